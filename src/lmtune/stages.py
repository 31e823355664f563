"""What a stage trains with: its batch loss (one place, for training and for `lmtune eval`), and what it
does to a step's micro-batches before the loop trains them.

pt, sft, dpo, kto and rm train the data's micro-batches as they are, each with its loss (lmtune.loss,
lmtune.preference, lmtune.reward); grpo generates completions of the step's prompts first and trains on
those (lmtune.grpo). The loop sees one interface: `groups` (the step groups, from the data's),
`prepare` (a step's micro-batches to train), `row_metrics` (what the train row adds), and the state a
checkpoint keeps of the stage.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lmtune.batching import Collator
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


class DataStage:
    """pt, sft, dpo, kto, rm: a step trains the data's micro-batches as they come."""

    def __init__(self, loss: Any):
        self.loss = loss

    def groups(self, data_groups: Any) -> Any:
        return data_groups

    def prepare(self, group: list, step: int) -> list:
        return group

    def row_metrics(self, step: int, loss: float) -> dict[str, float | None]:
        return {}

    def state_dict(self) -> dict[str, Any] | None:
        return None

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        pass


def stage_for(config: TrainConfig, model: torch.nn.Module, unwrapped: torch.nn.Module, reference: Any,
              tokenizer: Any, rewards: list | None, collator: Collator, accelerator: Any, output_dir: Path) -> Any:
    """The stage object of the run; `model` as training runs it, `unwrapped` the model itself."""
    if config.stage != "grpo":
        return DataStage(loss_for_stage(unwrapped, config, reference))
    from lmtune.grpo import GRPOStage
    from lmtune.rollout import LocalRollout

    rollout = LocalRollout(unwrapped, config, tokenizer, seed=config.seed + 1 + accelerator.process_index,
                           synced_processes=bool(config.fsdp) and accelerator.num_processes > 1)
    return GRPOStage(config, model, unwrapped, tokenizer, rollout, rewards, reference, collator, accelerator,
                     output_dir)
