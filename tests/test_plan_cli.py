"""`lmtune plan` and the plan summary of `lmtune train`: what the user reads before a run starts."""

from __future__ import annotations

import json

import pytest
from conftest import run_lmtune


def plan_json(config, capsys, *overrides) -> dict:
    capsys.readouterr()
    assert run_lmtune("plan", config, *overrides, "--json") == 0
    return json.loads(capsys.readouterr().out)


def test_plan_json_lists_steps_saves_and_rotation(tiny_config, capsys):
    plan = plan_json(tiny_config(saves_per_epoch=8, num_train_epochs=4, save_total_limit=32,
                                 per_device_train_batch_size=1), capsys)
    # 32 rows, batch 1: 32 steps an epoch, 8 saves an epoch, 4 epochs
    assert plan["steps_per_epoch"] == 32 and plan["total_steps"] == 128
    assert [s["step"] for s in plan["saves"]] == list(range(4, 129, 4))
    assert len(plan["kept"]) == 32 and plan["deleted"] == []
    assert plan["saves"][-1] == {"step": 128, "reasons": ["epoch", "final"]}
    assert plan["checkpoint_bytes"] > 0 and plan["final_model_bytes"] > 0
    assert plan["disk_bytes"] == 32 * plan["checkpoint_bytes"] + plan["final_model_bytes"]


def test_plan_table_says_how_many_are_written_kept_and_deleted(tiny_config, capsys):
    config = tiny_config(saves_per_epoch=8, num_train_epochs=4, save_total_limit=4, per_device_train_batch_size=1)
    assert run_lmtune("plan", config) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "128 optimizer steps, 32 per epoch, 4.00 epochs" in out
    assert ("32 checkpoints will be written, save_total_limit 4 keeps the last 4: 28 will be deleted "
            "(save_total_limit: 32 would keep them all)") in out
    assert "needs about" in out and "free" in out
    assert run_lmtune("plan", config, "save_total_limit=32") == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "32 checkpoints will be written; save_total_limit 32 keeps them all" in out


def test_plan_shows_each_phase(tiny_config, capsys):
    config = tiny_config(num_train_epochs=3, save_schedule=[{"until_epoch": 1, "saves_per_epoch": 4},
                                                            {"until_epoch": 3, "save_epochs": 1}])
    plan = plan_json(config, capsys)
    assert [s["step"] for s in plan["saves"]] == [2, 4, 6, 8, 16, 24]
    assert [(p["from_step"], p["until_step"]) for p in plan["phases"]] == [(1, 8), (9, 24)]
    assert run_lmtune("plan", config) == 0
    out = capsys.readouterr().out
    assert "save_schedule[0]: steps 1..8: 4 saves" in out and "save_schedule[1]: steps 9..24: 2 saves" in out


@pytest.mark.parametrize("values, words", [
    ({"save_steps": 0.5}, ["save_steps", "save_epochs: 0.5"]),
    ({"save_strategy": "no", "save_steps": 4}, ["save_strategy: no", "save_steps"]),
    ({"save_schedule": [{"until_epoch": 2, "save_steps": 1}, {"until_epoch": 1, "save_steps": 2}]},
     ["save_schedule[1] ends at until_epoch 1", "save_schedule[0]"]),
    ({"save_schedule": [{"until_epoch": 1}, {"save_steps": 2}]}, ["until_epoch or until_step"]),
])
def test_config_mistakes_exit_2_naming_the_keys(tiny_config, tmp_path, capsys, values, words):
    config = tiny_config(**values)
    for command in ("plan", "train"):
        capsys.readouterr()
        assert run_lmtune(command, config) == 2
        err = " ".join(capsys.readouterr().err.split())
        for word in words:
            assert word in err, (command, err)
    assert not (tmp_path / "run").exists()  # nothing written


def test_save_steps_past_the_run_is_a_plan_warning(tiny_config, capsys):
    config = tiny_config(max_steps=6, save_steps=50)
    plan = plan_json(config, capsys)
    assert [s["step"] for s in plan["saves"]] == [6]
    assert plan["warnings"] == ["save_steps 50 is larger than the run (6 steps): it never saves; "
                                "only the final save is written"]
    assert run_lmtune("plan", config) == 0
    assert "warning: save_steps 50 is larger than the run (6 steps)" in " ".join(capsys.readouterr().out.split())


def test_dense_saves_of_a_big_model_warn_in_the_plan(tiny_config, capsys, monkeypatch):
    import lmtune.planning as planning

    monkeypatch.setattr(planning, "estimate_sizes",
                        lambda *args: {"checkpoint_bytes": 2_000_000_000, "final_model_bytes": None})
    plan = plan_json(tiny_config(max_steps=40, save_steps=1, per_device_train_batch_size=1), capsys)
    assert any(w.startswith("save_steps save at every step, a checkpoint of about 2.0 GB each (80 GB written")
               for w in plan["warnings"]), plan["warnings"]


def test_train_prints_the_plan_summary_first(tiny_config, capsys):
    assert run_lmtune("train", tiny_config(max_steps=4, save_steps=2, save_total_limit=1)) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert ("2 checkpoints will be written, save_total_limit 1 keeps the last 1: 1 will be deleted "
            "(save_total_limit: 2 would keep them all)") in err
    assert "needs about" in err
    assert err.index("checkpoints will be written") < err.index("checkpoint-2")


def test_train_refuses_when_the_kept_checkpoints_do_not_fit(tiny_config, tmp_path, capsys, monkeypatch):
    import lmtune.planning as planning

    monkeypatch.setattr(planning, "free_bytes", lambda folder: 1000)
    config = tiny_config(max_steps=4, save_steps=1)
    assert run_lmtune("train", config) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "the kept checkpoints and the final model need about" in err and "only 1.0 KB is free" in err
    assert "save_total_limit" in err
    assert not (tmp_path / "run").exists()  # nothing written
    assert run_lmtune("plan", config) == 0  # the plan itself still prints, with the shortfall
    out = " ".join(capsys.readouterr().out.split())
    assert "1.0 KB free" in out and "the kept checkpoints do not fit on the disk" in out


def test_plan_says_which_batching_is_used_and_the_padding_it_removes(tiny_config, capsys):
    from lmtune.batching import batching_of
    from lmtune.config import build_config

    plan = plan_json(tiny_config(), capsys)
    batching = plan["batching"]
    assert batching["padding_free"] is True and batching["packing"] is False  # the defaults of sft
    assert 0 < batching["padding_share"] < 1
    assert run_lmtune("plan", tiny_config()) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "batching: padding-free" in out and f"removes {batching['padding_share']:.1%}" in out
    assert run_lmtune("plan", tiny_config(), "padding_free=false") == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "batching: padded" in out and f"padding is {batching['padding_share']:.1%}" in out
    assert batching_of(build_config({"stage": "pt"}), [])["padding_free"] is False  # pt packs full rows
