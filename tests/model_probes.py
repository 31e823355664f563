"""Callbacks (`callbacks: [model_probes:Name]`) that look at the model the engine trains, for tests that
check a feature is really on: what each records is kept on its class, since runs are in this process."""

from __future__ import annotations

import functools
import gc
import json
from typing import Any

import torch

from lmtune.models import decoder_layers


def _causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


class LayerCalls:
    """The forward calls of each decoder layer's MLP in each optimizer step (`per_step`, one list a step).
    The MLP's `forward` itself, not a hook: transformers checkpoints a layer's `forward`, inside its hooks,
    and torch's recomputation in the backward pass runs no forward hooks."""

    per_step: list[list[int]] = []

    def on_train_begin(self, state: Any, model: torch.nn.Module) -> None:
        LayerCalls.per_step = []
        layers = decoder_layers(_causal_lm(model))
        self.calls = [0] * len(layers)
        for index, layer in enumerate(layers):
            layer.mlp.forward = functools.partial(self._counted, index, layer.mlp.forward)

    def _counted(self, index: int, forward: Any, *args: Any, **kwargs: Any) -> Any:
        self.calls[index] += 1
        return forward(*args, **kwargs)

    def on_step_end(self, state: Any, metrics: Any) -> None:
        LayerCalls.per_step.append(self.calls)
        self.calls = [0] * len(self.calls)


class BaseLayers:
    """The classes (`module.Name`) and weight dtypes of the layers LoRA wraps, as the first step left them."""

    classes: set[str] = set()
    dtypes: set[torch.dtype] = set()

    def on_train_begin(self, state: Any, model: torch.nn.Module) -> None:
        BaseLayers.classes, BaseLayers.dtypes = set(), set()
        self.model = model

    def on_step_end(self, state: Any, metrics: Any) -> None:
        if state.step != 1:
            return
        for module in self.model.modules():
            base = getattr(module, "base_layer", None)
            if base is not None:
                BaseLayers.classes.add(f"{type(base).__module__}.{type(base).__name__}")
                BaseLayers.dtypes.add(base.weight.dtype)


class ComputeDtypes:
    """The dtype of the first decoder layer's MLP weights and of its output in the first step, written to
    `compute_dtypes.json` in the run's folder (for a run in another process)."""

    def on_train_begin(self, state: Any, model: torch.nn.Module) -> None:
        self.seen: dict[str, str] = {}
        mlp = decoder_layers(_causal_lm(model))[0].mlp
        self.seen["weight"] = str(next(mlp.parameters()).dtype)
        self.hook = mlp.register_forward_hook(self._record)

    def _record(self, module: Any, args: Any, output: torch.Tensor) -> None:
        self.seen.setdefault("output", str(output.dtype))

    def on_step_end(self, state: Any, metrics: Any) -> None:
        if state.step == 1:
            self.hook.remove()
            (state.output_dir / "compute_dtypes.json").write_text(json.dumps(self.seen))


class ModelLayout:
    """The attention kernel the trained model runs and whether each decoder layer is compiled."""

    attention: str | None = None
    compiled: list[bool] = []

    def on_train_begin(self, state: Any, model: torch.nn.Module) -> None:
        causal_lm = _causal_lm(model)
        ModelLayout.attention = causal_lm.config._attn_implementation
        ModelLayout.compiled = [layer._compiled_call_impl is not None for layer in decoder_layers(causal_lm)]


class CollectorStates:
    """Whether Python's garbage collector ran as training began and after step 1, and how many objects it
    had frozen then, written to `collector_states.json` in the run's folder (for a run in another process)."""

    def on_train_begin(self, state: Any, model: torch.nn.Module) -> None:
        self.seen = {"start-up": gc.isenabled()}

    def on_step_end(self, state: Any, metrics: Any) -> None:
        if state.step == 1:
            self.seen.update({"training": gc.isenabled(), "frozen": gc.get_freeze_count()})
            (state.output_dir / "collector_states.json").write_text(json.dumps(self.seen))
