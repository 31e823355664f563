"""The learning-rate schedule: built from a `Schedule`, so that a resume can rebuild the one in effect.

`resume_lr: keep` continues the checkpoint's own schedule (type, peak, warm-up, total steps), whatever
the config says now; `resume_lr: config` applies the config's schedule, over the run's length now,
from the resume step on. Past the end of its total steps a schedule holds its last rate.
"""

from __future__ import annotations

from typing import Any

from lmtune.config import TrainConfig
from lmtune.state import Schedule


def config_schedule(config: TrainConfig, total_steps: int) -> Schedule:
    return Schedule(config.lr_scheduler_type, config.learning_rate, config.warmup_for(total_steps), total_steps)


def resumed_schedule(saved: Schedule, config: TrainConfig, total_steps: int) -> Schedule:
    return saved if config.resume_lr == "keep" else config_schedule(config, total_steps)


class _HeldAfterEnd:
    """A schedule's factor, held at its value of the last step once the schedule has ended (transformers'
    cosine would rise again past its end)."""

    def __init__(self, factor: Any, last_step: int):
        self.factor, self.last_step = factor, last_step

    def __call__(self, step: int) -> float:
        return self.factor(min(step, self.last_step))


def build_scheduler(optimizer: Any, schedule: Schedule, step: int = 0) -> Any:
    """A LambdaLR over `optimizer` at `step` of `schedule`: the optimizer's rate is the one of `step`."""
    from lmtune.models import without_bitsandbytes

    with without_bitsandbytes():  # transformers' schedules module imports peft (a full run's 2 s of CPU with it)
        from transformers import get_scheduler

    for group in optimizer.param_groups:  # lr_scale: LoRA+'s B matrices train at a multiple of the rate
        group["initial_lr"] = group["lr"] = schedule.learning_rate * group.get("lr_scale", 1.0)
    scheduler = get_scheduler(schedule.lr_scheduler_type, optimizer, num_warmup_steps=schedule.warmup_steps,
                              num_training_steps=schedule.total_steps)
    scheduler.lr_lambdas = [_HeldAfterEnd(factor, schedule.total_steps) for factor in scheduler.lr_lambdas]
    scheduler.last_epoch = step
    for group, base, factor in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas, strict=True):
        group["lr"] = base * factor(step)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
    return scheduler


def lr_at(schedule: Schedule, step: int) -> float:
    import torch

    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=schedule.learning_rate)
    return build_scheduler(optimizer, schedule, step).get_last_lr()[0]


def describe(schedule: Schedule) -> str:
    return (f"{schedule.lr_scheduler_type}, peak {schedule.learning_rate:.3g}, {schedule.warmup_steps} warm-up steps, "
            f"{schedule.total_steps} steps")


def resume_lr_lines(saved: Schedule, config: TrainConfig, step: int, total_steps: int) -> list[str]:
    """What the learning rate does from the resume step to the end, for the plan and the log."""
    schedule = resumed_schedule(saved, config, total_steps)
    now, last = lr_at(schedule, step), lr_at(schedule, total_steps)
    if config.resume_lr == "keep":
        lines = [f"learning rate (resume_lr: keep): the saved schedule continues ({describe(saved)}): "
                 f"{now:.3g} at step {step}, {last:.3g} at step {total_steps}"]
        if total_steps > saved.total_steps:
            lines.append(f"the run now ends at step {total_steps}, after the saved schedule's end (step "
                         f"{saved.total_steps}): steps {saved.total_steps + 1}..{total_steps} keep its last rate "
                         f"{lr_at(saved, saved.total_steps):.3g}; set resume_lr: config to train them on the "
                         "config's schedule")
        if schedule != config_schedule(config, total_steps):
            lines.append(f"the config's schedule ({describe(config_schedule(config, total_steps))}) is not applied; "
                         "set resume_lr: config to apply it from the resume step")
        return lines
    return [f"learning rate (resume_lr: config): the config's schedule ({describe(schedule)}) applies from step "
            f"{step}: {lr_at(saved, step):.3g} -> {now:.3g} at step {step}, {last:.3g} at step {total_steps}"]
