"""The loss of a batch: summed next-token cross-entropy over its trained positions.

A batch loss says what its sum is a sum over (`divided_by`, a field of the micro-batch's Counts): the
engine divides the sum by that count over the whole optimizer step (all micro-batches, all processes),
evaluation by that of the whole eval set, so that every token (SFT) or every pair (DPO) weighs the same.
Metrics of the loss (`metric_names`, `metric_sums()`) are sums too, divided by the same count.

`reported_metrics` turns those means into what a log row shows (kto's rewards are means over the desirable
or the undesirable examples alone: ratios of two of its sums).

`TrainedPositionsLoss` (the default) computes the model's own logits at the positions whose next label is
not -100, and only there: the model's forward runs with its output layer on no position, a hook keeps the
decoder's final hidden states, and the trained positions' hidden states go through the causal LM's own
forward again, a chunk at a time, with its decoder answering with those hidden states instead of running.
So the output layer and everything the family's forward does after it (Cohere's `logit_scale`, Granite's
`logits_scaling`, Gemma's `final_logit_softcapping`, and what the next family brings) are transformers'
own code, never a copy of it; the logits of the masked prompt and of padding are never computed, and
those of a long row never exist all at once. The first batch a loss sees is checked against the model's
own full-logit loss (`check_against_full_logits`): a mismatch stops the run naming the model class.
`FullLogitsLoss` is the model's own forward over every position: for models whose forward cannot leave
out its logits. A stage with another loss (dpo and kto in lmtune.preference, rm in lmtune.reward) plugs in as an object
of the same shape; lmtune.stages picks it.

Mixture-of-experts: where the model's config asks for the router's load-balancing loss
(`output_router_logits`, set with `router_aux_loss_coef` by `moe_aux_loss_coef`), a training batch's
loss adds `router_aux_loss_coef * aux_loss * units` (units: the batch's trained tokens, or its pairs).
Divided by the step's units, that is transformers' own loss (mean cross-entropy + coefficient * aux loss)
for a step of one micro-batch, and the units-weighted mean of the micro-batches' aux losses otherwise, so
that every token weighs the same in both terms. The aux loss is reported beside the loss (`aux_loss`,
the same units-weighted mean); evaluation reports it but leaves it out of the loss, so that an eval loss
is a cross-entropy (and its perplexity a perplexity).
"""

from __future__ import annotations

import abc
import contextlib
import inspect
import logging
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from lmtune.data.templates import IGNORE_INDEX
from lmtune.errors import RunFailed

log = logging.getLogger("lmtune")

# Logits of at most this many (position, vocabulary entry) pairs at once: 256 MB in float32, 1,365
# positions of a 49,152-word vocabulary. A batch with more trained positions is taken in chunks, each
# computed again in the backward pass (one more forward of the output layer) instead of being kept.
LOGITS_PER_CHUNK = 2**26

# The largest relative difference between lmtune's loss and the model's own that the first batch's check
# lets pass: the same arithmetic in float32 agrees to ~1e-6; half-precision logits differ in their rounding.
CHECK_TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-6}
HALF_PRECISION_TOLERANCE = 1e-2
# Positions the check runs on: enough for every position-wise step after the decoder to show, few enough
# that its two forwards cost a fraction of a training step (a whole row took two forwards of its length).
CHECK_POSITIONS = 32

_FULL_LOGITS_TOLD: set[str] = set()  # model classes whose fallback to full logits was logged


def causal_lm_of(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers causal LM inside a PeftModel, or the model itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def decoder_of(causal_lm: torch.nn.Module) -> torch.nn.Module | None:
    """The decoder a causal LM holds (`get_decoder`), or None where transformers gives it none (the method
    missing, or raising NotImplementedError)."""
    try:
        return causal_lm.get_decoder()
    except (AttributeError, NotImplementedError):
        return None


def router_loss_coef(model: torch.nn.Module) -> float | None:
    """The weight of the router's load-balancing loss where the model's forward computes it (a mixture-of-
    experts config with `output_router_logits`), else None."""
    config = causal_lm_of(model).config
    if not getattr(config, "output_router_logits", False):
        return None
    return float(getattr(config, "router_aux_loss_coef", 0.0) or 0.0)


class TokenSumLoss:
    """The contract of a batch loss: `loss(model, batch)` is a sum over `divided_by` units; the metrics it
    reports with it are sums over the same units (SFT reports the router's aux loss of a mixture of
    experts that computes one, else none)."""

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


class TokenLosses(TokenSumLoss, abc.ABC):
    """What the SFT losses share: the summed cross-entropy of the trained tokens, plus the router's
    load-balancing loss of a mixture of experts (weighted by the batch's trained tokens, in training)."""

    def __init__(self, model: torch.nn.Module | None = None):
        self.router_coef = router_loss_coef(model) if model is not None else None
        self.metric_names = ("aux_loss",) if self.router_coef is not None else ()
        self.aux_loss: torch.Tensor | None = None  # the router's aux loss of the last forward
        self._metric_sums = torch.zeros(len(self.metric_names))

    @abc.abstractmethod
    def token_losses(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The cross-entropy of each trained position (float32), and the [rows, length - 1] mask of them."""

    def __call__(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        losses, trained = self.token_losses(model, batch)
        return self.with_router_loss(losses.sum(), int(trained.sum()), model.training)

    def with_router_loss(self, loss: torch.Tensor, units: int, training: bool) -> torch.Tensor:
        """`loss` (a sum over `units`) plus the router's aux loss of the last forward, weighted as one term of
        each unit, in training; the aux loss's sum over the units becomes the metric."""
        if self.router_coef is None or self.aux_loss is None:
            return loss
        aux = self.aux_loss.to(loss.device, torch.float32)
        self._metric_sums = (aux.detach() * units).view(1).cpu()
        return loss + self.router_coef * aux * units if training else loss

    def metric_sums(self) -> torch.Tensor:
        return self._metric_sums

    def _keep_aux_loss(self, output: Any) -> None:
        self.aux_loss = getattr(output, "aux_loss", None) if self.router_coef is not None else None


class FullLogitsLoss(TokenLosses):
    """The model's own forward over every position (logits at all of them), cross-entropy summed over the
    trained ones, as transformers computes it (in float32)."""

    def token_losses(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        inputs = {key: value for key, value in batch.items() if key != "labels"}
        output = model(**inputs, use_cache=False)
        self._keep_aux_loss(output)
        targets = batch["labels"][:, 1:]
        trained = targets != IGNORE_INDEX
        return F.cross_entropy(output.logits[:, :-1][trained].float(), targets[trained], reduction="none"), trained


class TrainedPositionsLoss(TokenLosses):
    """The model's own logits at the trained positions only -> summed cross-entropy, in chunks.

    `model` is the unwrapped model (a PeftModel or a transformers causal LM); the call takes the model
    as training runs it (wrapped for several processes), so the forward goes through the wrapper and
    its gradient synchronisation; the logits are then computed by the causal LM's own forward (not the
    wrapper's: its decoder does not run again) on the kept hidden states."""

    def __init__(self, model: torch.nn.Module):
        super().__init__(model)
        self.causal_lm = causal_lm_of(model)
        self.decoder = self.causal_lm.get_decoder()
        self.vocab_size = self.causal_lm.get_output_embeddings().weight.shape[0]
        forward = inspect.signature(self.causal_lm.forward).parameters
        # the replayed forward must not look for router logits: its decoder answers with hidden states only
        self._replay_options = {"output_router_logits": False} if "output_router_logits" in forward else {}
        self._hidden: torch.Tensor | None = None
        self._output_type: Any = None  # the class of the decoder's output (a family's own fields, all None)
        self._replaying = False
        self._checked = False
        self._hook = self.decoder.register_forward_hook(self._keep_hidden_states)

    def remove(self) -> None:
        self._hook.remove()

    def _keep_hidden_states(self, module: Any, args: Any, output: Any) -> None:
        if not self._replaying:
            self._hidden = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]
            self._output_type = type(output) if hasattr(output, "last_hidden_state") else None

    def __call__(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        self._check_once(model, batch)
        hidden, targets, _ = self._trained_hidden(model, batch)
        return self.with_router_loss(self._summed_cross_entropy(hidden, targets), len(targets), model.training)

    def token_losses(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        self._check_once(model, batch)
        hidden, targets, trained = self._trained_hidden(model, batch)
        return self._token_cross_entropy(hidden, targets).float(), trained

    def _check_once(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> None:
        if not self._checked:
            self._checked = True
            check_against_full_logits(self, model, batch)

    def _trained_hidden(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]):
        labels = batch["labels"]
        inputs = {key: value for key, value in batch.items() if key != "labels"}
        no_logits = torch.zeros(0, dtype=torch.long, device=labels.device)
        output = model(**inputs, logits_to_keep=no_logits, use_cache=False)  # its output layer on no position
        self._keep_aux_loss(output)
        hidden, self._hidden = self._hidden, None
        # position i predicts token i+1: its target is labels[i+1]
        targets = labels[:, 1:]
        trained = targets != IGNORE_INDEX
        return hidden[:, :-1][trained], targets[trained], trained

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The model's own logits of final hidden states [positions, hidden] -> [positions, vocabulary]: the
        causal LM's forward, its decoder answering with `hidden` instead of running."""
        with self._decoder_answering(hidden[None]):
            return self.causal_lm.forward(inputs_embeds=hidden[None], use_cache=False, **self._replay_options).logits[0]

    @contextlib.contextmanager
    def _decoder_answering(self, hidden: torch.Tensor) -> Iterator[None]:
        from transformers.modeling_outputs import BaseModelOutputWithPast

        output_type = self._output_type or BaseModelOutputWithPast

        def answer(*args: Any, **kwargs: Any) -> Any:
            return output_type(last_hidden_state=hidden)

        own = self.decoder.__dict__.get("forward")  # a forward set on the module (accelerate's hooks set one)
        self.decoder.forward = answer
        self._replaying = True
        try:
            yield
        finally:
            self._replaying = False
            if own is None:
                del self.decoder.forward
            else:
                self.decoder.forward = own

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
        logits = self.logits(hidden).float()  # in float32, as transformers computes its loss
        return F.cross_entropy(logits, targets, reduction="sum")

    def _chunk_token_losses(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.logits(hidden).float(), targets, reduction="none")


def check_against_full_logits(loss: TrainedPositionsLoss, model: torch.nn.Module,
                              batch: dict[str, torch.Tensor]) -> None:
    """lmtune's loss against the model's own (its forward over full logits) on the start of the batch's first
    row, every position trained (whatever the data masks: a long prompt leaves nothing out), in eval mode
    (no dropout, no random draw, so the run's random stream is untouched). Raises RunFailed naming the
    model class when they differ. The window holds one chunk of logits: the check costs two forwards of
    at most CHECK_POSITIONS positions."""
    width = min(batch["input_ids"].shape[1], CHECK_POSITIONS, max(2, LOGITS_PER_CHUNK // loss.vocab_size))
    # the model's inputs only: a stage's own fields (reference log-probs, kto marks) are not per position
    window = {key: batch[key][:1, :width] for key in ("input_ids", "attention_mask", "position_ids") if key in batch}
    window["labels"] = window["input_ids"]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            inputs = {key: value for key, value in window.items() if key != "labels"}
            own_logits = model(**inputs, use_cache=False).logits[0, :-1]
            own = float(F.cross_entropy(own_logits.float(), window["input_ids"][0, 1:], reduction="sum"))
            hidden, targets, _ = loss._trained_hidden(model, window)
            mine = float(loss._summed_cross_entropy(hidden, targets))
    finally:
        model.train(was_training)
    tolerance = CHECK_TOLERANCE.get(own_logits.dtype, HALF_PRECISION_TOLERANCE)
    if not abs(mine - own) <= tolerance * max(abs(own), 1.0):
        name = type(loss.causal_lm).__name__
        raise RunFailed(f"{name}: the loss lmtune computes at trained positions ({mine:.6g}) is not the model's "
                        f"own loss over full logits ({own:.6g}) on the first batch; lmtune cannot reproduce "
                        f"{name}'s forward after its decoder. Please report it with the model's config.json")
    log.debug("%s: the loss at trained positions is the model's own (%.6g, full logits %.6g)",
              type(loss.causal_lm).__name__, mine, own)


def batch_loss_for(model: torch.nn.Module) -> TrainedPositionsLoss | FullLogitsLoss:
    """The loss of the run's model: trained positions only where the model's forward can leave out its
    logits (`logits_to_keep`) and reads the hidden states of a decoder it holds; full logits otherwise."""
    causal_lm = causal_lm_of(model)
    forward = inspect.signature(causal_lm.forward).parameters
    decoder = decoder_of(causal_lm)
    served = decoder not in (None, causal_lm) and causal_lm.get_output_embeddings() is not None
    if "logits_to_keep" in forward and served:
        return TrainedPositionsLoss(model)
    name = type(causal_lm).__name__
    if name not in _FULL_LOGITS_TOLD:
        _FULL_LOGITS_TOLD.add(name)
        log.info("%s computes logits at every position: its forward has no logits_to_keep, or no decoder of "
                 "its own whose hidden states its output layer reads", name)
    return FullLogitsLoss(model)
