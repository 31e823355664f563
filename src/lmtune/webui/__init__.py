"""`lmtune webui`: set up, start, watch, stop and resume runs in a browser.

It adds no training logic: the form writes a YAML config, Start runs `lmtune train CONFIG` as a
subprocess, Stop sends it SIGINT, and everything shown is read from the run folder, so a run
started from a terminal can be watched too. `form`, `monitor` and `runner` hold no gradio code.
"""

from __future__ import annotations

from lmtune.webui.form import parse_auth

__all__ = ["launch", "parse_auth"]


def launch(root, host: str = "127.0.0.1", port: int = 7860, auth: str | None = None) -> None:
    from lmtune.webui.app import serve

    serve(root, host, port, parse_auth(auth) if auth else None)
