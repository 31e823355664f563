"""The plan of a run, a pure function of the config and the size of the data (no torch here).

`lmtune plan` prints it and the engine obeys it, so the two cannot disagree. Steps are optimizer
steps, counted from 1. An epoch is `steps_per_epoch` steps; an optimizer step never spans two
epochs, so epoch k ends exactly at step k * steps_per_epoch (the last epoch may be cut short).

The rules, each naming steps of the whole run (a step named by several rules is saved once, with
all their reasons):

- `save_steps: N`: steps N, 2N, 3N, ...
- `save_epochs: X`: the first step at which X, 2X, 3X, ... real epochs are done (exact decimal
  arithmetic: 0.3 is three tenths, not the nearest binary float).
- `saves_per_epoch: K`: in every epoch of length L (a shorter last epoch too), the first step at
  which j/K of that epoch is done, j = 1..K; the last is the epoch's end.
- `save_schedule` phases: phase i covers the steps after the end of phase i-1 up to its own end
  (`until_step`, or the first step at which `until_epoch` epochs are done); its rules name the same
  step numbers as they would on their own, restricted to that range.
- the final step, always.

After a resume that changed the global batch (per_device_train_batch_size x gradient_accumulation_steps
x processes), the steps before it were of another size: steps count on from the checkpoint's, and
epochs are counted from `epoch_origin`, the step at which epoch 0 would have begun had every step been
of the new size (`epoch_origin_at`; 0 when the global batch is kept). Epoch k then ends at step
`epoch_origin + k * steps_per_epoch`, and the rules counted in epochs name steps of that frame.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from fractions import Fraction

from lmtune.config import SavePhase, TrainConfig

HF_DEFAULT_SAVE_STEPS = 500
# A checkpoint this big written at a large share of the steps is worth a warning.
BIG_CHECKPOINT_BYTES = 100 * 1000**2
DENSE_SAVE_SHARE = 0.25
DENSE_SAVE_MIN_COUNT = 20
SAVE_KEYS = ("save_epochs", "saves_per_epoch")


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
    final_model_bytes: int | None = None
    memory: dict | None = None  # bytes per process: weights, gradients, optimizer, activations per token
    save_total_limit: int | None = None
    keeps_best: bool = False
    stream: dict | None = None  # for streamed data: what is known or estimated of its size
    resume: list[str] = field(default_factory=list)  # where a resume starts and what its learning rate does
    batching: dict | None = None  # how micro-batches are laid out (batching.batching_of)
    epoch_origin: int = 0  # see the module's docstring
    data: dict | None = None  # the training rows planned over: {"train": int, "eval": int, "unit": "pairs", ...}
    generation: dict | None = None  # grpo: completions generated per step and the tokens they may take

    @property
    def disk_bytes(self) -> int | None:
        """Peak disk use of the run: the checkpoints rotation keeps at once, plus one being written before
        rotation deletes the oldest, plus the best when it has fallen out of the newest ones, plus the final
        model."""
        if self.checkpoint_bytes is None:
            return None
        at_once = len(self.kept)
        if self.deleted:
            at_once += 1 + (1 if self.keeps_best else 0)
        return self.checkpoint_bytes * max(at_once, 1) + (self.final_model_bytes or 0)

    def to_json(self) -> dict:
        return {
            "steps_per_epoch": self.steps_per_epoch,
            "total_steps": self.total_steps,
            "epochs": self.epochs,
            "saves": [{"step": s, "reasons": sorted(r)} for s, r in sorted(self.save_steps.items())],
            "evals": [{"step": s, "reasons": sorted(r)} for s, r in sorted(self.eval_steps.items())],
            "save_total_limit": self.save_total_limit,
            "kept": self.kept,
            "deleted": self.deleted,
            "keeps_best": self.keeps_best,
            "phases": self.phases,
            "save_minutes": self.save_minutes,
            "eval_minutes": self.eval_minutes,
            "checkpoint_bytes": self.checkpoint_bytes,
            "final_model_bytes": self.final_model_bytes,
            "memory": self.memory,
            "disk_bytes": self.disk_bytes,
            "warnings": self.warnings,
            "stream": self.stream,
            "resume": self.resume,
            "batching": self.batching,
            "epoch_origin": self.epoch_origin,
            "data": self.data,
            "generation": self.generation,
        }


def steps_per_epoch(rows: int, batch_size: int, accumulation: int, world_size: int = 1) -> int:
    """Optimizer steps in one pass over `rows` training rows."""
    micro_batches = math.ceil(math.ceil(rows / world_size) / batch_size)
    return math.ceil(micro_batches / accumulation)


def global_batch(config: TrainConfig, world_size: int) -> int:
    """Rows an optimizer step trains on all processes together."""
    return config.per_device_train_batch_size * config.gradient_accumulation_steps * world_size


def steps_per_batch(config: TrainConfig) -> int:
    """Optimizer steps each step's rows are trained for: grpo trains a generated batch num_iterations times."""
    return config.num_iterations if config.stage == "grpo" else 1


def epoch_origin_at(step: int, data_epoch: int, data_rows: int, train_rows: int, batch: int, repeats: int = 1,
                    repeats_left: int = 0) -> int:
    """The epoch origin of a run that continues after `step`, at row `data_rows` of epoch `data_epoch`,
    with a global batch of `batch` rows, each trained `repeats` steps (`repeats_left` of the last batch
    still to go): the rest of that epoch takes ceil(rows left / batch) * repeats + repeats_left steps."""
    steps_left = math.ceil(max(train_rows - data_rows, 0) / batch) * repeats + repeats_left
    return step + steps_left - (data_epoch + 1) * math.ceil(train_rows / batch) * repeats


def make_plan(
    config: TrainConfig, train_rows: int | None, world_size: int = 1, has_eval_data: bool = False,
    checkpoint_bytes: int | None = None, final_model_bytes: int | None = None, memory: dict | None = None,
    epoch_origin: int = 0,
) -> Plan:
    """The plan of `config` on `train_rows` rows; None for a stream of unknown length, where a rule
    counted in epochs is an error that names its key. `epoch_origin`: see the module's docstring."""
    per_epoch = None
    if train_rows is not None:
        per_epoch = steps_per_epoch(
            train_rows, config.per_device_train_batch_size, config.gradient_accumulation_steps, world_size
        ) * steps_per_batch(config)
    if config.max_steps is not None:
        total = config.max_steps
    elif per_epoch is None:
        from lmtune.errors import UserError

        raise UserError("max_steps is needed: the length of the data is unknown, so num_train_epochs cannot tell "
                        "when to stop")
    else:
        total = epoch_origin + max(1, math.ceil(_exact(config.num_train_epochs) * per_epoch))
    epochs = (total - epoch_origin) / per_epoch if per_epoch else None
    warnings: list[str] = []

    saves = _save_rules(config, per_epoch, total, warnings, epoch_origin)
    phases = []
    for index, phase in enumerate(config.save_schedule or []):
        start, end = _phase_range(config.save_schedule, index, per_epoch, total, warnings, epoch_origin)
        phase_saves = _rule_steps(phase.save_steps, phase.save_epochs, phase.saves_per_epoch, per_epoch, total,
                                  start, end, "phase steps", "phase epoch",
                                  (f"save_schedule[{index}].save_epochs", f"save_schedule[{index}].saves_per_epoch"),
                                  epoch_origin)
        phases.append({"phase": index, "from_step": start + 1, "until_step": end, "saves": sorted(phase_saves)})
        _merge(saves, phase_saves)
    evals = _eval_rules(config, per_epoch, total, has_eval_data, warnings, epoch_origin)
    if config.save_on_eval:
        _merge(saves, {step: ["eval"] for step in evals})
    _merge(saves, {total: ["final"]})
    kept, deleted = rotation(sorted(saves), config.save_total_limit)
    keeps_best = config.metric_for_best_model is not None and has_eval_data
    _warn_dense_saves(config, len(saves), total, checkpoint_bytes, warnings)
    return Plan(
        per_epoch, total, epochs, saves, evals, kept, deleted, warnings, phases,
        config.save_minutes, config.eval_minutes if has_eval_data else None, checkpoint_bytes, final_model_bytes,
        memory, config.save_total_limit, keeps_best, epoch_origin=epoch_origin,
        generation=generation_budget(config, world_size, total) if config.stage == "grpo" else None,
    )


def generation_budget(config: TrainConfig, world_size: int, total_steps: int) -> dict:
    """grpo: the completions a generating step samples (num_generations per prompt of the global batch), how
    many steps generate (every num_iterations-th), and the most tokens that takes (max_completion_length each)."""
    per_step = global_batch(config, world_size) * config.num_generations
    generating_steps = math.ceil(total_steps / config.num_iterations)
    return {"completions_per_step": per_step, "generating_steps": generating_steps,
            "max_tokens_per_step": per_step * config.max_completion_length,
            "max_tokens": per_step * config.max_completion_length * generating_steps}


def rotation(steps: list[int], limit: int | None, best: int | None = None) -> tuple[list[int], list[int]]:
    """Which of the saved steps survive `save_total_limit`: the newest `limit`, plus the best."""
    steps = sorted(steps)
    if limit is None or len(steps) <= limit:
        return steps, []
    kept = set(steps[-limit:])
    if best is not None and best in steps:
        kept.add(best)
    return sorted(kept), [s for s in steps if s not in kept]


# --- the rules --------------------------------------------------------------------------------


def _save_rules(config: TrainConfig, per_epoch: int | None, total: int, warnings: list[str], origin: int) -> dict:
    save_steps, save_epochs, per = config.save_steps, config.save_epochs, config.saves_per_epoch
    if config.save_strategy == "steps" and save_steps is None:
        save_steps = HF_DEFAULT_SAVE_STEPS
        warnings.append(f"save_strategy: steps without save_steps saves every {HF_DEFAULT_SAVE_STEPS} steps "
                        "(the Hugging Face default); set save_steps to choose")
    if config.save_strategy == "epoch" and per is None and save_epochs is None:
        if per_epoch is None:
            raise_unknown_epoch("save_strategy: epoch")
        per = 1
    if config.save_strategy == "epoch" and save_steps is not None:
        warnings.append(f"save_strategy: epoch and save_steps: {save_steps} are both used (every epoch and every "
                        f"{save_steps} steps); the Hugging Face Trainer would ignore save_steps")
    if save_steps is not None and save_steps > total:
        warnings.append(f"save_steps {save_steps} is larger than the run ({total} steps): it never saves; "
                        "only the final save is written")
    if save_epochs is not None and per_epoch is not None and origin + epoch_to_step(save_epochs, per_epoch) > total:
        epochs = (total - origin) / per_epoch
        warnings.append(f"save_epochs {save_epochs:g} is longer than the run ({epochs:.3g} epochs): "
                        "only the final save is written")
    if per is not None and per_epoch is not None and per > per_epoch:
        warnings.append(f"saves_per_epoch {per} is more than the {per_epoch} steps of an epoch: it saves at every "
                        "step")
    return _rule_steps(save_steps, save_epochs, per, per_epoch, total, 0, total, "steps", "epoch", origin=origin)


def _eval_rules(config: TrainConfig, per_epoch: int | None, total: int, has_eval: bool, warnings: list[str],
                origin: int):
    rules = (config.eval_steps, config.eval_epochs, config.evals_per_epoch)
    if not has_eval:
        if any(r is not None for r in rules) or config.eval_minutes:
            warnings.append("eval_* rules are set but there is no eval data (val_size is 0): no evaluation")
        if config.save_on_eval or config.metric_for_best_model:
            key = "save_on_eval" if config.save_on_eval else "metric_for_best_model"
            warnings.append(f"{key} is set but there is no eval data (val_size is 0): it has no effect")
        return {}
    if config.eval_steps is not None and config.eval_steps > total:
        warnings.append(f"eval_steps {config.eval_steps} is larger than the run ({total} steps): "
                        "only the final evaluation")
    evals = _rule_steps(*rules, per_epoch, total, 0, total, "steps", "epoch", ("eval_epochs", "evals_per_epoch"),
                        origin)
    if not evals and not config.eval_minutes:
        evals = {total: ["final"]}
    return evals


def _phase_range(phases: list[SavePhase], index: int, per_epoch: int | None, total: int,
                 warnings: list[str], origin: int) -> tuple[int, int]:
    """The steps (start, end] of phase `index`; ends must grow from one phase to the next."""
    from lmtune.errors import UserError

    def end_of(i: int) -> int:
        phase = phases[i]
        if phase.until_step is not None:
            return phase.until_step
        if per_epoch is None:
            raise_unknown_epoch(f"save_schedule[{i}].until_epoch")
        return origin + epoch_to_step(phase.until_epoch, per_epoch)

    start = end_of(index - 1) if index else 0
    end = end_of(index)
    if end <= start:
        def name(i: int) -> str:
            if phases[i].until_step is not None:
                return f"until_step {phases[i].until_step}"
            return f"until_epoch {phases[i].until_epoch:g} (step {end_of(i)})"

        raise UserError(
            f"save_schedule[{index}] ends at {name(index)}, not after the end of save_schedule[{index - 1}] "
            f"({name(index - 1)}); phases are listed in order and each must end later than the one before"
        )
    if start >= total:
        warnings.append(f"save_schedule[{index}] starts after the run's last step ({total}): it never applies")
    elif end > total:
        warnings.append(f"save_schedule[{index}] ends after the run's last step ({total}): it is cut there")
    return min(start, total), min(end, total)


def _rule_steps(
    every_steps: int | None, every_epochs: float | None, per_epoch_count: int | None, per_epoch: int | None,
    total: int, start: int, end: int, steps_reason: str, epoch_reason: str, keys: tuple[str, str] = SAVE_KEYS,
    origin: int = 0,
) -> dict[int, list[str]]:
    """The steps in (start, end] named by each rule, with the rule's reason; `keys` name the two epoch
    rules in an error; the rules counted in epochs count from step `origin`."""
    found: dict[int, list[str]] = {}
    if every_steps is not None:
        first = (start // every_steps + 1) * every_steps
        _merge(found, {s: [steps_reason] for s in range(first, end + 1, every_steps)})
    if every_epochs is not None:
        if per_epoch is None:
            raise_unknown_epoch(keys[0])
        steps = [origin + s for s in _every_epochs(every_epochs, per_epoch, end - origin)]
        _merge(found, {s: [epoch_reason] for s in steps if s > start})
    if per_epoch_count is not None:
        if per_epoch is None:
            raise_unknown_epoch(keys[1])
        steps = {origin + s for s in _evenly_per_epoch(per_epoch_count, per_epoch, total - origin)}
        _merge(found, {s: [epoch_reason] for s in steps if start < s <= end})
    return found


def _exact(value: float) -> Fraction:
    """A config number as the decimal the user wrote: 0.3 is 3/10."""
    return Fraction(repr(float(value)))


def epoch_to_step(epoch: float, per_epoch: int) -> int:
    """The first step at which `epoch` epochs are done."""
    return max(1, math.ceil(_exact(epoch) * per_epoch))


def _every_epochs(every: float, per_epoch: int, last: int) -> list[int]:
    step_size = _exact(every) * per_epoch
    steps, count = [], 1
    while (step := max(1, math.ceil(count * step_size))) <= last:
        steps.append(step)
        count += 1
    return steps


def _evenly_per_epoch(count: int, per_epoch: int, total: int) -> set[int]:
    """`count` evenly spaced steps in every epoch, the last at its end; a short last epoch too."""
    steps = set()
    for epoch_start in range(0, total, per_epoch):
        length = min(per_epoch, total - epoch_start)
        steps.update(epoch_start + -(-j * length // count) for j in range(1, count + 1))
    return steps


def _merge(into: dict[int, list[str]], more: dict[int, list[str]]) -> None:
    for step, reasons in more.items():
        bucket = into.setdefault(step, [])
        bucket.extend(r for r in reasons if r not in bucket)


def _warn_dense_saves(config: TrainConfig, written: int, total: int, size: int | None, warnings: list[str]) -> None:
    """Saving at a large share of the steps of a big model spends the run writing checkpoints."""
    if size is None or size < BIG_CHECKPOINT_BYTES or written < DENSE_SAVE_MIN_COUNT:
        return
    if written < DENSE_SAVE_SHARE * total:
        return
    keys = [key for key in ("save_steps", "save_epochs", "saves_per_epoch", "save_schedule", "save_on_eval")
            if getattr(config, key) not in (None, False)]
    every = "every step" if written >= total else f"{written} of {total} steps"
    warnings.append(
        f"{' + '.join(keys) or 'the save rules'} save at {every}, a checkpoint of about {size / 1000**3:.1f} GB "
        f"each ({written * size / 1000**3:.0f} GB written in all): saving will take much of the run; "
        "save less often, or set save_only_model: true"
    )


def raise_unknown_epoch(key: str) -> None:
    from lmtune.errors import UserError

    raise UserError(
        f"{key} needs the size of an epoch in optimizer steps, which a stream (streaming: true) does not have "
        "(a num_samples hint in dataset_info.json only estimates the epoch shown in progress); "
        "use save_steps / eval_steps / until_step or save_minutes instead, or set streaming: false"
    )
