"""Which batch loss a run's stage trains with: one place, for training and for `lmtune eval`."""

from __future__ import annotations

from typing import Any

import torch

from lmtune.config import TrainConfig
from lmtune.loss import TokenSumLoss, batch_loss_for


def loss_for_stage(model: torch.nn.Module, config: TrainConfig, reference: Any = None) -> TokenSumLoss:
    """dpo's and kto's preference losses (against `reference`), the reward model's pairwise loss, or the
    next-token loss of pt and sft."""
    if config.stage in ("dpo", "kto"):
        from lmtune.preference import KTOLoss, PreferenceLoss

        return (KTOLoss if config.stage == "kto" else PreferenceLoss)(model, config, reference)
    if config.stage == "rm":
        from lmtune.reward import RewardLoss

        return RewardLoss()
    return batch_loss_for(model)
