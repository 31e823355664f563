"""The loss of a batch: summed next-token cross-entropy over its trained positions.

A batch loss says what its sum is a sum over (`divided_by`, a field of the micro-batch's Counts): the
engine divides the sum by that count over the whole optimizer step (all micro-batches, all processes),
evaluation by that of the whole eval set, so that every token (SFT) or every pair (DPO) weighs the same.
Metrics of the loss (`metric_names`, `metric_sums()`) are sums too, divided by the same count.

`reported_metrics` turns those means into what a log row shows (kto's rewards are means over the desirable
or the undesirable examples alone: ratios of two of its sums).

`TrainedPositionsLoss` (the default) runs the model's forward without its output layer, takes the
final hidden states where the next label is not -100, and applies the output layer and the
cross-entropy to those alone, a chunk of positions at a time: the logits of the masked prompt and of
padding are never computed, and the logits of a long row never exist all at once. `FullLogitsLoss` is
the model's own loss over every position: for models whose forward cannot leave out its logits.
A stage with another loss (dpo and kto in lmtune.preference, rm in lmtune.reward) plugs in as an object
of the same shape; lmtune.stages picks it.
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


class TokenSumLoss:
    """The contract of a batch loss: `loss(model, batch)` is a sum over `divided_by` units; the metrics it
    reports with it are sums over the same units (SFT reports none)."""

    divided_by = "trained_tokens"
    metric_names: tuple[str, ...] = ()

    def metric_sums(self) -> torch.Tensor:
        """The metric sums of the last batch, in `metric_names` order."""
        return torch.zeros(0)

    def reported_metrics(self, means: list[float]) -> dict[str, float]:
        """The metrics a log row shows, from the metric sums each divided by its `divided_by` count: the
        means themselves, unless a stage's metrics are ratios of its sums."""
        return dict(zip(self.metric_names, means, strict=True))

    def remove(self) -> None:
        """Leaves the model as it was (no hook of this loss left on it)."""


class FullLogitsLoss(TokenSumLoss):
    """The model's own loss: logits at every position, cross-entropy summed over the trained ones."""

    def __call__(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        # num_items_in_batch=1: transformers divides its summed loss by it, so this is the sum
        return model(**batch, num_items_in_batch=1, use_cache=False).loss

    def token_losses(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The cross-entropy of each trained position (float32), and the [rows, length - 1] mask of them."""
        inputs = {key: value for key, value in batch.items() if key != "labels"}
        logits = model(**inputs, use_cache=False).logits[:, :-1]
        targets = batch["labels"][:, 1:]
        trained = targets != IGNORE_INDEX
        return F.cross_entropy(logits[trained].float(), targets[trained], reduction="none"), trained


class TrainedPositionsLoss(TokenSumLoss):
    """Hidden states -> logits at trained positions only -> summed cross-entropy, in chunks.

    `model` is the unwrapped model (a PeftModel or a transformers causal LM); the call takes the model
    as training runs it (wrapped for several processes), so the forward goes through the wrapper and
    its gradient synchronisation, and the output layer is applied after it, as a module call."""

    def __init__(self, model: torch.nn.Module):
        causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.head = causal_lm.get_output_embeddings()
        self.vocab_size = self.head.weight.shape[0]
        self._hidden: torch.Tensor | None = None
        self._hook = causal_lm.get_decoder().register_forward_hook(self._keep_hidden_states)

    def remove(self) -> None:
        self._hook.remove()

    def _keep_hidden_states(self, module: Any, args: Any, output: Any) -> None:
        self._hidden = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]

    def __call__(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        hidden, targets, _ = self._trained_hidden(model, batch)
        return self._summed_cross_entropy(hidden, targets)

    def token_losses(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The cross-entropy of each trained position (float32), and the [rows, length - 1] mask of them."""
        hidden, targets, trained = self._trained_hidden(model, batch)
        return self._token_cross_entropy(hidden, targets).float(), trained

    def _trained_hidden(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]):
        labels = batch["labels"]
        inputs = {key: value for key, value in batch.items() if key != "labels"}
        no_logits = torch.zeros(0, dtype=torch.long, device=labels.device)
        model(**inputs, logits_to_keep=no_logits, use_cache=False)  # the forward; its output layer on no position
        hidden, self._hidden = self._hidden, None
        # position i predicts token i+1: its target is labels[i+1]
        targets = labels[:, 1:]
        trained = targets != IGNORE_INDEX
        return hidden[:, :-1][trained], targets[trained], trained

    def _summed_cross_entropy(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        parts = self._in_chunks(self._chunk_loss, hidden, targets)
        if len(parts) == 1:
            return parts[0]
        total = hidden.new_zeros((), dtype=torch.float32)
        for part in parts:
            total = total + part
        return total

    def _token_cross_entropy(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return torch.cat(self._in_chunks(self._chunk_token_losses, hidden, targets))

    def _in_chunks(self, chunk_loss: Any, hidden: torch.Tensor, targets: torch.Tensor) -> list[torch.Tensor]:
        chunk = max(1, LOGITS_PER_CHUNK // self.vocab_size)
        if len(targets) <= chunk:
            return [chunk_loss(hidden, targets)]
        parts = []
        for start in range(0, len(targets), chunk):
            part = (hidden[start : start + chunk], targets[start : start + chunk])
            if torch.is_grad_enabled():
                # the chunk's logits are computed again in the backward pass instead of being kept
                parts.append(checkpoint(chunk_loss, *part, use_reentrant=False))
            else:
                parts.append(chunk_loss(*part))
        return parts

    def _chunk_loss(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = self.head(hidden).float()  # in float32, as transformers computes its loss
        return F.cross_entropy(logits, targets, reduction="sum")

    def _chunk_token_losses(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.head(hidden).float(), targets, reduction="none")


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
