"""Resuming: which checkpoint, whether it fits this run, and what the user changed since it was written.

A resume continues the same run: weights, optimizer, schedule, every RNG of every process, the data
position and the counters come back as they were after the checkpoint's step (`TrainState`), so that
the next losses equal those of a run that never stopped.

On another number of processes (data of known size), the data continues at the same row of the same
epoch order (batching.epoch_batches), each step holding the rows an uninterrupted run's step would
hold as long as the global batch is kept; processes the checkpoint had not take an RNG derived from
the seed and the step.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmtune.checkpoint import (
    CheckpointIndex,
    DamagedCheckpoint,
    atomic_write_text,
    has_content_hashes,
    read_sharded,
    read_state,
    read_weights,
    verify_checkpoint,
)
from lmtune.config import TrainConfig, field_meta
from lmtune.errors import UserError
from lmtune.schedule import epoch_origin_at, global_batch, steps_per_batch, steps_per_epoch
from lmtune.state import TrainState

log = logging.getLogger("lmtune")

FINGERPRINT_WHOLE_FILE_BYTES = 16 << 20  # larger files: their size and first and last 4 MB
FINGERPRINT_EDGE_BYTES = 4 << 20


@dataclass
class ResumePoint:
    path: Path
    state: TrainState
    skipped: list[tuple[str, list[str]]] = field(default_factory=list)  # newer checkpoints that were damaged

    @property
    def step(self) -> int:
        return self.state.step

    @property
    def saved_config(self) -> dict[str, Any]:
        return self.state.run_config


def find_resume_point(config: TrainConfig, output_dir: Path) -> ResumePoint | None:
    """The checkpoint to continue from, or None to start fresh. Auto-resume takes the newest checkpoint
    whose files all open, and says which newer ones it skipped and why."""
    choice = config.resume_from_checkpoint
    if choice is False:
        return None
    if choice == "auto":
        if not output_dir.is_dir() or config.overwrite_output_dir:
            return None
        return _newest_good(CheckpointIndex.load(output_dir))
    path = Path(choice)
    problems = verify_checkpoint(path) if path.is_dir() else [f"{path} is not a folder"]
    if problems:
        raise UserError(f"resume_from_checkpoint: {path} cannot be resumed: {'; '.join(problems)}. "
                        "`lmtune checkpoints RUN_DIR --verify` lists the checkpoints that can")
    _say_what_was_checked(path)
    return ResumePoint(path, read_state(path))


def _say_what_was_checked(folder: Path) -> None:
    if not has_content_hashes(folder):
        log.info("%s has no content hashes (written before lmtune recorded them): its files were checked by size "
                 "and by opening each", folder.name)


def _newest_good(index: CheckpointIndex) -> ResumePoint | None:
    for entry in index.entries:
        if entry["status"] == "incomplete":
            log.warning("skipping %s: it was never completed (a crash or a stop during the save)", entry["path"])
    skipped: list[tuple[str, list[str]]] = []
    for folder in index.complete_newest_first():
        problems = verify_checkpoint(folder)
        if not problems:
            _say_what_was_checked(folder)
            return ResumePoint(folder, read_state(folder), skipped)
        log.warning("skipping %s: %s", folder.name, "; ".join(problems))
        skipped.append((folder.name, problems))
    if skipped:
        raise UserError(f"no checkpoint in {index.run_dir} can be resumed ({len(skipped)} damaged: "
                        f"{'; '.join(p for _, problems in skipped for p in problems)[:600]}); set "
                        "overwrite_output_dir: true to start over, or resume_from_checkpoint: a path")
    return None


# --- does it fit this run ------------------------------------------------------------------


def check_compatible(point: ResumePoint, config: TrainConfig, num_processes: int) -> None:
    saved = point.saved_config
    made_for = (f"{point.path} was made for model {saved.get('model_name_or_path')!r} with finetuning_type "
                f"{saved.get('finetuning_type')!r}")
    if saved.get("finetuning_type") != config.finetuning_type:
        raise UserError(f"{made_for}; this run is finetuning_type {config.finetuning_type!r}: set finetuning_type "
                        f"back, or start over (overwrite_output_dir: true, or resume_from_checkpoint: false)")
    workers = saved.get("dataloader_num_workers", 0)
    if config.streaming and workers != config.dataloader_num_workers:
        raise UserError(f"{point.path} holds the position of a stream read by {workers} data loader workers a "
                        f"process (each reads its own share of the files) and this run has "
                        f"{config.dataloader_num_workers}: set dataloader_num_workers: {workers} to resume it")
    processes = len(point.state.rng)
    if config.streaming and processes != num_processes:
        raise UserError(f"{point.path} holds the position of a stream read by {_processes(processes)} (each reads its "
                        f"own share of the files, so another number of processes cannot continue where they were) "
                        f"and this run has {num_processes}: start it with --nproc_per_node {processes} to resume it")


def batch_lines(point: ResumePoint, config: TrainConfig, num_processes: int, steps_per_epoch: int | None) -> list[str]:
    """For the plan and the log: another number of processes than the checkpoint's, another global batch."""
    saved, written_by = point.saved_config, len(point.state.rng)
    before = (saved.get("per_device_train_batch_size", 0), saved.get("gradient_accumulation_steps", 0), written_by)
    now = (config.per_device_train_batch_size, config.gradient_accumulation_steps, num_processes)
    lines = []
    if written_by != num_processes:
        lines.append(f"written by {_processes(written_by)}, resumed on {num_processes}: the data continues at the "
                     f"same row of epoch {point.state.data_epoch + 1}'s order, split over {num_processes}; the "
                     "random numbers differ from an uninterrupted run's (dropout draws other noise)")
    if before == now:
        return lines
    old, new = before[0] * before[1] * before[2], global_batch(config, num_processes)
    split = f"(per_device x accumulation x processes: {' x '.join(map(str, before))} -> {' x '.join(map(str, now))})"
    if old == new:
        return lines + [f"global batch kept: {new} {split}: each step trains the rows an uninterrupted run's step "
                        "would"]
    per_epoch = f"; {steps_per_epoch} steps per epoch from here" if steps_per_epoch else ""
    return lines + [f"global batch changed: {old} -> {new} {split}: steps count on from step {point.step}{per_epoch}"]


def elastic_batch(point: ResumePoint, config: TrainConfig, num_processes: int) -> TrainConfig:
    """After torchrun restarted the workers (an elastic restart, maybe on fewer or more nodes): the
    checkpoint's global batch, kept by gradient_accumulation_steps where this number of processes divides it
    (per_device_train_batch_size as the checkpoint's); otherwise the config as it is."""
    saved, per_device = point.saved_config, config.per_device_train_batch_size
    if saved.get("per_device_train_batch_size") != per_device or not saved.get("gradient_accumulation_steps"):
        return config
    kept = per_device * saved["gradient_accumulation_steps"] * len(point.state.rng)
    accumulation, rest = divmod(kept, per_device * num_processes)
    if rest or accumulation < 1 or accumulation == config.gradient_accumulation_steps:
        return config
    return config.model_copy(update={"gradient_accumulation_steps": accumulation})


def restart_details(point: ResumePoint, configured: TrainConfig, config: TrainConfig, num_processes: int,
                    restart: int, reached_step: int | None) -> dict[str, Any]:
    """The `restart` event of an elastic restart, with its log line: what changed, what was lost."""
    saved = point.saved_config
    reached = max(reached_step or point.step, point.step)
    details = {
        "restart": restart, "processes": {"saved": len(point.state.rng), "now": num_processes},
        "gradient_accumulation_steps": {"saved": saved.get("gradient_accumulation_steps"),
                                        "config": configured.gradient_accumulation_steps,
                                        "now": config.gradient_accumulation_steps},
        "global_batch": {"saved": saved.get("per_device_train_batch_size", 0) * saved.get(
            "gradient_accumulation_steps", 0) * len(point.state.rng), "now": global_batch(config, num_processes)},
        "reached_step": reached, "steps_lost": reached - point.step,
    }
    batch = details["global_batch"]
    kept = "kept" if batch["saved"] == batch["now"] else f"changed {batch['saved']} ->"
    details["line"] = (
        f"elastic restart {restart} (torchrun): {_processes(len(point.state.rng))} -> {num_processes}, "
        f"gradient_accumulation_steps {details['gradient_accumulation_steps']['saved']} -> "
        f"{config.gradient_accumulation_steps}, global batch {kept} {batch['now']}; {reached - point.step} steps "
        f"lost (the run had reached step {reached}; it continues from {point.path.name})")
    return details


def _processes(count: int) -> str:
    return f"{count} process" if count == 1 else f"{count} processes"


def settle_data_position(point: ResumePoint, train_rows: int | None) -> None:
    """A checkpoint of state version 2 saved no data position: it follows from its step, as that version laid
    epochs out (an epoch of steps_per_epoch steps, each taking its global batch of rows of the order)."""
    state = point.state
    if state.data_epoch is not None:
        return
    if train_rows is None:  # a stream: its position is its loaders'
        state.data_epoch, state.data_rows = 0, 0
        return
    saved = point.saved_config
    batch, accumulation = saved["per_device_train_batch_size"], saved["gradient_accumulation_steps"]
    per_epoch = steps_per_epoch(train_rows, batch, accumulation, len(state.rng))
    state.data_epoch, steps_done = divmod(state.step, per_epoch)
    state.data_rows = min(steps_done * batch * accumulation * len(state.rng), train_rows)


def epoch_origin(point: ResumePoint | None, config: TrainConfig, train_rows: int | None, num_processes: int) -> int:
    """The plan's epoch origin for a run that continues from `point` (schedule.epoch_origin_at)."""
    if point is None or train_rows is None:
        return 0
    state = point.state
    kept = (state.stage or [None])[0] or {}
    repeats_left = (kept.get("kept") or {}).get("left", 0)  # grpo: steps still to train on the generated batch
    return epoch_origin_at(state.step, state.data_epoch, state.data_rows, train_rows,
                           global_batch(config, num_processes), steps_per_batch(config), repeats_left)


def load_weights(model: torch.nn.Module, point: ResumePoint) -> None:
    from peft import PeftModel, set_peft_model_state_dict

    try:
        state = read_weights(point.path)
    except DamagedCheckpoint as error:
        raise UserError(str(error)) from None
    saved = point.saved_config
    mismatch = (f"{point.path}: its weights do not fit this model (made for model {saved.get('model_name_or_path')!r}"
                f", finetuning_type {saved.get('finetuning_type')!r}, lora_rank {saved.get('lora_rank')}); "
                "did model_name_or_path, lora_rank or lora_target change?")
    try:
        if isinstance(model, PeftModel):
            result = set_peft_model_state_dict(model, state)
            unexpected = list(getattr(result, "unexpected_keys", []))
            if unexpected:
                raise UserError(f"{mismatch} (unexpected {sorted(unexpected)[:3]})")
            return
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as error:
        raise UserError(f"{mismatch} ({str(error).strip().splitlines()[-1][:300]})") from None
    tied = {name for name in missing if _is_tied(model, name, state)}
    if unexpected or set(missing) - tied:
        raise UserError(f"{mismatch} (missing {sorted(set(missing) - tied)[:3]}, unexpected {sorted(unexpected)[:3]})")


def _is_tied(model: torch.nn.Module, name: str, saved: dict[str, torch.Tensor]) -> bool:
    parameters = dict(model.named_parameters(remove_duplicate=False))
    target = parameters.get(name)
    return target is not None and any(p is target for other, p in parameters.items() if other in saved)


def load_sharded_checkpoint(model: torch.nn.Module, optimizer: Any, point: ResumePoint) -> None:
    """The weights and optimizer state of a sharded checkpoint, into a sharded or a whole model: DCP reads
    from the shards, whatever the number of processes that wrote them, what each process holds."""
    from lmtune.sharding import load_sharded_state, sharded_state

    state = sharded_state(model, optimizer)
    read_sharded(point.path, state)
    load_sharded_state(model, optimizer, state)


def load_optimizer_state(optimizer: Any, point: ResumePoint, state: dict[str, Any], load: Any = None) -> None:
    """`load`: how this run's optimizer takes a whole state dict (a sharded one: `FullySharded.load_optimizer`)."""
    try:
        (load or optimizer.load_state_dict)(state)
    except (ValueError, KeyError, RuntimeError) as error:
        raise UserError(f"{point.path}: its optimizer state does not fit this run's trained parameters ({error}); "
                        "did lora_target, freeze_trainable_layers or the model change?") from None


# --- what changed ---------------------------------------------------------------------------


def describe_changes(point: ResumePoint, config: TrainConfig, fingerprint: dict[str, str]) -> list[str]:
    """One line per key the user changed since the checkpoint, with its real effect; and whether the data
    files or the tokenizer differ from those the checkpoint was trained on."""
    saved, now = point.saved_config, config.to_yaml_dict()
    lines = [f"{key}: {saved[key]!r} -> {now[key]!r} ({_effect(key, config)})"
             for key in now if key in saved and saved[key] != now[key] and key not in ("resume_from_checkpoint",
                                                                                      "overwrite_output_dir")]
    for part, what in (("data", "the data files"), ("tokenizer", "the tokenizer")):
        old = point.state.data_fingerprint.get(part)
        if old is not None and old != fingerprint.get(part):
            lines.append(f"{what} differ from those {point.path.name} was trained on: the continued run is not the "
                         "one an uninterrupted run would have been")
    return lines


def _effect(key: str, config: TrainConfig) -> str:
    effect = field_meta(key).get("on_resume", "run")
    if effect == "schedule":
        return "applied from the resume step (resume_lr: config)" if config.resume_lr == "config" else (
            "not applied: resume_lr is keep and the saved schedule continues; set resume_lr: config to apply it")
    if effect == "length":
        return "the run's length changes"
    if effect == "batch":
        return "each step's rows are split another way; only a change of the global batch changes what is trained"
    if effect == "neutral":
        return "takes effect"
    return "changes what is trained: the continued run differs from an uninterrupted one"


def data_fingerprint(files: list[Path], tokenizer: Any) -> dict[str, str]:
    """What the run trains on, to tell on resume whether it changed: the data files' content and the
    tokenizer's vocabulary, special tokens and chat template."""
    data = hashlib.sha256()
    for path in files:
        data.update(f"{path.name}:{path.stat().st_size}:".encode())
        data.update(_content_digest(path))
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False)
    details = [vocab, tokenizer.all_special_tokens, getattr(tokenizer, "chat_template", None)]
    tokens = hashlib.sha256(json.dumps(details, default=str).encode())
    return {"data": data.hexdigest()[:20], "tokenizer": tokens.hexdigest()[:20]}


def _content_digest(path: Path) -> bytes:
    size = path.stat().st_size
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        if size <= FINGERPRINT_WHOLE_FILE_BYTES:
            digest.update(handle.read())
        else:
            digest.update(handle.read(FINGERPRINT_EDGE_BYTES))
            handle.seek(size - FINGERPRINT_EDGE_BYTES)
            digest.update(handle.read())
    return digest.digest()


# --- RNG ------------------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """This process's RNG state, as tensors and plain values (loadable with weights_only=True)."""
    kind, keys, position, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), position,
                                                   has_gauss, cached], "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def restore_rng_of_process(point: ResumePoint, process_index: int, seed: int) -> None:
    """Process r continues the checkpoint's RNG of process r; a process it did not have starts one derived
    from the seed, the step and its index (deterministic, but not what any uninterrupted run draws)."""
    if process_index < len(point.state.rng):
        restore_rng(point.state.rng[process_index])
    else:
        seed_everything(seed + 1_000_003 * point.step + 7919 * process_index)


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    kind, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def truncate_metrics(path: Path, step: int) -> None:
    """Rows after the resume step belong to a continuation that is being replaced."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if _step_of_row(line) <= step]
    atomic_write_text(path, "".join(line + "\n" for line in kept))


def last_trained_step(path: Path) -> int | None:
    """The step of the last train row of metrics.jsonl (None: no such row)."""
    if not path.is_file():
        return None
    steps = [row.get("step", 0) for row in _rows(path) if row.get("type") == "train"]
    return max(steps, default=None)


def _rows(path: Path) -> list[dict[str, Any]]:
    rows = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(ValueError):
            rows.append(json.loads(line))
    return rows


def _step_of_row(line: str) -> float:
    """A row's step; a line cut short by a crash counts as after every step (it is dropped)."""
    try:
        return json.loads(line).get("step", 0)
    except ValueError:
        return float("inf")
