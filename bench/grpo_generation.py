"""The share of a GRPO step spent generating: examples/grpo.yaml on the built-in model for a few steps.

    .venv/bin/python bench/grpo_generation.py --steps 5
    .venv/bin/python bench/grpo_generation.py --smoke   # 1 step on the tiny random Llama

Prints, per step, the seconds spent generating and training (metrics.jsonl's generation_s and
training_s), the generated tokens per second, and the share of the whole run spent generating.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import model_dir, smoke_requested

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--smoke", action="store_true", help="1 step of short completions on the tiny model")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        run = Path(folder) / "run"
        overrides = [f"max_steps={args.steps}"]
        if smoke_requested(args):
            overrides = ["max_steps=1", f"model_name_or_path={model_dir('tiny', Path(folder))}",
                         "max_completion_length=4", "num_generations=2", "per_device_train_batch_size=1"]
        subprocess.run([sys.executable, "-m", "lmtune", "train", str(REPO / "examples" / "grpo.yaml"),
                        f"output_dir={run}", "report_to=none", "plot_loss=false", "save_steps=null",
                        "save_total_limit=null", "logging_steps=1", *overrides], check=True, capture_output=True,
                       cwd=REPO / "examples")
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r["type"] == "train"]
    for r in rows:
        print(f"step {r['step']}: generation {r['generation_s']:.1f} s, training {r['training_s']:.1f} s, "
              f"{r['generated_tokens_per_s']:.1f} generated tokens/s, reward {r['reward']:.3f}")
    generation, training = sum(r["generation_s"] for r in rows), sum(r["training_s"] for r in rows)
    print(f"seconds: generation {generation:.1f} s of {generation + training:.1f} s")
    print(f"generation_share: {generation / (generation + training):.2f}")


if __name__ == "__main__":
    main()
