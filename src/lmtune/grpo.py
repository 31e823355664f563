"""Stage grpo: group-relative policy optimisation, as TRL's GRPOTrainer computes it.

A step's prompts come from the data as any stage's rows do; the stage first generates
`num_generations` completions of each (lmtune.rollout), scores them with the reward functions
(lmtune.rewards), turns each group's rewards into advantages, and lays prompt + completion out as
training rows whose trained tokens are the completion's. The loss of a micro-batch is then, per
completion token t of completion i (ratio r = pi / pi_old, advantage A_i):

    -min(r * A_i, clip(r, 1 - epsilon, 1 + epsilon_high) * A_i)  [+ beta * KL_t to the reference]

summed as `loss_type` says: dapo sums over tokens (divided by the step's tokens), grpo takes each
completion's token mean (divided by the step's completions), dr_grpo sums over tokens and divides by
max_completion_length (and by the step's completions). With num_iterations 1, pi_old is pi itself
(detached): the ratio is 1 and the loss's value is minus the token-weighted mean advantage, near 0
by construction; the reward is what to watch.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from lmtune.batching import Collator, Counts
from lmtune.config import TrainConfig
from lmtune.data.templates import IGNORE_INDEX
from lmtune.loss import TokenSumLoss, batch_loss_for
from lmtune.preference import sequence_of_positions
from lmtune.rewards import RewardFailed, RewardFunction, reward_arguments
from lmtune.rollout import Completions, Rollout

log = logging.getLogger("lmtune")

COMPLETIONS_FILE = "completions.jsonl"
PROMPTS_SHOWN = 2  # prompts (with all their completions) written to completions.jsonl per logging step
ZERO_SPREAD_STEPS = 5  # steps in a row where no group has reward spread before the warning
GRPO_KEYS = ("advantages", "loss_mask", "old_log_probs")  # a training micro-batch's tensors besides the model's


# --- advantages -----------------------------------------------------------------------------------


def nanstd(values: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """The standard deviation (Bessel-corrected) of the non-NaN values, as TRL's `nanstd`."""
    mean = torch.nanmean(values, dim=dim, keepdim=dim is not None)
    variance = torch.nanmean((values - mean) ** 2, dim=dim)
    count = (~torch.isnan(values)).sum(dim=dim) if dim is not None else (~torch.isnan(values)).sum()
    return torch.sqrt(variance * count / (count - 1))


def group_advantages(rewards_per_func: torch.Tensor, weights: torch.Tensor, num_generations: int,
                     scale_rewards: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """TRL's advantages: the weighted sum of the functions' rewards (NaN where every function returned None),
    minus the group's mean, divided by the group's std (`group`), the whole batch's (`batch`) or not (`none`),
    plus 1e-4. Returns the advantages (0 for an unscorable completion), the rewards, and whether the std
    that scales (the group's, for `none`) is zero."""
    unscorable = torch.isnan(rewards_per_func).all(dim=1)
    rewards = (rewards_per_func * weights.unsqueeze(0)).nansum(dim=1)
    rewards[unscorable] = math.nan
    grouped = rewards.view(-1, num_generations)
    mean = torch.nanmean(grouped, dim=1).repeat_interleave(num_generations)
    if scale_rewards == "batch":
        std = nanstd(rewards).expand_as(rewards)
    else:
        std = nanstd(grouped, dim=1).repeat_interleave(num_generations)
    advantages = rewards - mean
    if scale_rewards != "none":
        advantages = advantages / (std + 1e-4)
    is_std_zero = torch.isclose(std, torch.zeros_like(std))
    return torch.nan_to_num(advantages, nan=0.0), rewards, is_std_zero


# --- the loss ---------------------------------------------------------------------------------------


def clipped_token_losses(log_probs: torch.Tensor, old_log_probs: torch.Tensor, advantages: torch.Tensor,
                         epsilon_low: float, epsilon_high: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per token: -min(r A, clip(r, 1 - eps_low, 1 + eps_high) A) with r = exp(log p - log p_old); and which
    tokens were clipped (TRL's clip_ratio: low where r < 1 - eps_low and A < 0, high where r > 1 + eps_high
    and A > 0)."""
    ratio = torch.exp(log_probs - old_log_probs)
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    losses = -torch.min(ratio * advantages, clipped * advantages)
    low = (ratio < 1 - epsilon_low) & (advantages < 0)
    high = (ratio > 1 + epsilon_high) & (advantages > 0)
    return losses, {"low": low, "high": high, "region": low | high}


def kl_to_reference(log_probs: torch.Tensor, ref_log_probs: torch.Tensor) -> torch.Tensor:
    """The k3 estimate TRL uses: exp(ref - p) - (ref - p) - 1, per token."""
    delta = ref_log_probs - log_probs
    return torch.exp(delta) - delta - 1


def summed_loss(token_losses: torch.Tensor, mask: torch.Tensor, sequence: torch.Tensor, sequences: int,
                loss_type: str, max_completion_length: int) -> torch.Tensor:
    """The micro-batch's loss as a sum over the units the step divides by (GRPOLoss.divided_by): tokens for
    dapo, completions for grpo (each its token mean) and dr_grpo (its token sum / max_completion_length)."""
    masked = token_losses * mask
    if loss_type == "dapo":
        return masked.sum()
    if loss_type == "dr_grpo":
        return masked.sum() / max_completion_length
    sums = masked.new_zeros(sequences).index_add(0, sequence, masked)
    tokens = mask.new_zeros(sequences).index_add(0, sequence, mask)
    return (sums / tokens.clamp(min=1.0)).sum()


class GRPOLoss(TokenSumLoss):
    """The loss of a micro-batch of generated completions. Its metrics (kl, clip_ratio/*) are token means,
    kept as sums and token counts until the stage reports them (`take_metrics`)."""

    def __init__(self, model: torch.nn.Module, config: TrainConfig, reference: Any):
        self.token_loss = batch_loss_for(model)
        self.config = config
        self.reference = reference
        self.divided_by = "trained_tokens" if config.loss_type == "dapo" else "completions"
        self._sums: torch.Tensor | None = None  # kl, clip low, high, region, tokens

    def remove(self) -> None:
        self.token_loss.remove()

    def __call__(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        config = self.config
        inputs = {key: value for key, value in batch.items() if key not in GRPO_KEYS}
        token_losses, trained = self.token_loss.token_losses(model, inputs)
        log_probs = -token_losses
        sequence, sequences = sequence_of_positions(inputs, trained)
        old = batch["old_log_probs"] if "old_log_probs" in batch else log_probs.detach()
        advantages = batch["advantages"].float()[sequence]
        epsilon_high = config.epsilon_high if config.epsilon_high is not None else config.epsilon
        losses, clipped = clipped_token_losses(log_probs, old, advantages, config.epsilon, epsilon_high)
        mask = batch["loss_mask"].float()[sequence]
        kl = None
        if config.beta > 0:
            kl = kl_to_reference(log_probs, self.reference.token_log_probs(inputs).to(log_probs))
            losses = losses + config.beta * kl
        sums = torch.stack([(kl.detach() * mask).sum() if kl is not None else mask.new_zeros(()),
                            *[(clipped[name].float() * mask).sum() for name in ("low", "high", "region")],
                            mask.sum()])
        self._sums = sums if self._sums is None else self._sums + sums
        return summed_loss(losses, mask, sequence, sequences, config.loss_type, config.max_completion_length)

    def take_metrics(self) -> torch.Tensor | None:
        """The token sums since the last call (kl, clip low, high, region, tokens), and start again."""
        sums, self._sums = self._sums, None
        return sums


# --- the stage ----------------------------------------------------------------------------------------


@dataclass
class GenerationCounts(Counts):
    """A training micro-batch of completions: `completions` (of prompts that are not an epoch's repeats) is
    what the grpo and dr_grpo losses divide by; `trained_tokens` their completion tokens that train."""

    completions: int = 0


class PromptCollator:
    """Rows of prompt-only data to a micro-batch of prompts (token ids, and what the rewards receive)."""

    def __call__(self, rows: list[dict]) -> tuple[dict[str, Any], Counts]:
        prompts = [list(row["input_ids"]) for row in rows]
        batch = {"prompt_ids": prompts, "reward_inputs": [json.loads(row["reward_inputs"]) for row in rows],
                 "repeat": [bool(row.get("repeat")) for row in rows]}
        real = [p for p, repeat in zip(prompts, batch["repeat"], strict=True) if not repeat]
        return batch, Counts(len(real), sum(len(p) for p in real), 0)


class GRPOStage:
    """How a step's prompts become micro-batches to train: generated, scored, turned into advantages; and
    what the run's log shows of it. Its state (the sampling RNG, the generated batch kept for the next
    num_iterations - 1 steps) is saved with every checkpoint."""

    def __init__(self, config: TrainConfig, model: torch.nn.Module, unwrapped: torch.nn.Module, tokenizer: Any,
                 rollout: Rollout, rewards: list[RewardFunction], reference: Any, collator: Collator,
                 accelerator: Any, output_dir: Path):
        self.config, self.model, self.tokenizer = config, model, tokenizer
        self.rollout, self.rewards, self.collator = rollout, rewards, collator
        self.accelerator, self.output_dir = accelerator, output_dir
        self.loss = GRPOLoss(unwrapped, config, reference)
        self.weights = torch.tensor(config.reward_weights or [1.0] * len(rewards), dtype=torch.float32)
        self._kept: dict[str, Any] | None = None  # the generated batch, for the next num_iterations - 1 steps
        self._steps: list[dict[str, float]] = []  # the generation metrics of each step since the last log
        self._shown: list[dict[str, Any]] = []  # completions of the last generated step, for completions.jsonl
        self._zero_spread_steps = 0
        self._loss_explained = False
        self._last_row_time = time.monotonic()

    # --- the step's micro-batches -------------------------------------------------------------

    def groups(self, data_groups: Any) -> Any:
        """The step groups of the data, each followed by num_iterations - 1 steps on its generated batch (None);
        a resume inside those steps continues them first."""
        while self._kept is not None and self._kept["left"] > 0:
            yield None
        for group in data_groups:
            yield group
            while self._kept is not None and self._kept["left"] > 0:
                yield None

    def prepare(self, group: list[tuple[dict, Counts]] | None, step: int) -> list[tuple[dict, Counts]]:
        """The step's training micro-batches: generated from the group's prompts, or (None) the kept ones."""
        if group is None:  # the batch's prompts were counted when it was generated
            self._kept["left"] -= 1
            return [(batch, GenerationCounts(**{**counts, "samples": 0})) for batch, counts in self._kept["batches"]]
        rollback = self.rollout.state_dict()
        started = time.monotonic()
        generated = [self.rollout.generate(batch["prompt_ids"], self.config.num_generations) for batch, _ in group]
        generation_s = time.monotonic() - started
        try:
            rewards_per_func = self._scored(group, generated, step)
        except RewardFailed:
            self.rollout.load_state_dict(rollback)  # a resume generates this step again, as it was
            raise
        advantages, metrics = self._advantages(group, generated, rewards_per_func)
        metrics["generation_s"] = generation_s
        batches = self._training_batches(group, generated, advantages)
        self._steps.append(metrics)
        if self.config.num_iterations > 1:
            self._kept = {"left": self.config.num_iterations - 1,
                          "batches": [({k: v.cpu() for k, v in batch.items()}, asdict(counts))
                                      for batch, counts in batches]}
        return batches

    def _scored(self, group: list[tuple[dict, Counts]], generated: list[Completions], step: int) -> torch.Tensor:
        """[completions, functions] rewards of this process's completions, NaN where a function gave None
        (and for an epoch's repeated prompts, which train nothing); RewardFailed on every process when a
        function failed on any."""
        G = self.config.num_generations
        prompts, columns, ids, repeat = [], [], [], []
        for (batch, _), completions in zip(group, generated, strict=True):
            for inputs, is_repeat in zip(batch["reward_inputs"], batch["repeat"], strict=True):
                prompts += [inputs["prompt"]] * G
                columns += [inputs["columns"]] * G
                repeat += [is_repeat] * G
            ids += completions.ids
        texts = self.tokenizer.batch_decode(ids, skip_special_tokens=True)
        kwargs = reward_arguments(prompts, texts, ids, columns, step)
        values = torch.full((len(ids), len(self.rewards)), math.nan)
        failure = None
        for index, reward in enumerate(self.rewards):
            try:
                values[:, index] = torch.tensor(reward(**kwargs), dtype=torch.float32)
            except Exception as error:  # the user's code: the run stops with a checkpoint and its traceback
                failure = f"reward function '{reward.source}' failed at step {step + 1}:\n" + "".join(
                    traceback.format_exception(type(error), error, error.__traceback__))
                break
        if self._any_process(failure is not None):
            raise RewardFailed(failure or "a reward function failed on another process (its log has the traceback)")
        values[torch.tensor(repeat, dtype=torch.bool)] = math.nan
        self._texts, self._prompts, self._repeat = texts, prompts, repeat
        return values

    def _any_process(self, flag: bool) -> bool:
        if self.accelerator.num_processes == 1:
            return flag
        total = self.accelerator.reduce(torch.tensor([int(flag)], device=self.accelerator.device), reduction="sum")
        return bool(total.item())

    def _advantages(self, group: list, generated: list[Completions],
                    rewards_per_func: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """This process's advantages, computed over every process's completions (a group never spans two
        processes, but scale_rewards: batch and the metrics take the whole step), and the step's metrics."""
        lengths = torch.tensor([len(ids) for c in generated for ids in c.ids], dtype=torch.float32)
        truncated = torch.tensor([t for c in generated for t in c.truncated], dtype=torch.float32)
        real = ~torch.tensor(self._repeat, dtype=torch.bool)
        local = torch.cat([rewards_per_func, lengths[:, None], truncated[:, None], real[:, None].float()], dim=1)
        every = self._gathered(local)
        functions = len(self.rewards)
        all_rewards, all_lengths = every[:, :functions], every[:, functions]
        all_truncated, all_real = every[:, functions + 1], every[:, functions + 2].bool()
        advantages, rewards, is_std_zero = group_advantages(all_rewards, self.weights, self.config.num_generations,
                                                            self.config.scale_rewards)
        start = self.accelerator.process_index * len(local)
        mine = advantages[start : start + len(local)]
        scored = all_real & ~torch.isnan(rewards)
        metrics = {"reward": _mean(rewards[scored]), "reward_std": _std(rewards[scored])}
        for index, reward in enumerate(self.rewards):
            values = all_rewards[all_real, index]
            metrics[f"rewards/{reward.name}/mean"] = _mean(values[~torch.isnan(values)])
            metrics[f"rewards/{reward.name}/std"] = _std(values[~torch.isnan(values)])
        metrics["frac_reward_zero_std"] = float(is_std_zero[all_real].float().mean())
        real_lengths = all_lengths[all_real]
        metrics["completions/mean_length"] = float(real_lengths.mean())
        metrics["completions/min_length"] = float(real_lengths.min())
        metrics["completions/max_length"] = float(real_lengths.max())
        metrics["completions/clipped_ratio"] = float(all_truncated[all_real].mean())
        metrics["generated_tokens"] = float(all_lengths.sum())
        self._keep_shown(rewards_per_func, mine)
        return mine, metrics

    def _gathered(self, local: torch.Tensor) -> torch.Tensor:
        if self.accelerator.num_processes == 1:
            return local
        return self.accelerator.gather(local.to(self.accelerator.device)).cpu()

    def _keep_shown(self, rewards_per_func: torch.Tensor, advantages: torch.Tensor) -> None:
        """The first prompts of the step with their completions, rewards and advantages (main process)."""
        G = self.config.num_generations
        shown = []
        for first in range(0, min(PROMPTS_SHOWN * G, len(self._texts)), G):
            if self._repeat[first]:
                continue
            shown.append({
                "prompt": self._prompts[first],
                "completions": [{"text": self._texts[i], "advantage": round(float(advantages[i]), 4),
                                 "rewards": {r.name: _number(rewards_per_func[i, j])
                                             for j, r in enumerate(self.rewards)}}
                                for i in range(first, first + G)],
            })
        self._shown = shown

    def _training_batches(self, group: list, generated: list[Completions],
                          advantages: torch.Tensor) -> list[tuple[dict, GenerationCounts]]:
        """Prompt + completion rows (the completion's tokens trained), collated as the run trains, with each
        completion's advantage and whether it trains (repeats and, with mask_truncated_completions, cut ones
        do not); and pi_old's token log-probabilities when the batch is trained more than once."""
        G, batches, offset = self.config.num_generations, [], 0
        for (prompts, _), completions in zip(group, generated, strict=True):
            rows, mask = [], []
            for index, ids in enumerate(completions.ids):
                prompt = prompts["prompt_ids"][index // G]
                rows.append({"input_ids": prompt + ids, "labels": [IGNORE_INDEX] * len(prompt) + ids,
                             "position_ids": list(range(len(prompt) + len(ids)))})
                trains = not prompts["repeat"][index // G] and not (
                    self.config.mask_truncated_completions and completions.truncated[index])
                mask.append(float(trains))
            batch, _ = self.collator(rows)
            count = len(rows)
            batch["advantages"] = advantages[offset : offset + count].clone()
            batch["loss_mask"] = torch.tensor(mask)
            offset += count
            real = [not r for r in prompts["repeat"] for _ in range(G)]
            counts = GenerationCounts(
                samples=sum(not r for r in prompts["repeat"]),
                tokens=sum(len(row["input_ids"]) for row, keep in zip(rows, real, strict=True) if keep),
                trained_tokens=int(sum(len(ids) * m for ids, m in zip(completions.ids, mask, strict=True))),
                completions=sum(real))
            if self.config.num_iterations > 1:
                batch["old_log_probs"] = self._log_probs_now(batch)
            batches.append((batch, counts))
        return batches

    def _log_probs_now(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """pi_old: the model's token log-probabilities before the steps that train on this batch."""
        inputs = {key: value.to(self.accelerator.device) for key, value in batch.items() if key not in GRPO_KEYS}
        with torch.no_grad(), self.accelerator.autocast():
            return -self.loss.token_loss.token_losses(self.model, inputs)[0].float().cpu()

    # --- what the log shows ---------------------------------------------------------------------

    def row_metrics(self, step: int, loss: float) -> dict[str, float | None]:
        """The metrics of the steps since the last log (TRL's names), for the train row; the first time the
        loss reads ~0 and when no group has had reward spread for a while, the log says what it means.
        Every process calls it (the loss's token sums are reduced over them)."""
        row: dict[str, float | None] = {}
        sums = self.loss.take_metrics()
        if sums is not None:
            if self.accelerator.num_processes > 1:
                sums = self.accelerator.reduce(sums, reduction="sum")
            tokens = float(sums[4].clamp(min=1))
            if self.config.beta > 0:
                row["kl"] = float(sums[0]) / tokens
            for index, name in enumerate(("low_mean", "high_mean", "region_mean"), start=1):
                row[f"clip_ratio/{name}"] = float(sums[index]) / tokens
        steps, self._steps = self._steps, []
        if steps:
            for key in steps[0]:
                if key not in ("generation_s", "generated_tokens"):
                    values = [s[key] for s in steps if not math.isnan(s[key])]
                    row[key] = round(sum(values) / len(values), 6) if values else None
            generation_s = sum(s["generation_s"] for s in steps)
            interval_s = max(time.monotonic() - self._last_row_time, generation_s, 1e-9)
            row["generation_s"] = round(generation_s, 3)
            row["training_s"] = round(max(interval_s - generation_s, 0.0), 3)
            row["generation_share"] = round(generation_s / interval_s, 4)
            generated = sum(s["generated_tokens"] for s in steps)
            row["generated_tokens_per_s"] = round(generated / max(generation_s, 1e-9), 1)
            self._note_zero_spread(steps)
        self._last_row_time = time.monotonic()
        if self.accelerator.is_main_process:
            self._explain_loss(loss)
            if steps and self._shown:
                with (self.output_dir / COMPLETIONS_FILE).open("a") as handle:
                    for shown in self._shown:
                        handle.write(json.dumps({"step": step, **shown}) + "\n")
        return row

    def _note_zero_spread(self, steps: list[dict[str, float]]) -> None:
        for metrics in steps:
            self._zero_spread_steps = self._zero_spread_steps + 1 if metrics["frac_reward_zero_std"] >= 1 else 0
            if self._zero_spread_steps == ZERO_SPREAD_STEPS and self.accelerator.is_main_process:
                log.warning("grpo: for %d steps in a row every group's completions got the same reward: every "
                            "advantage is 0 and nothing is learned. Make the task reachable sometimes (an easier "
                            "reward, a partial reward), raise num_generations or temperature",
                            ZERO_SPREAD_STEPS)

    def _explain_loss(self, loss: float) -> None:
        if self._loss_explained or abs(loss) > 0.05:
            return
        self._loss_explained = True
        log.info("grpo: a loss near 0 is expected: each completion's advantage is its reward minus its group's "
                 "mean, so the advantages average to about 0 and so does the loss (with num_iterations 1 the ratio "
                 "is 1); its gradient still moves the model. Watch `reward` rise, and frac_reward_zero_std "
                 "(groups that teach nothing) stay below 1")

    # --- the saved state ------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"rollout": self.rollout.state_dict(), "kept": copy.deepcopy(self._kept)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rollout.load_state_dict(state["rollout"])
        self._kept = state["kept"]


def _mean(values: torch.Tensor) -> float:
    return float(values.mean()) if len(values) else math.nan


def _std(values: torch.Tensor) -> float:
    return float(values.std()) if len(values) > 1 else math.nan


def _number(value: torch.Tensor) -> float | None:
    return None if math.isnan(float(value)) else round(float(value), 4)
