"""`report_to`: the experiment trackers a run logs to, each a callback over its own library.

- tensorboard: event files in output_dir/runs;
- wandb: online when it can log in, else offline in output_dir/wandb (`wandb sync` uploads it later);
  WANDB_MODE and the other WANDB_* variables are read by wandb as usual;
- mlflow: a local `./mlruns` folder unless MLFLOW_TRACKING_URI names another store;
- swanlab: its library's own defaults (SWANLAB_MODE=offline keeps it local).

Train rows are logged as train/<metric>, eval rows as eval/loss, at the run's step.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from lmtune.callbacks import RunState, TensorBoardWriter
from lmtune.config import TrainConfig

log = logging.getLogger("lmtune")
TRAIN_METRICS = ("loss", "lr", "grad_norm", "tokens_per_s", "mem_peak_mb")


def tracker_callbacks(config: TrainConfig, output_dir: Path) -> list[Any]:
    makers = {"tensorboard": lambda: TensorBoardWriter(output_dir / "runs"), "wandb": lambda: WandbTracker(output_dir),
              "mlflow": lambda: MlflowTracker(), "swanlab": lambda: SwanlabTracker(output_dir)}
    return [makers[name]() for name in config.trackers]


def run_name(config: TrainConfig, output_dir: Path) -> str:
    return config.run_name or Path(output_dir).resolve().name


def train_values(metrics: dict[str, Any]) -> dict[str, float]:
    return {f"train/{key}": float(metrics[key]) for key in TRAIN_METRICS if metrics.get(key) is not None}


def wandb_has_credentials() -> bool:
    """W&B can reach its server only with an API key; without one it runs offline, never prompting."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    return netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="replace")


class RunObjectTracker:
    """A tracker whose run has `log(values, step=)` and `finish()` (W&B's run object, the swanlab module)."""

    def __init__(self, output_dir: Path):
        self.output_dir = Path(output_dir)
        self.run = None

    def on_step_end(self, state: RunState, metrics: dict | None) -> None:
        if metrics is not None and self.run is not None:
            self.run.log(train_values(metrics), step=metrics["step"])

    def on_evaluate(self, state: RunState, metrics: dict) -> None:
        if self.run is not None:
            self.run.log({"eval/loss": metrics["eval_loss"]}, step=metrics["step"])

    def on_train_end(self, state: RunState) -> None:
        if self.run is not None:
            self.run.finish()


class WandbTracker(RunObjectTracker):
    def on_train_begin(self, state: RunState, model: Any) -> None:
        import wandb

        mode = os.environ.get("WANDB_MODE") or ("online" if wandb_has_credentials() else "offline")
        if mode == "offline":
            log.info("wandb: no API key, logging offline to %s (upload it later with `wandb sync`)",
                     self.output_dir / "wandb")
        self.run = wandb.init(dir=str(self.output_dir), name=run_name(state.config, self.output_dir), mode=mode,
                              config=state.config.to_yaml_dict(), resume="allow",
                              id=_stable_id(self.output_dir))


def _stable_id(output_dir: Path) -> str:
    """One W&B run per run folder, so a resumed run goes on in the same W&B run."""
    import hashlib

    return hashlib.sha256(str(Path(output_dir).resolve()).encode()).hexdigest()[:16]


class MlflowTracker:
    def __init__(self) -> None:
        self.active = False

    def on_train_begin(self, state: RunState, model: Any) -> None:
        import mlflow

        if not os.environ.get("MLFLOW_TRACKING_URI"):
            # MLflow 3 asks for this before it writes a plain ./mlruns folder (its classic local store)
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            mlflow.set_tracking_uri(Path("mlruns").resolve().as_uri())
        mlflow.start_run(run_name=run_name(state.config, state.output_dir))
        mlflow.log_params({k: str(v)[:250] for k, v in state.config.to_yaml_dict().items()})
        self.active = True

    def on_step_end(self, state: RunState, metrics: dict | None) -> None:
        import mlflow

        if metrics is not None and self.active:
            mlflow.log_metrics({k.replace("/", "_"): v for k, v in train_values(metrics).items()},
                               step=metrics["step"])

    def on_evaluate(self, state: RunState, metrics: dict) -> None:
        import mlflow

        if self.active:
            mlflow.log_metrics({"eval_loss": metrics["eval_loss"]}, step=metrics["step"])

    def on_train_end(self, state: RunState) -> None:
        import mlflow

        if self.active:
            mlflow.end_run()
            self.active = False


class SwanlabTracker(RunObjectTracker):
    def on_train_begin(self, state: RunState, model: Any) -> None:
        import swanlab

        swanlab.init(experiment_name=run_name(state.config, self.output_dir), config=state.config.to_yaml_dict(),
                     logdir=str(self.output_dir / "swanlog"))
        self.run = swanlab  # the documented API logs and finishes through the module: swanlab.log, swanlab.finish
