"""Generation inside a training run (stage grpo): prompts in, completions out.

`Rollout` is the one interface the loss sees: `generate(prompts, num_generations)` returns, for each
prompt, `num_generations` completions as token ids (cut after the first end-of-sequence token, which
they keep), the log-probability of each sampled token under the distribution it was sampled from, and
whether the completion was cut by `max_completion_length`. `LocalRollout` runs transformers' batched
`generate` with the KV cache on the model being trained, in eval mode and without gradients. Another
backend (vLLM, continuous batching) is another class with the same method.

The sampling RNG is the rollout's own, not the global one: it is saved with a checkpoint
(`state_dict`) and restored on resume, so a resumed run samples the same completions.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import torch


@dataclass
class Completions:
    """`num_generations` completions of each prompt, the completions of a prompt next to each other."""

    ids: list[list[int]]
    log_probs: list[list[float]]  # of each sampled token, under the (temperature, top-p, top-k) sampling
    truncated: list[bool]  # no end-of-sequence token within max_completion_length


class Rollout(Protocol):
    def generate(self, prompts: list[list[int]], num_generations: int) -> Completions: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class LocalRollout:
    """Sampling with the training model itself (a transformers causal LM or a PeftModel)."""

    def __init__(self, model: torch.nn.Module, config: Any, pad_token_id: int, eos_token_ids: list[int],
                 seed: int, synced_processes: bool = False):
        self.model = model
        self.max_new_tokens = config.max_completion_length
        self.sampling = {"do_sample": True, "temperature": config.temperature, "top_p": config.top_p,
                         "top_k": config.top_k or None}
        self.pad_token_id = pad_token_id
        self.eos_token_ids = eos_token_ids
        self.synced_processes = synced_processes  # sharded weights: every process runs as many forwards
        self.device = next(model.parameters()).device
        self._cpu_rng = torch.Generator().manual_seed(seed).get_state()
        self._cuda_rng = None
        if self.device.type == "cuda":
            generator = torch.Generator(device=self.device).manual_seed(seed)
            self._cuda_rng = generator.get_state()

    def generate(self, prompts: list[list[int]], num_generations: int) -> Completions:
        input_ids, attention_mask = self._left_padded([p for p in prompts for _ in range(num_generations)])
        was_training = self.model.training
        self.model.eval()
        try:
            with self._own_rng(), torch.no_grad():
                out = self.model.generate(
                    input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=self.max_new_tokens,
                    pad_token_id=self.pad_token_id, eos_token_id=self.eos_token_ids, use_cache=True,
                    output_scores=True, return_dict_in_generate=True, synced_gpus=self.synced_processes,
                    **self.sampling)
        finally:
            self.model.train(was_training)
        generated = out.sequences[:, input_ids.shape[1]:]
        # log-probabilities of the sampled tokens, step by step (scores are the processed logits)
        picked = [torch.log_softmax(scores.float(), dim=-1).gather(1, generated[:, i : i + 1])
                  for i, scores in enumerate(out.scores)]
        log_probs = torch.cat(picked, dim=1).tolist()
        ids, kept_log_probs, truncated = [], [], []
        for row, row_log_probs in zip(generated.tolist(), log_probs, strict=True):
            end = next((i for i, token in enumerate(row) if token in self.eos_token_ids), None)
            truncated.append(end is None)
            length = len(row) if end is None else end + 1
            ids.append(row[:length])
            kept_log_probs.append(row_log_probs[:length])
        return Completions(ids, kept_log_probs, truncated)

    def _left_padded(self, prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            input_ids[row, width - len(prompt):] = torch.tensor(prompt)
            attention_mask[row, width - len(prompt):] = 1
        return input_ids.to(self.device), attention_mask.to(self.device)

    @contextlib.contextmanager
    def _own_rng(self) -> Iterator[None]:
        """The global RNG swapped for the rollout's while it samples (transformers samples from the global one)."""
        devices = [self.device] if self._cuda_rng is not None else []
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(self._cpu_rng)
            if self._cuda_rng is not None:
                torch.cuda.set_rng_state(self._cuda_rng, self.device)
            yield
            self._cpu_rng = torch.get_rng_state()
            if self._cuda_rng is not None:
                self._cuda_rng = torch.cuda.get_rng_state(self.device)

    def state_dict(self) -> dict[str, Any]:
        state = {"cpu": self._cpu_rng.clone()}
        if self._cuda_rng is not None:
            state["cuda"] = self._cuda_rng.clone()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._cpu_rng = state["cpu"].clone()
        if self._cuda_rng is not None and "cuda" in state:
            self._cuda_rng = state["cuda"].clone()
