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
from lmtune.runlock import running_pid

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

    @property
    def last(self) -> dict[str, Any] | None:
        return self.train[-1] if self.train else None


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


def read_run(run_dir: Path) -> RunView:
    run_dir = Path(run_dir)
    config: dict[str, Any] = {}
    config_path = run_dir / "run_config.yaml"
    if config_path.is_file():
        try:
            config = yaml.safe_load(config_path.read_text()) or {}
        except yaml.YAMLError:
            config = {}
    rows = read_rows(run_dir)
    return RunView(
        run_dir, config,
        train=_latest_per_step([r for r in rows if r.get("type") == "train" and "loss" in r]),
        evals=_latest_per_step([r for r in rows if r.get("type") == "eval" and "eval_loss" in r]),
        events=[r for r in rows if r.get("type") == "event"],
    )


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
    step = last["step"]
    share = f" ({100 * step / total:.0f}%)" if total else ""
    epoch = f" · epoch {last['epoch']:.2f}" if last.get("epoch") is not None else ""
    if last.get("stream_pass") is not None:
        epoch += f"{' (estimated)' if last.get('epoch_estimated') else ''} · pass {last['stream_pass']}"
    eta = f" · ETA {format_duration(last.get('eta_s'))}" if state.kind == RUNNING else ""
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

RUNNING, STOPPED, FINISHED, FAILED = "running", "stopped", "finished", "failed"


@dataclass
class RunState:
    kind: str  # RUNNING, STOPPED, FINISHED or FAILED
    text: str  # what the Monitor says, e.g. "stopped: resumable from checkpoint-12"


def run_state(run_dir: Path) -> RunState:
    """Running while train.pid names a live lmtune process; otherwise what its newest checkpoint says: a
    final save is finished, a save on SIGINT / SIGTERM is stopped, anything else ended without either."""
    run_dir = Path(run_dir)
    pid = running_pid(run_dir)
    if pid is not None:
        return RunState(RUNNING, f"running (pid {pid})")
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
        shown = "; ".join(str(v) for v in value) if isinstance(value, list) else value
        parts.append(f"{key}: {shown}")
    return " · ".join(parts)


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


# --- the chart ----------------------------------------------------------------------------------

WIDTH, HEIGHT, LEFT, RIGHT, TOP, BOTTOM = 720, 280, 60, 20, 28, 36
TRAIN_COLOUR, EVAL_COLOUR = "#2563eb", "#ea580c"


def _ticks(low: float, high: float, count: int = 5) -> list[float]:
    if high <= low:
        return [low]
    return [low + (high - low) * i / (count - 1) for i in range(count)]


def chart_html(view: RunView) -> str:
    """Train loss (line) and eval loss (line and dots) against the step, as an inline SVG."""
    train = [(r["step"], float(r["loss"])) for r in view.train if _finite(r["loss"])]
    evals = [(r["step"], float(r["eval_loss"])) for r in view.evals if _finite(r["eval_loss"])]
    counts = f'data-train-points="{len(train)}" data-eval-points="{len(evals)}"'
    if not train and not evals:
        return (f'<div class="lmtune-chart" {counts}><p>No loss logged yet: the chart fills in as the run writes '
                "metrics.jsonl.</p></div>")
    points = train + evals
    x_low, x_high = min(p[0] for p in points), max(p[0] for p in points)
    y_low, y_high = min(p[1] for p in points), max(p[1] for p in points)
    margin = (y_high - y_low) * 0.05 or 0.5
    y_low, y_high = y_low - margin, y_high + margin
    x_span = max(x_high - x_low, 1)

    def x(step: float) -> float:
        return LEFT + (step - x_low) / x_span * (WIDTH - LEFT - RIGHT)

    def y(value: float) -> float:
        return TOP + (y_high - value) / (y_high - y_low) * (HEIGHT - TOP - BOTTOM)

    parts = [f'<rect x="{LEFT}" y="{TOP}" width="{WIDTH - LEFT - RIGHT}" height="{HEIGHT - TOP - BOTTOM}" '
             'fill="none" stroke="#9ca3af"/>']
    for value in _ticks(y_low, y_high):
        parts.append(f'<line x1="{LEFT - 4}" x2="{WIDTH - RIGHT}" y1="{y(value):.1f}" y2="{y(value):.1f}" '
                     'stroke="#e5e7eb"/>')
        parts.append(f'<text x="{LEFT - 8}" y="{y(value) + 4:.1f}" text-anchor="end" font-size="11" '
                     f'fill="currentColor">{value:.3g}</text>')
    for step in sorted({round(s) for s in _ticks(x_low, x_high)}):
        parts.append(f'<text x="{x(step):.1f}" y="{HEIGHT - BOTTOM + 16}" text-anchor="middle" font-size="11" '
                     f'fill="currentColor">{step}</text>')
    parts.append(f'<text x="{(LEFT + WIDTH - RIGHT) / 2}" y="{HEIGHT - 4}" text-anchor="middle" font-size="12" '
                 'fill="currentColor">step</text>')
    for row in view.events:
        if row.get("event") == "resume" and isinstance(row.get("step"), int) and x_low <= row["step"] <= x_high:
            at = x(row["step"])
            parts.append(f'<line x1="{at:.1f}" x2="{at:.1f}" y1="{TOP}" y2="{HEIGHT - BOTTOM}" stroke="#6b7280" '
                         'stroke-dasharray="4 3"/>')
            parts.append(f'<text x="{at + 3:.1f}" y="{TOP + 12}" font-size="11" fill="#6b7280">resumed</text>')
    if train:
        line = " ".join(f"{x(s):.1f},{y(v):.1f}" for s, v in train)
        parts.append(f'<polyline class="train-loss" points="{line}" fill="none" stroke="{TRAIN_COLOUR}" '
                     'stroke-width="1.8"/>')
    if evals:
        line = " ".join(f"{x(s):.1f},{y(v):.1f}" for s, v in evals)
        parts.append(f'<polyline class="eval-loss" points="{line}" fill="none" stroke="{EVAL_COLOUR}" '
                     'stroke-width="1.8"/>')
        parts += [f'<circle cx="{x(s):.1f}" cy="{y(v):.1f}" r="3.5" fill="{EVAL_COLOUR}"/>' for s, v in evals]
    legend = (f'<text x="{WIDTH - RIGHT - 8}" y="{TOP - 10}" text-anchor="end" font-size="12">'
              f'<tspan fill="{TRAIN_COLOUR}">&#9644; train loss ({_points(len(train))})</tspan>'
              f'<tspan dx="14" fill="{EVAL_COLOUR}">&#9679; eval loss ({_points(len(evals))})</tspan></text>')
    svg = (f'<svg viewBox="0 0 {WIDTH} {HEIGHT}" width="100%" style="max-width:{WIDTH}px" role="img" '
           f'aria-label="loss and eval loss by step">{"".join(parts)}{legend}</svg>')
    return f'<div class="lmtune-chart" {counts}>{svg}</div>'


def _points(count: int) -> str:
    return f"{count} point" if count == 1 else f"{count} points"


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


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
    header = "".join(f"<th>{name}</th>" for name in ("step", "epoch", "reasons", "loss", "eval loss", "size",
                                                      "status"))
    rows = []
    for e in shown:
        status = e.get("status", "?") + (" best" if e.get("best") else "")
        epoch = f"{e['epoch']:.3f}" if isinstance(e.get("epoch"), int | float) else "-"
        cells = [str(e["step"]), epoch, ",".join(e.get("reasons", [])), _metric(e.get("metrics"), "loss"),
                 _metric(e.get("metrics"), "eval_loss"), _size(e.get("size_bytes")), status]
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
