"""The user-error base every package's errors derive from.

A user error (a bad path, a bad flag value, an unreachable server, a corrupt file) is reported
by every entry point as one line starting with `error:` and exit status 2 (`fwdfed.cli.run_main`);
a traceback means a bug. Each package names its own kinds (BundleError, DataError, ...).
"""

from __future__ import annotations


class UserError(Exception):
    """An error caused by the user's input or environment; the message is meant for the user."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message, for a one-line error built on a library's."""
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0]
