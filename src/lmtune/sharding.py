"""How the model is laid over the processes: whole on each (data parallel) or sharded (FSDP2).

A strategy is a small object the loop asks how to wrap the model, how to hold back the gradient
reduction between micro-batches, how to clip, and what a checkpoint holds; the loop itself has no
branch for it. `fsdp` and `fsdp_offload` come from the config, or from the environment `accelerate
launch` sets from an accelerate FSDP config (`take_accelerate_fsdp`).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from accelerate import Accelerator

from lmtune.config import TrainConfig, build_config
from lmtune.errors import UserError
from lmtune.models import decoder_layers

log = logging.getLogger("lmtune")

ACCELERATE_STRATEGIES = {"FULL_SHARD": "full_shard", "1": "full_shard", "SHARD_GRAD_OP": "shard_grad_op",
                         "2": "shard_grad_op", "NO_SHARD": False, "3": False}


def accelerate_fsdp_settings(environ: Mapping[str, str]) -> dict[str, Any]:
    """The lmtune keys an accelerate FSDP config stands for, as `accelerate launch` puts it in the environment
    (FSDP1 and FSDP2 configs alike: lmtune always shards with FSDP2); empty when it is no FSDP launch."""
    if environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
        return {}
    if environ.get("FSDP_VERSION", "1") == "2":
        reshard = environ.get("FSDP_RESHARD_AFTER_FORWARD", "true")
        mode = "shard_grad_op" if reshard.lower() in ("false", "shard_grad_op", "2") else "full_shard"
    else:
        strategy = environ.get("FSDP_SHARDING_STRATEGY", "FULL_SHARD").upper()
        if strategy not in ACCELERATE_STRATEGIES:
            raise UserError(f"accelerate config: fsdp_sharding_strategy {strategy} is not available in lmtune; "
                            "use FULL_SHARD or SHARD_GRAD_OP")
        mode = ACCELERATE_STRATEGIES[strategy]
    settings: dict[str, Any] = {"fsdp": mode}
    if mode:
        settings["fsdp_offload"] = environ.get("FSDP_OFFLOAD_PARAMS", "false").lower() == "true"
    if environ.get("FSDP_ACTIVATION_CHECKPOINTING", "false").lower() == "true":
        settings["gradient_checkpointing"] = True
    return settings


def take_accelerate_fsdp(config: TrainConfig, environ: dict[str, str] | os._Environ = os.environ) -> TrainConfig:
    """`config` with the FSDP settings of an `accelerate launch`; a key the YAML sets to something else is
    an error that names both. accelerate is then told not to shard: lmtune shards the model itself, the
    same way on CPUs and GPUs."""
    settings = accelerate_fsdp_settings(environ)
    if "ACCELERATE_USE_FSDP" in environ:
        environ["ACCELERATE_USE_FSDP"] = "false"
    for key, value in settings.items():
        mine = getattr(config, key)
        if key in config.model_fields_set and mine != value and not (key == "gradient_checkpointing" and mine):
            raise UserError(f"{key}: the config says {mine!r} and the accelerate config (accelerate launch) says "
                            f"{value!r}; remove {key} from one of them")
    if not settings:
        return config
    updated = build_config({**config.to_yaml_dict(), **settings}, "accelerate launch")  # the same checks
    log.info("accelerate launch: %s", ", ".join(f"{key}: {value}" for key, value in settings.items()))
    return updated


def strategy_for(config: TrainConfig, processes: int, bf16: bool = False) -> DataParallel | FullySharded:
    """One process has nothing to shard over: it holds the whole model, whatever `fsdp` says (so that a run
    sharded over N processes continues on one with the same config). `bf16`: the run computes in bfloat16."""
    if config.fsdp and processes > 1:
        return FullySharded(reshard_after_forward=config.fsdp == "full_shard", offload=config.fsdp_offload,
                            bf16=bf16)
    if config.fsdp:
        log.info("fsdp: %s: this run has one process, nothing to shard over: it holds the whole model and "
                 "writes unsharded checkpoints", config.fsdp)
    return DataParallel()


def trained_only(model: torch.nn.Module, state: dict[str, Any]) -> dict[str, Any]:
    """The entries of a model state dict that are trained (a LoRA adapter's, not the frozen base)."""
    trained = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    return {key: value for key, value in state.items() if key in trained}


def sharded_state(model: torch.nn.Module, optimizer: Any | None) -> dict[str, Any]:
    """What a sharded checkpoint holds: the model's (LoRA: the adapter's) and, unless `optimizer` is None,
    AdamW's state; each process its own shard (whole tensors where the model is not sharded)."""
    from peft import PeftModel
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    state: dict[str, Any] = {}
    if optimizer is None:
        state["model"] = get_model_state_dict(model)
    else:
        state["model"], state["optimizer"] = get_state_dict(model, getattr(optimizer, "optimizer", optimizer))
    if isinstance(model, PeftModel):
        state["model"] = trained_only(model, state["model"])
    return state


def load_sharded_state(model: torch.nn.Module, optimizer: Any | None, state: dict[str, Any]) -> None:
    """Put `state` (from `sharded_state`, filled by a checkpoint) into the model and the optimizer."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_state_dict

    options = StateDictOptions(strict=False)
    if optimizer is None:
        set_model_state_dict(model, state["model"], options=options)
    else:
        set_state_dict(model, getattr(optimizer, "optimizer", optimizer), model_state_dict=state["model"],
                       optim_state_dict=state["optimizer"], options=options)


class DataParallel:
    """Every process holds the whole model; accelerate's DDP averages the gradients."""

    sharded = False

    def prepare(self, accelerator: Accelerator, model: torch.nn.Module,
                make_optimizer: Callable[[torch.nn.Module], torch.optim.Optimizer]) -> tuple[Any, Any]:
        return accelerator.prepare(model, make_optimizer(model))

    def no_sync(self, accelerator: Accelerator, model: torch.nn.Module) -> contextlib.AbstractContextManager:
        return accelerator.no_sync(model) if accelerator.num_processes > 1 else contextlib.nullcontext()

    def clip_grad_norm(self, accelerator: Accelerator, model: torch.nn.Module, max_norm: float) -> torch.Tensor:
        return accelerator.clip_grad_norm_(model.parameters(), max_norm)

    def optimizer_loader(self, model: torch.nn.Module, optimizer: Any) -> Callable[[dict[str, Any]], None]:
        return optimizer.load_state_dict

    def full_state(self, model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
        """The whole model's weights for the final model folder; None: the model's own state dict."""
        return None


class FullySharded:
    """FSDP2 (`fully_shard`): each decoder layer, then the rest of the model, sharded over the processes.

    Gradients are reduce-scattered and averaged over the processes, as DDP averages them, so the loop's
    loss scaling is the same. The root keeps its parameters (embeddings, output layer) gathered after the
    forward: the loss applies the output layer to the hidden states after the model's forward."""

    sharded = True

    def __init__(self, reshard_after_forward: bool, offload: bool, bf16: bool = False):
        self.reshard_after_forward = reshard_after_forward
        self.offload = offload
        self.bf16 = bf16
        self.checkpoint_group: Any = None  # made in prepare, on every process

    def prepare(self, accelerator: Accelerator, model: torch.nn.Module,
                make_optimizer: Callable[[torch.nn.Module], torch.optim.Optimizer]) -> tuple[Any, Any]:
        from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

        policy = OffloadPolicy()
        if self.offload and torch.cuda.is_available():
            policy = CPUOffloadPolicy()
        elif self.offload:
            log.info("fsdp_offload: the parameters and optimizer state are on the CPU already (no GPU)")
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        try:
            layers = decoder_layers(base)
        except UserError:
            raise UserError(f"fsdp: {type(base).__name__} holds no list of decoder layers, the units lmtune "
                            "shards; set fsdp: false") from None
        log.info("fsdp: each of the %d %s layers sharded on its own", len(layers), type(layers[0]).__name__)
        precision = self.precision_policy()
        for layer in layers:
            fully_shard(layer, reshard_after_forward=self.reshard_after_forward, offload_policy=policy,
                        mp_policy=precision)
        fully_shard(model, reshard_after_forward=False, offload_policy=policy, mp_policy=precision)
        # DCP's background writes talk over a group of their own, never interleaved with the step's collectives
        self.checkpoint_group = torch.distributed.new_group(backend="gloo")
        return model, accelerator.prepare(make_optimizer(model))

    def precision_policy(self) -> Any:
        """bf16: the float32 shards are gathered in bfloat16 (half the traffic and the gathered memory) and the
        gradients reduced in float32, which the float32 shards and AdamW then take."""
        from torch.distributed.fsdp import MixedPrecisionPolicy

        if not self.bf16:
            return MixedPrecisionPolicy()
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)

    @contextlib.contextmanager
    def no_sync(self, accelerator: Accelerator, model: Any) -> Iterator[None]:
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)

    def clip_grad_norm(self, accelerator: Accelerator, model: torch.nn.Module, max_norm: float) -> torch.Tensor:
        """The norm of the whole gradient from the shards (every process gets the same), then clipping."""
        parameters = [p for p in model.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm([p.grad for p in parameters], 2.0)
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, norm)
        return norm

    def optimizer_loader(self, model: torch.nn.Module, optimizer: Any) -> Callable[[dict[str, Any]], None]:
        """How a whole AdamW state dict (an unsharded checkpoint's, keyed by parameter number) goes into this
        run's sharded optimizer: by parameter name, each process keeping its shard."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        inner = getattr(optimizer, "optimizer", optimizer)

        def load(whole: dict[str, Any]) -> None:
            names = {id(parameter): name for name, parameter in model.named_parameters()}
            ordered = [names[id(parameter)] for group in inner.param_groups for parameter in group["params"]]
            by_name = {"state": {ordered[number]: value for number, value in whole["state"].items()},
                       "param_groups": [{**group, "params": [ordered[number] for number in group["params"]]}
                                        for group in whole["param_groups"]]}
            for group, saved in zip(inner.param_groups, whole["param_groups"], strict=True):
                group.update({key: value for key, value in saved.items() if key not in group})  # initial_lr
            set_optimizer_state_dict(model, inner, by_name, options=StateDictOptions(full_state_dict=True))

        return load

    def full_state(self, model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
        """Gathered from every process (all take part) onto the main process's CPU; empty elsewhere. A tied
        weight (the output layer sharing the embeddings) is written once, as save_pretrained writes it."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        tied = set(dict(model.named_parameters(remove_duplicate=False))) - set(dict(model.named_parameters()))
        return {key: value for key, value in state.items() if key not in tied}
