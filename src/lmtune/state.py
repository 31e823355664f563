"""The saved state of a run: everything a resume restores, in one place.

The loop reads and writes a `TrainState` (the callbacks' `RunState` extends it); `checkpoint.py`
alone turns it into the files of a checkpoint and back.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

STATE_VERSION = 3
VERSION_3_FIELDS = ("data_epoch", "data_rows")  # what version 2 lacks; its checkpoints still resume


@dataclass
class Schedule:
    """The learning-rate schedule in effect: rebuilt as it was on a `resume_lr: keep` resume."""

    lr_scheduler_type: str
    learning_rate: float  # the peak
    warmup_steps: int
    total_steps: int


@dataclass
class TrainState:
    """After step `step`: the counters, the data position, the stream's pass, the schedule, the RNG of
    every process."""

    step: int = 0
    epoch: float | None = 0.0
    # data of known size: the epoch in training and how many rows of its order all processes have trained,
    # so that a resume on any number of processes, with any batch, continues at that row (None: a state of
    # version 2, which saved no position; resume.settle_data_position derives it)
    data_epoch: int | None = 0
    data_rows: int | None = 0
    samples_seen: int = 0
    tokens_seen: int = 0
    stream_pass: int = 0
    elapsed_s: float = 0.0
    best_metric: float | None = None
    last_metrics: dict[str, float] = field(default_factory=dict)
    schedule: Schedule | None = None
    data_fingerprint: dict[str, str] = field(default_factory=dict)  # data files and tokenizer trained on
    run_config: dict[str, Any] = field(default_factory=dict)  # the resolved config of the run
    # per process, in process order: python / numpy / torch (/ cuda) RNG, and a stream's loader position
    rng: list[dict[str, Any]] = field(default_factory=list)
    data_loader: list[dict[str, Any]] | None = None
    # per process: the stage's own state (grpo: the sampling RNG and the generated batch kept for more steps)
    stage: list[dict[str, Any]] | None = None

    def saved_fields(self) -> TrainState:
        """A copy holding only this class's fields (a `RunState` carries more), sharing no dict."""
        import copy

        return TrainState(**{f.name: copy.deepcopy(getattr(self, f.name)) for f in dataclasses.fields(TrainState)})

    def restore_into(self, target: TrainState) -> None:
        for f in dataclasses.fields(TrainState):
            setattr(target, f.name, getattr(self, f.name))


# The fields that go to train_state.json; the others (tensors, RNG tuples) to rng_state.pth.
BINARY_FIELDS = ("rng", "data_loader", "stage")


def state_to_json(state: TrainState) -> dict[str, Any]:
    values = {f.name: getattr(state, f.name) for f in dataclasses.fields(TrainState) if f.name not in BINARY_FIELDS}
    if state.schedule is not None:
        values["schedule"] = dataclasses.asdict(state.schedule)
    return {"version": STATE_VERSION, **values}


def state_from_json(values: dict[str, Any], binary: dict[str, Any]) -> TrainState:
    """The state written by `state_to_json` and the binary fields; a missing field is a KeyError."""
    names = [f.name for f in dataclasses.fields(TrainState)]
    missing = [name for name in names if name not in values and name not in BINARY_FIELDS]
    if values.get("version") == 2 and set(missing) == set(VERSION_3_FIELDS):
        values, missing = {**values, **dict.fromkeys(VERSION_3_FIELDS)}, []
    if values.get("version") not in (2, STATE_VERSION) or missing:
        raise KeyError(f"written by another version of lmtune (version {values.get('version')}, "
                       f"missing {', '.join(missing) or 'nothing'})")
    kwargs = {name: values[name] for name in names if name not in BINARY_FIELDS}
    kwargs.update({name: binary.get(name) for name in BINARY_FIELDS})
    if kwargs["schedule"] is not None:
        kwargs["schedule"] = Schedule(**kwargs["schedule"])
    return TrainState(**kwargs)
