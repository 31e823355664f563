"""`lmtune webui`: set up, start, watch, stop and resume runs in a browser.

It adds no training logic: the form writes a YAML config into the run folder, Start runs
`lmtune train CONFIG` as a process of its own (it outlives the page and the server), Stop sends it
SIGINT, and everything shown is read from the run folders, so a run started from a terminal can be
watched too. One module a tab (`train_tab`, `monitor_tab`, `chat_tab`), put together in `app`;
`form`, `monitor` and `runner` hold no gradio code.
"""

from __future__ import annotations

from lmtune.webui.form import parse_auth

__all__ = ["parse_auth"]
