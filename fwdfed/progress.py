"""Progress bars with an ETA for long work (the export's stages, a device's local steps, the emulator's
devices, a job's rounds): tqdm, on stderr, only on a terminal.

`disable=None` makes tqdm turn itself off when its stream is not a TTY, so logs, CI and the tests, which
pipe or capture the output, see no bar and no change at all; `leave=False` clears a bar once its work is
done, so a terminal keeps the lines the commands print and not the bars.
"""

from __future__ import annotations

import sys


def progress(iterable=None, total: int | None = None, desc: str | None = None, unit: str = "it", file=None):
    """`iterable` with a bar (or, without one, a bar to `update()` by hand) on `file` (stderr by default),
    shown only when that stream is a terminal."""
    from tqdm import tqdm

    stream = file if file is not None else sys.stderr
    disable = None if hasattr(stream, "isatty") else True  # tqdm asks isatty(); a stream without one (None) is off
    return tqdm(iterable, total=total, desc=desc, unit=unit, file=stream, disable=disable, leave=False,
                dynamic_ncols=True)


def echo(bar, text: str) -> None:
    """print(text, end="", flush=True) with `bar` cleared and redrawn around it, so that a line the command
    prints does not land inside the bar; just the print when the bar is off."""
    if bar.disable:
        print(text, end="", flush=True)
        return
    with bar.external_write_mode():
        print(text, end="", flush=True)
