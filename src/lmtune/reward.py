"""Reward modelling (stage rm): a scalar score head on the language model, trained on preference pairs.

The model is the family's `...ForSequenceClassification` with one label: the decoder of the causal LM and a
linear `score` head, which transformers applies at the last token of each sequence that is not the pad
token. A pair's chosen and rejected sequences are each their own padded row (never padding-free: the score
is read at a row's last token); the loss of a pair is -log sigmoid(r_chosen - r_rejected), the
Bradley-Terry loss of LLaMA-Factory and TRL. The score goes through the model's own forward, so training,
`lmtune eval` and whoever loads the saved model with AutoModelForSequenceClassification read the same score.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lmtune.config import REWARD_METRICS
from lmtune.data.templates import IGNORE_INDEX
from lmtune.loss import TokenSumLoss


def pair_scores(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The scores of the chosen and of the rejected sequences of a batch of pairs (float32)."""
    inputs = {key: batch[key] for key in ("input_ids", "attention_mask") if key in batch}
    scores = model(**inputs, use_cache=False).logits[:, 0].float()
    return scores[0::2], scores[1::2]


class RewardLoss(TokenSumLoss):
    """The summed pairwise loss of a batch's pairs (the engine divides by the pairs of the step); its metric
    sums: the pairs whose chosen answer scores higher (`accuracy`), and the summed score margin."""

    divided_by = "samples"
    metric_names = REWARD_METRICS

    def __init__(self) -> None:
        self._metric_sums = torch.zeros(len(REWARD_METRICS))

    def __call__(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        chosen, rejected = pair_scores(model, batch)
        labels = batch["labels"][:, 1:] != IGNORE_INDEX
        # a pair with no trained token is a repeat that pads an epoch's end: it counts nowhere
        trained = (labels[0::2].any(-1) & labels[1::2].any(-1)).to(chosen.dtype)
        margins = chosen - rejected
        self._metric_sums = torch.stack([((margins > 0).to(chosen.dtype) * trained).sum(),
                                         (margins.detach() * trained).sum()])
        return (-F.logsigmoid(margins) * trained).sum()

    def metric_sums(self) -> torch.Tensor:
        return self._metric_sums
