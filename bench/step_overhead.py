"""What lmtune's training step costs on top of the model's own forward and backward.

    python bench/step_overhead.py [--model tiny|smollm2] [--finetuning full|lora] [--pairs 10]
                                  [--device cpu|cuda] [--peak-tflops 989] [--smoke]

A: lmtune's engine, set up from a config as `lmtune train` does (`set_up`, then the loop's own
   `_optimizer_step` and `_after_step`: token-weighted accumulation, clipping, the LR schedule, the
   device-side interval sums, callbacks, and a metrics row every `--logging-steps` steps).
B: a bare PyTorch loop written here: forward and loss (the engine's loss object: the model's work),
   backward, clip, AdamW step, zero_grad; nothing else.

Both train the same model (loaded by the same function, so LoRA is set up the same way) on the same
micro-batches, taken once from the engine's own data loader, with the same clipping and accumulation.
After a warm-up block of each, A and B alternate in this process, step by step on the CPU (A B A B:
both see the same moments of a shared machine) or block by block on a GPU (no sync between steps);
each pair of `--logging-steps`-step blocks gives a ratio A / B, and the last line is their median:
`overhead_ratio: X`.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    EngineSteps,
    add_device_args,
    autocast,
    base_config,
    matmul_flops_per_token,
    median,
    mfu,
    model_dir,
    scratch_home,
    select_device,
    smoke_requested,
    sync,
    write_sft_data,
)

DEFAULTS = {  # modest sizes: a shared 2-core CPU runs each in a few minutes
    "tiny": dict(batch_size=4, accumulation=2, cutoff_len=64, pairs=10, logging_steps=10),
    "smollm2": dict(batch_size=2, accumulation=2, cutoff_len=64, pairs=4, logging_steps=5),
}


class BareSteps:
    """The loop a user would write by hand around the same model."""

    def __init__(self, config, device: str):
        import torch

        from lmtune.loss import batch_loss_for
        from lmtune.models import load_model

        torch.manual_seed(config.seed)
        self.device = torch.device(device)
        self.model = load_model(config.model_name_or_path, config).to(self.device)
        self.loss = batch_loss_for(self.model)  # the model's work, as the engine computes it
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=config.learning_rate, weight_decay=config.weight_decay)
        self.max_grad_norm = config.max_grad_norm
        self.autocast = device

    def step(self, group) -> None:
        import torch

        self.model.train()
        for batch, _ in group:
            batch = {key: value.to(self.device, non_blocking=True) for key, value in batch.items()}
            with autocast(self.autocast):
                loss = self.loss(self.model, batch) / len(group)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def timed_step(runner, group, device: str) -> float:
    sync(device)
    began = time.perf_counter()
    runner.step(group)
    sync(device)
    return time.perf_counter() - began


def timed_pair(engine, bare, groups: list, start: int, steps: int, device: str, interleave: str) -> tuple[float, float]:
    """Milliseconds per step of A and of B over the same `steps` steps from group `start` (cycling).
    `step`: A B A B step by step, so that both see the same moments of a noisy machine; `block`: all of
    A's steps, then all of B's, timed without a sync between steps (on a GPU the host runs ahead)."""
    chosen = [groups[index % len(groups)] for index in range(start, start + steps)]
    if interleave == "step":
        a = b = 0.0
        for group in chosen:
            a += timed_step(engine, group, device)
            b += timed_step(bare, group, device)
        return a * 1000 / steps, b * 1000 / steps
    times = []
    for runner in (engine, bare):
        sync(device)
        began = time.perf_counter()
        for group in chosen:
            runner.step(group)
        sync(device)
        times.append((time.perf_counter() - began) * 1000 / steps)
    return times[0], times[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("tiny", "smollm2"), default="tiny")
    parser.add_argument("--finetuning", choices=("full", "lora"), default="full")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--accumulation", type=int, help="micro-batches per optimizer step")
    parser.add_argument("--cutoff-len", type=int)
    parser.add_argument("--pairs", type=int, help="A B pairs after the warm-up")
    parser.add_argument("--logging-steps", type=int, help="engine logging interval = steps per block")
    parser.add_argument("--distinct-groups", type=int, default=8, help="different optimizer steps' batches cycled")
    parser.add_argument("--interleave", choices=("step", "block"),
                        help="alternate A and B every step (default on the CPU) or every block (default on a GPU)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--smoke", action="store_true", help="one pair of 2 steps on the tiny model")
    add_device_args(parser)
    args = parser.parse_args()
    if smoke_requested(args):
        args.model, args.pairs, args.logging_steps, args.distinct_groups, args.cutoff_len = "tiny", 1, 2, 2, 64
    args.interleave = args.interleave or ("block" if args.device == "cuda" else "step")
    for key, value in DEFAULTS[args.model].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    select_device(args.device)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    with scratch_home() as tmp:
        handler = logging.FileHandler(tmp / "train.log")  # the engine's log lines go somewhere, as in a real run
        logging.getLogger("lmtune").addHandler(handler)
        logging.getLogger("lmtune").setLevel(logging.INFO)
        data = write_sft_data(tmp / "sft.json", rows=512, min_words=10, max_words=args.cutoff_len // 2)
        config = base_config(
            model_dir(args.model, tmp), data, tmp / "run", args.device, finetuning_type=args.finetuning,
            per_device_train_batch_size=args.batch_size, gradient_accumulation_steps=args.accumulation,
            cutoff_len=args.cutoff_len, logging_steps=args.logging_steps,
        )
        engine = EngineSteps(config)
        groups = engine.groups(args.distinct_groups)
        bare = BareSteps(config, args.device)
        block = args.logging_steps
        timed_pair(engine, bare, groups, 0, block, args.device, "block")  # warm-up: allocator, optimizer state
        engine_ms, bare_ms, ratios = [], [], []
        for pair in range(args.pairs):
            a, b = timed_pair(engine, bare, groups, pair * block, block, args.device, args.interleave)
            engine_ms.append(a)
            bare_ms.append(b)
            ratios.append(a / b)
            print(f"pair {pair + 1}/{args.pairs}: engine {a:.2f} ms/step, bare {b:.2f} ms/step, ratio {a / b:.4f}",
                  flush=True)
        loader_ms = _loader_ms(engine, len(groups))
        logging.getLogger("lmtune").removeHandler(handler)

    tokens = sum(c.tokens for g in groups for _, c in g) / len(groups)
    rows = sum(c.samples for g in groups for _, c in g) / len(groups)
    trained_params = sum(p.numel() for p in engine.model.parameters() if p.requires_grad)
    print(f"model {args.model} ({args.finetuning}, {trained_params:,} trainable parameters), device {args.device}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"step: {args.accumulation} x {args.batch_size} rows, {tokens:.0f} non-padding tokens on average; "
          f"engine logs every {args.logging_steps} steps; {args.pairs} pairs of {block} steps, "
          f"alternating every {args.interleave}")
    print(f"engine: {median(engine_ms):.2f} ms/step (median of blocks)")
    print(f"bare:   {median(bare_ms):.2f} ms/step (median of blocks)")
    print(f"engine data loading, not in the ratio (collating {args.accumulation} micro-batches): "
          f"{loader_ms:.2f} ms/step")
    if args.device == "cuda":
        per_token = matmul_flops_per_token(engine.model, tokens / max(rows, 1))
        for name, ms in (("engine", median(engine_ms)), ("bare", median(bare_ms))):
            print(f"MFU {name}: {mfu(tokens / (ms / 1000), per_token, args.peak_tflops):.1%} "
                  f"of {args.peak_tflops:g} TFLOPS")
    print(f"overhead_ratio: {median(ratios):.4f}")


def _loader_ms(engine: EngineSteps, steps: int) -> float:
    """What the engine's DataLoader (collation in this process, as dataloader_num_workers: 0) costs a step."""
    began = time.perf_counter()
    engine.groups(steps)
    return (time.perf_counter() - began) * 1000 / steps


if __name__ == "__main__":
    main()
