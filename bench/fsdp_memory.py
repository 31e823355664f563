"""Peak memory per process of SmolLM2-135M full fine-tuning: 1 process against FSDP over 2, with and
without gradient_checkpointing; and how long a save blocks the training thread, unsharded and sharded.

Each setting is a real `lmtune train` (in a child process, or `torchrun --nproc_per_node 2`), a few
steps on short sequences, with a callback that writes each process's peak RSS after the first step
(before any save) and when training ends (saves and the gathered final model included), and that
times the engine's own `_save_checkpoint` on the training thread (plus, for an unsharded save, the wait
of the next optimizer step for the writer's copy). The settings alternate over the repeats.

    .venv/bin/python bench/fsdp_memory.py [--steps 2] [--seq 128] [--repeats 1] [--smoke]

The last line is `fsdp_peak_ratio`: the training peak of FSDP over that of 1 process. `--smoke`: the tiny
model, FSDP alone (last line `fsdp_peak_mb`).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).parent))
from _common import median, model_dir, smoke_requested, write_sft_data  # noqa: E402

REPORTER = '''
import json, os, resource, time
import lmtune.engine as engine


class Report:
    """Each process: its peak RSS at the end, and the training thread's time in each mid-run save."""

    def __init__(self):
        self.blocked = []
        save = engine.TrainingLoop._save_checkpoint
        report = self

        def timed(loop, reasons):
            start, waited = time.perf_counter(), loop.store.guard_wait_s
            save(loop, reasons)
            report.store, report.waited_before, report.started = loop.store, waited, start
            report.blocked.append(time.perf_counter() - start)

        engine.TrainingLoop._save_checkpoint = timed

    def on_step_end(self, state, metrics):
        if state.step == 1:  # after a whole step (AdamW state made), before the first save
            self.training_peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        if getattr(self, "store", None) is not None:  # the step after a save: its wait for the copy
            self.blocked[-1] += self.store.guard_wait_s - self.waited_before
            self.store = None

    def on_train_end(self, state):
        rank = os.environ.get("RANK", "0")
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        out = os.path.join(os.environ["FSDP_BENCH_OUT"], f"rank-{rank}.json")
        with open(out, "w") as handle:
            json.dump({"peak_mb": peak_mb, "training_peak_mb": self.training_peak_mb,
                       "blocked_s": self.blocked[:-1]}, handle)  # the last save is the final one
'''


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run(folder: Path, model: Path, data: Path, fsdp: bool, checkpointing: bool, steps: int, seq: int) -> dict:
    name = f"{'fsdp' if fsdp else 'single'}-{'gc' if checkpointing else 'nogc'}"
    out = folder / name
    out.mkdir(exist_ok=True)
    config = folder / f"{name}.yaml"
    config.write_text(yaml.safe_dump({
        "model_name_or_path": str(model), "dataset": str(data), "output_dir": str(folder / f"run-{name}"),
        "overwrite_output_dir": True, "finetuning_type": "full", "per_device_train_batch_size": 1,
        "gradient_accumulation_steps": 1 if fsdp else 2,  # the same global batch: 2 examples a step
        "cutoff_len": seq, "max_steps": steps, "save_steps": 1, "logging_steps": 1, "report_to": "none",
        "plot_loss": False, "preview_samples": 0, "gradient_checkpointing": checkpointing,
        "fsdp": "full_shard" if fsdp else False, "callbacks": ["fsdp_bench_report:Report"],
    }))
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                 str(free_port())] if fsdp else [sys.executable])
    env = {**os.environ, "FSDP_BENCH_OUT": str(out), "OMP_NUM_THREADS": "1" if fsdp else "2",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(folder), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([*launcher, "-m", "lmtune", "train", str(config)], env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{name}: lmtune train failed (exit {result.returncode}):\n{result.stderr[-3000:]}")
    ranks = [json.loads(path.read_text()) for path in sorted(out.glob("rank-*.json"))]
    blocked = [seconds for rank in ranks for seconds in rank["blocked_s"]]
    return {"peak_mb": max(rank["peak_mb"] for rank in ranks), "blocked_s": median(blocked),
            "training_peak_mb": max(rank["training_peak_mb"] for rank in ranks)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--smoke", action="store_true", help="the tiny model, FSDP only")
    args = parser.parse_args()
    smoke = smoke_requested(args)
    if smoke:
        args.steps, args.seq, args.repeats = 2, 64, 1
    print(f"load average at the start: {os.getloadavg()[0]:.1f}")
    with tempfile.TemporaryDirectory(prefix="lmtune-fsdp-bench-") as tmp:
        folder = Path(tmp)
        (folder / "fsdp_bench_report.py").write_text(REPORTER)
        model = model_dir("tiny" if smoke else "smollm2", folder)
        data = write_sft_data(folder / "data.json", rows=64, min_words=args.seq // 2, max_words=args.seq)
        # smoke: FSDP alone (the 1-process run is e2e's smoke path), one start-up of 2 processes
        settings = [(True, False)] if smoke else [(fsdp, gc) for gc in (False, True) for fsdp in (False, True)]
        results: dict = {setting: [] for setting in settings}
        for _ in range(args.repeats):
            for setting in settings:
                results[setting].append(run(folder, model, data, *setting, args.steps, args.seq))
    model_name = "tiny model" if smoke else "SmolLM2-135M"
    print(f"{model_name} full fine-tuning, {args.steps} steps of 2 examples x up to {args.seq} tokens, CPU; "
          f"peak RSS of the largest process (median of {args.repeats}):")
    peak = {s: median([r["peak_mb"] for r in rows]) for s, rows in results.items()}
    training = {s: median([r["training_peak_mb"] for r in rows]) for s, rows in results.items()}
    blocked = {s: median([r["blocked_s"] for r in rows]) for s, rows in results.items()}
    for fsdp, gc in settings:
        label = f"{'FSDP full_shard, 2 processes' if fsdp else '1 process, no sharding':30s}" \
                f"{' gradient_checkpointing' if gc else '':24s}"
        print(f"  {label} peak {training[(fsdp, gc)]:6.0f} MB training, {peak[(fsdp, gc)]:6.0f} MB with the saves "
              f"and the final model; a save blocks the training thread {blocked[(fsdp, gc)]:.3f} s")
    compared = sorted({gc for _, gc in settings if (False, gc) in results and (True, gc) in results}, reverse=True)
    for gc in compared:
        print(f"ratio FSDP / 1 process{' (gradient_checkpointing)' if gc else ''}: training "
              f"{training[(True, gc)] / training[(False, gc)]:.3f}, "
              f"with saves {peak[(True, gc)] / peak[(False, gc)]:.3f}")
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")
    if not compared:
        print(f"fsdp_peak_mb: {training[(True, False)]:.0f}")
        return
    print(f"fsdp_peak_ratio: {training[(True, False)] / training[(False, False)]:.3f}")


if __name__ == "__main__":
    main()
