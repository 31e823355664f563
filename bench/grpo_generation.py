"""The share of a GRPO step spent generating: examples/grpo.yaml on the built-in model for a few steps.

    .venv/bin/python bench/grpo_generation.py --steps 5

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

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        run = Path(folder) / "run"
        subprocess.run([sys.executable, "-m", "lmtune", "train", str(REPO / "examples" / "grpo.yaml"),
                        f"output_dir={run}", f"max_steps={args.steps}", "report_to=none", "plot_loss=false",
                        "save_steps=null", "logging_steps=1"], check=True, capture_output=True)
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r["type"] == "train"]
    for r in rows:
        print(f"step {r['step']}: generation {r['generation_s']:.1f} s, training {r['training_s']:.1f} s, "
              f"{r['generated_tokens_per_s']:.1f} generated tokens/s, reward {r['reward']:.3f}")
    generation, training = sum(r["generation_s"] for r in rows), sum(r["training_s"] for r in rows)
    print(f"share of step time spent generating: {generation / (generation + training):.0%} "
          f"({generation:.1f} s of {generation + training:.1f} s)")


if __name__ == "__main__":
    main()
