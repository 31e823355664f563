"""Resuming: which checkpoint, what it restores, and what the user changed since it was written.

A resume continues the same run: weights, optimizer, scheduler, every RNG of every process, the data
position, and the counters come back as they were after the checkpoint's step, so that the next
losses equal those of a run that never stopped.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from lmtune.checkpoint import TRAIN_STATE, CheckpointIndex, atomic_write_text, is_complete_checkpoint
from lmtune.config import TrainConfig
from lmtune.errors import UserError

log = logging.getLogger("lmtune")

# Keys that do not change what the next step computes.
NEUTRAL_KEYS = {"resume_from_checkpoint", "resume_lr", "overwrite_output_dir", "output_dir", "logging_steps",
                "report_to", "plot_loss", "log_level", "preview_samples", "callbacks", "save_steps", "save_epochs",
                "saves_per_epoch", "save_minutes", "save_strategy", "save_total_limit", "save_on_eval",
                "save_only_model", "save_schedule", "eval_steps", "eval_epochs", "evals_per_epoch", "eval_minutes",
                "per_device_eval_batch_size", "metric_for_best_model", "dataloader_num_workers",
                "preprocessing_num_workers"}
LR_KEYS = {"learning_rate", "lr_scheduler_type", "warmup_steps"}
LENGTH_KEYS = {"max_steps", "num_train_epochs"}


@dataclass
class ResumePoint:
    path: Path
    train_state: dict[str, Any]

    @property
    def step(self) -> int:
        return int(self.train_state["step"])

    @property
    def saved_config(self) -> dict[str, Any]:
        return self.train_state.get("config", {})


def find_resume_point(config: TrainConfig, output_dir: Path) -> ResumePoint | None:
    """The checkpoint to continue from, or None to start fresh."""
    choice = config.resume_from_checkpoint
    if choice is False:
        return None
    if choice == "auto":
        if not output_dir.is_dir() or config.overwrite_output_dir:
            return None
        index = CheckpointIndex.load(output_dir)
        for entry in index.entries:
            if entry["status"] == "incomplete":
                log.warning("skipping %s: it was never completed (a crash or a stop during the save)", entry["path"])
        newest = index.newest_complete()
        return _read_point(newest) if newest is not None else None
    path = Path(choice)
    if not is_complete_checkpoint(path):
        raise UserError(
            f"resume_from_checkpoint: {path} is not a complete checkpoint (no checkpoint_complete.json and "
            "train_state.json); use `lmtune checkpoints RUN_DIR` to list the complete ones"
        )
    return _read_point(path)


def _read_point(path: Path) -> ResumePoint:
    state = json.loads((path / TRAIN_STATE).read_text())
    if not (path / "optimizer.pt").is_file():
        raise UserError(f"{path} was saved with save_only_model: true and holds no optimizer state to resume from; "
                        "start a new run from its weights instead (model_name_or_path)")
    return ResumePoint(path, state)


# --- what changed ---------------------------------------------------------------------------


def describe_changes(point: ResumePoint, config: TrainConfig) -> list[str]:
    """One line per key the user changed since the checkpoint, and whether it takes effect."""
    saved, now = point.saved_config, config.to_yaml_dict()
    lines = []
    for key in now:
        if key in ("resume_from_checkpoint", "overwrite_output_dir") or saved.get(key) == now[key]:
            continue
        if key not in saved:
            continue
        lines.append(f"{key}: {saved[key]!r} -> {now[key]!r} ({_effect(key, config)})")
    return lines


def _effect(key: str, config: TrainConfig) -> str:
    if key in LR_KEYS:
        return "takes effect now (resume_lr: config)" if config.resume_lr == "config" else (
            "ignored: resume_lr is keep, the saved schedule continues; set resume_lr: config to apply it")
    if key in LENGTH_KEYS:
        return "takes effect: the run's length changes"
    if key in NEUTRAL_KEYS:
        return "takes effect"
    return "changes the run itself: data, model or batches differ from the checkpoint's run"


# --- restoring --------------------------------------------------------------------------------


def load_weights(model: torch.nn.Module, checkpoint: Path) -> None:
    from peft import PeftModel, set_peft_model_state_dict

    if isinstance(model, PeftModel):
        set_peft_model_state_dict(model, load_file(checkpoint / "adapter_model.safetensors"))
        return
    state = load_file(checkpoint / "model.safetensors")
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {name for name in missing if _is_tied(model, name, state)}
    if unexpected or set(missing) - tied:
        raise UserError(f"{checkpoint}: its weights do not fit this model (missing {sorted(set(missing) - tied)[:3]}, "
                        f"unexpected {sorted(unexpected)[:3]}); did model_name_or_path or finetuning_type change?")


def _is_tied(model: torch.nn.Module, name: str, saved: dict[str, torch.Tensor]) -> bool:
    parameters = dict(model.named_parameters(remove_duplicate=False))
    target = parameters.get(name)
    return target is not None and any(p is target for other, p in parameters.items() if other in saved)


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(checkpoint: Path, process_index: int) -> None:
    states = torch.load(checkpoint / "rng_state.pth", weights_only=False)
    state = states[process_index] if isinstance(states, list) else states
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def set_learning_rate_from(scheduler_factory: Any, optimizer: torch.optim.Optimizer, config: TrainConfig,
                           step: int) -> tuple[float, Any]:
    """resume_lr: config: the config's schedule, at the resume step, over the restored optimizer."""
    old = optimizer.param_groups[0]["lr"]
    for group in optimizer.param_groups:
        group["initial_lr"] = config.learning_rate
        group["lr"] = config.learning_rate
    scheduler = scheduler_factory()  # transformers' schedules are LambdaLR: lr = base * factor(step)
    scheduler.last_epoch = step
    for group, base, factor in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas, strict=True):
        group["lr"] = base * factor(step)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
    return old, scheduler


def truncate_metrics(path: Path, step: int) -> None:
    """Rows after the resume step belong to a continuation that is being replaced."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= step]
    atomic_write_text(path, "".join(line + "\n" for line in kept))
