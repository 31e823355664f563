"""The whole job, from process start to exit: LoRA SFT of SmolLM2-135M (rank 8 on all linear layers, 400
rows, batch 4, cutoff_len 128, 30 steps) with `lmtune train` in a child process; median of 3 runs, split
into start-up, steps, the final save and the exit.

    python bench/e2e.py [--runs 3] [--steps 30] [--warmup-steps N] [--baseline-src PATH] [--smoke]

`--baseline-src`: a copy of an earlier lmtune's `src` folder, run as `lmtune-before`, alternating with
the current one (before/after figures under the same load).

If LMTUNE_BENCH_LLAMAFACTORY_VENV names a venv with LLaMA-Factory installed, the same job runs there too
(`llamafactory-cli train`, the same data, template, model and settings), the two alternating run by run,
and the last line is the ratio of the whole times, `lmtune/llamafactory`; otherwise the last line is
`lmtune_s`, lmtune's median whole time.

The split is read the same way for both, from the times the child's log lines arrive here (unbuffered):
a line per optimizer step (`logging_steps: 1`) gives the end of each step; `steps` is the time from the
end of step 1 to the end of the last step, scaled to all steps (so a slow first step counts as start-up),
`start-up` is the time before the first step by that average, `save` is from the last step to lmtune's
`done` line (LLaMA-Factory: its `train_runtime` summary line ... the last line it prints), and `exit` is
from there to the process's exit. One uncounted run of each (`--warmup-steps` steps) warms the data caches
and the disk.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import median, model_dir, scratch_home, smoke_requested, write_sft_data  # noqa: E402

PARTS = ("start-up", "steps", "save", "exit", "whole")


def job(steps: int) -> dict:
    """The settings both tools get (their key names are the same)."""
    return {"stage": "sft", "finetuning_type": "lora", "lora_rank": 8, "lora_target": "all", "template": "chatml",
            "cutoff_len": 128, "per_device_train_batch_size": 4, "gradient_accumulation_steps": 1,
            "learning_rate": 1.0e-4, "lr_scheduler_type": "cosine", "max_steps": steps, "logging_steps": 1,
            "overwrite_output_dir": True, "report_to": "none", "plot_loss": False, "seed": 42}


def lmtune_command(folder: Path, model: Path, data: Path, steps: int, name: str = "lmtune") -> list[str]:
    config = folder / f"{name}.yaml"
    config.write_text(yaml.safe_dump({**job(steps), "model_name_or_path": str(model), "dataset": str(data),
                                      "output_dir": str(folder / f"out-{name}")}))
    return [sys.executable, "-m", "lmtune", "train", str(config)]


def llamafactory_command(venv: Path, folder: Path, model: Path, data: Path, steps: int) -> list[str]:
    (folder / "dataset_info.json").write_text(json.dumps({"bench": {"file_name": str(data)}}))
    config = folder / "llamafactory.yaml"
    config.write_text(yaml.safe_dump({**job(steps), "model_name_or_path": str(model), "dataset": "bench",
                                      "dataset_dir": str(folder), "do_train": True,
                                      "output_dir": str(folder / "out-llamafactory"), "save_strategy": "no",
                                      "dataloader_num_workers": 0, "disable_tqdm": True}))
    return [str(venv / "bin" / "llamafactory-cli"), "train", str(config)]


def step_line(tool: str, line: str) -> bool:
    if tool.startswith("lmtune"):
        return " step " in f" {line}" and " loss " in line
    return line.lstrip().startswith("{") and "'loss'" in line


def end_line(tool: str, line: str) -> bool:
    return "done:" in line if tool.startswith("lmtune") else "train_runtime" in line


def timed_run(tool: str, command: list[str], steps: int, env: dict, baseline_src: str | None) -> dict:
    """Runs `command` and splits its time by the arrival of its log lines."""
    if tool == "lmtune-before":
        env = {**env, "PYTHONPATH": os.pathsep.join(filter(None, [baseline_src, env.get("PYTHONPATH")]))}
    started = time.monotonic()
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    step_ends, end, tail = [], None, []
    for line in child.stdout:
        now = time.monotonic() - started
        tail = (tail + [line])[-40:]
        if step_line(tool, line):
            step_ends.append(now)
        elif end is None and end_line(tool, line):
            end = now
    child.wait()
    whole = time.monotonic() - started
    if child.returncode != 0 or len(step_ends) != steps or end is None:
        raise SystemExit(f"{tool} run failed (exit {child.returncode}, {len(step_ends)} step lines of {steps}):\n"
                         + "".join(tail))
    per_step = (step_ends[-1] - step_ends[0]) / max(steps - 1, 1)
    first_begins = step_ends[0] - per_step
    return {"start-up": first_begins, "steps": per_step * steps, "save": end - step_ends[-1], "exit": whole - end,
            "whole": whole}


def describe(tool: str, runs: list[dict]) -> str:
    parts = ", ".join(f"{part} {median([r[part] for r in runs]):.2f} s" for part in PARTS)
    wholes = ", ".join(f"{r['whole']:.1f}" for r in runs)
    return f"{tool}: {parts} (median of {len(runs)}; whole runs {wholes})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rows", type=int, default=400)
    parser.add_argument("--warmup-steps", type=int, help="steps of the uncounted first run (default: --steps)")
    parser.add_argument("--baseline-src", help="an earlier lmtune's src folder, run alternately as lmtune-before")
    parser.add_argument("--smoke", action="store_true", help="one short run on the tiny model")
    args = parser.parse_args()
    smoke = smoke_requested(args)
    if smoke:
        args.runs, args.steps, args.rows = 1, 3, 24
    venv = os.environ.get("LMTUNE_BENCH_LLAMAFACTORY_VENV")
    tools = ["lmtune-before"] if args.baseline_src else []
    tools += ["lmtune"] + (["llamafactory"] if venv and not smoke else [])
    print(f"load average at the start: {' '.join(f'{v:.1f}' for v in os.getloadavg())}", flush=True)
    with scratch_home() as tmp:
        folder = Path(tmp)
        model = model_dir("tiny" if smoke else "smollm2", folder)
        data = write_sft_data(folder / "data.json", rows=args.rows, min_words=10, max_words=90)
        warmup_steps = args.warmup_steps or args.steps

        def command(tool: str, steps: int) -> list[str]:
            if tool == "llamafactory":
                return llamafactory_command(Path(venv), folder, model, data, steps)
            return lmtune_command(folder, model, data, steps, tool)

        env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        results: dict[str, list[dict]] = {tool: [] for tool in tools}
        for run in range(args.runs + (0 if smoke else 1)):  # run 0: warms the caches, not counted
            steps = warmup_steps if run == 0 and not smoke else args.steps
            for tool in tools:
                result = timed_run(tool, command(tool, steps), steps, env, args.baseline_src)
                if smoke or run > 0:
                    results[tool].append(result)
                print(f"run {run} {tool}: " + ", ".join(f"{p} {result[p]:.2f} s" for p in PARTS), flush=True)
    print(f"job: LoRA rank 8 all linear, {'tiny model' if smoke else 'SmolLM2-135M'}, {args.rows} rows, batch 4, "
          f"cutoff_len 128, {args.steps} steps, CPU, {os.cpu_count()} cores")
    print(f"load average at the end: {' '.join(f'{v:.1f}' for v in os.getloadavg())}")
    for tool in tools:
        print(describe(tool, results[tool]))
    whole = {tool: median([r["whole"] for r in results[tool]]) for tool in tools}
    if "lmtune-before" in tools:
        print(f"lmtune/lmtune-before: {whole['lmtune'] / whole['lmtune-before']:.3f}")
    if "llamafactory" in tools:
        print(f"lmtune/llamafactory: {whole['lmtune'] / whole['llamafactory']:.3f}")
    else:
        print(f"lmtune_s: {whole['lmtune']:.2f}")


if __name__ == "__main__":
    main()
