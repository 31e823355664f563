"""The config file: key names, types, overrides on the command line, and the help that lists them."""

from __future__ import annotations

import json

import pytest
import yaml
from conftest import run_lmtune

from lmtune.config import TrainConfig


def error_of(capsys, *args) -> str:
    capsys.readouterr()
    assert run_lmtune(*args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return " ".join(err.split())


@pytest.mark.parametrize("where", ["file", "command line"])
def test_an_unknown_key_suggests_the_nearest_one(tiny_config, tmp_path, capsys, where):
    if where == "file":
        err = error_of(capsys, "plan", tiny_config(lora_rnak=4))
    else:
        err = error_of(capsys, "plan", tiny_config(), "lora_rnak=4")
    assert "unknown key 'lora_rnak'" in err and "did you mean 'lora_rank'?" in err


@pytest.mark.parametrize("values, words", [
    ({"learning_rate": "fast"}, ["learning_rate", "valid number", "'fast'"]),
    ({"stage": "rl"}, ["stage", "'pt'", "'sft'"]),
    ({"per_device_train_batch_size": 0}, ["per_device_train_batch_size", "greater than 0"]),
    ({"interleave_probs": "0.5,half"}, ["interleave_probs", "comma separated list of numbers"]),
    ({"dataset": "a.json,b.json", "mix_strategy": "interleave_under", "interleave_probs": "0.2,0.3,0.5"},
     ["interleave_probs has 3 values for 2 data sets", "one probability a data set"]),
])
def test_a_wrong_value_names_the_key_and_writes_nothing(tiny_config, tmp_path, capsys, values, words):
    err = error_of(capsys, "train", tiny_config(**values))
    for word in words:
        assert word in err, err
    assert not (tmp_path / "run").exists()


def test_files_that_are_not_a_config(tmp_path, capsys):
    (tmp_path / "broken.yaml").write_text("learning_rate: [\n")
    assert "broken.yaml: not valid YAML" in error_of(capsys, "plan", tmp_path / "broken.yaml")
    (tmp_path / "list.yaml").write_text("- learning_rate\n")
    assert "must be a mapping" in error_of(capsys, "plan", tmp_path / "list.yaml")
    assert "config file not found" in error_of(capsys, "plan", tmp_path / "nowhere.yaml")


def test_command_line_values_override_the_file_and_reach_run_config(tiny_config, tmp_path, capsys):
    config = tiny_config(max_steps=5, learning_rate=0.01)
    capsys.readouterr()
    assert run_lmtune("plan", config, "max_steps=2", "--json") == 0
    assert json.loads(capsys.readouterr().out)["total_steps"] == 2
    assert run_lmtune("train", config, "max_steps=2", "learning_rate=0.002", "save_total_limit=null",
                      "lora_target=[q_proj,v_proj]") == 0
    written = yaml.safe_load((tmp_path / "run" / "run_config.yaml").read_text())
    assert written["max_steps"] == 2 and written["learning_rate"] == 0.002
    assert written["save_total_limit"] is None and written["lora_target"] == ["q_proj", "v_proj"]
    assert set(written) == set(TrainConfig.model_fields)  # every default filled in


def test_help_config_lists_every_key_with_its_type_default_and_help(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    assert run_lmtune("train", "--help-config") == 0
    lines = capsys.readouterr().out.splitlines()
    rows = {cells[0]: cells[1:] for line in lines
            if len(cells := [cell.strip() for cell in line.strip("│").split("│")]) == 4 and cells[0]}
    assert set(TrainConfig.model_fields) <= set(rows)
    assert rows["stage"][:2] == ["pt | sft | dpo | kto | rm | grpo", "sft"]
    assert rows["save_total_limit"][:2] == ["int | null", "null"]
    assert rows["learning_rate"][0] == "float" and rows["learning_rate"][2]
    assert not any("<class" in " ".join(cells) for cells in rows.values())


def test_interleave_probs_are_read_once_as_numbers():
    from lmtune.config import build_config

    assert build_config({"interleave_probs": "0.7, 0.3"}).interleave_probs == [0.7, 0.3]
    assert build_config({"interleave_probs": [0.5, 0.5]}).interleave_probs == [0.5, 0.5]
