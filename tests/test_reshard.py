"""A checkpoint written by N processes resumes on M: the data goes on at the same row of the same epoch
order, each step trains the rows an uninterrupted run's step would (same global batch), and with another
global batch the steps count on and the plan and the log say so."""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter

import pytest
from conftest import read_jsonl, run_lmtune, torchrun
from test_resume import final_weights, train_losses

# A callback that writes, after each step, the examples (token ids) this process trained in that step.
TRAINED_ROWS = '''
import json, os

class TrainedRows:
    def on_train_begin(self, state, model):
        self.examples = []
        model.register_forward_pre_hook(self.record, with_kwargs=True)

    def record(self, module, args, kwargs):
        if module.training:  # padding-free rows: an example starts where its position ids restart
            for ids, positions in zip(kwargs["input_ids"].tolist(), kwargs["position_ids"].tolist()):
                starts = [i for i, p in enumerate(positions) if p == 0] + [len(positions)]
                self.examples += [ids[a:b] for a, b in zip(starts, starts[1:])]

    def on_step_end(self, state, metrics):
        path = os.path.join(state.output_dir, "trained-rows-" + os.environ.get("RANK", "0") + ".jsonl")
        with open(path, "a") as out:
            out.write(json.dumps({"step": state.step, "examples": self.examples}) + "\\n")
        self.examples = []
'''


@pytest.fixture
def rows_config(tiny_config, tmp_path, monkeypatch):
    """tiny_config with the TrainedRows callback, importable here and in torchrun's processes."""
    (tmp_path / "trained_rows.py").write_text(TRAINED_ROWS)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")])))

    def make(run, **settings):
        return tiny_config(output_dir=str(run), callbacks=["trained_rows:TrainedRows"], **settings)

    return make


def trained_rows(run) -> dict[int, Counter]:
    """Step -> the examples all processes trained in it."""
    steps: dict[int, Counter] = {}
    for path in run.glob("trained-rows-*.jsonl"):
        for row in read_jsonl(path):
            steps.setdefault(row["step"], Counter()).update(tuple(example) for example in row["examples"])
    return steps


def resume_copy(straight, run, step: int):
    run.mkdir()
    shutil.copytree(straight / f"checkpoint-{step}", run / f"checkpoint-{step}")
    return run


def last_train_row(run) -> dict:
    return [r for r in read_jsonl(run / "metrics.jsonl") if r["type"] == "train"][-1]


def assert_same_steps(straight, resumed, from_step: int) -> tuple[float, float]:
    """Every step after `from_step` trains the same examples as the uninterrupted run's step."""
    rows, straight_rows = trained_rows(resumed), trained_rows(straight)
    assert sorted(rows) == sorted(train_losses(resumed))
    for step in rows:
        assert rows[step] == straight_rows[step], step
    return assert_within_float_noise(straight, resumed, from_step)


def assert_within_float_noise(straight, resumed, from_step: int) -> tuple[float, float]:
    """The steps after `from_step`, no step twice, their losses and the final weights within float noise of the
    uninterrupted run, and the same samples seen; returns the largest loss and weight differences."""
    expected, got = train_losses(straight), train_losses(resumed)
    assert sorted(got) == [s for s in sorted(expected) if s > from_step]  # no step twice, none missing
    loss_difference = max(abs(got[s] - expected[s]) for s in got)
    weights, straight_weights = final_weights(resumed), final_weights(straight)
    assert weights.keys() == straight_weights.keys()
    weight_difference = max(float((weights[k] - straight_weights[k]).abs().max()) for k in straight_weights)
    assert loss_difference < 1e-4 and weight_difference < 1e-4
    assert last_train_row(resumed)["samples_seen"] == last_train_row(straight)["samples_seen"]
    assert last_train_row(resumed)["epoch"] == last_train_row(straight)["epoch"]
    return loss_difference, weight_difference


def assert_each_row_once_an_epoch(run, epochs: list[range], rows_per_epoch: int = 32) -> None:
    steps = trained_rows(run)
    for epoch_steps in epochs:
        seen = sum((steps[s] for s in epoch_steps), Counter())
        assert len(seen) == rows_per_epoch and set(seen.values()) == {1}


def test_two_processes_resume_on_one_with_double_accumulation_and_with_another_global_batch(
        rows_config, tmp_path, capsys):
    straight = tmp_path / "straight"
    # 32 rows, 4 x 1 x 2 = 8 rows a step: 4 steps an epoch, 8 steps; the checkpoint of step 3 is mid-epoch
    torchrun(rows_config(straight, num_train_epochs=2, save_steps=3))
    assert_each_row_once_an_epoch(straight, [range(1, 5), range(5, 9)])

    kept = resume_copy(straight, tmp_path / "kept", 3)  # 4 x 2 x 1: the global batch is kept
    assert run_lmtune("train", rows_config(kept, num_train_epochs=2, save_steps=3,
                                           gradient_accumulation_steps=2)) == 0
    difference = assert_same_steps(straight, kept, 3)
    log = " ".join(capsys.readouterr().err.split())
    assert "written by 2 processes, resumed on 1" in log
    assert "global batch kept: 8 (per_device x accumulation x processes: 4 x 1 x 2 -> 4 x 2 x 1)" in log
    event = next(r for r in read_jsonl(kept / "metrics.jsonl") if r.get("event") == "resume")
    assert event["processes"] == {"saved": 2, "now": 1}

    changed = resume_copy(straight, tmp_path / "changed", 3)  # 4 x 1 x 1: the global batch halves
    settings = dict(num_train_epochs=2, save_steps=3)
    assert run_lmtune("plan", rows_config(changed, **settings), "--json") == 0
    plan = json.loads(capsys.readouterr().out)
    assert run_lmtune("plan", rows_config(changed, **settings)) == 0
    expected_line = "global batch changed: 8 -> 4 (per_device x accumulation x processes: 4 x 1 x 2 -> 4 x 1 x 1)"
    assert expected_line in " ".join(capsys.readouterr().out.split())
    assert run_lmtune("train", rows_config(changed, **settings)) == 0
    assert expected_line in " ".join(capsys.readouterr().err.split())
    # the 8 rows left of epoch 1 take 2 steps of 4, then epoch 2 takes 8: steps 4..13
    assert (plan["steps_per_epoch"], plan["total_steps"]) == (8, 13)
    assert sorted(train_losses(changed)) == list(range(4, 14))
    steps, straight_steps = trained_rows(changed), trained_rows(straight)
    assert steps[4] + steps[5] == straight_steps[4]  # the rest of epoch 1: the rows the uninterrupted step 4 trained
    for step in range(5, 9):  # epoch 2, in its order: each uninterrupted step's rows, two steps of 4
        assert steps[2 * step - 4] + steps[2 * step - 3] == straight_steps[step]
    assert_each_row_once_an_epoch(changed, [range(6, 14)])
    final = last_train_row(changed)
    assert (final["samples_seen"], final["epoch"]) == (64, 2.0)
    assert [r["step"] for r in read_jsonl(changed / "metrics.jsonl") if r.get("event") == "save"] == [6, 9, 12, 13]
    print("2 -> 1: largest loss and final weight differences", *(f"{d:.2e}" for d in difference))


def test_one_process_resumes_on_two_within_float_noise_with_a_repeat_at_the_end_of_the_epoch(
        rows_config, tmp_path):
    straight = tmp_path / "straight"
    # 31 rows, 4 x 2 x 1 = 8 rows a step: steps of 8, 8, 8 and 7 rows; the checkpoint of step 2 resumes on
    # 4 x 1 x 2, where the last 7 rows do not split over 2 processes: a repeat of the epoch's first row pads them
    settings = dict(max_samples=31, save_steps=2)
    assert run_lmtune("train", rows_config(straight, gradient_accumulation_steps=2, **settings)) == 0
    resumed = resume_copy(straight, tmp_path / "resumed", 2)
    result = torchrun(rows_config(resumed, **settings))
    assert "written by 1 process, resumed on 2" in " ".join(result.stderr.split())
    steps, straight_steps = trained_rows(resumed), trained_rows(straight)
    assert steps[3] == straight_steps[3]
    repeat = steps[4] - straight_steps[4]  # run through the model, but nothing of it trained or counted
    assert not straight_steps[4] - steps[4] and sum(repeat.values()) == 1 and set(repeat) <= set(straight_steps[1])
    difference = assert_within_float_noise(straight, resumed, 2)
    assert last_train_row(resumed)["samples_seen"] == 31
    print("1 -> 2: largest loss and final weight differences", *(f"{d:.2e}" for d in difference))


def test_a_plan_after_another_global_batch_counts_epochs_from_the_resume():
    from lmtune.config import build_config
    from lmtune.schedule import epoch_origin_at, make_plan

    # 32 rows; 8 a step before, 4 after a resume at step 3 (24 rows done): the rest of epoch 1 takes 2 steps
    origin = epoch_origin_at(3, 0, 24, 32, 4)
    config = build_config(dict(per_device_train_batch_size=4, num_train_epochs=2, saves_per_epoch=2))
    plan = make_plan(config, 32, epoch_origin=origin)
    assert (plan.steps_per_epoch, plan.total_steps, plan.epochs) == (8, 13, 2)
    assert [s for s in sorted(plan.save_steps) if s > 3] == [5, 9, 13]  # end of epoch 1, middle and end of 2
    assert epoch_origin_at(3, 0, 24, 32, 8) == 0  # the global batch kept: the plan of the uninterrupted run


# --- the data position, without processes: rows left, repeats at the end of an epoch ----------------------


@pytest.mark.parametrize(("rows", "before", "after"), [
    (30, (2, 4, 1), (1, 4, 2)), (30, (2, 4, 1), (3, 2, 1)), (29, (3, 1, 2), (2, 3, 1)), (10, (1, 3, 1), (4, 1, 1)),
])
def test_the_rows_left_of_an_epoch_are_those_an_uninterrupted_run_trains_next(rows, before, after):
    """(processes, per_device, accumulation) before and after a resume at each step of the epoch."""
    from lmtune.batching import epoch_batches, epoch_order

    def steps_from(start, processes, per_device, accumulation):
        """The real rows each step trains from row `start` on, all processes together."""
        per_process = [epoch_batches(rows, per_device, 0, 1, rank, processes, start=start)
                       for rank in range(processes)]
        count = len(per_process[0])
        assert all(len(batches) == count for batches in per_process)  # every process as many micro-batches
        groups = range(0, count, accumulation)
        return [sorted(i for batches in per_process for batch in batches[g:g + accumulation] for i in batch
                       if i >= 0) for g in groups]

    order = epoch_order(rows, 0, 1)
    uninterrupted = steps_from(0, *before)
    assert sorted(i for step in uninterrupted for i in step) == list(range(rows))  # repeats train nothing
    done = 0
    for step in uninterrupted:
        left = [i for step_rows in steps_from(done, *after) for i in step_rows]
        assert sorted(left) == sorted(order[done:])  # no row twice, none skipped
        done += len(step)
        if before[0] * before[1] * before[2] == after[0] * after[1] * after[2]:
            assert steps_from(done - len(step), *after)[0] == step


def test_a_repeated_row_is_neither_trained_nor_counted():
    from lmtune.batching import Collator, EpochRows, repeat_index

    rows = EpochRows([{"input_ids": [5, 6, 7], "labels": [5, 6, 7], "position_ids": [0, 1, 2]},
                      {"input_ids": [8, 9], "labels": [8, 9], "position_ids": [0, 1]}])
    for padding_free in (True, False):
        batch, counts = Collator(0, packed=False, padding_free=padding_free)([rows[0], rows[repeat_index(1)]])
        assert (counts.samples, counts.tokens, counts.trained_tokens) == (1, 3, 2)
        assert batch["input_ids"].numel() >= 5  # the repeat is there, so that every process has a micro-batch


def test_each_process_continues_its_saved_random_numbers_and_a_new_one_starts_its_own(tmp_path):
    import torch

    from lmtune.resume import ResumePoint, restore_rng_of_process, rng_state
    from lmtune.state import TrainState

    torch.manual_seed(1)
    point = ResumePoint(tmp_path, TrainState(step=3, rng=[rng_state()]))  # written by one process
    after_the_checkpoint = torch.rand(4)

    def draws(process_index):
        restore_rng_of_process(point, process_index, seed=42)
        return torch.rand(4)

    assert torch.equal(draws(0), after_the_checkpoint)
    assert torch.equal(draws(1), draws(1)) and not torch.equal(draws(1), after_the_checkpoint)
    assert not torch.equal(draws(1), draws(2))
