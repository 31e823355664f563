"""SFT throughput in trained tokens per second, with and without packing, on mixed-length data.

    python bench/throughput.py [--model tiny|smollm2] [--steps-per-block 5] [--pairs 4]
                               [--device cpu|cuda] [--peak-tflops 989]

Generates alpaca rows whose lengths are spread evenly from short to `--cutoff-len`, and sets up
lmtune's engine on them twice from the same config but `packing`: off (each micro-batch padded to
its longest row) and on (whole examples packed into rows of `cutoff_len`). Optimizer steps alternate
between the two, step by step, in one process; for each it prints trained (label, non-padding) tokens per
second, the median over blocks, and the share of padding among the tokens the model computes on.
The last line is the speed-up: `packing_speedup: X` (median of the pair ratios).
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
    base_config,
    matmul_flops_per_token,
    median,
    mfu,
    model_dir,
    scratch_home,
    select_device,
    sync,
    write_sft_data,
)

DEFAULTS = {  # modest sizes: a shared 2-core CPU runs each in a few minutes
    "tiny": dict(batch_size=4, cutoff_len=256, pairs=4),
    "smollm2": dict(batch_size=2, cutoff_len=256, pairs=3),
}


def batch_stats(groups: list) -> dict[str, float]:
    """Over these steps: trained tokens, non-padding tokens, and the tokens the model computes on."""
    trained = real = computed = 0
    for group in groups:
        for batch, counts in group:
            trained += counts.trained_tokens
            real += counts.tokens
            computed += batch["input_ids"].numel()
    return {"trained": trained, "real": real, "computed": computed, "rows": sum(len(g) for g in groups)}


def timed_step(engine: EngineSteps, group: list, device: str) -> float:
    sync(device)
    began = time.perf_counter()
    engine.step(group)
    sync(device)
    return time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("tiny", "smollm2"), default="tiny")
    parser.add_argument("--finetuning", choices=("full", "lora"), default="full")
    parser.add_argument("--batch-size", type=int, help="rows per micro-batch, both ways")
    parser.add_argument("--cutoff-len", type=int)
    parser.add_argument("--rows", type=int, default=600, help="examples in the generated data set")
    parser.add_argument("--steps-per-block", type=int, default=5)
    parser.add_argument("--pairs", type=int)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    add_device_args(parser)
    args = parser.parse_args()
    for key, value in DEFAULTS[args.model].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    select_device(args.device)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    block = args.steps_per_block
    with scratch_home() as tmp:
        handler = logging.FileHandler(tmp / "train.log")
        logging.getLogger("lmtune").addHandler(handler)
        logging.getLogger("lmtune").setLevel(logging.INFO)
        # About 1.3 tokens a word with the SmolLM2 tokenizer: the longest responses reach cutoff_len.
        data = write_sft_data(tmp / "sft.json", rows=args.rows, min_words=3, max_words=int(args.cutoff_len / 1.4))
        model = model_dir(args.model, tmp)
        engines, groups, stats = {}, {}, {}
        for name, packing in (("padded", False), ("packed", True)):
            config = base_config(model, data, tmp / f"run-{name}", args.device, finetuning_type=args.finetuning,
                                 per_device_train_batch_size=args.batch_size, cutoff_len=args.cutoff_len,
                                 packing=packing, logging_steps=block)
            engines[name] = EngineSteps(config)
            groups[name] = engines[name].groups((args.pairs + 1) * block)
            stats[name] = batch_stats(groups[name])
        for name in engines:  # warm-up
            for group in groups[name][:block]:
                timed_step(engines[name], group, args.device)
        speeds: dict[str, list[float]] = {name: [] for name in engines}
        ratios = []
        for pair in range(1, args.pairs + 1):
            # Step by step, padded then packed: both see the same moments of a shared machine.
            seconds = dict.fromkeys(engines, 0.0)
            for index in range(pair * block, (pair + 1) * block):
                for name in engines:
                    seconds[name] += timed_step(engines[name], groups[name][index], args.device)
            for name in engines:
                trained = batch_stats(groups[name][pair * block:(pair + 1) * block])["trained"]
                speeds[name].append(trained / seconds[name])
            ratios.append(speeds["packed"][-1] / speeds["padded"][-1])
            print(f"pair {pair}/{args.pairs}: padded {speeds['padded'][-1]:.0f} tok/s, "
                  f"packed {speeds['packed'][-1]:.0f} tok/s, ratio {ratios[-1]:.3f}", flush=True)
        logging.getLogger("lmtune").removeHandler(handler)

    print(f"model {args.model} ({args.finetuning}), device {args.device}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; {args.rows} examples of mixed length, cutoff_len {args.cutoff_len}, "
          f"{args.batch_size} rows per micro-batch, {args.pairs} pairs of {block} steps")
    for name in engines:
        s = stats[name]
        tokens_per_s = median(speeds[name])
        line = (f"{name}: {tokens_per_s:.0f} trained tokens/s; padding {1 - s['real'] / s['computed']:.1%} of "
                f"computed tokens; {s['real'] / s['rows']:.0f} real tokens per micro-batch")
        if args.device == "cuda":
            # Useful work only: FLOPs of the non-padding tokens (padding is computed, but wasted).
            per_token = matmul_flops_per_token(engines[name].model, s["real"] / s["rows"])
            real_per_s = tokens_per_s * s["real"] / s["trained"]
            line += f"; MFU {mfu(real_per_s, per_token, args.peak_tflops):.1%} of {args.peak_tflops:g} TFLOPS"
        print(line)
    print(f"packing_speedup: {median(ratios):.3f}")


if __name__ == "__main__":
    main()
