"""Memory budgets as people write them, and the process's measured peak.

`parse_size("1.5GB")` understands decimal (KB, MB, GB: powers of 1000) and binary (KiB, MiB,
GiB: powers of 1024) units and plain byte counts. The peak is the kernel's own high-water
mark of resident memory (VmHWM), which counts native allocations that Python cannot see.
"""

from __future__ import annotations

import re

UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
         "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*$")


def parse_size(text: str) -> int:
    """Bytes in a size like '1.5GB', '1500MB', '800MiB' or '1073741824'; ValueError otherwise."""
    match = _SIZE.match(str(text))
    unit = match.group(2).upper() if match else None
    if not match or unit not in UNITS:
        raise ValueError(f"cannot read memory size {text!r}: use a number with a unit such as 1.5GB, 1500MB or 800MiB")
    size = int(float(match.group(1)) * UNITS[unit])
    if size <= 0:
        raise ValueError(f"memory size {text!r} must be positive")
    return size


def format_size(n: int) -> str:
    return f"{n / 2**20:.0f} MiB" if n < 2**30 else f"{n / 2**30:.2f} GiB"


def status_field(name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(name + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {name}")


def peak_rss() -> int:
    """The process's peak resident memory so far, in bytes (the kernel's VmHWM)."""
    return status_field("VmHWM")


def current_rss() -> int:
    return status_field("VmRSS")


def reset_peak() -> None:
    """Make VmHWM restart from the current RSS (Linux: clear_refs 5), so a phase's peak is its own.
    OSError where the kernel does not allow it."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
