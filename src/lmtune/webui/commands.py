"""`lmtune eval` and `lmtune export` run from the browser, as the Train tab runs `lmtune train`: the page
only chooses the arguments (each checked to lie inside the working folder), and the command is the CLI's,
run as a subprocess in the working folder, so the browser and the terminal measure and write the same.

No gradio here: the Eval and Export tabs (`eval_tab`, `export_tab`) show what these return.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from lmtune.config import BUILTIN_MODEL
from lmtune.errors import UserError
from lmtune.webui import form as F


@dataclass
class Finished:
    code: int
    stdout: str
    stderr: str


def run_lmtune(root: Path, args: list[str], tick: float = 0.5) -> Iterator[float | Finished]:
    """Run `lmtune ARGS` in the working folder: yields the seconds it has run while it runs, then how it
    ended. Closing the iterator (the page went away) ends the command."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "160", "TERM": "dumb"}
    process = subprocess.Popen([sys.executable, "-m", "lmtune", *args], cwd=root, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env=env, text=True)
    output: dict[str, str] = {}
    reader = threading.Thread(target=lambda: output.update(zip(("stdout", "stderr"), process.communicate(),
                                                                strict=True)), daemon=True)
    started = time.monotonic()
    reader.start()
    try:
        while reader.is_alive():
            reader.join(tick)
            yield time.monotonic() - started
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    yield Finished(process.returncode, output.get("stdout", ""), output.get("stderr", ""))


def failure(done: Finished) -> str:
    """What a failed command said: its error lines (exit 2: the message that names the fix)."""
    lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower()] or lines[-8:]
    return f"exit code {done.code}: " + "\n".join(errors)


# --- eval -------------------------------------------------------------------------------------------


RUN_MODEL = ""  # the run's own model: its final model, as `lmtune eval RUN` measures
EVAL_SPLIT = ""  # the run's eval split, as `lmtune eval RUN` measures


def run_config(root: Path, run: str) -> dict[str, Any]:
    folder = F.inside(root, run, "run")
    path = folder / "run_config.yaml"
    if not path.is_file():
        raise UserError(f"run '{run}' has no run_config.yaml: it is not a run folder (or it has not started)")
    return yaml.safe_load(path.read_text()) or {}


def eval_model_choices(root: Path, run: str) -> list[tuple[str, str]]:
    """The run's own model first, then its checkpoints, then every other model of the working folder."""
    choices = [("the run's final model", RUN_MODEL)]
    run = (run or "").strip().rstrip("/")
    mine = [c for c in F.chat_choices(root) if run and (c[1] == run or c[1].startswith(run + "/"))]
    return choices + mine + [c for c in F.chat_choices(root) if c not in mine]


def eval_dataset_choices(root: Path, run: str) -> list[tuple[str, str]]:
    """The run's eval split, then the data sets of the run's dataset_dir."""
    choices = [("the run's eval split (val_size)", EVAL_SPLIT)]
    try:
        dataset_dir = run_config(root, run).get("dataset_dir") or "data"
    except UserError:
        return choices
    return choices + F.dataset_choices(root, dataset_dir)


def eval_args(root: Path, run: str, model: str, dataset: str) -> list[str]:
    """`lmtune eval`'s arguments; every path checked to lie inside the working folder."""
    if not (run or "").strip():
        raise UserError("run: pick the run to evaluate (its config says which data and template)")
    config = run_config(root, run)
    args = ["eval", F.relative(root, F.inside(root, run, "run"))]
    if (model or "").strip():
        args += ["--checkpoint", model_arg(root, model)]
    if (dataset or "").strip():
        args += ["--dataset", _dataset_inside(root, dataset.strip(), config.get("dataset_dir") or "data")]
    return args


def _dataset_inside(root: Path, name: str, dataset_dir: str) -> str:
    """A name of the run's dataset_info.json, or a data file inside the working folder."""
    folder = F.inside(root, dataset_dir, "dataset_dir")
    if name in F.dataset_registry(folder):
        return name
    for candidate in (folder / name, Path(name)):
        if F.inside(root, candidate, "dataset").is_file():
            return name
    raise UserError(f"dataset '{name}' is neither a name in {dataset_dir}/dataset_info.json nor a data file in the "
                    "working folder")


def model_arg(root: Path, value: str) -> str:
    """A model, run or checkpoint as the command takes it: relative to the working folder it runs in."""
    target = F.chat_target(root, value)
    return target if target == BUILTIN_MODEL else F.relative(root, Path(target))


def eval_report(done: Finished) -> dict[str, Any]:
    return json.loads(done.stdout)


def report_markdown(report: dict[str, Any]) -> str:
    """The numbers of an eval report as a table, what was measured above it."""
    model, data = report.get("model", {}), report.get("data", {})
    step = f", step {model['step']}" if model.get("step") is not None else ""
    lines = [f"**{model.get('kind', 'model')}** `{model.get('path')}`{step} on **{', '.join(data.get('dataset', []))}**"
             f" ({data.get('split')})", "", "| measure | value |", "|---|---|"]
    for key, value in report.items():
        if isinstance(value, int | float) and not isinstance(value, bool):
            lines.append(f"| {key} | {value:.4f} |" if isinstance(value, float) else f"| {key} | {value} |")
    return "\n".join(lines)


# --- export -----------------------------------------------------------------------------------------


def export_folder_for(source: str) -> str:
    """Where an export goes unless the user says otherwise: exports/<the source, slashes as dashes>."""
    name = (source or "").strip().strip("/").replace("/", "-") or "model"
    return f"exports/{name}"


def export_args(root: Path, source: str, out: str, dtype: str, gguf: bool, max_shard_size: str) -> list[str]:
    """`lmtune export`'s arguments; the source and the new folder checked to lie inside the working folder.
    dtype, the shard size and an existing folder are checked by the command itself (exit 2)."""
    if not (source or "").strip():
        raise UserError("source: pick a run, checkpoint or model folder to export")
    folder = F.inside(root, out, "out")
    if folder == Path(root).resolve():
        raise UserError("out: choose a new folder inside the working folder, not the working folder itself")
    args = ["export", model_arg(root, source), "--out", F.relative(root, folder), "--dtype", dtype,
            "--max-shard-size", (max_shard_size or "").strip() or "5GB"]
    return args + (["--gguf"] if gguf else [])


def files_markdown(root: Path, out: str) -> str:
    folder = F.inside(root, out, "out")
    rows = ["| file | size |", "|---|---|"]
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rows.append(f"| {path.relative_to(folder).as_posix()} | {_size(path.stat().st_size)} |")
    return f"written to `{F.relative(root, folder)}`:\n\n" + "\n".join(rows)


def _size(count: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if count < 1024 or unit == "GB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return str(count)
