"""Which rows go into which micro-batch, and how rows become tensors.

The order of an epoch is a pure function of (seed, epoch), so a run can be continued from any
micro-batch by slicing the list; every process takes its own stride of the same order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lmtune.data.templates import IGNORE_INDEX


def epoch_batches(
    num_rows: int, batch_size: int, seed: int, epoch: int, rank: int = 0, world_size: int = 1,
    shuffle: bool = True,
) -> list[list[int]]:
    """The micro-batches (row indices) of this process in one epoch."""
    if shuffle:
        generator = torch.Generator().manual_seed(seed + epoch)
        order = torch.randperm(num_rows, generator=generator).tolist()
        per_process = math.ceil(num_rows / world_size)
        order += order[: per_process * world_size - num_rows]  # every process gets as many rows
    else:
        order = list(range(num_rows))
    mine = order[rank::world_size]
    return [mine[start : start + batch_size] for start in range(0, len(mine), batch_size)]


@dataclass
class Counts:
    """What a micro-batch holds, for progress: examples, non-padding tokens, trained tokens."""

    samples: int
    tokens: int
    trained_tokens: int
    stream_position: float = 0.0  # passes over a streamed data set, as a float


class Collator:
    """Pads a list of rows to the longest. Packed rows carry position ids that restart at each
    example (and at the padding), which tells the model's attention to keep examples apart."""

    def __init__(self, pad_token_id: int, packed: bool):
        self.pad_token_id = pad_token_id
        self.packed = packed

    def __call__(self, rows: list[dict]) -> tuple[dict[str, torch.Tensor], Counts]:
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
        samples = int(((positions == 0) & (attention == 1)).sum())  # an example starts at position 0
        counts = Counts(samples, int(attention.sum()), int((labels[:, 1:] != IGNORE_INDEX).sum()),
                        max(row.get("stream_position", 0.0) for row in rows))
        if self.packed:
            return {"input_ids": input_ids, "labels": labels, "position_ids": positions}, counts
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention}, counts
