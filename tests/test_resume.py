"""A resume continues the same run: equal per-step losses and equal final weights, bit for bit on CPU."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import read_jsonl, run_lmtune, torchrun
from safetensors.torch import load_file


def train_losses(run_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_jsonl(run_dir / "metrics.jsonl") if r["type"] == "train"}


def final_weights(run_dir) -> dict[str, torch.Tensor]:
    name = "adapter_model.safetensors" if (run_dir / "adapter_model.safetensors").exists() else "model.safetensors"
    return load_file(run_dir / name)


def assert_same_run(straight, resumed, from_step: int) -> None:
    expected, got = train_losses(straight), train_losses(resumed)
    assert sorted(got) == [s for s in sorted(expected) if s > from_step]
    assert [got[s] for s in sorted(got)] == [expected[s] for s in sorted(got)]  # exactly equal
    a, b = final_weights(straight), final_weights(resumed)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def straight_and_resumed(tiny_config, tmp_path, from_step: int, **settings):
    """Train once to the end; then from the checkpoint at `from_step`, copied to a fresh folder."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert run_lmtune("train", tiny_config(output_dir=str(straight), save_steps=1, **settings)) == 0
    resumed.mkdir()
    shutil.copytree(straight / f"checkpoint-{from_step}", resumed / f"checkpoint-{from_step}")
    code = run_lmtune("train", tiny_config(output_dir=str(resumed),
                                           resume_from_checkpoint=str(resumed / f"checkpoint-{from_step}"),
                                           save_steps=1, **settings))
    assert code == 0
    return straight, resumed


@pytest.mark.parametrize(
    ("from_step", "settings"),
    [
        (3, {"max_steps": 7}),  # middle of the first epoch (8 steps per epoch)
        (8, {"num_train_epochs": 2}),  # at the epoch boundary
        (2, {"max_steps": 5, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 3}),
        (3, {"max_steps": 6, "dataloader_num_workers": 2}),
        (2, {"max_steps": 4, "packing": True, "per_device_train_batch_size": 1}),
        (4, {"max_steps": 7, "finetuning_type": "lora", "lora_dropout": 0.3, "lr_scheduler_type": "cosine",
             "warmup_steps": 2}),
    ],
    ids=["mid-epoch", "epoch-boundary", "accumulation", "loader-workers", "packing", "lora-dropout-cosine"],
)
def test_resume_gives_the_same_losses_and_weights(tiny_config, tmp_path, from_step, settings):
    straight, resumed = straight_and_resumed(tiny_config, tmp_path, from_step, **settings)
    assert_same_run(straight, resumed, from_step)
    event = next(r for r in read_jsonl(resumed / "metrics.jsonl") if r.get("event") == "resume")
    assert event["event"] == "resume" and event["step"] == from_step


def test_auto_resume_in_place_does_not_repeat_steps(tiny_config, tmp_path):
    run = tmp_path / "run"
    assert run_lmtune("train", tiny_config(max_steps=6, save_steps=2)) == 0
    # Pretend the run died after step 5: its newest checkpoint is 4, and metrics has rows past it.
    shutil.rmtree(run / "checkpoint-6")
    assert run_lmtune("train", tiny_config(max_steps=6, save_steps=2)) == 0
    steps = [r["step"] for r in read_jsonl(run / "metrics.jsonl") if r["type"] == "train"]
    assert steps == [1, 2, 3, 4, 5, 6]
    events = [r for r in read_jsonl(run / "metrics.jsonl") if r.get("event") == "resume"]
    assert events[0]["event"] == "resume" and events[0]["from"].endswith("checkpoint-4")


def test_resume_lr_config_applies_the_new_rate(tiny_config, tmp_path):
    run = tmp_path / "run"
    assert run_lmtune("train", tiny_config(max_steps=3, save_steps=3, learning_rate=1e-3)) == 0
    code = run_lmtune("train", tiny_config(max_steps=6, save_steps=3, learning_rate=4e-3, resume_lr="config"))
    assert code == 0
    rows = read_jsonl(run / "metrics.jsonl")
    lrs = {r["step"]: r["lr"] for r in rows if r["type"] == "train"}
    assert lrs[3] == pytest.approx(1e-3) and lrs[4] == pytest.approx(4e-3)
    event = next(r for r in rows if r.get("event") == "resume")
    assert event["lr_old"] == pytest.approx(1e-3) and event["lr_new"] == pytest.approx(4e-3)
    assert any("learning_rate" in line for line in event["changes"])


def test_resume_lr_keep_continues_the_saved_rate(tiny_config, tmp_path):
    run = tmp_path / "run"
    assert run_lmtune("train", tiny_config(max_steps=3, save_steps=3, learning_rate=1e-3)) == 0
    assert run_lmtune("train", tiny_config(max_steps=5, save_steps=3, learning_rate=4e-3)) == 0
    lrs = {r["step"]: r["lr"] for r in read_jsonl(run / "metrics.jsonl") if r["type"] == "train"}
    assert lrs[4] == pytest.approx(1e-3)
    event = next(r for r in read_jsonl(run / "metrics.jsonl") if r.get("event") == "resume")
    assert any("not applied: resume_lr is keep" in line for line in event["changes"])


def test_fresh_start_refuses_a_folder_that_holds_a_run(tiny_config, tmp_path):
    assert run_lmtune("train", tiny_config(max_steps=2)) == 0
    before = sorted(p.name for p in (tmp_path / "run").iterdir())
    assert run_lmtune("train", tiny_config(max_steps=2, resume_from_checkpoint=False)) == 2
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == before
    assert run_lmtune("train", tiny_config(max_steps=2, resume_from_checkpoint=False, overwrite_output_dir=True)) == 0


def test_resume_from_an_incomplete_checkpoint_is_refused(tiny_config, tmp_path):
    assert run_lmtune("train", tiny_config(max_steps=2, save_steps=1)) == 0
    (tmp_path / "run" / "checkpoint-1" / "checkpoint_complete.json").unlink()
    code = run_lmtune("train", tiny_config(max_steps=2, resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-1")))
    assert code == 2


def _lmtune_process(config, *extra, env_extra=None, prelude=""):
    """`lmtune train` in a child process; `prelude` runs first (to slow the writer down)."""
    code = f"{prelude}\nfrom lmtune.cli import main\nmain(['train', {str(config)!r}, *{list(extra)!r}])"
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)


def _wait_for(predicate, timeout=120.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError("timed out")


SLOW_TRAINING = (
    "import time, lmtune.engine as e\n"
    "step = e.TrainingLoop._optimizer_step\n"
    "e.TrainingLoop._optimizer_step = lambda self, g: (time.sleep(0.3), step(self, g))[1]\n"
)


def test_sigint_writes_a_resumable_checkpoint_and_exits_130(tiny_config, tmp_path):
    run = tmp_path / "run"
    config = tiny_config(max_steps=40)
    process = _lmtune_process(config, prelude=SLOW_TRAINING)
    _wait_for(lambda: (run / "metrics.jsonl").exists() and len(read_jsonl(run / "metrics.jsonl")) >= 2)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr[-2000:]
    index = read_jsonl_index(run)
    assert index and "signal" in index[-1]["reasons"] and index[-1]["status"] == "kept"
    stopped_at = index[-1]["step"]
    assert 2 <= stopped_at < 40
    assert run_lmtune("train", config) == 0
    straight = tmp_path / "straight"
    assert run_lmtune("train", tiny_config(max_steps=40, output_dir=str(straight))) == 0
    assert_same_run(straight, run, 0)


def read_jsonl_index(run):
    import json

    return json.loads((run / "checkpoints.json").read_text())["checkpoints"]


def test_sigkill_during_a_save_leaves_the_previous_checkpoint(tiny_config, tmp_path):
    run = tmp_path / "run"
    config = tiny_config(max_steps=6, save_steps=2)
    slow_writer = (
        "import time, lmtune.checkpoint as c\n"
        "save = c.save_file\n"
        "def slow(state, path, **kw):\n"
        "    if 'checkpoint-4' in str(path):\n"
        "        time.sleep(60)\n"
        "    return save(state, path, **kw)\n"
        "c.save_file = slow\n"
    )
    process = _lmtune_process(config, prelude=slow_writer)
    _wait_for(lambda: (run / ".checkpoint-4.tmp").exists())
    process.kill()
    process.wait()
    assert (run / "checkpoint-2" / "checkpoint_complete.json").exists()
    assert not (run / "checkpoint-4").exists()
    assert run_lmtune("checkpoints", run) == 0
    assert run_lmtune("train", config) == 0
    event = next(r for r in read_jsonl(run / "metrics.jsonl") if r.get("event") == "resume")
    assert event["from"].endswith("checkpoint-2")
    straight = tmp_path / "straight"
    assert run_lmtune("train", tiny_config(max_steps=6, save_steps=2, output_dir=str(straight))) == 0
    assert_same_run(straight, run, 0)


def test_two_process_resume_matches(tiny_config, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    settings = dict(max_steps=4, save_steps=1, lora_dropout=0.2, finetuning_type="lora")
    torchrun(tiny_config(output_dir=str(straight), **settings))
    resumed.mkdir()
    shutil.copytree(straight / "checkpoint-2", resumed / "checkpoint-2")
    torchrun(tiny_config(output_dir=str(resumed), **settings))
    assert_same_run(straight, resumed, 2)


def test_rerunning_a_finished_run_changes_nothing(tiny_config, tmp_path):
    assert run_lmtune("train", tiny_config(max_steps=2)) == 0
    run = tmp_path / "run"
    before = {p.name: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}
    assert run_lmtune("train", tiny_config(max_steps=2)) == 0
    after = {p.name: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}
    assert after == before


def test_one_writer_per_run_folder_and_the_web_ui_can_stop_a_terminal_run(tiny_config, tmp_path):
    from lmtune.webui.runner import Runner

    run = tmp_path / "run"
    config = tiny_config(max_steps=40)
    process = _lmtune_process(config, prelude=SLOW_TRAINING)
    _wait_for(lambda: (run / "metrics.jsonl").exists() and (run / "train.pid").exists())
    assert run_lmtune("train", config) == 2  # a second writer is refused while the first runs
    message = Runner(tmp_path).stop(run)
    assert f"pid {process.pid}" in message
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr[-2000:]
    assert not (run / "train.pid").exists()
    assert "signal" in read_jsonl_index(run)[-1]["reasons"]


def as_written_by_state_version_2(checkpoint) -> None:
    """The checkpoint as lmtune wrote it before the data position was saved (state version 2)."""
    import json

    state_file, mark_file = checkpoint / "train_state.json", checkpoint / "checkpoint_complete.json"
    state = json.loads(state_file.read_text())
    del state["data_epoch"], state["data_rows"]
    state_file.write_text(json.dumps({**state, "version": 2}))
    mark = json.loads(mark_file.read_text())
    mark["files"]["train_state.json"] = state_file.stat().st_size
    mark.pop("sha256", None)  # content hashes came later still
    mark_file.write_text(json.dumps(mark))


def test_a_checkpoint_of_state_version_2_resumes_at_its_place_in_the_epoch(tiny_config, tmp_path):
    straight = tmp_path / "straight"
    assert run_lmtune("train", tiny_config(output_dir=str(straight), max_steps=12, save_steps=1)) == 0
    rows = {r["step"]: r for r in read_jsonl(straight / "metrics.jsonl") if r["type"] == "train"}
    epoch_end = next(step for step, row in rows.items() if row["epoch"] == 1.0)
    for step in (3, epoch_end):  # within the first epoch, and at its end
        resumed = tmp_path / f"resumed-{step}"
        resumed.mkdir()
        shutil.copytree(straight / f"checkpoint-{step}", resumed / f"checkpoint-{step}")
        as_written_by_state_version_2(resumed / f"checkpoint-{step}")
        assert run_lmtune("train", tiny_config(output_dir=str(resumed), max_steps=12, save_steps=1)) == 0
        assert_same_run(straight, resumed, step)
