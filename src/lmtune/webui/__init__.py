"""`lmtune webui`: set up, start, watch, stop and resume runs in a browser.

It adds no training logic: the form writes a YAML config, Start runs `lmtune train CONFIG` as a
subprocess, Stop sends it SIGINT, and everything shown is read from the run folder, so a run
started from a terminal can be watched too. `form`, `monitor` and `runner` hold no gradio code.
"""

from __future__ import annotations

from lmtune.webui.form import parse_auth

__all__ = ["parse_auth"]
