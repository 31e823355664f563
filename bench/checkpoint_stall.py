"""How long a checkpoint save blocks the training thread, against a plain synchronous save.

SmolLM2-135M, full fine-tuning, AdamW with its state filled by one real step. The blocked time is
what `lmtune train` spends on the training thread for a save, with the same calls the engine makes:
taking the snapshot and handing it to the background writer, plus the time the next
`optimizer.step()` waits for the writer thread to finish copying the tensors (the next forward and
backward passes run meanwhile). The baseline writes the same tensors with one synchronous
`safetensors.save_file`. The blocked time of a sharded save (fsdp) is measured in real runs by
bench/fsdp_memory.py.

    .venv/bin/python bench/checkpoint_stall.py [--repeats 3] [--dir /tmp/stall] [--model smollm2|tiny] [--smoke]

Prints both times (median of the repeats) and their ratio, `blocked_ratio`; the goal is below 0.1.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from lmtune.checkpoint import CheckpointStore, Snapshot
from lmtune.config import TrainConfig
from lmtune.engine import checkpoint_tensors
from lmtune.models import count_parameters, load_model
from lmtune.state import TrainState

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import model_dir, smoke_requested  # noqa: E402


def one_training_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    ids = torch.randint(0, model.config.vocab_size, (1, 64))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def snapshot(model, optimizer, scheduler, step: int) -> Snapshot:
    """What `TrainingLoop._snapshot` takes, with no model files to write."""
    weights, name = checkpoint_tensors(model)
    return Snapshot(step=step, weights=weights, weights_name=name, write_model_files=lambda folder: None,
                    optimizer=optimizer.state_dict(), state=TrainState(step=step, rng=[{}]),
                    entry={"step": step, "reasons": ["bench"], "metrics": {}})


def flat_state(model, optimizer) -> dict[str, torch.Tensor]:
    tensors = {f"model.{k}": v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    for index, state in optimizer.state_dict()["state"].items():
        for key, value in state.items():
            if value.ndim:
                tensors[f"optimizer.{index}.{key}"] = value
    return tensors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=None, help="where to write (default: a temporary folder)")
    parser.add_argument("--model", choices=("smollm2", "tiny"), default="smollm2")
    parser.add_argument("--smoke", action="store_true", help="one repeat on the tiny model")
    args = parser.parse_args()
    if smoke_requested(args):
        args.model, args.repeats = "tiny", 1
    folder = args.dir or Path(tempfile.mkdtemp(prefix="lmtune-stall-"))
    folder.mkdir(parents=True, exist_ok=True)

    config = TrainConfig(finetuning_type="full")
    model = load_model(str(model_dir(args.model, folder)), config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    scheduler = torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0)
    one_training_step(model, optimizer)
    trainable, _ = count_parameters(model)
    state_bytes = sum(t.numel() * t.element_size() for t in flat_state(model, optimizer).values())
    print(f"{args.model} full fine-tuning: {trainable:,} trainable parameters, "
          f"{state_bytes / 1e9:.2f} GB of weights + optimizer state; torch threads {torch.get_num_threads()}")

    store = CheckpointStore(folder / "run", save_total_limit=1, best_metric=None)
    step_alone = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        one_training_step(model, optimizer)
        step_alone.append(time.perf_counter() - start)
    blocked, hand_off, steps_after, written = [], [], [], []
    for step in range(1, args.repeats + 1):
        store.wait()
        waited_before = store.guard_wait_s
        start = time.perf_counter()
        store.save(snapshot(model, optimizer, scheduler, step), guard=optimizer)
        hand_off.append(time.perf_counter() - start)
        one_training_step(model, optimizer)  # its optimizer.step() waits until the copy is done
        steps_after.append(time.perf_counter() - start - hand_off[-1])
        blocked.append(hand_off[-1] + store.guard_wait_s - waited_before)
        store.wait()
        written.append(time.perf_counter() - start)

    plain = []
    for repeat in range(args.repeats):
        path = folder / f"plain-{repeat}.safetensors"
        start = time.perf_counter()
        save_file(flat_state(model, optimizer), str(path), metadata={"format": "pt"})
        plain.append(time.perf_counter() - start)
        path.unlink()

    stall, sync = statistics.median(blocked), statistics.median(plain)
    print(f"training thread blocked by a save: {stall:.3f} s  (runs: " + ", ".join(f"{b:.3f}" for b in blocked)
          + "; snapshot + hand-off " + ", ".join(f"{h:.3f}" for h in hand_off) + ")")
    print(f"training step right after a save: {statistics.median(steps_after):.3f} s; "
          f"a step with no save: {statistics.median(step_alone):.3f} s")
    print(f"whole checkpoint on the writer thread (with fsync): {statistics.median(written):.3f} s")
    print(f"plain synchronous safetensors save_file, same tensors: {sync:.3f} s  (runs: "
          + ", ".join(f"{p:.3f}" for p in plain) + ")")
    print(f"blocked_ratio: {stall / sync:.3f} (blocked / synchronous; goal < 0.1)")
    if args.dir is None:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
