"""The models `lmtune serve` holds in memory.

A LoRA adapter is loaded onto one shared copy of its base model as a PEFT named adapter and switched on
per batch; at most `max_adapters` adapters stay loaded per base and `max_models` models in all, the
least recently used going first. Only the serving thread calls `activate`, so switching adapters never
races with a forward pass.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmtune.chat import Target, load_model_for_inference, run_template
from lmtune.checkpoint import is_sharded


@dataclass
class Ready:
    """A model switched to the weights of one served name, with that name's tokenizer and template."""

    model: Any
    tokenizer: Any
    template: str | None


@dataclass
class _Loaded:
    model: Any
    adapters: OrderedDict[str, str]  # adapter folder -> its PEFT name, least recently used first


class ModelPool:
    def __init__(self, max_models: int = 2, max_adapters: int = 8, device: str | None = None) -> None:
        self.max_models, self.max_adapters, self.device = max_models, max_adapters, device
        self.loaded: OrderedDict[str, _Loaded] = OrderedDict()  # weights folder (adapters: the base) -> model
        self.tokenizers: dict[str, tuple[Any, str | None]] = {}
        self.next_adapter = 0

    def activate(self, target: Target) -> Ready:
        """The model for target, loaded if need be, its adapter (if any) switched on."""
        shares_base = target.is_adapter and not is_sharded(Path(target.model_path))
        key = target.base_model if shares_base else target.model_path
        if key not in self.loaded:
            self._load(key, target, shares_base)
        self.loaded.move_to_end(key)
        entry = self.loaded[key]
        if shares_base:
            self._switch_adapter(entry, target.model_path)
        return Ready(entry.model, *self._tokenizer_of(target))

    def _load(self, key: str, target: Target, shares_base: bool) -> None:
        if shares_base:
            from peft import PeftModel

            model, _ = load_model_for_inference(Target(target.base_model, "model", target.base_model), self.device)
            name = self._adapter_name()
            model = PeftModel.from_pretrained(model, target.model_path, adapter_name=name).eval()
            entry = _Loaded(model, OrderedDict({target.model_path: name}))
        else:
            model, _ = load_model_for_inference(target, self.device)
            entry = _Loaded(model, OrderedDict())
        self.loaded[key] = entry
        while len(self.loaded) > self.max_models:
            self.loaded.popitem(last=False)

    def _switch_adapter(self, entry: _Loaded, folder: str) -> None:
        if folder not in entry.adapters:
            name = self._adapter_name()
            entry.model.load_adapter(folder, adapter_name=name)
            entry.adapters[folder] = name
        entry.adapters.move_to_end(folder)
        entry.model.set_adapter(entry.adapters[folder])
        while len(entry.adapters) > self.max_adapters:
            _, name = entry.adapters.popitem(last=False)
            entry.model.delete_adapter(name)
        entry.model.eval()

    def _adapter_name(self) -> str:
        self.next_adapter += 1
        return f"adapter{self.next_adapter}"  # PEFT names become module keys: no dots or slashes

    def _tokenizer_of(self, target: Target) -> tuple[Any, str | None]:
        from lmtune.models import load_tokenizer

        if target.model_path not in self.tokenizers:
            self.tokenizers[target.model_path] = (load_tokenizer(target.model_path), run_template(target))
        return self.tokenizers[target.model_path]

    def adapter_count(self) -> int:
        return sum(len(entry.adapters) for entry in self.loaded.values())
