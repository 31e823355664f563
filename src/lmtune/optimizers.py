"""The optimizer of a run: torch's AdamW; with LoRA+ its B matrices at a larger learning rate; with
use_muon, torch's Muon for the hidden layers' weight matrices and AdamW for the rest.

Each parameter group may carry `lr_scale`: its learning rate is the schedule's times that scale
(lr_schedule.build_scheduler), so LoRA+'s ratio survives the schedule and a resume.
"""

from __future__ import annotations

from typing import Any

import torch

from lmtune.config import TrainConfig


def build_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    if config.loraplus_lr_ratio is not None:
        return _loraplus(model, config)
    if config.use_muon:
        return _muon_with_adamw(model, config)
    decay, no_decay = _decay_split((name, param) for name, param in model.named_parameters() if param.requires_grad)
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.learning_rate, fused=_fused(decay + no_decay))


def _fused(params: list[torch.nn.Parameter]) -> bool | None:
    """torch's fused AdamW kernel: one pass over each tensor for the whole update, where the default on the CPU
    loops op by op (bench/README.md, "optimizer_step": a third of the time of a SmolLM2 LoRA update)."""
    return all(param.device.type in ("cpu", "cuda") for param in params) or None


def _decay_split(named: Any) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]:
    """Weight decay for matrices, none for biases and norms."""
    decay, no_decay = [], []
    for name, param in named:
        (no_decay if param.ndim < 2 or "norm" in name.lower() else decay).append(param)
    return decay, no_decay


def _loraplus(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """LoRA+ as PEFT builds it: A matrices at learning_rate, B matrices (and biases) at learning_rate x
    loraplus_lr_ratio, LoRA on embeddings at loraplus_lr_embedding."""
    from peft.optimizers import create_loraplus_optimizer

    optimizer = create_loraplus_optimizer(model, torch.optim.AdamW, lr=config.learning_rate,
                                          loraplus_lr_ratio=config.loraplus_lr_ratio,
                                          loraplus_weight_decay=config.weight_decay,
                                          loraplus_lr_embedding=config.loraplus_lr_embedding,
                                          fused=_fused([p for p in model.parameters() if p.requires_grad]))
    optimizer.param_groups = [group for group in optimizer.param_groups if group["params"]]
    for group in optimizer.param_groups:
        group["lr_scale"] = group["lr"] / config.learning_rate
    return optimizer


def _muon_with_adamw(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """As LLaMA-Factory's use_muon: Muon for the 2-D weights of the hidden layers, AdamW for the embeddings,
    the output head and the 1-D parameters. Muon's update is scaled to AdamW's size (match_rms_adamw), so one
    learning rate serves both."""
    edges = {id(module.weight) for module in (model.get_input_embeddings(), model.get_output_embeddings())
             if module is not None}
    trained = [(name, param) for name, param in model.named_parameters() if param.requires_grad]
    hidden = [param for _, param in trained if param.ndim == 2 and id(param) not in edges]
    decay, no_decay = _decay_split((name, param) for name, param in trained
                                   if param.ndim != 2 or id(param) in edges)
    groups = [{"params": hidden, "weight_decay": config.weight_decay, "muon": True},
              {"params": decay, "weight_decay": config.weight_decay, "muon": False},
              {"params": no_decay, "weight_decay": 0.0, "muon": False}]
    return MuonWithAdamW([group for group in groups if group["params"]], lr=config.learning_rate)


class MuonWithAdamW(torch.optim.Optimizer):
    """torch.optim.Muon on the groups marked `muon`, torch.optim.AdamW on the others: one optimizer, so the
    schedule, the checkpoint and the resume see one state dict. Both work on this optimizer's own groups and
    state (the same objects), so its state_dict is theirs."""

    def __init__(self, groups: list[dict[str, Any]], lr: float):
        super().__init__(groups, {"lr": lr, "muon": False})
        self._link()

    def _link(self) -> None:
        muon = [group for group in self.param_groups if group["muon"]]
        adamw = [group for group in self.param_groups if not group["muon"]]
        self._parts = []
        if muon:
            self._parts.append(torch.optim.Muon(muon, lr=muon[0]["lr"], adjust_lr_fn="match_rms_adamw"))
        if adamw:
            self._parts.append(torch.optim.AdamW(adamw, lr=adamw[0]["lr"],
                                                 fused=_fused([p for group in adamw for p in group["params"]])))
        for part in self._parts:
            part.state = self.state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)  # new group and state objects: the parts are linked to them again
        self._link()

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        for part in self._parts:
            part.step()
