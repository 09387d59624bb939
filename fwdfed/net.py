"""Network facts both ends need."""

from __future__ import annotations

import ipaddress


def is_loopback(host: str) -> bool:
    """True for an address that never leaves this machine: plain ws:// is then acceptable."""
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
