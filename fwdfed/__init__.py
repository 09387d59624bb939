"""Pieces shared by every command-line entry point."""
