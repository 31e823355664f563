"""Peak memory of one training step with and without `gradient_checkpointing`, and its cost in time.

Each measurement runs in a child process of its own (peak memory is per process), the two settings
alternating; full fine-tuning of SmolLM2-135M (or the tiny model) through lmtune's own model set-up,
one forward + backward + AdamW step on a batch of random tokens. `--smoke`: the tiny model, both settings
in one child (its peaks then say nothing), so that the check pays one start-up.

    .venv/bin/python bench/activation_memory.py --model smollm2 --batch 4 --seq 512 --repeats 2 [--smoke]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import add_device_args, median, model_dir, smoke_requested  # noqa: E402

CHILD = """
import json, resource, sys, time, torch
from lmtune.config import TrainConfig
from lmtune.models import load_model
path, settings, device = sys.argv[1], sys.argv[2].split(","), sys.argv[5]
batch, seq = int(sys.argv[3]), int(sys.argv[4])
for checkpointing in (setting == "1" for setting in settings):
    model = load_model(path, TrainConfig(finetuning_type="full", gradient_checkpointing=checkpointing)).to(device)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0)).to(device)
    def step():
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward(); optimizer.step(); optimizer.zero_grad(set_to_none=True)
    step()  # the optimizer state exists from here on: the second step's peak is the steady one
    if device == "cuda":
        torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter(); step()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else rss
    print(json.dumps({"peak_mb": peak, "step_s": seconds, "rss_before_mb": before / 1024}))
"""


def measure(path: Path, settings: tuple[bool, ...], batch: int, seq: int, device: str) -> list[dict]:
    """One child process steps under each setting in turn (gradient_checkpointing off/on): one result each."""
    flags = ",".join("1" if checkpointing else "0" for checkpointing in settings)
    result = subprocess.run([sys.executable, "-c", CHILD, str(path), flags, str(batch), str(seq), device],
                            capture_output=True, text=True, check=True)
    return [json.loads(line) for line in result.stdout.strip().splitlines()[-len(settings):]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("smollm2", "tiny"), default="smollm2")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--smoke", action="store_true", help="one short repeat on the tiny model")
    add_device_args(parser)
    args = parser.parse_args()
    smoke = smoke_requested(args)
    if smoke:
        args.model, args.batch, args.seq, args.repeats = "tiny", 1, 32, 1
    with tempfile.TemporaryDirectory() as tmp:
        path = model_dir(args.model, Path(tmp))
        runs: dict[bool, list[dict]] = {False: [], True: []}
        for _ in range(args.repeats):
            # smoke: both settings in one child (its peak is then no measure), one start-up instead of two
            for settings in [(False, True)] if smoke else [(False,), (True,)]:
                for checkpointing, result in zip(settings, measure(path, settings, args.batch, args.seq,
                                                                   args.device), strict=True):
                    runs[checkpointing].append(result)
    what = "GPU allocated" if args.device == "cuda" else "process RSS"
    print(f"{args.model} full fine-tuning, batch {args.batch} x {args.seq} tokens, {args.device}, peak {what} "
          f"of one step (median of {args.repeats}):")
    peak = {flag: median([r["peak_mb"] for r in rows]) for flag, rows in runs.items()}
    step = {flag: median([r["step_s"] for r in rows]) for flag, rows in runs.items()}
    for flag, label in ((False, "without"), (True, "with")):
        print(f"  {label} gradient_checkpointing: peak {peak[flag]:.0f} MB, step {step[flag]:.2f} s")
    print(f"step_time_ratio: {step[True] / step[False]:.3f}")
    print(f"peak_ratio_checkpointed: {peak[True] / peak[False]:.3f}")


if __name__ == "__main__":
    main()
