"""The plan of a run, a pure function of the config and the size of the data (no torch here).

`lmtune plan` prints it and the engine obeys it, so the two cannot disagree. Steps are optimizer
steps, counted from 1. An epoch is `steps_per_epoch` steps; an optimizer step never spans two
epochs, so epoch k ends exactly at step k * steps_per_epoch (the last epoch may be cut short).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

from lmtune.config import SavePhase, TrainConfig

HF_DEFAULT_SAVE_STEPS = 500


@dataclass
class Plan:
    steps_per_epoch: int | None
    total_steps: int
    epochs: float | None
    save_steps: dict[int, list[str]]
    eval_steps: dict[int, list[str]]
    kept: list[int]
    deleted: list[int]
    warnings: list[str] = field(default_factory=list)
    phases: list[dict] = field(default_factory=list)
    save_minutes: float | None = None
    eval_minutes: float | None = None
    checkpoint_bytes: int | None = None

    @property
    def disk_bytes(self) -> int | None:
        """Peak disk use: the checkpoints that rotation keeps at once, one more being written."""
        if self.checkpoint_bytes is None:
            return None
        limit = len(self.kept) + (1 if self.deleted else 0)
        return self.checkpoint_bytes * max(limit, 1)

    def to_json(self) -> dict:
        return {
            "steps_per_epoch": self.steps_per_epoch,
            "total_steps": self.total_steps,
            "epochs": self.epochs,
            "saves": [{"step": s, "reasons": r} for s, r in sorted(self.save_steps.items())],
            "evals": [{"step": s, "reasons": r} for s, r in sorted(self.eval_steps.items())],
            "kept": self.kept,
            "deleted": self.deleted,
            "phases": self.phases,
            "save_minutes": self.save_minutes,
            "eval_minutes": self.eval_minutes,
            "checkpoint_bytes": self.checkpoint_bytes,
            "disk_bytes": self.disk_bytes,
            "warnings": self.warnings,
        }


def steps_per_epoch(rows: int, batch_size: int, accumulation: int, world_size: int = 1) -> int:
    """Optimizer steps in one pass over `rows` training rows."""
    micro_batches = math.ceil(math.ceil(rows / world_size) / batch_size)
    return math.ceil(micro_batches / accumulation)


def make_plan(
    config: TrainConfig, train_rows: int | None, world_size: int = 1, has_eval_data: bool = False,
    checkpoint_bytes: int | None = None,
) -> Plan:
    per_epoch = None
    if train_rows is not None:
        per_epoch = steps_per_epoch(
            train_rows, config.per_device_train_batch_size, config.gradient_accumulation_steps, world_size
        )
    total = config.max_steps if config.max_steps is not None else math.ceil(config.num_train_epochs * per_epoch)
    epochs = total / per_epoch if per_epoch else None
    warnings: list[str] = []

    saves = _save_rules(config, per_epoch, total, warnings)
    phases = []
    for index, phase in enumerate(config.save_schedule or []):
        start, end = _phase_range(config.save_schedule, index, per_epoch, total)
        phase_saves = _phase_rules(phase, per_epoch, total, start, end)
        phases.append({"from_step": start + 1, "until_step": end, "saves": sorted(phase_saves)})
        _merge(saves, phase_saves)
    evals = _eval_rules(config, per_epoch, total, has_eval_data, warnings)
    if config.save_on_eval:
        _merge(saves, {step: ["eval"] for step in evals})
    _merge(saves, {total: ["final"]})
    kept, deleted = rotation(sorted(saves), config.save_total_limit)
    return Plan(
        per_epoch, total, epochs, saves, evals, kept, deleted, warnings, phases,
        config.save_minutes, config.eval_minutes if has_eval_data else None, checkpoint_bytes,
    )


def rotation(steps: list[int], limit: int | None, best: int | None = None) -> tuple[list[int], list[int]]:
    """Which of the saved steps survive `save_total_limit`: the newest `limit`, plus the best."""
    if limit is None or len(steps) <= limit:
        return list(steps), []
    kept = set(steps[-limit:])
    if best is not None and best in steps:
        kept.add(best)
    return sorted(kept), [s for s in steps if s not in kept]


# --- the rules --------------------------------------------------------------------------------


def _save_rules(config: TrainConfig, per_epoch: int | None, total: int, warnings: list[str]) -> dict:
    save_steps, save_epochs, per = config.save_steps, config.save_epochs, config.saves_per_epoch
    if config.save_strategy == "steps" and save_steps is None:
        save_steps = HF_DEFAULT_SAVE_STEPS
    if config.save_strategy == "epoch" and per is None and save_epochs is None:
        per = 1
    if save_steps is not None and save_steps > total:
        warnings.append(f"save_steps {save_steps} is larger than the run ({total} steps): only the final save")
    if per_epoch is None and (save_epochs is not None or per is not None):
        raise_unknown_epoch("save_epochs" if save_epochs is not None else "saves_per_epoch")
    return _rule_steps(save_steps, save_epochs, per, per_epoch, total, 0, total, "steps", "epoch")


def _eval_rules(config: TrainConfig, per_epoch: int | None, total: int, has_eval: bool, warnings: list[str]):
    rules = (config.eval_steps, config.eval_epochs, config.evals_per_epoch)
    if not has_eval:
        if any(r is not None for r in rules) or config.eval_minutes:
            warnings.append("eval_* rules are set but there is no eval data (val_size is 0): no evaluation")
        return {}
    if per_epoch is None and (config.eval_epochs is not None or config.evals_per_epoch is not None):
        raise_unknown_epoch("eval_epochs" if config.eval_epochs is not None else "evals_per_epoch")
    evals = _rule_steps(*rules, per_epoch, total, 0, total, "steps", "epoch")
    if not evals and not config.eval_minutes:
        evals = {total: ["final"]}
    return evals


def _phase_rules(phase: SavePhase, per_epoch: int | None, total: int, start: int, end: int) -> dict:
    if per_epoch is None and (phase.save_epochs is not None or phase.saves_per_epoch is not None):
        raise_unknown_epoch("save_schedule")
    return _rule_steps(phase.save_steps, phase.save_epochs, phase.saves_per_epoch, per_epoch, total, start, end,
                       "phase steps", "phase epoch")


def _phase_range(phases: list[SavePhase], index: int, per_epoch: int | None, total: int) -> tuple[int, int]:
    def end_of(phase: SavePhase) -> int:
        if phase.until_step is not None:
            return min(phase.until_step, total)
        if per_epoch is None:
            raise_unknown_epoch("save_schedule until_epoch")
        return min(epoch_to_step(phase.until_epoch, per_epoch), total)

    start = end_of(phases[index - 1]) if index else 0
    return start, max(start, end_of(phases[index]))


def _rule_steps(
    every_steps: int | None, every_epochs: float | None, per_epoch_count: int | None, per_epoch: int | None,
    total: int, start: int, end: int, steps_reason: str, epoch_reason: str,
) -> dict[int, list[str]]:
    """The steps in (start, end] named by each rule, with the rule's reason."""
    found: dict[int, list[str]] = {}
    if every_steps is not None:
        _merge(found, {s: [steps_reason] for s in range(start + every_steps, end + 1, every_steps)})
    if every_epochs is not None:
        _merge(found, {s: [epoch_reason] for s in _every_epochs(every_epochs, per_epoch, total) if start < s <= end})
    if per_epoch_count is not None:
        steps = _evenly_per_epoch(per_epoch_count, per_epoch, total)
        _merge(found, {s: [epoch_reason] for s in steps if start < s <= end})
    return found


def epoch_to_step(epoch: float, per_epoch: int) -> int:
    """The first step at which `epoch` epochs are done (a tiny tolerance absorbs float error)."""
    return max(1, math.ceil(epoch * per_epoch - 1e-9))


def _every_epochs(every: float, per_epoch: int, total: int) -> Iterable[int]:
    count = 1
    while (step := epoch_to_step(count * every, per_epoch)) <= total:
        yield step
        count += 1


def _evenly_per_epoch(count: int, per_epoch: int, total: int) -> set[int]:
    """`count` evenly spaced steps in every epoch, the last at its end; a short last epoch too."""
    steps = set()
    for epoch_start in range(0, total, per_epoch):
        length = min(per_epoch, total - epoch_start)
        steps.update(epoch_start + math.ceil(j * length / count - 1e-9) for j in range(1, count + 1))
    steps.discard(0)
    return steps


def _merge(into: dict[int, list[str]], more: dict[int, list[str]]) -> None:
    for step, reasons in more.items():
        bucket = into.setdefault(step, [])
        bucket.extend(r for r in reasons if r not in bucket)


def raise_unknown_epoch(key: str) -> None:
    from lmtune.errors import UserError

    raise UserError(
        f"{key} needs the size of an epoch, which a stream without a known size does not have; "
        "use save_steps / eval_steps or save_minutes, or add num_samples to the data set's entry"
    )
