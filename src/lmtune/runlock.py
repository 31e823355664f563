"""`train.pid` in a run folder while a run writes to it: one writer at a time, and a process others can
stop (the web UI sends it SIGINT, as Ctrl-C would)."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

from lmtune.errors import UserError

PID_FILE = "train.pid"


def running_pid(run_dir: Path) -> int | None:
    """The pid of the lmtune process writing to `run_dir` on this machine, if it is alive."""
    path = Path(run_dir) / PID_FILE
    try:
        owner = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    pid = owner.get("pid")
    if owner.get("host") != socket.gethostname() or not isinstance(pid, int):
        return None
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None  # the process is gone: a stale file from a run that was killed
    return pid if b"lmtune" in command else None


def check_not_running(run_dir: Path) -> None:
    other = running_pid(run_dir)
    if other is not None and other != os.getpid():
        raise UserError(f"another run (pid {other}) is writing to {run_dir}; stop it first, or choose another "
                        "output_dir")


class RunLock:
    """Held by the main process for as long as the run writes to its folder."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / PID_FILE

    def __enter__(self) -> RunLock:
        check_not_running(self.path.parent)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
        return self

    def __exit__(self, *exc: object) -> None:
        self.path.unlink(missing_ok=True)
