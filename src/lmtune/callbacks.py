"""The hooks of a run. Built-in logging, progress and plotting use them; so can users (`callbacks`).

A callback is any object with some of these methods; the ones it lacks are skipped:

    on_train_begin(state, model)
    on_step_end(state, metrics)      metrics: the train row when this is a logging step, else None
    on_evaluate(state, metrics)
    on_save(state, path)
    on_train_end(state)

`state` is the `RunState` below. A callback asks for a save or a stop by setting
`state.save_reasons` (a set of strings) or `state.should_stop` in `on_step_end`.
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmtune.config import TrainConfig
from lmtune.errors import UserError
from lmtune.state import TrainState

log = logging.getLogger("lmtune")
HOOKS = ("on_train_begin", "on_step_end", "on_evaluate", "on_save", "on_train_end")


@dataclass(kw_only=True)
class RunState(TrainState):
    """The saved state (step, epoch, samples and tokens seen, ...) and what only the running loop needs."""

    config: TrainConfig
    output_dir: Path
    is_main_process: bool
    total_steps: int
    steps_per_epoch: int | None
    save_reasons: set[str] = field(default_factory=set)
    should_stop: bool = False


class CallbackList:
    def __init__(self, callbacks: list[Any]):
        self.callbacks = callbacks

    def fire(self, hook: str, *args: Any) -> None:
        for callback in self.callbacks:
            method = getattr(callback, hook, None)
            if method is not None:
                method(*args)


def load_user_callbacks(paths: list[str]) -> list[Any]:
    """`package.module:ClassName` or `package.module.ClassName`, constructed without arguments."""
    callbacks = []
    for path in paths:
        module_name, _, class_name = path.rpartition(":") if ":" in path else path.rpartition(".")
        try:
            cls = getattr(importlib.import_module(module_name), class_name)
        except (ImportError, AttributeError, ValueError) as error:
            raise UserError(f"callbacks: cannot import '{path}': {error}") from None
        callback = cls()
        if not any(hasattr(callback, hook) for hook in HOOKS):
            raise UserError(f"callbacks: '{path}' has none of the hooks {', '.join(HOOKS)}")
        callbacks.append(callback)
    return callbacks


class MetricsFile:
    """metrics.jsonl: one JSON object a line, train / eval / event rows."""

    def __init__(self, path: Path):
        self.path = path
        self._lock = threading.Lock()  # the checkpoint writer thread adds its events too

    def write(self, row: dict[str, Any]) -> None:
        with self._lock, self.path.open("a") as handle:
            handle.write(json.dumps(row) + "\n")

    def on_step_end(self, state: RunState, metrics: dict | None) -> None:
        if metrics is not None:
            self.write(metrics)

    def on_evaluate(self, state: RunState, metrics: dict) -> None:
        self.write(metrics)

    def event(self, state: RunState, name: str, **details: Any) -> None:
        self.write({"type": "event", "event": name, "step": state.step, **details})


class TerminalLog:
    """A line per logging step in the log; the progress bar is separate."""

    def on_step_end(self, state: RunState, metrics: dict | None) -> None:
        if metrics is None:
            return
        epoch = f" epoch {metrics['epoch']:.2f}" if metrics.get("epoch") is not None else ""
        if metrics.get("stream_pass") is not None:  # a stream: its pass, and an epoch estimated until its size is known
            epoch += f"{' (estimated)' if metrics['epoch_estimated'] else ''} pass {metrics['stream_pass']}"
        log.info(
            "step %d/%d%s  loss %.4f%s  lr %.3g  grad_norm %.3f  %.0f tok/s  mem %.0f MB  eta %s",
            metrics["step"], state.total_steps, epoch, metrics["loss"], _rewards(metrics), metrics["lr"],
            metrics["grad_norm"], metrics["tokens_per_s"], metrics["mem_peak_mb"], format_duration(metrics["eta_s"]),
        )

    def on_evaluate(self, state: RunState, metrics: dict) -> None:
        log.info("step %d  eval_loss %.4f%s", metrics["step"], metrics["eval_loss"], _rewards(metrics, "eval_"))

    def on_save(self, state: RunState, path: Path) -> None:
        log.info("saved %s", path)


def _rewards(metrics: dict, prefix: str = "") -> str:
    """Preference training: how often the chosen answer wins and by how much (dpo, rm), or the reward margin
    and the KL estimate (kto)."""
    shown = {"accuracy": ("rewards/accuracies", "accuracy"), "margin": ("rewards/margins", "margin"), "kl": ("kl",)}
    parts = []
    for label, names in shown.items():
        value = next((metrics[prefix + name] for name in names if prefix + name in metrics), None)
        if value is not None:
            parts.append(f"  {label} {value:.2f}" if label == "accuracy" else f"  {label} {value:.3f}")
    return "".join(parts)


class ProgressBar:
    """A live bar with loss, tokens/s and ETA, on a terminal."""

    def __init__(self) -> None:
        self.progress = None
        self.task = None

    def on_train_begin(self, state: RunState, model: Any) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        console = Console(stderr=True)
        if not console.is_terminal:
            return
        self.progress = Progress(
            TextColumn("[bold]train"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
            TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
            console=console, transient=False,
        )
        self.task = self.progress.add_task("train", total=state.total_steps, completed=state.step, info="")
        self.progress.start()

    def on_step_end(self, state: RunState, metrics: dict | None) -> None:
        if self.progress is None:
            return
        info = None
        if metrics is not None:
            info = f"loss {metrics['loss']:.4f}  {metrics['tokens_per_s']:.0f} tok/s"
        self.progress.update(self.task, completed=state.step, **({"info": info} if info else {}))

    def on_train_end(self, state: RunState) -> None:
        if self.progress is not None:
            self.progress.stop()


class TensorBoardWriter:
    def __init__(self, log_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(log_dir))

    def on_step_end(self, state: RunState, metrics: dict | None) -> None:
        if metrics is None:
            return
        for key in ("loss", "lr", "grad_norm", "tokens_per_s", "mem_peak_mb"):
            self.writer.add_scalar(f"train/{key}", metrics[key], metrics["step"])

    def on_evaluate(self, state: RunState, metrics: dict) -> None:
        self.writer.add_scalar("eval/loss", metrics["eval_loss"], metrics["step"])

    def on_train_end(self, state: RunState) -> None:
        self.writer.close()


class LossPlot:
    """loss.png from metrics.jsonl at the end of the run (train and eval loss)."""

    def on_train_end(self, state: RunState) -> None:
        plot_loss(state.output_dir / "metrics.jsonl", state.output_dir / "loss.png")


def plot_loss(metrics_path: Path, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    train = [(r["step"], r["loss"]) for r in rows if r["type"] == "train" and math.isfinite(r["loss"])]
    evals = [(r["step"], r["eval_loss"]) for r in rows if r["type"] == "eval"]
    if not train and not evals:
        return
    figure, axes = plt.subplots(figsize=(8, 4.5))
    if train:
        axes.plot(*zip(*train, strict=True), label="train loss")
    if evals:
        axes.plot(*zip(*evals, strict=True), "o-", label="eval loss")
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(out, dpi=100)
    plt.close(figure)


def format_duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"
