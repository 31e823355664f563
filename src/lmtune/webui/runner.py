"""Runs started from the browser: `lmtune train CONFIG` as a subprocess, stopped with SIGINT.

The command line is fixed here; the browser only chooses the config file (inside the working
folder, written by the form). Its output goes to `<output_dir>/train.log`, which the Monitor reads.
"""

from __future__ import annotations

import atexit
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

from lmtune.errors import UserError
from lmtune.runlock import running_pid
from lmtune.webui.monitor import LOG_NAME


class Runner:
    def __init__(self, root: Path):
        self.root = Path(root).resolve()
        self._runs: dict[Path, subprocess.Popen] = {}
        self._lock = threading.Lock()
        atexit.register(self.stop_all)

    def start(self, config_path: Path, run_dir: Path) -> subprocess.Popen:
        run_dir = Path(run_dir).resolve()
        with self._lock:
            if self.is_running(run_dir):
                raise UserError(f"a run is already writing to {run_dir}; stop it first")
            run_dir.mkdir(parents=True, exist_ok=True)
            command = [sys.executable, "-m", "lmtune", "train", str(Path(config_path).relative_to(self.root))]
            env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "160", "TERM": "dumb"}
            with (run_dir / LOG_NAME).open("a") as log:
                log.write(f"$ lmtune train {command[-1]}\n")
                log.flush()
                process = subprocess.Popen(command, cwd=self.root, stdout=log, stderr=subprocess.STDOUT,
                                           stdin=subprocess.DEVNULL, env=env)
            self._runs[run_dir] = process
            return process

    def is_running(self, run_dir: Path) -> bool:
        process = self._runs.get(Path(run_dir).resolve())
        return process is not None and process.poll() is None

    def stop(self, run_dir: Path) -> str:
        """SIGINT, as Ctrl-C in a terminal: the run finishes its step, writes a checkpoint and exits 130."""
        process = self._runs.get(Path(run_dir).resolve())
        if process is None or process.poll() is not None:
            pid = running_pid(run_dir)  # a run started elsewhere, e.g. in a terminal
            if pid is None:
                return "no run is writing to this folder"
            os.kill(pid, signal.SIGINT)
            return f"stop requested (SIGINT to pid {pid}): the run writes a resumable checkpoint and exits"
        process.send_signal(signal.SIGINT)
        return f"stop requested (SIGINT to pid {process.pid}): the run writes a resumable checkpoint and exits"

    def status(self, run_dir: Path) -> str | None:
        """The process's state, or None when this page started no run in the folder."""
        process = self._runs.get(Path(run_dir).resolve())
        if process is None:
            return None
        code = process.poll()
        if code is None:
            return f"running (pid {process.pid})"
        if code == 0:
            return "finished (exit code 0)"
        if code in (130, -signal.SIGINT, -signal.SIGTERM):
            return f"stopped (exit code {code}); resume it from the Train tab"
        if code == 2:
            return "refused to start (exit code 2): the log below says why"
        return f"failed (exit code {code}): the log below says why"

    def stop_all(self) -> None:
        for process in list(self._runs.values()):
            if process.poll() is None:
                process.send_signal(signal.SIGINT)
        for process in list(self._runs.values()):
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
