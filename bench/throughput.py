"""SFT throughput: padded batches with full logits (before) against lmtune's defaults (padding-free
batches, logits only at trained positions), in trained tokens per second and memory.

    python bench/throughput.py [--model tiny|smollm2] [--finetuning full|lora] [--steps-per-block 5]
                               [--pairs 4] [--threads N] [--device cpu|cuda] [--peak-tflops 989] [--smoke]

Generates alpaca rows whose response lengths are spread evenly from short to `--cutoff-len`, and sets up
lmtune's engine on them twice from the same config: `padded` has `padding_free: false` and the
model's own loss over every position's logits (`FullLogitsLoss`, what lmtune did before); `default` is
the config as a user gets it (`padding_free` on for SFT, `TrainedPositionsLoss`). Both train on the same
examples in the same micro-batches (only their layout differs). Optimizer steps alternate between the
two, step by step, in one process; each block of steps gives one ratio of trained tokens per second.
Memory: on the CPU, the peak of the tensors the step keeps for its backward pass (activations and
logits, not the weights), counted by autograd's saved-tensor hooks; on a GPU, the allocator's peak.
The last line is the speed-up: `speedup_vs_padded: X` (median of the pair ratios).
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
    smoke_requested,
    sync,
    write_sft_data,
)

DEFAULTS = {  # modest sizes: a shared 2-core CPU runs each in a few minutes
    "tiny": dict(batch_size=4, cutoff_len=256, pairs=4),
    "smollm2": dict(batch_size=4, cutoff_len=256, pairs=3),
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


class SavedForBackward:
    """The bytes of the tensors autograd keeps for the backward pass, at their peak within a step (each
    storage counted once; parameters left out, as both set-ups hold the same)."""

    def __init__(self, model):
        self.parameters = {p.data_ptr() for p in model.parameters()}
        self.live: dict[int, int] = {}
        self.peak = 0

    def pack(self, tensor):
        pointer = tensor.untyped_storage().data_ptr()
        if pointer not in self.parameters and pointer not in self.live:
            self.live[pointer] = tensor.untyped_storage().nbytes()
            self.peak = max(self.peak, sum(self.live.values()))
        return tensor

    def unpack(self, tensor):
        return tensor


def timed_step(engine: EngineSteps, group: list, device: str) -> tuple[float, float]:
    """Seconds of one optimizer step, and its memory peak in MB."""
    import torch

    sync(device)
    counter = SavedForBackward(engine.model)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    began = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(counter.pack, counter.unpack):
        engine.step(group)
    sync(device)
    seconds = time.perf_counter() - began
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else counter.peak
    return seconds, peak / 2**20


def set_up(args, tmp: Path, model: Path, data: Path) -> dict[str, EngineSteps]:
    from lmtune.loss import FullLogitsLoss

    engines = {}
    for name, padding_free in (("padded", False), ("default", None)):
        config = base_config(model, data, tmp / f"run-{name}", args.device, finetuning_type=args.finetuning,
                             per_device_train_batch_size=args.batch_size, cutoff_len=args.cutoff_len,
                             padding_free=padding_free, logging_steps=args.steps_per_block)
        engines[name] = EngineSteps(config)
    engines["padded"].loop.loss = FullLogitsLoss()  # what lmtune computed before: logits at every position
    return engines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("tiny", "smollm2"), default="tiny")
    parser.add_argument("--finetuning", choices=("full", "lora"), default="lora")
    parser.add_argument("--batch-size", type=int, help="rows per micro-batch, both ways")
    parser.add_argument("--cutoff-len", type=int)
    parser.add_argument("--rows", type=int, default=600, help="examples in the generated data set")
    parser.add_argument("--steps-per-block", type=int, default=5)
    parser.add_argument("--pairs", type=int)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--smoke", action="store_true", help="one pair of 1 step on the tiny model")
    add_device_args(parser)
    args = parser.parse_args()
    if smoke_requested(args):
        args.model, args.rows, args.pairs, args.steps_per_block, args.cutoff_len = "tiny", 32, 1, 1, 64
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
        engines = set_up(args, tmp, model_dir(args.model, tmp), data)
        groups = {name: engine.groups((args.pairs + 1) * block) for name, engine in engines.items()}
        stats = {name: batch_stats(groups[name]) for name in engines}
        assert stats["padded"]["trained"] == stats["default"]["trained"]  # the same examples either way
        for name in engines:  # warm-up
            for group in groups[name][:block]:
                timed_step(engines[name], group, args.device)
        speeds: dict[str, list[float]] = {name: [] for name in engines}
        peaks = dict.fromkeys(engines, 0.0)
        ratios = []
        for pair in range(1, args.pairs + 1):
            # Step by step, padded then default: both see the same moments of a shared machine.
            seconds = dict.fromkeys(engines, 0.0)
            for index in range(pair * block, (pair + 1) * block):
                for name in engines:
                    step_seconds, peak = timed_step(engines[name], groups[name][index], args.device)
                    seconds[name] += step_seconds
                    peaks[name] = max(peaks[name], peak)
            for name in engines:
                trained = batch_stats(groups[name][pair * block:(pair + 1) * block])["trained"]
                speeds[name].append(trained / seconds[name])
            ratios.append(speeds["default"][-1] / speeds["padded"][-1])
            print(f"pair {pair}/{args.pairs}: padded {speeds['padded'][-1]:.0f} tok/s, "
                  f"default {speeds['default'][-1]:.0f} tok/s, ratio {ratios[-1]:.3f}", flush=True)
        logging.getLogger("lmtune").removeHandler(handler)

    memory = "GPU allocator peak" if args.device == "cuda" else "peak kept for backward"
    print(f"model {args.model} ({args.finetuning}), device {args.device}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; {args.rows} examples of mixed length, cutoff_len {args.cutoff_len}, "
          f"{args.batch_size} rows per micro-batch, {args.pairs} pairs of {block} steps")
    for name in engines:
        s = stats[name]
        tokens_per_s = median(speeds[name])
        line = (f"{name}: {tokens_per_s:.0f} trained tokens/s; {memory} {peaks[name]:.0f} MB; padding "
                f"{1 - s['real'] / s['computed']:.1%} of computed tokens; {s['trained'] / s['real']:.1%} of "
                "the real tokens trained")
        if args.device == "cuda":
            # Useful work only: FLOPs of the non-padding tokens (padding is computed, but wasted).
            per_token = matmul_flops_per_token(engines[name].model, s["real"] / s["rows"])
            real_per_s = tokens_per_s * s["real"] / s["trained"]
            line += f"; MFU {mfu(real_per_s, per_token, args.peak_tflops):.1%} of {args.peak_tflops:g} TFLOPS"
        print(line)
    print(f"memory default / padded: {peaks['default'] / peaks['padded']:.3f}")
    print(f"speedup_vs_padded: {median(ratios):.3f}")


if __name__ == "__main__":
    main()
