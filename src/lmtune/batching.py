"""Which rows go into which micro-batch, and how rows become tensors.

The order of an epoch is a pure function of (seed, epoch), the same for any number of processes, so
a run can be continued from any row of it (on any number of processes) by slicing the list; every
process takes its own stride of what is left.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import torch

from lmtune.data.templates import IGNORE_INDEX
from lmtune.paths import cache_home


def epoch_order(num_rows: int, seed: int, epoch: int) -> list[int]:
    """The order of an epoch's rows: the same on every process, whatever their number."""
    generator = torch.Generator().manual_seed(seed + epoch)
    return torch.randperm(num_rows, generator=generator).tolist()


def epoch_batches(
    num_rows: int, batch_size: int, seed: int, epoch: int, rank: int = 0, world_size: int = 1,
    shuffle: bool = True, start: int = 0,
) -> list[list[int]]:
    """The micro-batches (row indices) of this process in one epoch, from row `start` of the epoch's order.

    Optimizer step j of all processes together trains rows [start + j*G, start + (j+1)*G) of the order
    (G the global batch): the rows left are the same whatever the number of processes. They are padded
    to a multiple of the processes with the epoch's first rows as repeats (`repeat_index`), which keep
    every process at the same number of micro-batches and train nothing."""
    if shuffle:
        order = epoch_order(num_rows, seed, epoch)
        rows = order[start:]
        rows += [repeat_index(row) for row in order[: -len(rows) % world_size]]
    else:
        rows = list(range(num_rows))
    mine = rows[rank::world_size]
    return [mine[first : first + batch_size] for first in range(0, len(mine), batch_size)]


def repeat_index(row: int) -> int:
    """The index by which `EpochRows` gives `row` as a repeat: nothing trained, nothing counted."""
    return -1 - row


class EpochRows(torch.utils.data.Dataset):
    """The training rows by index; a repeat index gives its row with every label masked."""

    def __init__(self, rows: Any):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        if index >= 0:
            return self.rows[index]
        row = self.rows[-1 - index]
        return {**row, "labels": [IGNORE_INDEX] * len(row["labels"]), "repeat": True}


@dataclass
class Counts:
    """What a micro-batch holds, for progress: samples (rows of the data: examples, or preference pairs; the
    examples of a packed row), non-padding tokens, trained tokens."""

    samples: int
    tokens: int
    trained_tokens: int


class Collator:
    """Rows to tensors, one of three ways:

    - padding-free (`padding_free`): the rows of the micro-batch laid end to end in one row, no padding;
    - padded, packed rows: padded to the longest, position ids only;
    - padded: padded to the longest, with an attention mask; a row of several sequences (a preference
      pair) becomes a row for each, since an attention mask does not keep them apart.

    Position ids restart at each example (and at the padding); without an attention mask, that is what
    tells the model's attention to keep examples apart. Precomputed reference log-probabilities of a
    pair's sequences (`ref_logps`) come along, in the order of the sequences, and a kto example's mark
    (`kto_tag`), one a row."""

    def __init__(self, pad_token_id: int, packed: bool, padding_free: bool = False):
        self.pad_token_id = pad_token_id
        self.packed = packed
        self.padding_free = padding_free

    def __call__(self, rows: list[dict]) -> tuple[dict[str, torch.Tensor], Counts]:
        trained = [row for row in rows if not row.get("repeat")]  # a repeat trains nothing and is not counted
        samples = sum(list(row["position_ids"]).count(0) for row in trained) if self.packed else len(trained)
        repeated_tokens = sum(len(row["input_ids"]) for row in rows if row.get("repeat"))
        reference = [value for row in rows for value in row["ref_logps"]] if "ref_logps" in rows[0] else None
        kto_tags = [bool(row["kto_tag"]) for row in rows] if "kto_tag" in rows[0] else None
        if self.padding_free:
            rows = [{key: [value for row in rows for value in row[key]]
                     for key in ("input_ids", "labels", "position_ids")}]
        elif not self.packed:
            rows = [sequence for row in rows for sequence in _sequences(row)]
        width = max(len(row["input_ids"]) for row in rows)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        positions = torch.zeros((len(rows), width), dtype=torch.long)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        for index, row in enumerate(rows):
            length = len(row["input_ids"])
            input_ids[index, :length] = torch.tensor(row["input_ids"])
            labels[index, :length] = torch.tensor(row["labels"])
            positions[index, :length] = torch.tensor(row["position_ids"])
            positions[index, length:] = torch.arange(width - length)
            attention[index, :length] = 1
        counts = Counts(samples, int(attention.sum()) - repeated_tokens, int((labels[:, 1:] != IGNORE_INDEX).sum()))
        batch = {"input_ids": input_ids, "labels": labels}
        if self.packed or self.padding_free:
            batch["position_ids"] = positions
        else:
            batch["attention_mask"] = attention
        if reference is not None:
            batch["ref_logps"] = torch.tensor(reference, dtype=torch.float32)
        if kto_tags is not None:
            batch["kto_tag"] = torch.tensor(kto_tags, dtype=torch.bool)
        return batch, counts


def _sequences(row: dict) -> list[dict]:
    """A row cut where its position ids restart: one example, or the two sequences of a pair."""
    starts = [i for i, position in enumerate(row["position_ids"]) if position == 0] + [len(row["input_ids"])]
    return [{key: row[key][start:end] for key in ("input_ids", "labels", "position_ids")}
            for start, end in zip(starts, starts[1:], strict=False)]


def padding_share(row_lengths: list[int], batch_size: int, seed: int) -> float:
    """The share of padding in the first epoch's micro-batches (one process), each padded to its longest row."""
    if not row_lengths:
        return 0.0
    padded = real = 0
    for batch in epoch_batches(len(row_lengths), batch_size, seed, epoch=0):
        lengths = [row_lengths[i] for i in batch]
        padded += max(lengths) * len(lengths)
        real += sum(lengths)
    return 1 - real / padded


def keeps_examples_apart(model: torch.nn.Module) -> bool:
    """Whether the model reads two examples laid end to end (position ids restarting, no attention mask)
    as it reads each alone. Linear-attention and convolution layers carry state from one token to the
    next whatever the position ids say: those models need padded batches."""
    first, second = [5, 6, 7, 8], [9, 10, 11]
    rows = [{"input_ids": ids, "labels": ids, "position_ids": list(range(len(ids)))} for ids in (first, second)]
    joined, _ = Collator(0, packed=False, padding_free=True)(rows)
    device = next(model.parameters()).device
    # flash-attn computes in 16 bits only: the check then runs as training does, in bfloat16 autocast
    sixteen_bits = getattr(model.config, "_attn_implementation", None) == "flash_attention_2"
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=sixteen_bits):
            together = model(input_ids=joined["input_ids"].to(device), position_ids=joined["position_ids"].to(device),
                             use_cache=False).logits[0, len(first):]
            alone = model(input_ids=torch.tensor([second], device=device), use_cache=False).logits[0]
    except TypeError:  # a forward without position ids
        return False
    finally:
        model.train(was_training)
    # a model that mixes examples is off by far more than bfloat16's rounding
    tolerance = {"rtol": 3e-2, "atol": 3e-2} if sixteen_bits else {"rtol": 1e-3, "atol": 1e-4}
    return torch.allclose(together.float(), alone.float(), **tolerance)


def model_keeps_examples_apart(model: torch.nn.Module) -> bool:
    """`keeps_examples_apart`, its verdict kept in the cache for the model's architecture: a run of a model
    already checked (the same config, attention, precision and library versions) needs no forward pass."""
    import transformers

    config, weight = model.config, next(model.parameters())
    described = json.dumps([type(model).__name__, config.to_json_string(use_diff=False),
                            getattr(config, "_attn_implementation", None), weight.device.type, str(weight.dtype),
                            transformers.__version__, torch.__version__])
    verdict_file = cache_home() / "checks" / f"apart-{hashlib.sha256(described.encode()).hexdigest()[:24]}.json"
    try:
        return bool(json.loads(verdict_file.read_text())["keeps_examples_apart"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    verdict = keeps_examples_apart(model)
    try:
        verdict_file.parent.mkdir(parents=True, exist_ok=True)
        partial = verdict_file.with_suffix(".tmp")
        partial.write_text(json.dumps({"keeps_examples_apart": verdict}))
        partial.replace(verdict_file)
    except OSError:
        pass  # a read-only cache: the next run checks again
    return verdict


def batching_of(config: Any, row_lengths: list[int], model: torch.nn.Module | None = None) -> dict[str, Any]:
    """How the run's micro-batches are laid out, and the padding that saves: for the plan, the log and the
    collator. With a model, padding-free batching is checked to keep its examples apart."""
    padding_free, note = config.use_padding_free, None
    if padding_free and model is not None and not model_keeps_examples_apart(model):
        padding_free = False
        note = (f"padding_free: this {model.config.model_type} model mixes examples laid end to end in one row "
                "(its layers carry state across the position ids), so its micro-batches are padded instead")
    share = padding_share(row_lengths, config.per_device_train_batch_size, config.seed) if row_lengths else None
    return {"padding_free": padding_free, "packing": config.use_packing, "padding_share": share, "note": note}


def batching_line(batching: dict[str, Any]) -> str:
    rows = "packed rows" if batching["packing"] else "examples"
    share = batching["padding_share"]
    if batching["padding_free"]:
        removed = f"{share:.1%} of the tokens padded batches would hold" if share is not None else "all padding"
        return (f"batching: padding-free: the {rows} of each micro-batch laid end to end in one row (same batches "
                f"and steps as padded ones); this removes {removed} (padding_free: false pads them instead)")
    padding = f": padding is {share:.1%} of their tokens" if share is not None else ""
    return f"batching: padded: the {rows} of each micro-batch padded to the longest{padding}"
