"""The plan against a step-by-step simulation of the run, and the cases users check by hand.

The simulation below walks the run one optimizer step at a time and asks, at each step, whether a
rule fires: it shares no code with `lmtune.schedule`.
"""

from __future__ import annotations

from fractions import Fraction

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmtune.config import build_config
from lmtune.errors import UserError
from lmtune.planning import plan_summary_lines
from lmtune.schedule import make_plan

# --- the simulation -----------------------------------------------------------------------------


def simulated_steps_per_epoch(rows: int, batch: int, accumulation: int) -> int:
    """Deal the rows into micro-batches, the micro-batches into optimizer steps, within one epoch."""
    steps = micro_in_step = 0
    remaining = rows
    while remaining > 0:
        remaining -= min(batch, remaining)
        if micro_in_step == 0:
            steps += 1
        micro_in_step = (micro_in_step + 1) % accumulation
    return steps


def exact(value) -> Fraction:
    return Fraction(str(value))


def simulated_total(per_epoch: int, epochs, max_steps) -> int:
    if max_steps is not None:
        return max_steps
    steps = 0
    while Fraction(steps, per_epoch) < exact(epochs):
        steps += 1
    return steps


def crossed(before: Fraction, after: Fraction, every: Fraction) -> bool:
    """Did the position pass a multiple of `every` during this step?"""
    k = 1
    while k * every <= after:
        if k * every > before:
            return True
        k += 1
    return False


def fires(step: int, per_epoch: int, total: int, every_steps, every_epochs, per_epoch_count) -> bool:
    if every_steps is not None and step % every_steps == 0:
        return True
    if every_epochs is not None and crossed(Fraction(step - 1, per_epoch), Fraction(step, per_epoch),
                                            exact(every_epochs)):
        return True
    if per_epoch_count is not None:
        epoch = (step - 1) // per_epoch
        length = min(per_epoch, total - epoch * per_epoch)
        inside = step - epoch * per_epoch
        if crossed(Fraction(inside - 1, length), Fraction(inside, length), Fraction(1, per_epoch_count)):
            return True
    return False


def phase_end(phase: dict, per_epoch: int) -> int:
    if "until_step" in phase:
        return phase["until_step"]
    step = 1
    while Fraction(step, per_epoch) < exact(phase["until_epoch"]):
        step += 1
    return step


def simulate(values: dict, rows: int, has_eval: bool) -> dict:
    per_epoch = simulated_steps_per_epoch(rows, values.get("per_device_train_batch_size", 4),
                                          values.get("gradient_accumulation_steps", 1))
    total = simulated_total(per_epoch, values.get("num_train_epochs", 3.0), values.get("max_steps"))
    save_steps, save_epochs = values.get("save_steps"), values.get("save_epochs")
    per = values.get("saves_per_epoch")
    if values.get("save_strategy") == "steps" and save_steps is None:
        save_steps = 500
    if values.get("save_strategy") == "epoch" and per is None and save_epochs is None:
        per = 1
    ends, previous = [], 0
    for phase in values.get("save_schedule") or []:
        end = phase_end(phase, per_epoch)
        if end <= previous:
            return {"error": True}
        ends.append((previous, end, phase))
        previous = end
    eval_rules = (values.get("eval_steps"), values.get("eval_epochs"), values.get("evals_per_epoch"))
    evals: dict[int, set] = {}
    saves: dict[int, set] = {}
    for step in range(1, total + 1):
        if has_eval and fires(step, per_epoch, total, *eval_rules):
            evals.setdefault(step, set()).update(["steps"] if eval_rules[0] and step % eval_rules[0] == 0 else [])
            evals[step].update(["epoch"] if fires(step, per_epoch, total, None, *eval_rules[1:]) else [])
        if fires(step, per_epoch, total, save_steps, None, None):
            saves.setdefault(step, set()).add("steps")
        if fires(step, per_epoch, total, None, save_epochs, per):
            saves.setdefault(step, set()).add("epoch")
        for start, end, phase in ends:
            if start < step <= end:
                if fires(step, per_epoch, total, phase.get("save_steps"), None, None):
                    saves.setdefault(step, set()).add("phase steps")
                if fires(step, per_epoch, total, None, phase.get("save_epochs"), phase.get("saves_per_epoch")):
                    saves.setdefault(step, set()).add("phase epoch")
    if has_eval and not evals:
        evals[total] = {"final"}
    if values.get("save_on_eval"):
        for step in evals:
            saves.setdefault(step, set()).add("eval")
    saves.setdefault(total, set()).add("final")
    # rotation as a run does it: after each save, the oldest go while there are too many
    limit, kept, deleted = values.get("save_total_limit"), [], []
    for step in sorted(saves):
        kept.append(step)
        while limit is not None and len(kept) > limit:
            deleted.append(kept.pop(0))
    return {"per_epoch": per_epoch, "total": total, "saves": saves, "evals": evals, "kept": kept,
            "deleted": deleted}


# --- property test ------------------------------------------------------------------------------

EPOCH_FLOATS = [0.1, 0.25, 0.3, 0.5, 0.7, 0.75, 1.0, 1.5, 2.0, 2.5]


@st.composite
def runs(draw):
    values: dict = {
        "per_device_train_batch_size": draw(st.integers(1, 8)),
        "gradient_accumulation_steps": draw(st.integers(1, 4)),
    }
    if draw(st.booleans()):
        values["max_steps"] = draw(st.integers(1, 120))
    else:
        values["num_train_epochs"] = draw(st.sampled_from([0.25, 0.3, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0]))
    maybe = lambda strategy: draw(st.none() | strategy)  # noqa: E731
    for key, strategy in (("save_steps", st.integers(1, 40)), ("save_epochs", st.sampled_from(EPOCH_FLOATS)),
                          ("saves_per_epoch", st.integers(1, 10)), ("save_total_limit", st.integers(1, 12)),
                          ("save_strategy", st.sampled_from(["steps", "epoch", "no"])),
                          ("eval_steps", st.integers(1, 30)), ("eval_epochs", st.sampled_from(EPOCH_FLOATS)),
                          ("evals_per_epoch", st.integers(1, 6))):
        value = maybe(strategy)
        if value is not None:
            values[key] = value
    values["save_on_eval"] = draw(st.booleans())
    phases = []
    for _ in range(draw(st.integers(0, 3))):
        phase = {"until_step": draw(st.integers(1, 150))} if draw(st.booleans()) else {
            "until_epoch": draw(st.sampled_from(EPOCH_FLOATS + [3.0]))}
        rule = draw(st.sampled_from(["save_steps", "save_epochs", "saves_per_epoch", "both"]))
        if rule in ("save_steps", "both"):
            phase["save_steps"] = draw(st.integers(1, 20))
        if rule == "save_epochs":
            phase["save_epochs"] = draw(st.sampled_from(EPOCH_FLOATS))
        if rule in ("saves_per_epoch", "both"):
            phase["saves_per_epoch"] = draw(st.integers(1, 8))
        phases.append(phase)
    if phases:
        values["save_schedule"] = phases
    return values, draw(st.integers(1, 300)), draw(st.booleans())


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(runs())
def test_plan_equals_step_by_step_simulation(run):
    values, rows, has_eval = run
    other_save_rules = any(values.get(k) is not None for k in ("save_steps", "save_epochs", "saves_per_epoch",
                                                              "save_schedule")) or values["save_on_eval"]
    if values.get("save_strategy") == "no" and other_save_rules:
        with pytest.raises(UserError, match="save_strategy"):
            build_config(values)
        return
    config = build_config(values)
    expected = simulate(values, rows, has_eval)
    if expected.get("error"):
        with pytest.raises(UserError, match=r"save_schedule\[\d\] ends at"):
            make_plan(config, rows, has_eval_data=has_eval)
        return
    plan = make_plan(config, rows, has_eval_data=has_eval)
    assert plan.steps_per_epoch == expected["per_epoch"]
    assert plan.total_steps == expected["total"]
    assert {s: set(r) for s, r in plan.save_steps.items()} == expected["saves"]
    assert {s: set(r) for s, r in plan.eval_steps.items()} == expected["evals"]
    assert plan.kept == expected["kept"]
    assert plan.deleted == expected["deleted"]


# --- the cases users check ----------------------------------------------------------------------


def plan_of(rows: int = 64, has_eval: bool = False, **values):
    values.setdefault("per_device_train_batch_size", 4)
    config = build_config(values)
    return config, make_plan(config, rows, has_eval_data=has_eval)


def test_saves_per_epoch_8_for_4_epochs_with_limit_32_keeps_all_32():
    config, plan = plan_of(saves_per_epoch=8, num_train_epochs=4, save_total_limit=32)
    assert plan.steps_per_epoch == 16 and plan.total_steps == 64
    assert sorted(plan.save_steps) == list(range(2, 65, 2))
    assert len(plan.kept) == 32 and plan.deleted == []
    assert plan_summary_lines(plan, config)[0] == (
        "32 checkpoints will be written; save_total_limit 32 keeps them all")


def test_limit_4_deletes_28_and_says_which_limit_keeps_all():
    config, plan = plan_of(saves_per_epoch=8, num_train_epochs=4, save_total_limit=4)
    assert plan.kept == [58, 60, 62, 64]
    assert len(plan.deleted) == 28
    assert plan_summary_lines(plan, config)[0] == (
        "32 checkpoints will be written, save_total_limit 4 keeps the last 4: 28 will be deleted "
        "(save_total_limit: 32 would keep them all)")


def test_limit_line_mentions_the_best_when_a_metric_is_kept():
    config, plan = plan_of(saves_per_epoch=8, num_train_epochs=4, save_total_limit=4, val_size=0.1,
                           metric_for_best_model="eval_loss", has_eval=True)
    line = plan_summary_lines(plan, config)[0]
    assert "keeps the last 4 (+ best): 28 will be deleted" in line


def test_save_epochs_quarter_saves_at_every_real_quarter():
    # 10 steps an epoch: a quarter is 2.5 steps, so saves fall on the first step past each quarter
    _, plan = plan_of(rows=40, save_epochs=0.25, num_train_epochs=2)
    assert plan.steps_per_epoch == 10
    assert sorted(plan.save_steps) == [3, 5, 8, 10, 13, 15, 18, 20]
    for k, step in enumerate(sorted(plan.save_steps), start=1):
        assert step / 10 >= k / 4 > (step - 1) / 10


def test_save_epochs_point_three_is_three_tenths():
    _, plan = plan_of(rows=40, save_epochs=0.3, num_train_epochs=3)
    assert sorted(plan.save_steps) == [3, 6, 9, 12, 15, 18, 21, 24, 27, 30]


def test_shorter_last_epoch_gets_its_k_saves():
    _, plan = plan_of(rows=32, saves_per_epoch=4, num_train_epochs=2.5)  # 8 steps an epoch, last one 4 steps
    assert plan.total_steps == 20
    assert sorted(plan.save_steps) == [2, 4, 6, 8, 10, 12, 14, 16, 17, 18, 19, 20]
    _, plan = plan_of(rows=40, saves_per_epoch=4, num_train_epochs=1.5)  # 10 steps, then 5
    assert sorted(s for s in plan.save_steps if s > 10) == [12, 13, 14, 15]


def test_rules_combine_as_a_union_with_every_reason():
    _, plan = plan_of(rows=32, save_steps=4, saves_per_epoch=2, num_train_epochs=2)
    assert plan.save_steps == {4: ["steps", "epoch"], 8: ["steps", "epoch"], 12: ["steps", "epoch"],
                               16: ["steps", "epoch", "final"]}


def test_save_schedule_phases_are_shown_and_dense_first():
    _, plan = plan_of(rows=64, num_train_epochs=3, save_schedule=[
        {"until_epoch": 1, "saves_per_epoch": 8}, {"until_step": 48, "save_epochs": 1}])
    assert sorted(plan.save_steps) == [2, 4, 6, 8, 10, 12, 14, 16, 32, 48]
    assert [(p["from_step"], p["until_step"], len(p["saves"])) for p in plan.phases] == [(1, 16, 8), (17, 48, 2)]


def test_save_on_eval_and_final_eval():
    _, plan = plan_of(rows=32, max_steps=12, eval_steps=5, save_on_eval=True, has_eval=True)
    assert sorted(plan.eval_steps) == [5, 10]
    assert plan.save_steps == {5: ["eval"], 10: ["eval"], 12: ["final"]}
    _, plan = plan_of(rows=32, max_steps=12, has_eval=True)
    assert plan.eval_steps == {12: ["final"]}


def test_rotation_never_deletes_the_best_or_the_newest():
    from lmtune.schedule import rotation

    assert rotation([2, 4, 6, 8, 10], 2, best=4) == ([4, 8, 10], [2, 6])
    assert rotation([2, 4, 6, 8, 10], 1, best=10) == ([10], [2, 4, 6, 8])
    assert rotation([2, 4], None) == ([2, 4], [])


def test_disk_counts_the_checkpoints_kept_at_once():
    config, plan = plan_of(saves_per_epoch=8, num_train_epochs=4, save_total_limit=4)
    plan.checkpoint_bytes = 10
    assert plan.disk_bytes == 50  # 4 kept, and the fifth being written before the oldest goes
    config, plan = plan_of(saves_per_epoch=8, num_train_epochs=4)
    plan.checkpoint_bytes = 10
    assert plan.disk_bytes == 320


# --- mistakes -----------------------------------------------------------------------------------


@pytest.mark.parametrize("values, words", [
    ({"save_steps": 0.25}, ["save_steps", "save_epochs: 0.25"]),
    ({"eval_steps": 2.5}, ["eval_steps", "eval_epochs: 2.5"]),
    ({"save_schedule": [{"until_step": 10, "save_steps": 1.5}]}, ["save_steps", "save_epochs: 1.5"]),
    ({"save_strategy": "no", "save_steps": 10}, ["save_strategy: no", "save_steps"]),
    ({"save_strategy": "no", "saves_per_epoch": 2, "save_on_eval": True},
     ["save_strategy: no", "saves_per_epoch", "save_on_eval"]),
    ({"save_schedule": [{"until_step": 10, "until_epoch": 1, "save_steps": 2}]}, ["until_epoch or until_step"]),
    ({"save_schedule": [{"save_steps": 2}]}, ["until_epoch or until_step"]),
    ({"save_schedule": [{"until_step": 10, "save_step": 2}]}, ["save_schedule.0.save_step"]),
])
def test_config_mistakes_name_the_keys(values, words):
    with pytest.raises(UserError) as error:
        build_config(values)
    for word in words:
        assert word in str(error.value)


def test_phases_out_of_order_are_an_error_naming_both():
    config = build_config({"num_train_epochs": 3, "save_schedule": [
        {"until_epoch": 2, "save_steps": 1}, {"until_step": 20, "save_steps": 5}]})
    with pytest.raises(UserError, match=r"save_schedule\[1\] ends at until_step 20.*save_schedule\[0\] "
                                         r"\(until_epoch 2 \(step 32\)\)"):
        make_plan(config, 64)


def test_phase_past_the_end_of_the_run_is_a_warning():
    _, plan = plan_of(rows=32, max_steps=10, save_schedule=[{"until_step": 8, "save_steps": 2},
                                                            {"until_step": 40, "save_steps": 5},
                                                            {"until_step": 50, "save_steps": 1}])
    assert sorted(plan.save_steps) == [2, 4, 6, 8, 10]
    assert any("save_schedule[1] ends after the run's last step (10)" in w for w in plan.warnings)
    assert any("save_schedule[2] starts after the run's last step (10): it never applies" in w
               for w in plan.warnings)


def test_save_steps_larger_than_the_run_is_a_warning():
    _, plan = plan_of(rows=32, max_steps=10, save_steps=50)
    assert sorted(plan.save_steps) == [10]
    assert plan.warnings == ["save_steps 50 is larger than the run (10 steps): it never saves; "
                             "only the final save is written"]


def test_epoch_rules_on_a_stream_of_unknown_size_are_an_error():
    for key, value in (("save_epochs", 0.25), ("saves_per_epoch", 2), ("eval_epochs", 1.0)):
        config = build_config({"max_steps": 100, key: value})
        with pytest.raises(UserError, match=f"{key} needs the size of an epoch"):
            make_plan(config, None, has_eval_data=True)
    config = build_config({"max_steps": 100, "save_schedule": [{"until_epoch": 1, "save_steps": 5}]})
    with pytest.raises(UserError, match=r"save_schedule\[0\].until_epoch needs the size of an epoch"):
        make_plan(config, None)
    config = build_config({"max_steps": 100, "save_strategy": "epoch"})
    with pytest.raises(UserError, match="save_strategy: epoch needs the size of an epoch"):
        make_plan(config, None)
    assert sorted(make_plan(build_config({"max_steps": 100, "save_steps": 40}), None).save_steps) == [40, 80, 100]


def test_saving_every_step_of_a_big_model_is_a_warning():
    config = build_config({"max_steps": 200, "save_steps": 1})
    plan = make_plan(config, 800, checkpoint_bytes=1_600_000_000)
    assert any(w.startswith("save_steps save at every step, a checkpoint of about 1.6 GB") for w in plan.warnings)
    assert not make_plan(config, 800, checkpoint_bytes=5_000_000).warnings  # a small adapter: fine
    config = build_config({"max_steps": 200, "save_steps": 50})
    assert not make_plan(config, 800, checkpoint_bytes=1_600_000_000).warnings


def test_saves_per_epoch_above_the_steps_of_an_epoch_is_a_warning():
    _, plan = plan_of(rows=16, saves_per_epoch=8, num_train_epochs=1)  # 4 steps an epoch
    assert sorted(plan.save_steps) == [1, 2, 3, 4]
    assert any("saves_per_epoch 8 is more than the 4 steps of an epoch" in w for w in plan.warnings)
