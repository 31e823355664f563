"""Preference training (stages dpo and kto): the loss of a batch, and the reference model it compares with.

A pair is two sequences, the chosen and the rejected answer after the same prompt; a micro-batch lays
the sequences of its pairs out as the SFT collator does (end to end without padding, or one padded row
each), chosen before rejected, so that both go through the model in one forward. The log-probability
of a sequence is the sum over its answer's tokens, computed at the trained positions only, as the SFT
loss is. The formulas are LLaMA-Factory's (after TRL): ipo, simpo and orpo use the mean over the
answer's tokens instead of the sum; pref_ftx adds the chosen answer's mean NLL, weighted.

KTO (stage kto) lays out each example as a pair is laid out: its prompt with its own answer, then its prompt
with another row's answer (the KL sequence), marked desirable or not (`kto_tag`). Its loss is TRL's: with z
the KL estimate (the mean over the step's micro-batch, on every process, of the KL sequences' log-ratio
policy - reference, clamped at 0, no gradient), a desirable answer costs w_d (1 - sigmoid(beta (r - z))) and
an undesirable one w_u (1 - sigmoid(beta (z - r))), r the answer's log-ratio.

The reference: for LoRA the model itself with its adapter switched off; for full and freeze a frozen
copy of the model as loaded, or (`precompute_ref_log_probs`) the log-probabilities of every pair
computed once before training and kept with the processed data.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from lmtune.config import KTO_METRICS, PREFERENCE_METRICS, TrainConfig
from lmtune.loss import TokenSumLoss, batch_loss_for
from lmtune.paths import building

log = logging.getLogger("lmtune")

LENGTH_NORMALISED = ("ipo", "simpo", "orpo")  # their log-probabilities are means over the answer's tokens


def sequence_log_probs(token_loss: Any, model: torch.nn.Module,
                       batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The summed log-probability of each sequence's trained tokens, and how many there are, in the order
    of the sequences: a sequence starts where the position ids restart (padding-free rows), or is a row."""
    token_losses, trained = token_loss.token_losses(model, batch)
    sequence, count = sequence_of_positions(batch, trained)
    sums = token_losses.new_zeros(count).index_add(0, sequence, -token_losses)
    tokens = token_losses.new_zeros(count).index_add(0, sequence, torch.ones_like(token_losses))
    return sums, tokens


def sequence_of_positions(batch: dict[str, torch.Tensor], trained: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The sequence of each trained position (`token_losses`' order), and how many sequences the batch holds:
    a sequence starts where the position ids restart (padding-free rows), or is a row."""
    if "position_ids" in batch:
        starts = batch["position_ids"] == 0
        sequence_of = (starts.flatten().cumsum(0) - 1).view_as(starts)
        count = int(starts.sum())
    else:
        rows, width = batch["input_ids"].shape
        sequence_of = torch.arange(rows, device=trained.device)[:, None].expand(rows, width)
        count = rows
    return sequence_of[:, 1:][trained], count  # position i predicts token i+1, of token i+1's sequence


def preference_losses(config: TrainConfig, chosen: torch.Tensor, rejected: torch.Tensor,
                      ref_chosen: torch.Tensor | None, ref_rejected: torch.Tensor | None,
                      chosen_mean: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The loss of each pair and the rewards of its answers, from the answers' log-probabilities (means
    for ipo, simpo and orpo, sums for sigmoid) and the chosen answer's mean log-probability."""
    beta = config.pref_beta
    if config.uses_reference:
        logits = (chosen - rejected) - (ref_chosen - ref_rejected)
        if config.pref_loss == "sigmoid":
            losses = -F.logsigmoid(beta * logits)
        else:  # ipo
            losses = (logits - 1 / (2 * beta)) ** 2
        chosen_rewards, rejected_rewards = beta * (chosen - ref_chosen), beta * (rejected - ref_rejected)
    else:
        if config.pref_loss == "simpo":
            losses = -F.logsigmoid(beta * ((chosen - rejected) - config.simpo_gamma / beta))
        else:  # orpo: the odds ratio, plus the chosen answer's NLL
            log_odds = (chosen - rejected) - (torch.log1p(-torch.exp(chosen)) - torch.log1p(-torch.exp(rejected)))
            losses = -chosen - beta * F.logsigmoid(log_odds)
        chosen_rewards, rejected_rewards = beta * chosen, beta * rejected
    if config.pref_ftx > 0:
        losses = losses + config.pref_ftx * -chosen_mean
    return losses, chosen_rewards.detach(), rejected_rewards.detach()


class PreferenceLoss(TokenSumLoss):
    """The summed loss of a batch's pairs (the engine divides by the pairs of the step), and its metrics
    (TRL's names), summed over the pairs too."""

    divided_by = "samples"
    metric_names = PREFERENCE_METRICS

    def __init__(self, model: torch.nn.Module, config: TrainConfig, reference: Any):
        self.token_loss = batch_loss_for(model)
        self.config = config
        self.reference = reference
        # a mixture of experts with its router's loss: the aux loss too, weighted by the pairs (lmtune.loss)
        self.metric_names = type(self).metric_names + self.token_loss.metric_names
        self._metric_sums = torch.zeros(len(self.metric_names))

    def log_probs(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]):
        """Of every sequence of the batch: the policy's log-probability (a mean over the answer's tokens for
        ipo, simpo and orpo, else the sum), the reference's likewise (None without a reference), the mean
        log-probability, and the number of trained tokens."""
        inputs = {key: value for key, value in batch.items() if key not in ("ref_logps", "kto_tag")}
        sums, tokens = sequence_log_probs(self.token_loss, model, inputs)
        means = sums / tokens.clamp(min=1)
        length_normalised = self.config.stage == "dpo" and self.config.pref_loss in LENGTH_NORMALISED
        policy = means if length_normalised else sums
        ref = None
        if self.config.uses_reference:
            ref_sums = batch["ref_logps"].to(sums) if "ref_logps" in batch else self.reference.log_probs(inputs)
            ref = ref_sums / tokens.clamp(min=1) if length_normalised else ref_sums
        return policy, ref, means, tokens

    def __call__(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        policy, ref, means, tokens = self.log_probs(model, batch)
        ref_chosen, ref_rejected = (ref[0::2], ref[1::2]) if ref is not None else (None, None)
        losses, chosen_rewards, rejected_rewards = preference_losses(
            self.config, policy[0::2], policy[1::2], ref_chosen, ref_rejected, means[0::2])
        # a pair with no trained token is a repeat that pads an epoch's end (batching.epoch_batches): it counts
        # in no sum, as it counts in no divisor
        trained = ((tokens[0::2] > 0) & (tokens[1::2] > 0)).to(losses.dtype)
        detached = policy.detach()
        self._metric_sums = torch.stack([
            (chosen_rewards * trained).sum(), (rejected_rewards * trained).sum(),
            ((chosen_rewards > rejected_rewards).to(losses.dtype) * trained).sum(),
            ((chosen_rewards - rejected_rewards) * trained).sum(), (detached[0::2] * trained).sum(),
            (detached[1::2] * trained).sum(),
        ])
        pairs_loss = self.token_loss.with_router_loss((losses * trained).sum(), int(trained.sum()), model.training)
        if self.token_loss.metric_names:
            self._metric_sums = torch.cat([self._metric_sums, self.token_loss.metric_sums().to(self._metric_sums)])
        return pairs_loss

    def metric_sums(self) -> torch.Tensor:
        return self._metric_sums


def kto_losses(config: TrainConfig, policy: torch.Tensor, ref: torch.Tensor, desirable: torch.Tensor,
               kl: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The weighted loss of each example and its reward beta x (policy - reference), from the answers'
    summed log-probabilities, their marks and the KL estimate."""
    log_ratios = policy - ref
    chosen = 1 - torch.sigmoid(config.pref_beta * (log_ratios - kl))
    rejected = 1 - torch.sigmoid(config.pref_beta * (kl - log_ratios))
    losses = torch.where(desirable, config.kto_chosen_weight * chosen, config.kto_rejected_weight * rejected)
    return losses, config.pref_beta * log_ratios.detach()


class KTOLoss(PreferenceLoss):
    """The summed loss of a batch's kto examples; its metric sums are those of TRL's metrics (`KTO_METRICS`):
    sums over the desirable and the undesirable examples and their counts, and the KL estimate weighted by
    the examples it was taken over."""

    metric_names = ("rewards/chosen_sum", "rewards/rejected_sum", "logps/chosen_sum", "logps/rejected_sum", "kl",
                    "count/chosen", "count/rejected")

    def __call__(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        policy, ref, means, tokens = self.log_probs(model, batch)
        # an example with no trained token is a repeat that pads an epoch's end: it counts nowhere
        trained = ((tokens[0::2] > 0) & (tokens[1::2] > 0)).to(policy.dtype)
        kl = self._kl_estimate(policy[1::2].detach() - ref[1::2], trained, model.training)
        desirable = batch["kto_tag"].to(policy.device)
        losses, rewards = kto_losses(self.config, policy[0::2], ref[0::2], desirable, kl)
        if self.config.pref_ftx > 0:  # the desirable answer's mean NLL, weighted
            losses = losses + self.config.pref_ftx * -means[0::2] * desirable
        chosen, rejected = desirable.to(policy.dtype) * trained, (~desirable).to(policy.dtype) * trained
        answers = policy[0::2].detach()
        self._metric_sums = torch.stack([(rewards * chosen).sum(), (rewards * rejected).sum(),
                                         (answers * chosen).sum(), (answers * rejected).sum(), kl * trained.sum(),
                                         chosen.sum(), rejected.sum()])
        examples_loss = self.token_loss.with_router_loss((losses * trained).sum(), int(trained.sum()), model.training)
        if self.token_loss.metric_names:
            self._metric_sums = torch.cat([self._metric_sums, self.token_loss.metric_sums().to(self._metric_sums)])
        return examples_loss

    @staticmethod
    def _kl_estimate(log_ratios: torch.Tensor, trained: torch.Tensor, across_processes: bool) -> torch.Tensor:
        """The mean log-ratio of the KL sequences, over every process's micro-batch while training (TRL gathers
        it too; evaluation batches are not matched across processes), clamped at 0."""
        total = torch.stack([(log_ratios * trained).sum(), trained.sum()])
        if across_processes and torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(total)
        return (total[0] / total[1].clamp(min=1)).clamp(min=0).detach()

    def reported_metrics(self, means: list[float]) -> dict[str, float]:
        """TRL's metrics: means over the desirable (chosen) or the undesirable (rejected) examples, which a
        step may lack (then the metric is left out), and the KL estimate."""
        own = len(KTOLoss.metric_names)
        rewards_chosen, rewards_rejected, logps_chosen, logps_rejected, kl, chosen, rejected = means[:own]
        reported = {}
        if chosen > 0:
            reported |= {"rewards/chosen": rewards_chosen / chosen, "logps/chosen": logps_chosen / chosen}
        if rejected > 0:
            reported |= {"rewards/rejected": rewards_rejected / rejected, "logps/rejected": logps_rejected / rejected}
        if chosen > 0 and rejected > 0:
            reported["rewards/margins"] = reported["rewards/chosen"] - reported["rewards/rejected"]
        reported["kl"] = kl
        router = dict(zip(self.metric_names[own:], means[own:], strict=True))  # a mixture of experts' aux loss
        return {name: reported[name] for name in KTO_METRICS if name in reported} | router


# --- the reference ------------------------------------------------------------------------------


class FrozenModel:
    """A model whose log-probabilities are the reference: computed without gradients."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.token_loss = batch_loss_for(model)

    def log_probs(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The summed log-probability of each sequence's trained tokens."""
        with torch.no_grad():
            return sequence_log_probs(self.token_loss, self.model, batch)[0]

    def token_log_probs(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The log-probability of each trained token, in `token_losses`' order."""
        with torch.no_grad():
            return -self.token_loss.token_losses(self.model, batch)[0]


class AdapterOff(FrozenModel):
    """LoRA: the model itself with its adapter switched off, the base model it trains from (no copy)."""

    def log_probs(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with self.model.disable_adapter():
            return super().log_probs(batch)

    def token_log_probs(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with self.model.disable_adapter():
            return super().token_log_probs(batch)


def reference_for(model: torch.nn.Module, config: TrainConfig, device: torch.device) -> FrozenModel | None:
    """The reference of the run's model, taken before a checkpoint's weights are loaded into it: the model
    itself with its adapter off (LoRA), or a frozen copy of it (full, freeze)."""
    if not config.uses_reference or config.precompute_ref_log_probs:
        return None
    if hasattr(model, "disable_adapter"):
        return AdapterOff(model)
    log.info("%s: the reference is a frozen copy of the model%s", config.stage,
             "" if config.stage == "grpo" else " (precompute_ref_log_probs: true needs none)")
    return FrozenModel(copy.deepcopy(model).eval().requires_grad_(False).to(device))


# --- reference log-probabilities computed once ----------------------------------------------------


def precompute_reference(config: TrainConfig, model: torch.nn.Module, data: Any, collator: Any,
                         accelerator: Any) -> None:
    """Adds `ref_logps` (chosen, rejected) to every pair of the train and eval data, computed with the model
    as loaded, or read from where an earlier run stored them with the processed data. Like the processed
    data, they are computed by one process per cache while the others wait on its file lock, outside any
    collective: a long computation is never a ddp_timeout."""
    stored = _stored_path(config, data.cache_dir)
    values = _read_stored(stored)
    if values is None and stored is None:
        values = _reference_log_probs(config, model, data, collator, accelerator)
    elif values is None:
        with building(stored, "reference log-probabilities"):
            values = _read_stored(stored)  # another process computed them while this one waited
            if values is None:
                values = _reference_log_probs(config, model, data, collator, accelerator)
                partial = stored.with_name(f"{stored.name}.partial-{os.getpid()}")
                partial.write_text(json.dumps(values))
                partial.replace(stored)
    data.train = data.train.add_column("ref_logps", values["train"])
    if data.eval is not None:
        data.eval = data.eval.add_column("ref_logps", values["eval"])


def _read_stored(stored: Path | None) -> dict | None:
    if stored is None or not stored.exists():
        return None
    log.info("precompute_ref_log_probs: reference log-probabilities read from %s", stored)
    return json.loads(stored.read_text())


def _reference_log_probs(config: TrainConfig, model: torch.nn.Module, data: Any, collator: Any,
                         accelerator: Any) -> dict[str, list]:
    reference = AdapterOff(model) if hasattr(model, "disable_adapter") else FrozenModel(model)
    values = {split: _log_probs_of(rows, reference, collator, config, accelerator)
              for split, rows in (("train", data.train), ("eval", data.eval)) if rows is not None}
    reference.token_loss.remove()
    log.info("precompute_ref_log_probs: reference log-probabilities of %d pairs computed", len(values["train"]))
    return values


def _log_probs_of(rows: Any, reference: Any, collator: Any, config: TrainConfig, accelerator: Any) -> list:
    was_training = reference.model.training
    reference.model.eval()
    device = next(reference.model.parameters()).device
    values = []
    size = config.per_device_eval_batch_size
    for start in range(0, len(rows), size):
        batch, _ = collator([rows[i] for i in range(start, min(start + size, len(rows)))])
        with accelerator.autocast():
            sums = reference.log_probs({key: value.to(device) for key, value in batch.items()})
        values += sums.view(-1, 2).tolist()
    reference.model.train(was_training)
    return values


def _stored_path(config: TrainConfig, cache_dir: Path | None) -> Path | None:
    """Where the reference log-probabilities of this data and model are kept: next to the processed data,
    named by the model's files and the precision they were computed in."""
    if cache_dir is None:
        return None
    from lmtune.models import resolve_model_path

    model_path = Path(resolve_model_path(config.model_name_or_path))
    files = sorted(model_path.glob("*")) if model_path.is_dir() else [model_path]
    description = {"model": str(model_path.resolve()), "bf16": config.bf16,
                   "files": [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.is_file()]}
    key = hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir / f"ref_logps-{key}.json"
