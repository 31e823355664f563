"""The loss of a batch: summed next-token cross-entropy over its trained positions.

The engine divides the sum by the trained tokens of the whole optimizer step (all micro-batches, all
processes), evaluation by those of the whole eval set, so that every token weighs the same.

`TrainedPositionsLoss` (the default) runs the model's forward without its output layer, takes the
final hidden states where the next label is not -100, and applies the output layer and the
cross-entropy to those alone, a chunk of positions at a time: the logits of the masked prompt and of
padding are never computed, and the logits of a long row never exist all at once. `FullLogitsLoss` is
the model's own loss over every position: for models whose forward cannot leave out its logits.
A stage with another loss (DPO) plugs in as an object of the same shape: `loss(model, batch)`.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from lmtune.data.templates import IGNORE_INDEX

log = logging.getLogger("lmtune")

# Logits of at most this many (position, vocabulary entry) pairs at once: 256 MB in float32, 1,365
# positions of a 49,152-word vocabulary. A batch with more trained positions is taken in chunks, each
# computed again in the backward pass (one more forward of the output layer) instead of being kept.
LOGITS_PER_CHUNK = 2**26


class FullLogitsLoss:
    """The model's own loss: logits at every position, cross-entropy summed over the trained ones."""

    def __call__(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        # num_items_in_batch=1: transformers divides its summed loss by it, so this is the sum
        return model(**batch, num_items_in_batch=1, use_cache=False).loss


class TrainedPositionsLoss:
    """Hidden states -> logits at trained positions only -> summed cross-entropy, in chunks.

    `model` is the unwrapped model (a PeftModel or a transformers causal LM); the call takes the model
    as training runs it (wrapped for several processes), so the forward goes through the wrapper and
    its gradient synchronisation, and the output layer is applied after it, as a module call."""

    def __init__(self, model: torch.nn.Module):
        causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.head = causal_lm.get_output_embeddings()
        self.vocab_size = self.head.weight.shape[0]
        self._hidden: torch.Tensor | None = None
        causal_lm.get_decoder().register_forward_hook(self._keep_hidden_states)

    def _keep_hidden_states(self, module: Any, args: Any, output: Any) -> None:
        self._hidden = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]

    def __call__(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        labels = batch["labels"]
        inputs = {key: value for key, value in batch.items() if key != "labels"}
        no_logits = torch.zeros(0, dtype=torch.long, device=labels.device)
        model(**inputs, logits_to_keep=no_logits, use_cache=False)  # the forward; its output layer on no position
        hidden, self._hidden = self._hidden, None
        # position i predicts token i+1: its target is labels[i+1]
        targets = labels[:, 1:]
        trained = targets != IGNORE_INDEX
        hidden, targets = hidden[:, :-1][trained], targets[trained]
        return self._summed_cross_entropy(hidden, targets)

    def _summed_cross_entropy(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        chunk = max(1, LOGITS_PER_CHUNK // self.vocab_size)
        if len(targets) <= chunk:
            return self._chunk_loss(hidden, targets)
        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, len(targets), chunk):
            part = (hidden[start : start + chunk], targets[start : start + chunk])
            if torch.is_grad_enabled():
                # the chunk's logits are computed again in the backward pass instead of being kept
                total = total + checkpoint(self._chunk_loss, *part, use_reentrant=False)
            else:
                total = total + self._chunk_loss(*part)
        return total

    def _chunk_loss(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = self.head(hidden).float()  # in float32, as transformers computes its loss
        return F.cross_entropy(logits, targets, reduction="sum")


def batch_loss_for(model: torch.nn.Module) -> TrainedPositionsLoss | FullLogitsLoss:
    """The loss of the run's model: trained positions only where the model's forward can leave out its
    logits (`logits_to_keep`) and has a decoder whose hidden states the output layer reads."""
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    forward = inspect.signature(causal_lm.forward).parameters
    try:
        causal_lm.get_decoder()
        has_head = causal_lm.get_output_embeddings() is not None
    except (AttributeError, NotImplementedError):
        has_head = False
    if "logits_to_keep" in forward and has_head:
        return TrainedPositionsLoss(model)
    log.info("%s computes logits at every position (its forward has no logits_to_keep)", type(causal_lm).__name__)
    return FullLogitsLoss()
