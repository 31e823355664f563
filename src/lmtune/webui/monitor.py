"""The Monitor tab's content, read from the run folder alone (run_config.yaml, metrics.jsonl,
checkpoints.json, train.log), so that a run started from a terminal can be watched too.

No gradio here: each function returns Markdown or HTML text.
"""

from __future__ import annotations

import html
import json
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lmtune.callbacks import format_duration
from lmtune.checkpoint import CheckpointIndex
from lmtune.runlock import PID_FILE, running_pid
from lmtune.webui.form import is_run_folder

LOG_NAME = "train.log"
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
_cache: dict[str, tuple[tuple[int, int], list[dict[str, Any]]]] = {}


@dataclass
class RunView:
    """What the run folder says now."""

    run_dir: Path
    config: dict[str, Any]
    train: list[dict[str, Any]] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    # whether the newest train row was written by the run's newest process (not by one before a resume)
    newest_process_logged: bool = True

    @property
    def last(self) -> dict[str, Any] | None:
        return self.train[-1] if self.train else None


def metrics_stamp(run_dir: Path) -> str:
    """Changes whenever metrics.jsonl does."""
    try:
        stat = (Path(run_dir) / "metrics.jsonl").stat()
    except OSError:
        return ""
    return f"{stat.st_size}:{stat.st_mtime_ns}"


def read_rows(run_dir: Path) -> list[dict[str, Any]]:
    """metrics.jsonl, re-read only when it changed; a half-written last line is skipped."""
    path = Path(run_dir) / "metrics.jsonl"
    try:
        stat = path.stat()
    except OSError:
        return []
    key, stamp = str(path.resolve()), (stat.st_size, stat.st_mtime_ns)
    if key in _cache and _cache[key][0] == stamp:
        return _cache[key][1]
    rows = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    _cache[key] = (stamp, rows)
    return rows


def _latest_per_step(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    by_step = {row["step"]: row for row in rows if isinstance(row.get("step"), int)}
    return [by_step[step] for step in sorted(by_step)]


def read_config(run_dir: Path) -> dict[str, Any]:
    """The run's run_config.yaml ({} before the run wrote it)."""
    try:
        config = yaml.safe_load((Path(run_dir) / "run_config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return config if isinstance(config, dict) else {}


def read_run(run_dir: Path) -> RunView:
    run_dir = Path(run_dir)
    config = read_config(run_dir)
    rows = read_rows(run_dir)
    return RunView(
        run_dir, config,
        train=_latest_per_step([r for r in rows if r.get("type") == "train" and "loss" in r]),
        evals=_latest_per_step([r for r in rows if r.get("type") == "eval" and "eval_loss" in r]),
        events=[r for r in rows if r.get("type") == "event"],
        newest_process_logged=_newest_process_logged(run_dir, rows),
    )


def _newest_process_logged(run_dir: Path, rows: list[dict[str, Any]]) -> bool:
    """False while a resumed run has not logged a step yet: it is loading (its train.pid is newer than
    metrics.jsonl), or its resume event is the newest row after the last step."""
    last_train = max((i for i, r in enumerate(rows) if r.get("type") == "train"), default=-1)
    last_resume = max((i for i, r in enumerate(rows) if r.get("event") == "resume"), default=-1)
    try:
        started_after_rows = (Path(run_dir) / PID_FILE).stat().st_mtime > (Path(run_dir) / "metrics.jsonl").stat(
        ).st_mtime
    except OSError:
        started_after_rows = False
    return last_train > last_resume and not started_after_rows


def total_steps(view: RunView) -> int | None:
    """The run's length: max_steps, or the epochs times the steps per epoch seen in the rows."""
    if view.config.get("max_steps"):
        return int(view.config["max_steps"])
    last, epochs = view.last, view.config.get("num_train_epochs")
    if last and last.get("epoch") and epochs:
        per_epoch = round(last["step"] / last["epoch"])
        return math.ceil(float(epochs) * per_epoch - 1e-9) if per_epoch else None
    return None


def _number(value: Any) -> str:
    return f"{value:,}" if isinstance(value, int) else "-"


def lr_text(value: float | None) -> str:
    return "-" if value is None else f"{value:.2e}"


def progress_markdown(view: RunView, state: RunState) -> str:
    """State, steps, samples, tokens, ETA (while running), loss and learning rate."""
    lines = [f"**{_markdown_safe(str(view.run_dir))}**: {state.text}"]
    last = view.last
    if last is None:
        lines.append("no training step logged yet")
        return "\n\n".join(lines)
    total = total_steps(view)
    # a stop's checkpoint can be one step past the last logged row: the step is the furthest the run got
    step = max([last["step"]] + [row["step"] for row in view.events if isinstance(row.get("step"), int)])
    share = f" ({100 * step / total:.0f}%)" if total else ""
    epoch = f" · epoch {last['epoch']:.2f}" if last.get("epoch") is not None else ""
    if last.get("stream_pass") is not None:
        epoch += f"{' (estimated)' if last.get('epoch_estimated') else ''} · pass {last['stream_pass']}"
    eta = f" · ETA {format_duration(last.get('eta_s'))}" if state.kind == RUNNING and view.newest_process_logged \
        else ""
    lines.append(
        f"step **{step}** / {total or '?'}{share}{epoch} · samples {_number(last.get('samples_seen'))} · "
        f"tokens {_number(last.get('tokens_seen'))} · elapsed {format_duration(last.get('elapsed_s'))}{eta}"
    )
    loss = f"loss {last['loss']:.4f}"
    if view.evals:
        loss += f" · eval loss {view.evals[-1]['eval_loss']:.4f} (step {view.evals[-1]['step']})"
    speed = f" · {last['tokens_per_s']:.0f} tokens/s" if isinstance(last.get("tokens_per_s"), int | float) else ""
    lines.append(f"{loss} · learning rate **{lr_text(last.get('lr'))}**{speed}")
    return "\n\n".join(lines)


# --- what state a run is in, from its folder --------------------------------------------------

RUNNING, STARTING, STOPPED, FINISHED, FAILED = "running", "starting", "stopped", "finished", "failed"
NOT_A_RUN = "not a run"
REFUSED = "refused to start (exit code 2): train.log says why"
START_LINE, EXIT_LINE = "$ lmtune train ", "$ exit code "  # what the web UI writes to train.log at a start, an end


@dataclass
class RunState:
    kind: str  # RUNNING, STARTING, STOPPED, FINISHED, FAILED or NOT_A_RUN
    text: str  # what the Monitor says, e.g. "stopped: resumable from checkpoint-12"


def run_state(run_dir: Path) -> RunState:
    """Running while train.pid names a live lmtune process; otherwise what its newest checkpoint says: a
    final save is finished, a save on SIGINT / SIGTERM is stopped, anything else ended without either."""
    run_dir = Path(run_dir)
    pid = running_pid(run_dir)
    if pid is not None:
        return RunState(RUNNING, f"running (pid {pid})")
    if not is_run_folder(run_dir):
        return RunState(NOT_A_RUN, "not a run folder (no run_config.yaml, metrics.jsonl, checkpoints.json or "
                                   f"{LOG_NAME} in it): choose a run, or start one on the Train tab")
    if exit_code(run_dir) == 2 and (run_dir / LOG_NAME).stat().st_mtime >= run_updated(run_dir):
        return RunState(FAILED, REFUSED)
    index = CheckpointIndex.load(run_dir) if run_dir.is_dir() else None
    written = sorted((e for e in index.entries if e.get("status") != "incomplete"), key=lambda e: e["step"]) \
        if index else []
    resumable = index.complete_newest_first() if index else []
    reasons = written[-1].get("reasons", []) if written else []
    if "final" in reasons:
        return RunState(FINISHED, f"finished at step {written[-1]['step']}")
    resume = (f"resumable from {resumable[0].name}" if resumable else "no checkpoint to resume from")
    if "signal" in reasons:
        return RunState(STOPPED, f"stopped at step {written[-1]['step']}: {resume}")
    return RunState(FAILED, f"failed or killed (no final or stop checkpoint; train.log says why): {resume}")


def launched_config(run_dir: Path) -> str | None:
    """The config file (relative to the working folder) of the newest start from the web UI, from train.log."""
    path = Path(run_dir) / LOG_NAME
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return None
    starts = [line.removeprefix(START_LINE).strip() for line in lines if line.startswith(START_LINE)]
    return starts[-1] if starts else None


def exit_code(run_dir: Path) -> int | None:
    """The exit code of the newest start from the web UI, once it ended (as its train.log records)."""
    path = Path(run_dir) / LOG_NAME
    try:
        with path.open("rb") as handle:
            handle.seek(max(0, path.stat().st_size - 4096))
            tail = handle.read().decode(errors="replace")
    except OSError:
        return None
    for line in reversed(tail.splitlines()):
        if line.startswith(EXIT_LINE):
            return int(line.removeprefix(EXIT_LINE)) if line.removeprefix(EXIT_LINE).lstrip("-").isdigit() else None
        if line.startswith(START_LINE):
            return None
    return None


def run_updated(run_dir: Path) -> float:
    """When the run last wrote to its folder (train.log aside: the web UI writes to it too)."""
    times = [(Path(run_dir) / name).stat().st_mtime for name in ("metrics.jsonl", "checkpoints.json",
                                                                 "run_config.yaml")
             if (Path(run_dir) / name).is_file()]
    return max(times, default=0.0)


def runs_html(root: Path, runs: list[str]) -> str:
    """Every run of the working folder with its state, newest first."""
    if not runs:
        return "<p>No run in the working folder yet: start one on the Train tab or with lmtune train.</p>"
    rows = []
    for run in runs:
        state = run_state(Path(root) / run)
        updated = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(run_updated(Path(root) / run)))
        rows.append(f'<tr class="run-{state.kind}"><td>{html.escape(run)}</td><td>{state.kind}</td>'
                    f"<td>{html.escape(state.text)}</td><td>{updated}</td></tr>")
    header = "".join(f"<th>{name}</th>" for name in ("run folder", "state", "what its folder says", "last written"))
    return f'<table class="lmtune-runs"><thead><tr>{header}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def event_text(row: dict[str, Any]) -> str:
    if row.get("event") == "save" and "signal" in (row.get("reasons") or []):
        return f"step {row.get('step', '?')}: stopped (SIGINT or SIGTERM); saved {row.get('path', 'a checkpoint')}"
    parts = [f"step {row.get('step', '?')}: {row.get('event', 'event')}"]
    if "lr_old" in row or "lr_new" in row:
        parts.append(f"learning rate: {lr_text(row.get('lr_old'))} -> {lr_text(row.get('lr_new'))}")
    for key, value in row.items():
        if key in ("type", "event", "step", "lr_old", "lr_new") or value in (None, "", [], {}):
            continue
        parts.append(f"{key}: {_plain(value)}")
    return " · ".join(parts)


def _plain(value: Any) -> str:
    """A list or mapping of an event as words: `a; b`, `saved 1, now 2`."""
    if isinstance(value, list):
        return "; ".join(_plain(v) for v in value)
    if isinstance(value, dict):
        return ", ".join(f"{k} {_plain(v)}" for k, v in value.items())
    return str(value)


def page_of(items: list, page: Any, size: int) -> tuple[list, int, int]:
    """Items (newest first) on page `page` (1 = newest) of `size` each; the page shown and the page count."""
    pages = max(1, math.ceil(len(items) / size))
    try:
        page = min(max(1, int(page or 1)), pages)
    except (TypeError, ValueError):
        page = 1
    return items[(page - 1) * size: page * size], page, pages


def is_routine(row: dict[str, Any]) -> bool:
    """A save or a rotation, which a run writes every few steps (a save on a stop is not routine)."""
    return row.get("event") == "rotation" or (row.get("event") == "save" and "signal" not in (row.get("reasons") or []))


def events_markdown(view: RunView, page: Any = 1, size: int = 10, routine: bool = False) -> str:
    """The run's events, newest first, in pages; saves and rotations only with `routine`, so that they
    do not push resumes and stops off the first page."""
    events = [row for row in view.events if routine or not is_routine(row)]
    if not events:
        return "no events yet (resumes, stops and, if chosen, saves and rotations of the run appear here)"
    shown, page, pages = page_of(events[::-1], page, size)
    lines = [f"- {_markdown_safe(event_text(row))}" for row in shown]
    return "\n".join(lines) + f"\n\npage {page} of {pages} ({len(events)} events, newest first)"


def _markdown_safe(text: str) -> str:
    """Text from the run folder shown as Markdown: no HTML tags, arrows kept readable."""
    return text.replace("&", "&amp;").replace("<", "&lt;")


# --- the plots ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlotSpec:
    """One plot of the Monitor: the series it draws, each a key of the train or eval rows of metrics.jsonl."""

    name: str
    title: str
    y_title: str
    series: tuple[tuple[str, str, str], ...]  # (label, row type, key)


PLOTS = (
    PlotSpec("loss", "loss", "loss", (("train loss", "train", "loss"), ("eval loss", "eval", "eval_loss"))),
    PlotSpec("lr", "learning rate", "learning rate", (("learning rate", "train", "lr"),)),
    PlotSpec("grad-norm", "gradient norm (before clipping)", "grad norm", (("grad norm", "train", "grad_norm"),)),
    PlotSpec("speed", "throughput", "tokens/s", (("trained tokens/s", "train", "tokens_per_s"),)),
    PlotSpec("memory", "process memory (peak)", "MB", (("peak memory", "train", "mem_peak_mb"),)),
    PlotSpec("gpu-memory", "GPU memory", "MB", (("allocated", "train", "gpu_mem_allocated_mb"),
                                                ("reserved", "train", "gpu_mem_reserved_mb"),
                                                ("peak", "train", "gpu_mem_peak_mb"))),
    PlotSpec("rewards", "rewards (dpo, kto)", "reward", (
        ("chosen", "train", "rewards/chosen"), ("rejected", "train", "rewards/rejected"),
        ("margin", "train", "rewards/margins"), ("eval margin", "eval", "eval_rewards/margins"))),
    PlotSpec("accuracy", "reward accuracy (dpo)", "accuracy", (
        ("accuracy", "train", "rewards/accuracies"), ("eval accuracy", "eval", "eval_rewards/accuracies"))),
    PlotSpec("rm", "reward model (rm)", "accuracy / margin", (
        ("accuracy", "train", "accuracy"), ("eval accuracy", "eval", "eval_accuracy"), ("margin", "train", "margin"))),
    PlotSpec("reward", "reward (grpo)", "reward", (("reward", "train", "reward"), ("reward std", "train", "reward_std"),
                                                  ("groups with no reward spread", "train",
                                                   "frac_reward_zero_std"))),
    PlotSpec("completion-length", "completion length (grpo)", "tokens", (
        ("mean length", "train", "completions/mean_length"),)),
    PlotSpec("generation", "generation speed (grpo)", "tokens/s", (
        ("generated tokens/s", "train", "generated_tokens_per_s"),)),
)
SERIES_COLOURS = ("#2563eb", "#ea580c", "#16a34a", "#9333ea")
RESUMED, STOPPED = "resumed", "stopped"  # the vertical lines drawn at each resume and each stop
MARKER_COLOURS = {RESUMED: "#6b7280", STOPPED: "#dc2626"}


def series_colours(spec: PlotSpec) -> dict[str, str]:
    """Every series a plot can draw, with its colour. A plot always has them all (gradio's plot keeps the
    series of its first drawing), those not logged as empty series."""
    colours = {label: SERIES_COLOURS[i % len(SERIES_COLOURS)] for i, (label, _, _) in enumerate(spec.series)}
    return {**colours, **MARKER_COLOURS}


def markers(view: RunView) -> list[tuple[int, str]]:
    """(step, RESUMED or STOPPED) for each resume and each stop (a save on SIGINT or SIGTERM) of the run."""
    found = []
    for row in view.events:
        if not isinstance(row.get("step"), int):
            continue
        if row.get("event") == "resume":
            found.append((row["step"], RESUMED))
        elif row.get("event") == "save" and "signal" in (row.get("reasons") or []):
            found.append((row["step"], STOPPED))
    return found


def plot_points(view: RunView, spec: PlotSpec) -> list[tuple[float, float | None, str]] | None:
    """(step, value, series) of `spec`'s series logged so far (None: none yet), a series not logged as one
    empty point, and a vertical line across the values at each resume and stop: up and down again at its
    step, so that the lines of one kind join only along the bottom edge."""
    rows = {"train": view.train, "eval": view.evals}
    points: list[tuple[float, float | None, str]] = [
        (row["step"], float(row[key]), label) for label, kind, key in spec.series for row in rows[kind]
        if _finite(row.get(key))]
    if not points:
        return None
    low, high = min(p[1] for p in points), max(p[1] for p in points)
    first, last = min(p[0] for p in points), max(p[0] for p in points)
    for step, name in markers(view):
        if first <= step <= last:
            points += [(step, low, name), (step, high, name), (step, low, name)]
    drawn = {p[2] for p in points}
    points += [(first, None, name) for name in series_colours(spec) if name not in drawn]
    return points


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


# --- checkpoints and log ------------------------------------------------------------------------


def _size(value: Any) -> str:
    if not isinstance(value, int | float):
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1000:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} TB"


def _metric(metrics: dict[str, Any], key: str) -> str:
    value = (metrics or {}).get(key)
    return f"{value:.4f}" if isinstance(value, int | float) else "-"


def checkpoints_html(run_dir: Path, page: Any = 1, size: int = 12) -> str:
    """checkpoints.json (and incomplete folders) as a table, newest first, `size` rows a page: kept,
    deleted, best, incomplete."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return "<p>No run folder yet.</p>"
    index = CheckpointIndex.load(run_dir)
    if not index.entries:
        return "<p>No checkpoint yet: checkpoints.json lists them as they are written.</p>"
    entries = sorted(index.entries, key=lambda e: e["step"], reverse=True)
    counts = {status: sum(e.get("status") == status for e in entries) for status in ("kept", "deleted", "incomplete")}
    limit = "null (keep all)" if index.save_total_limit is None else index.save_total_limit
    shown, page, pages = page_of(entries, page, size)
    summary = (f"<p>{counts['kept']} kept, {counts['deleted']} deleted, {counts['incomplete']} incomplete; "
               f"save_total_limit {limit}; page {page} of {pages}, newest first</p>")
    best = read_config(run_dir).get("metric_for_best_model")
    best = best if best not in (None, "loss", "eval_loss") else None  # the best checkpoint's metric, as a column
    names = ["step", "epoch", "reasons", "loss", "eval loss", *([best] if best else []), "size", "status"]
    header = "".join(f"<th>{html.escape(name)}</th>" for name in names)
    rows = []
    for e in shown:
        status = e.get("status", "?") + (" best" if e.get("best") else "")
        epoch = f"{e['epoch']:.3f}" if isinstance(e.get("epoch"), int | float) else "-"
        cells = [str(e["step"]), epoch, ",".join(e.get("reasons", [])), _metric(e.get("metrics"), "loss"),
                 _metric(e.get("metrics"), "eval_loss"), *([_metric(e.get("metrics"), best)] if best else []),
                 _size(e.get("size_bytes")), status]
        rows.append(f'<tr class="ckpt-{html.escape(e.get("status", ""))}">'
                    + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
    return (f'{summary}<table class="lmtune-checkpoints"><thead><tr>{header}</tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table>')


def log_tail(run_dir: Path, lines: int = 30) -> str:
    """The end of train.log (what `lmtune train` printed); without one, the last metrics rows."""
    path = Path(run_dir) / LOG_NAME
    if path.is_file():
        with path.open("rb") as handle:
            handle.seek(max(0, path.stat().st_size - 64_000))
            text = ANSI.sub("", handle.read().decode(errors="replace"))
        # a progress bar rewrites its line with carriage returns: keep what the line shows last
        shown = [([part for part in line.split("\r") if part.strip()] or [""])[-1].rstrip()
                 for line in text.split("\n")]
        return "\n".join([line for line in shown if line][-lines:])
    rows = read_rows(run_dir)[-lines:]
    if not rows:
        return f"no {LOG_NAME} and no metrics.jsonl in {run_dir} yet"
    return "\n".join(json.dumps(row) for row in rows)
