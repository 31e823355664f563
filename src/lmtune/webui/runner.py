"""Runs started from the browser: `lmtune train CONFIG` as a subprocess of its own session.

The command line is fixed here; the browser only chooses the config file (inside the working
folder, written by the form). Its output goes to `<output_dir>/train.log`, which the Monitor reads.
A run does not belong to the web UI: it has its own session, so that neither Ctrl-C in the web
UI's terminal nor the web UI's end (SIGINT or SIGTERM) reaches it; the Stop buttons send it SIGINT,
as Ctrl-C in its own terminal would, and a reopened web UI finds it again from its `train.pid`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from lmtune.errors import UserError
from lmtune.runlock import running_pid
from lmtune.webui import monitor as M


class Runner:
    def __init__(self, root: Path):
        self.root = Path(root).resolve()
        self._runs: dict[Path, subprocess.Popen] = {}
        self._started: dict[Path, float] = {}
        self._lock = threading.Lock()

    def pid(self, run_dir: Path) -> int | None:
        """The process writing to `run_dir` (started here or elsewhere), or None."""
        process = self._runs.get(Path(run_dir).resolve())
        return process.pid if process is not None and process.poll() is None else running_pid(run_dir)

    def check_free(self, run_dir: Path) -> None:
        """A UserError when a run (started here or elsewhere) is writing to `run_dir`."""
        run_dir = Path(run_dir).resolve()
        pid = self.pid(run_dir)
        if pid is not None:
            raise UserError(f"a run (pid {pid}) is already writing to {run_dir}; stop it first, or choose another "
                            "output_dir")

    def start(self, config_path: Path, run_dir: Path) -> subprocess.Popen:
        run_dir = Path(run_dir).resolve()
        with self._lock:
            self.check_free(run_dir)
            run_dir.mkdir(parents=True, exist_ok=True)
            command = [sys.executable, "-m", "lmtune", "train", str(Path(config_path).relative_to(self.root))]
            env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "160", "TERM": "dumb"}
            with (run_dir / M.LOG_NAME).open("a") as log:
                log.write(f"{M.START_LINE}{command[-1]}\n")
                log.flush()
                process = subprocess.Popen(command, cwd=self.root, stdout=log, stderr=subprocess.STDOUT,
                                           stdin=subprocess.DEVNULL, env=env, start_new_session=True)
            self._runs[run_dir], self._started[run_dir] = process, time.time()
        threading.Thread(target=self._record_exit, args=(process, run_dir), daemon=True).start()
        return process

    @staticmethod
    def _record_exit(process: subprocess.Popen, run_dir: Path) -> None:
        """The exit code at the end of train.log, so that a refused start is known after the web UI restarts."""
        code = process.wait()
        with (run_dir / M.LOG_NAME).open("a") as log:
            log.write(f"\n{M.EXIT_LINE}{code}\n")

    def stop(self, run_dir: Path) -> str:
        """SIGINT, as Ctrl-C in a terminal: the run finishes its step, writes a checkpoint and exits 130."""
        pid = self.pid(run_dir)
        if pid is None:
            return "no run is writing to this folder"
        os.kill(pid, signal.SIGINT)
        return f"stop requested (SIGINT to pid {pid}): the run writes a resumable checkpoint and exits"

    def state(self, run_dir: Path) -> M.RunState:
        """What the run folder says, with what only this web UI knows: a run still loading, an exit code."""
        files = M.run_state(run_dir)
        process = self._runs.get(Path(run_dir).resolve())
        if process is None or files.kind == M.RUNNING:
            return files
        code = process.poll()
        if code is None and M.run_updated(run_dir) < self._started[Path(run_dir).resolve()]:
            return M.RunState(M.STARTING, f"starting (pid {process.pid}): loading the model and the data")
        if code is None:  # its train.pid is gone: it is closing down
            return M.RunState(files.kind, f"{files.text}; its process (pid {process.pid}) is exiting")
        if code == 2:
            return M.RunState(M.FAILED, M.REFUSED)
        return M.RunState(files.kind, f"{files.text} (exit code {code})")
