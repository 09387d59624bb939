"""The page: one HTML template with the package's own script and style, and plotly.js from the
`plotly` package (no CDN). Served, the page loads them as files and follows the job live; as a
static file, everything, the state included, is inlined into one HTML document."""

from __future__ import annotations

import functools
import html
from importlib import resources
from pathlib import Path

STATIC = resources.files("coordinator.dashboard") / "static"
ASSETS = {"dashboard.js": "text/javascript", "dashboard.css": "text/css", "plotly.min.js": "text/javascript"}


@functools.cache
def asset(name: str) -> bytes:
    """A file the page loads; plotly.min.js is the copy the plotly package ships."""
    if name == "plotly.min.js":
        from plotly.offline import get_plotlyjs

        return get_plotlyjs().encode()
    return (STATIC / name).read_bytes()


def template() -> str:
    return (STATIC / "index.html").read_text()


def served_page(title: str) -> str:
    head = '<link rel="stylesheet" href="static/dashboard.css">'
    scripts = '<script src="static/plotly.min.js"></script>\n<script src="static/dashboard.js"></script>'
    return fill(title, head, scripts)


def static_page(title: str, state_json: str) -> str:
    """One self-contained document: the state at the time of writing, no live updates."""
    head = f"<style>\n{asset('dashboard.css').decode()}\n</style>"
    scripts = (f'<script type="application/json" id="snapshot">{in_script(state_json)}</script>\n'
               f"<script>{in_script(asset('plotly.min.js').decode())}</script>\n"
               f"<script>{in_script(asset('dashboard.js').decode())}</script>")
    return fill(title, head, scripts)


def in_script(text: str) -> str:
    """Text safe inside a script element: "</" would end it early, and "<\\/" means the same in
    JavaScript strings and regular expressions, and in JSON strings."""
    return text.replace("</", "<\\/")


def fill(title: str, head: str, scripts: str) -> str:
    return (template().replace("{{title}}", html.escape(title)).replace("{{head}}", head)
            .replace("{{scripts}}", scripts))


def write_static(state: dict, out: Path) -> Path:
    from coordinator.dashboard.snapshot import encode

    text, _ = encode(state)
    out.write_text(static_page(f"job {state['job']['id']}", text))
    return out

