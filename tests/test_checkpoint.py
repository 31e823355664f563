"""Checkpoints on disk: the run saves exactly the plan's steps, rotation keeps exactly the plan's
survivors, a save that fails half way leaves everything before it intact, and `lmtune checkpoints`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import read_jsonl, run_lmtune
from safetensors.torch import load_file

import lmtune.checkpoint as checkpoint
from lmtune.checkpoint import CheckpointIndex, CheckpointStore, Snapshot, is_complete_checkpoint
from lmtune.errors import RunFailed
from lmtune.schedule import rotation
from lmtune.state import TrainState


def plan_json(config: Path, capsys) -> dict:
    capsys.readouterr()
    assert run_lmtune("plan", config, "--json") == 0
    return json.loads(capsys.readouterr().out)


def read_index(run: Path) -> dict:
    return json.loads((run / "checkpoints.json").read_text())


def written(index: dict) -> dict[int, dict]:
    return {e["step"]: e for e in index["checkpoints"] if e["status"] in ("kept", "deleted")}


def status_of(index: dict, status: str) -> list[int]:
    return sorted(e["step"] for e in index["checkpoints"] if e["status"] == status)


def assert_folders_match(run: Path, index: dict) -> None:
    for entry in index["checkpoints"]:
        folder = run / entry["path"]
        if entry["status"] == "kept":
            assert is_complete_checkpoint(folder), entry
            assert load_file(folder / "model.safetensors")  # loadable
        elif entry["status"] == "deleted":
            assert not folder.exists(), entry
    on_disk = sorted(int(p.name.split("-")[1]) for p in run.glob("checkpoint-*"))
    assert on_disk == status_of(index, "kept")


# 32 rows of the sums data set; the plan says how many steps that makes for each batch set-up.
RULES = [
    pytest.param(dict(saves_per_epoch=3, num_train_epochs=2, save_total_limit=3), id="saves_per_epoch+limit"),
    pytest.param(dict(save_epochs=0.3, save_steps=5, max_steps=13, per_device_train_batch_size=3,
                      gradient_accumulation_steps=2), id="save_epochs+save_steps+accumulation"),
    pytest.param(dict(num_train_epochs=2.5, save_strategy="epoch", save_total_limit=2,
                      save_schedule=[{"until_epoch": 0.5, "saves_per_epoch": 8}, {"until_step": 14, "save_steps": 3}]),
                 id="save_schedule+save_strategy"),
    pytest.param(dict(max_steps=10, val_size=0.25, eval_steps=3, save_on_eval=True, save_steps=4,
                      save_total_limit=2), id="save_on_eval"),
]


@pytest.mark.parametrize("values", RULES)
def test_the_run_saves_exactly_the_plans_steps_and_keeps_its_survivors(tiny_config, tmp_path, capsys, values):
    config = tiny_config(**values)
    plan = plan_json(config, capsys)
    assert run_lmtune("train", config) == 0
    run = tmp_path / "run"
    index = read_index(run)
    saved = written(index)
    assert {step: sorted(e["reasons"]) for step, e in saved.items()} == {s["step"]: s["reasons"]
                                                                         for s in plan["saves"]}
    assert status_of(index, "kept") == plan["kept"]
    assert status_of(index, "deleted") == plan["deleted"]
    assert index["save_total_limit"] == values.get("save_total_limit")
    assert_folders_match(run, index)
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r["step"] for r in events if r["type"] == "eval"]
    assert evals == [e["step"] for e in plan["evals"]]


def test_rotation_with_a_best_metric_keeps_the_best_and_the_newest(tiny_config, tmp_path, capsys):
    # saves between evaluations carry no eval_loss of their own, so they are never taken for the best
    config = tiny_config(max_steps=16, val_size=0.25, eval_steps=4, save_steps=2, save_total_limit=2,
                         metric_for_best_model="eval_loss", learning_rate=3e-2)
    plan = plan_json(config, capsys)
    assert plan["keeps_best"] is True
    assert run_lmtune("train", config) == 0
    run = tmp_path / "run"
    index = read_index(run)
    saved = written(index)
    planned = {s["step"] for s in plan["saves"]}
    assert planned <= set(saved)
    for step in set(saved) - planned:  # a save the plan cannot know in advance: a new best
        assert saved[step]["reasons"] == ["best"] and step in {e["step"] for e in plan["evals"]}
    best = [e for e in index["checkpoints"] if e["best"]]
    assert len(best) == 1 and best[0]["status"] == "kept"
    evals = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    eval_losses = {r["step"]: r["eval_loss"] for r in evals if r["type"] == "eval"}
    assert best[0]["metrics"]["eval_loss"] == min(eval_losses.values())
    assert eval_losses[best[0]["step"]] == min(eval_losses.values())  # measured on that checkpoint's weights
    kept, deleted = rotation(sorted(saved), 2, best=best[0]["step"])
    assert status_of(index, "kept") == kept and status_of(index, "deleted") == deleted
    assert max(saved) in kept  # the newest
    assert_folders_match(run, index)


def test_a_save_that_fails_half_way_leaves_the_previous_checkpoints_intact(tiny_config, tmp_path, capsys,
                                                                          monkeypatch):
    real_save = checkpoint.save_file
    calls = []

    def failing_save(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 3:  # the third checkpoint: half a file, then the disk "fills up"
            Path(filename).write_bytes(b"\0" * 1000)
            raise OSError(28, "No space left on device (simulated)")
        return real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(checkpoint, "save_file", failing_save)
    config = tiny_config(max_steps=8, save_steps=2)
    capsys.readouterr()
    assert run_lmtune("train", config) == 1
    err = " ".join(capsys.readouterr().err.split())
    assert "writing checkpoint-6 failed" in err and "No space left on device" in err
    assert "the checkpoints written before are intact (newest: checkpoint-4)" in err
    run = tmp_path / "run"
    assert not (run / "checkpoint-6").exists()  # never under the final name
    assert not (run / ".checkpoint-6.tmp").exists()  # the failed save removed what it had written
    index = read_index(run)
    assert status_of(index, "kept") == [2, 4]
    for step in (2, 4):
        state = json.loads((run / f"checkpoint-{step}" / "train_state.json").read_text())
        assert state["step"] == step
        assert load_file(run / f"checkpoint-{step}" / "model.safetensors")
        assert torch.load(run / f"checkpoint-{step}" / "optimizer.pt", weights_only=True)["state"]
    assert CheckpointIndex.load(run).newest_complete() == run / "checkpoint-4"

    assert run_lmtune("checkpoints", run, "--json") == 0
    listed = json.loads(capsys.readouterr().out)["checkpoints"]
    assert [(e["step"], e["path"], e["status"]) for e in listed] == [
        (2, "checkpoint-2", "kept"), (4, "checkpoint-4", "kept")]

    # a save killed half way (no clean-up possible) leaves its folder: the same command again removes it,
    # resumes from checkpoint-4 and finishes
    (run / ".checkpoint-6.tmp").mkdir()
    (run / ".checkpoint-6.tmp" / "model.safetensors").write_bytes(b"\0" * 1000)
    monkeypatch.setattr(checkpoint, "save_file", real_save)
    assert run_lmtune("train", config) == 0
    index = read_index(run)
    assert status_of(index, "kept") == [2, 4, 6, 8] and status_of(index, "incomplete") == []
    assert not (run / ".checkpoint-6.tmp").exists()


def test_checkpoints_command_table_and_json(tiny_config, tmp_path, capsys, monkeypatch):
    config = tiny_config(max_steps=6, save_steps=2, save_total_limit=2, val_size=0.25, eval_steps=2,
                         metric_for_best_model="eval_loss", learning_rate=1e-6)
    assert run_lmtune("train", config) == 0
    run = tmp_path / "run"
    (run / ".checkpoint-7.tmp").mkdir()  # a save cut off by a crash
    capsys.readouterr()
    assert run_lmtune("checkpoints", run, "--json") == 0
    data = json.loads(capsys.readouterr().out)
    assert data["save_total_limit"] == 2 and data["best_metric"] == "eval_loss"
    rows = {e["step"]: e for e in data["checkpoints"]}
    assert sorted(rows) == [2, 4, 6, 7]
    assert rows[7]["status"] == "incomplete"
    kept = [s for s, e in rows.items() if e["status"] == "kept"]
    assert 6 in kept and len(kept) in (2, 3)  # the last 2, and the best when it is older
    for entry in rows.values():
        if entry["status"] != "incomplete":
            assert entry["size_bytes"] > 0 and entry["created"] and "loss" in entry["metrics"]
    monkeypatch.setenv("COLUMNS", "160")  # one line a row
    assert run_lmtune("checkpoints", run) == 0
    table = capsys.readouterr().out
    for word in ("step", "epoch", "reasons", "loss", "eval loss", "size", "status", "incomplete", "deleted",
                 "final,steps", " MB "):
        assert word in table, word
    rows_shown = [line for line in table.splitlines() if line[:1] == "│" and line.split()[1].isdigit()]
    line_of = {int(line.split()[1]): line for line in rows_shown}
    assert "kept" in line_of[6] and "1.0000" in line_of[6]  # 24 training rows after val_size: 6 steps an epoch
    best = next(e["step"] for e in rows.values() if e.get("best"))
    assert "best" in line_of[best]
    assert f"{rows[best]['metrics']['eval_loss']:.4f}" in line_of[best]
    assert run_lmtune("checkpoints", tmp_path / "nothing-here") == 2


# --- the store on its own -------------------------------------------------------------------------


def snapshot(step: int, **metrics) -> Snapshot:
    return Snapshot(
        step=step, weights={"w": torch.full((4, 4), float(step))}, weights_name="model.safetensors",
        write_model_files=lambda folder: (folder / "config.json").write_text("{}"),
        optimizer={"state": {}}, state=TrainState(step=step, rng=[{"python": None}]),
        entry={"step": step, "epoch": None, "samples_seen": step, "tokens_seen": step,
                                           "reasons": ["steps"], "metrics": metrics},
    )


def test_store_rotation_by_step_records_deletions(tmp_path):
    store = CheckpointStore(tmp_path, save_total_limit=2, best_metric="eval_loss")
    for step, loss in ((1, 3.0), (2, 1.0), (3, 2.0), (4, 2.5), (5, 2.2)):
        store.save(snapshot(step, eval_loss=loss))
    store.wait()
    index = read_index(tmp_path)
    assert status_of(index, "kept") == [2, 4, 5]  # the last two and the best
    assert status_of(index, "deleted") == [1, 3]
    assert [e["step"] for e in index["checkpoints"] if e["best"]] == [2]
    assert_folders_match_plain(tmp_path, index)


def assert_folders_match_plain(run: Path, index: dict) -> None:
    on_disk = sorted(int(p.name.split("-")[1]) for p in run.glob("checkpoint-*"))
    assert on_disk == status_of(index, "kept")


def test_store_failure_in_the_writer_is_reported_and_leaves_the_index(tmp_path, monkeypatch):
    store = CheckpointStore(tmp_path, save_total_limit=None, best_metric=None)
    store.save(snapshot(1))
    store.wait()
    before = (tmp_path / "checkpoints.json").read_text()

    def broken(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half")
        raise RuntimeError("interrupted")

    monkeypatch.setattr(checkpoint, "save_file", broken)
    store.save(snapshot(2))
    with pytest.raises(RunFailed, match="writing checkpoint-2 failed: RuntimeError: interrupted"):
        store.wait()
    assert (tmp_path / "checkpoints.json").read_text() == before
    assert not (tmp_path / "checkpoint-2").exists()
    assert load_file(tmp_path / "checkpoint-1" / "model.safetensors")["w"][0, 0] == 1.0
    listed = CheckpointIndex.load(tmp_path).entries
    assert [(e["step"], e["status"]) for e in listed] == [(1, "kept")]
    assert not (tmp_path / ".checkpoint-2.tmp").exists()  # the failed save removed its own folder
    assert not list(tmp_path.glob(".checkpoints.json*"))  # the index was replaced, never left half


def test_a_complete_folder_missing_from_the_index_is_taken_back_a_tmp_one_never(tmp_path):
    store = CheckpointStore(tmp_path, save_total_limit=None, best_metric=None)
    store.save(snapshot(1))
    store.save(snapshot(2))
    store.wait()
    index = read_index(tmp_path)
    index["checkpoints"] = [e for e in index["checkpoints"] if e["step"] == 1]  # a crash before the index update
    (tmp_path / "checkpoints.json").write_text(json.dumps(index))
    import shutil

    shutil.copytree(tmp_path / "checkpoint-2", tmp_path / ".checkpoint-3.tmp")  # marked, but never renamed
    entries = {e["step"]: e for e in CheckpointIndex.load(tmp_path).entries}
    assert entries[2]["status"] == "kept" and entries[2]["reasons"] == ["steps"]
    assert entries[3]["status"] == "incomplete"
    assert CheckpointIndex.load(tmp_path).newest_complete() == tmp_path / "checkpoint-2"


def test_only_an_evaluated_checkpoint_can_be_the_best(tiny_config, tmp_path):
    config = tiny_config(max_steps=6, val_size=0.25, eval_steps=4, save_steps=2, metric_for_best_model="eval_loss")
    assert run_lmtune("train", config) == 0
    entries = {e["step"]: e for e in read_index(tmp_path / "run")["checkpoints"]}
    assert sorted(entries) == [2, 4, 6]
    assert "eval_loss" in entries[4]["metrics"]
    assert "eval_loss" not in entries[2]["metrics"] and "eval_loss" not in entries[6]["metrics"]
    assert [s for s, e in entries.items() if e["best"]] == [4]


def test_a_checkpoint_holds_the_state_of_its_own_step(tiny_config, tmp_path):
    """The writer thread copies the tensors while training goes on; the copy must still be of its step."""
    assert run_lmtune("train", tiny_config(max_steps=4, save_steps=2)) == 0
    assert run_lmtune("train", tiny_config(max_steps=2, output_dir=str(tmp_path / "short"))) == 0
    saved = load_file(tmp_path / "run" / "checkpoint-2" / "model.safetensors")
    short = load_file(tmp_path / "short" / "checkpoint-2" / "model.safetensors")
    assert saved.keys() == short.keys()
    for key in saved:
        assert torch.equal(saved[key], short[key]), key
    after = load_file(tmp_path / "run" / "checkpoint-4" / "model.safetensors")
    assert any(not torch.equal(saved[k], after[k]) for k in saved)  # steps 3 and 4 did change the weights
    moments = torch.load(tmp_path / "run" / "checkpoint-2" / "optimizer.pt", weights_only=True)["state"]
    short_moments = torch.load(tmp_path / "short" / "checkpoint-2" / "optimizer.pt", weights_only=True)["state"]
    assert all(torch.equal(moments[i]["exp_avg"], short_moments[i]["exp_avg"]) for i in moments)


def test_save_minutes_and_eval_minutes_follow_the_clock(tiny_config, tmp_path, minutes_pass_after):
    callbacks = minutes_pass_after(steps=(3, 6), minutes=1.5)
    config = tiny_config(max_steps=8, save_minutes=1, eval_minutes=1, val_size=0.25, callbacks=callbacks)
    assert run_lmtune("train", config) == 0
    run = tmp_path / "run"
    saved = written(read_index(run))
    assert {step: entry["reasons"] for step, entry in saved.items() if step != 8} == {3: ["minutes"],
                                                                                      6: ["minutes"]}
    evals = [row["step"] for row in read_jsonl(run / "metrics.jsonl") if row["type"] == "eval"]
    assert evals[:2] == [3, 6] and set(evals) <= {3, 6, 8}


def test_every_save_and_rotation_is_an_event_and_on_save_sees_the_checkpoints_step(tiny_config, tmp_path,
                                                                                    monkeypatch):
    (tmp_path / "save_recorder.py").write_text(
        "class Recorder:\n"
        "    def on_save(self, state, path):\n"
        "        with open(state.output_dir / 'saves.txt', 'a') as f:\n"
        "            f.write(f'{state.step} {path.name}\\n')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    config = tiny_config(max_steps=6, save_steps=2, save_total_limit=1, callbacks=["save_recorder:Recorder"])
    assert run_lmtune("train", config) == 0
    run = tmp_path / "run"
    events = [r for r in read_jsonl(run / "metrics.jsonl") if r["type"] == "event"]
    assert [(e["step"], e["path"], e["reasons"]) for e in events if e["event"] == "save"] == [
        (2, "checkpoint-2", ["steps"]), (4, "checkpoint-4", ["steps"]), (6, "checkpoint-6", ["final", "steps"])]
    assert [(e["step"], e["deleted"]) for e in events if e["event"] == "rotation"] == [
        (4, ["checkpoint-2"]), (6, ["checkpoint-4"])]
    assert status_of(read_index(run), "deleted") == [2, 4]
    assert (run / "saves.txt").read_text().splitlines() == ["2 checkpoint-2", "4 checkpoint-4", "6 checkpoint-6"]
