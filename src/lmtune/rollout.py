"""Generation inside a training run (stage grpo): prompts in, completions out.

`Rollout` is the one interface the loss sees: `generate(prompts, num_generations)` returns, for each
prompt, `num_generations` completions as token ids (cut after the first end-of-sequence token, which
they keep), the log-probability of each sampled token under the distribution it was sampled from, and
whether the completion was cut by `max_completion_length`. `LocalRollout` decodes with lmtune.generation
(batched, with the KV cache) on the model being trained, in eval mode and without gradients. Another
backend (vLLM, continuous batching) is another class with the same method.

The sampling RNG is the rollout's own generator, not the global one: it is saved with a checkpoint
(`state_dict`) and restored on resume, so a resumed run samples the same completions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch

from lmtune.generation import Sampling, generate


@dataclass
class Completions:
    """`num_generations` completions of each prompt, the completions of a prompt next to each other."""

    ids: list[list[int]]
    log_probs: list[list[float]]  # the model's log-probability of each sampled token (before temperature and cuts)
    truncated: list[bool]  # no end-of-sequence token within max_completion_length


class Rollout(Protocol):
    def generate(self, prompts: list[list[int]], num_generations: int) -> Completions: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class LocalRollout:
    """Sampling with the training model itself (a transformers causal LM or a PeftModel), through
    lmtune.generation, the one generation module of chat, serve and the rollouts."""

    def __init__(self, model: torch.nn.Module, config: Any, tokenizer: Any, seed: int,
                 synced_processes: bool = False):
        self.model, self.tokenizer = model, tokenizer
        self.sampling = Sampling(max_new_tokens=config.max_completion_length, temperature=config.temperature,
                                 top_p=config.top_p, top_k=config.top_k, top_logprobs=0)
        self.synced_processes = synced_processes  # sharded weights: every process runs as many forwards
        device = next(model.parameters()).device
        self.random = torch.Generator(device=device).manual_seed(seed)

    def generate(self, prompts: list[list[int]], num_generations: int) -> Completions:
        rows = [p for p in prompts for _ in range(num_generations)]
        was_training = self.model.training
        self.model.eval()
        try:
            done = generate(self.model, self.tokenizer, rows, [self.sampling] * len(rows), random=self.random,
                            synced=self.synced_processes)
        finally:
            self.model.train(was_training)
        return Completions([c.token_ids for c in done], [[lp.logprob for lp in c.logprobs or []] for c in done],
                           [c.finish_reason == "length" for c in done])

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.random.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        device = "cuda" if self.random.device.type == "cuda" else "cpu"
        # a checkpoint of an earlier lmtune kept the global RNG states the rollout swapped in ("cpu", "cuda")
        self.random.set_state(state.get("generator", state.get(device)).clone())
