"""`lmtune eval`: loss and perplexity of a model on the eval split of a run, or on a given data set.

The data goes through `prepare_data`, the `Collator` and the batch loss (lmtune.loss) exactly as in
training, so the loss is the training loss: mean over trained tokens (labels not masked), summed over
the whole set, not averaged per batch. Perplexity is exp(loss). For a preference run (stages dpo, kto) the
loss is the mean over pairs (kto: examples), with the reward metrics training logs, against the reference
training used (the adapter switched off, or the base model loaded again for full and freeze). For a
reward model (stage rm) it is the mean pairwise loss, with the pairwise accuracy and the mean margin.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
from pathlib import Path
from typing import Any

import torch

from lmtune.batching import Collator, batching_of, epoch_batches
from lmtune.chat import Target, load_model_for_inference, resolve_target
from lmtune.config import TrainConfig, load_config
from lmtune.errors import UserError
from lmtune.stages import loss_for_stage

log = logging.getLogger("lmtune")


def evaluate(config_or_run: Path, checkpoint: str | None = None, dataset: str | None = None) -> dict[str, Any]:
    """The report: what was measured (model, data) and the numbers."""
    config, run_dir = _config_of(config_or_run)
    target = _model_of(config, run_dir, checkpoint, config_or_run)
    if dataset is not None:
        config = config.model_copy(update={"dataset": dataset, "val_size": 0.0, "streaming": False})
    elif config.val_size <= 0:
        raise UserError(f"{config_or_run}: the run has no eval split (val_size is 0); give --dataset NAME_OR_FILE "
                        "or set val_size")
    model, tokenizer = load_model_for_inference(target)
    rows = _rows_to_evaluate(config, tokenizer, whole=dataset is not None)
    if rows is None or len(rows) == 0:
        raise UserError(f"{config_or_run}: no rows to evaluate")
    loss_of = _loss_for(config, model)
    loss_sum, count, examples, metric_sums = _loss_sum(model, rows, tokenizer.pad_token_id, config, loss_of)
    if count == 0:
        raise UserError(f"{config_or_run}: the data has no trained tokens (every label is masked)")
    loss = loss_sum / count
    report = {
        "model": target.describe() | {"step": _step_of(target)},
        "data": {"dataset": config.datasets, "dataset_dir": config.dataset_dir,
                 "split": "all" if dataset is not None else _split_name(config),
                 "cutoff_len": config.cutoff_len, "packing": config.use_packing, "template": config.template},
        "examples": examples,
        "tokens": count,
        "loss": loss,
        "perplexity": math.exp(loss) if loss < 700 else float("inf"),
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    if config.stage in ("dpo", "kto", "rm"):  # a mean over pairs or examples: no tokens, no perplexity
        del report["tokens"], report["perplexity"]
        report |= {config.sample_name: count} | loss_of.reported_metrics([value / count for value in metric_sums])
    return report


def _loss_for(config: TrainConfig, model: Any) -> Any:
    """The batch loss training used: the stage's, with the run's reference for dpo and kto."""
    from lmtune.preference import AdapterOff, FrozenModel

    reference = None
    if config.uses_reference and hasattr(model, "disable_adapter"):
        reference = AdapterOff(model)
    elif config.uses_reference:
        base, _ = load_model_for_inference(config.model_name_or_path, str(model.device))
        reference = FrozenModel(base)
    return loss_for_stage(model, config, reference)


def _rows_to_evaluate(config: TrainConfig, tokenizer: Any, whole: bool) -> Any:
    """The whole data set, or the eval split the run evaluated on (for a stream: its held-out first rows)."""
    if config.streaming and not whole:
        from lmtune.data.processing import rows_of_examples
        from lmtune.data.streaming import open_stream

        _, info = open_stream(config, tokenizer)
        return rows_of_examples(info.held_out, config)
    from lmtune.data import prepare_data

    data = prepare_data(config, tokenizer)
    return data.train if whole else data.eval


def _split_name(config: TrainConfig) -> str:
    if config.streaming:
        return f"eval (the first {int(config.val_size)} rows of the stream, val_size)"
    return f"eval (val_size {config.val_size}, seed {config.seed})"


def _config_of(config_or_run: Path) -> tuple[TrainConfig, Path | None]:
    """A YAML file, a run folder (its run_config.yaml) or a checkpoint folder (its run's)."""
    if config_or_run.is_file():
        return load_config(config_or_run), None
    for run_dir in (config_or_run, config_or_run.parent):
        if config_or_run.is_dir() and (run_dir / "run_config.yaml").is_file():
            return load_config(run_dir / "run_config.yaml"), run_dir
    raise UserError(f"{config_or_run}: expected a config YAML file, a run folder (with run_config.yaml) or one "
                    "of its checkpoint folders")


def _model_of(config: TrainConfig, run_dir: Path | None, checkpoint: str | None, given: Path) -> Target:
    """--checkpoint (any model chat accepts), else the checkpoint or run given, else the config's run."""
    if checkpoint is not None:
        return resolve_target(checkpoint)
    if run_dir is not None:
        return resolve_target(str(given))
    output_dir = Path(config.output_dir)
    if (output_dir / "run_config.yaml").is_file():
        return resolve_target(str(output_dir))
    raise UserError(f"{given}: its output_dir {output_dir} holds no run yet; train it first, or name the model "
                    "with --checkpoint (a checkpoint folder, a model folder or the base model)")


def _step_of(target: Target) -> int | None:
    from lmtune.checkpoint import DamagedCheckpoint, is_complete_checkpoint, read_state

    if not is_complete_checkpoint(Path(target.model_path)):
        return None
    try:
        return read_state(Path(target.model_path)).step
    except DamagedCheckpoint:
        return None


def _loss_sum(model: Any, rows: Any, pad_token_id: int, config: TrainConfig,
              loss_of: Any) -> tuple[float, int, int, list[float]]:
    """(summed loss, the count it is a sum over: trained tokens or pairs, examples, summed metrics), in the
    order of the rows."""
    padding_free = batching_of(config, [], model)["padding_free"]
    collator = Collator(pad_token_id, packed=config.use_packing, padding_free=padding_free)
    batches = epoch_batches(len(rows), config.per_device_eval_batch_size, 0, 0, shuffle=False)
    loss_sum, count, examples = 0.0, 0, 0
    metric_sums = torch.zeros(len(loss_of.metric_names), dtype=torch.float64)
    with torch.no_grad():
        for indices in batches:
            batch, counts = collator([rows[i] for i in indices])
            batch = {key: value.to(model.device) for key, value in batch.items()}
            loss_sum += float(loss_of(model, batch).double())
            metric_sums += loss_of.metric_sums().double().cpu()
            count += getattr(counts, loss_of.divided_by)
            examples += counts.samples
    return loss_sum, count, examples, metric_sums.tolist()


def write_report(report: dict[str, Any], out: Path | None) -> str:
    text = json.dumps(report, indent=1)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
    return text
