"""AdamW's implementations and torch's thread count, measured on one training step on the CPU.

    python bench/optimizer_step.py [--model smollm2|tiny] [--finetuning lora|full] [--rounds 5]
                                   [--tokens 128] [--smoke]

One model (loaded by lmtune's own `load_model`, so LoRA is set up as a run sets it up), one micro-batch
of `--tokens` generated tokens in one row. Round by round, the order rotating each round so that
every variant sees the same moments of a shared machine:

- forward and loss, backward and clipping once under each thread count (torch's default, and each of
  `--threads`, set with `torch.set_num_threads` for that pass and back after);
- then `optimizer.step()` of each AdamW implementation in turn, each owning its state over the same
  trainable parameters, all on the gradients of the last pass:
  `default`: `torch.optim.AdamW(groups, lr=...)` as lmtune built it before (on CPU tensors torch picks its
  per-tensor loop); `foreach`: `foreach=True` (one call per op for all tensors); `fused`: `fused=True`
  (one fused kernel per tensor for the whole update).

Printed: the median pass per thread count, the median `optimizer.step()` per implementation and the whole
step it makes (default pass + that update) against the default's; the last line is `fused_step_ratio`.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import base_config, median, model_dir, scratch_home, smoke_requested, write_sft_data  # noqa: E402

import lmtune  # noqa: E402, F401  (before torch: it sets OMP_WAIT_POLICY before torch starts its threads)


def adamw(params: list, implementation: str, lr: float):
    """The same two groups as lmtune's `build_optimizer`, with the chosen implementation."""
    import torch

    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": 0.0}, {"params": no_decay, "weight_decay": 0.0}]
    options = {"default": {}, "foreach": {"foreach": True}, "fused": {"fused": True}}[implementation]
    return torch.optim.AdamW(groups, lr=lr, **options)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("smollm2", "tiny"), default="smollm2")
    parser.add_argument("--finetuning", choices=("lora", "full"), default="lora")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, nargs="*", default=[1], help="thread counts to try beside torch's")
    parser.add_argument("--smoke", action="store_true", help="the tiny model, 2 rounds of 32 tokens")
    args = parser.parse_args()
    if smoke_requested(args):
        args.model, args.rounds, args.tokens = "tiny", 2, 32
    logging.getLogger("lmtune").setLevel(logging.WARNING)

    import torch

    from lmtune.loss import batch_loss_for
    from lmtune.models import load_model

    default_threads = torch.get_num_threads()
    with scratch_home() as tmp:
        folder = Path(tmp)
        model_path = model_dir(args.model, folder)
        data = write_sft_data(folder / "data.json", rows=8, min_words=5, max_words=20)
        config = base_config(model_path, data, folder / "out", "cpu", finetuning_type=args.finetuning,
                             lora_target="all", template="chatml")
        model = load_model(str(model_path), config)
    model.train()
    loss_of = batch_loss_for(model)
    params = [p for p in model.parameters() if p.requires_grad]
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(10, model.config.vocab_size - 10, (1, args.tokens), generator=generator)
    batch = {"input_ids": ids, "labels": ids.clone(), "position_ids": torch.arange(args.tokens)[None]}

    implementations = {name: adamw(params, name, config.learning_rate) for name in ("default", "foreach", "fused")}
    thread_counts = [default_threads] + [n for n in args.threads if n != default_threads]
    passes: dict[int, list[float]] = {n: [] for n in thread_counts}
    updates: dict[str, list[float]] = {name: [] for name in implementations}

    def forward_backward(threads: int) -> float:
        torch.set_num_threads(threads)
        try:
            model.zero_grad(set_to_none=True)
            started = time.perf_counter()
            (loss_of(model, batch) / args.tokens).backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            return time.perf_counter() - started
        finally:
            torch.set_num_threads(default_threads)

    def update(name: str) -> float:
        started = time.perf_counter()
        implementations[name].step()
        return time.perf_counter() - started

    def rotated(names: list, round_index: int) -> list:
        shift = round_index % len(names)
        return names[shift:] + names[:shift]

    for round_index in range(args.rounds + 1):  # round 0 warms up: first kernels, the optimizers' state
        for threads in rotated(thread_counts, round_index):
            took = forward_backward(threads)
            if round_index:
                passes[threads].append(took)
        for name in rotated(list(implementations), round_index):
            took = update(name)  # each on the same gradients, those of the last pass
            if round_index:
                updates[name].append(took)
    trainable = sum(p.numel() for p in params)
    print(f"model {args.model} ({args.finetuning}, {trainable:,} trainable parameters in {len(params)} tensors), "
          f"torch {torch.__version__}, default threads {default_threads}; 1 x {args.tokens} tokens a step, "
          f"{args.rounds} rounds, order rotating; load average {' '.join(f'{v:.1f}' for v in os.getloadavg())}")
    base_pass = median(passes[default_threads])
    for threads in thread_counts:
        took = median(passes[threads])
        print(f"threads={threads}: forward + backward + clip {took * 1000:.1f} ms ({took / base_pass:.3f} of "
              f"threads={default_threads})")
    base_update = median(updates["default"])
    for name in implementations:
        took = median(updates[name])
        step = (base_pass + took) / (base_pass + base_update)
        print(f"adamw {name}: optimizer.step {took * 1000:.2f} ms ({took / base_update:.3f} of default); "
              f"whole step {step:.3f} of default")
    print(f"fused_step_ratio: {(base_pass + median(updates['fused'])) / (base_pass + base_update):.3f}")


if __name__ == "__main__":
    main()
