"""fwdfed.progress: a bar with the count on a terminal, nothing at all on a stream that is not one."""

from __future__ import annotations

import io

from fwdfed.progress import echo, progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_no_bar_off_a_terminal():
    stream = io.StringIO()
    assert list(progress(range(4), desc="local steps", unit="step", file=stream)) == [0, 1, 2, 3]
    bar = progress(total=3, desc="stages", file=stream)
    bar.update(2)
    bar.close()
    assert stream.getvalue() == ""


def test_a_bar_with_the_count_on_a_terminal():
    stream = Terminal()
    assert list(progress(range(4), desc="local steps", unit="step", file=stream)) == [0, 1, 2, 3]
    shown = stream.getvalue()
    assert "local steps" in shown and "0/4" in shown


def test_echo_prints_the_line_with_or_without_a_bar(capsys):
    for stream in (io.StringIO(), Terminal()):
        bar = progress(desc="rounds", file=stream)
        echo(bar, "round 1/2: ...\n")
        bar.close()
    assert capsys.readouterr().out == "round 1/2: ...\n" * 2
