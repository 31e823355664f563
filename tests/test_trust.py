"""A user can trust a run: bad input changes nothing, checkpoint files run no code, a damaged checkpoint is
survived, the saved schedule is the one that continues, and a stop at any step leaves what it promises."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import read_jsonl, run_lmtune
from safetensors.torch import load_file


def folder_hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def weights_of(folder: Path) -> dict[str, torch.Tensor]:
    name = "adapter_model.safetensors" if (folder / "adapter_model.safetensors").exists() else "model.safetensors"
    return load_file(folder / name)


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights_of(a), weights_of(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key


@pytest.fixture
def stop_at(tmp_path, monkeypatch):
    """`stop_at(step)`: a `callbacks` entry that sends this process SIGINT at the end of `step`, as Ctrl-C."""
    monkeypatch.syspath_prepend(str(tmp_path))

    def make(step: int) -> list[str]:
        (tmp_path / f"stop_at_{step}.py").write_text(
            "import os, signal\n"
            "class Stop:\n"
            "    def on_step_end(self, state, metrics):\n"
            f"        if state.step == {step}:\n"
            "            os.kill(os.getpid(), signal.SIGINT)\n"
        )
        return [f"stop_at_{step}:Stop"]

    return make


# --- bad input changes no byte -------------------------------------------------------------------


def _broken_model(tmp_path: Path) -> str:
    folder = tmp_path / "broken-model"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "llama", "hidden_size": ')
    return str(folder)


def _bad_callback(tmp_path: Path) -> list[str]:
    return ["no_such_module_anywhere:Callback"]


BAD_INPUTS = {
    "missing-data-file": lambda tmp_path: {"dataset": str(tmp_path / "nope.json")},
    "unknown-data-set": lambda tmp_path: {"dataset": "no_such_set"},
    "missing-model": lambda tmp_path: {"model_name_or_path": str(tmp_path / "no-model")},
    "broken-model-config": lambda tmp_path: {"model_name_or_path": _broken_model(tmp_path)},
    "unknown-template": lambda tmp_path: {"template": "no_such_template"},
    "bad-lora-target": lambda tmp_path: {"finetuning_type": "lora", "lora_target": ["no_such_proj"]},
    "bad-callback": lambda tmp_path: {"callbacks": _bad_callback(tmp_path)},
    "bad-resume-path": lambda tmp_path: {"resume_from_checkpoint": str(tmp_path / "run" / "checkpoint-99")},
    "cutoff-cuts-every-answer": lambda tmp_path: {"cutoff_len": 2},
}


@pytest.fixture
def finished_run(tiny_config, tmp_path):
    assert run_lmtune("train", tiny_config(max_steps=2, save_steps=1)) == 0
    return tmp_path / "run"


@pytest.mark.parametrize("overwrite", [False, True], ids=["keep", "overwrite"])
@pytest.mark.parametrize("bad", sorted(BAD_INPUTS))
def test_bad_input_changes_no_byte_of_a_finished_run(finished_run, tiny_config, tmp_path, capsys, bad, overwrite):
    before = folder_hashes(finished_run)
    settings = {"max_steps": 2, "save_steps": 1, **BAD_INPUTS[bad](tmp_path), "overwrite_output_dir": overwrite}
    capsys.readouterr()
    assert run_lmtune("train", tiny_config(**settings)) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "Traceback" not in err and "error:" in err
    assert folder_hashes(finished_run) == before


def test_a_model_folder_with_a_broken_config_is_named(tiny_config, tmp_path, capsys):
    model = _broken_model(tmp_path)
    assert run_lmtune("train", tiny_config(model_name_or_path=model)) == 2
    assert model in " ".join(capsys.readouterr().err.split())
    assert not (tmp_path / "run").exists()


def test_a_checkpoint_of_another_kind_names_what_it_was_made_for(tiny_config, tmp_path, capsys, smollm2_dir):
    assert run_lmtune("train", tiny_config(max_steps=2, finetuning_type="lora")) == 0
    before = folder_hashes(tmp_path / "run")
    capsys.readouterr()
    assert run_lmtune("train", tiny_config(max_steps=4, finetuning_type="full")) == 2
    assert folder_hashes(tmp_path / "run") == before
    err = " ".join(capsys.readouterr().err.split())
    assert "was made for model" in err and "finetuning_type 'lora'" in err
    assert "this run is finetuning_type 'full'" in err
    # the same kind, another model: its weights do not fit
    other = tmp_path / "other-model"
    from transformers import LlamaConfig, LlamaForCausalLM

    from lmtune.models import load_tokenizer

    tokenizer = load_tokenizer(str(smollm2_dir))
    shape = LlamaConfig(vocab_size=len(tokenizer), hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2)
    LlamaForCausalLM(shape).save_pretrained(other)
    tokenizer.save_pretrained(other)
    assert run_lmtune("train", tiny_config(max_steps=4, finetuning_type="lora", model_name_or_path=str(other))) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "its weights do not fit this model" in err and "lora_rank 8" in err
    assert folder_hashes(tmp_path / "run") == before


def test_overwrite_never_clears_a_run_that_is_live(tiny_config, tmp_path):
    from test_resume import SLOW_TRAINING, _lmtune_process, _wait_for

    run = tmp_path / "run"
    config = tiny_config(max_steps=60, save_steps=1)
    process = _lmtune_process(config, prelude=SLOW_TRAINING)
    try:
        _wait_for(lambda: (run / "checkpoints.json").exists() and (run / "train.pid").exists())
        index_before = json.loads((run / "checkpoints.json").read_text())
        assert run_lmtune("train", config, "overwrite_output_dir=true") == 2
        assert (run / "checkpoint-1").is_dir() and (run / "metrics.jsonl").is_file()
        kept = [e["path"] for e in index_before["checkpoints"] if e["status"] == "kept"]
        assert all((run / path).is_dir() for path in kept)
    finally:
        process.send_signal(signal.SIGINT)
        process.communicate(timeout=120)
    assert process.returncode == 130


# --- checkpoint files run no code ----------------------------------------------------------------


class _RunsCode:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("file", ["optimizer.pt", "rng_state.pth"])
def test_a_crafted_pickle_in_a_checkpoint_runs_no_code(tiny_config, tmp_path, capsys, stop_at, file):
    run = tmp_path / "run"
    assert run_lmtune("train", tiny_config(max_steps=6, save_steps=2, callbacks=stop_at(4))) == 130
    marker = tmp_path / "code-ran"
    torch.save({"state": _RunsCode(str(marker))}, run / "checkpoint-4" / file)
    capsys.readouterr()
    explicit = tiny_config(max_steps=6, save_steps=2, resume_from_checkpoint=str(run / "checkpoint-4"))
    assert run_lmtune("train", explicit) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"checkpoint-4/{file}: refused to load" in err
    assert run_lmtune("train", tiny_config(max_steps=6, save_steps=2)) == 0  # auto: continues from checkpoint-2
    assert not marker.exists()
    skipped = [r for r in read_jsonl(run / "metrics.jsonl") if r.get("event") == "checkpoint_skipped"]
    assert skipped[0]["path"] == "checkpoint-4" and file in skipped[0]["problems"][0]


# --- a damaged newest checkpoint is survived -----------------------------------------------------


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGE = {
    "truncated-weights": lambda run: _truncate(run / "checkpoint-4" / "model.safetensors"),
    "truncated-optimizer": lambda run: _truncate(run / "checkpoint-4" / "optimizer.pt"),
    "empty-rng-state": lambda run: (run / "checkpoint-4" / "rng_state.pth").write_bytes(b""),
    "bad-train-state": lambda run: (run / "checkpoint-4" / "train_state.json").write_text('{"step": 4, '),
    "bad-index": lambda run: (run / "checkpoints.json").write_text("{not json"),
}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_model_dir):
    """The run the damaged ones must end as: 6 steps, a checkpoint every 2."""
    folder = tmp_path_factory.mktemp("uninterrupted")
    data = folder / "sums.json"
    from conftest import ALPACA_ROWS, write_config

    data.write_text(json.dumps(ALPACA_ROWS))
    config = write_config(folder, model_name_or_path=str(tiny_model_dir), dataset=str(data), finetuning_type="full",
                          output_dir=str(folder / "run"), learning_rate=5e-3, per_device_train_batch_size=4,
                          logging_steps=1, report_to="none", plot_loss=False, preview_samples=0, cutoff_len=128,
                          lr_scheduler_type="cosine", max_steps=6, save_steps=2)
    assert run_lmtune("train", config) == 0
    return folder / "run"


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_newest_checkpoint_is_skipped_and_the_run_ends_as_if_no_fault(
        tiny_config, tmp_path, capsys, stop_at, uninterrupted, damage):
    run = tmp_path / "run"
    settings = {"max_steps": 6, "save_steps": 2, "lr_scheduler_type": "cosine"}
    assert run_lmtune("train", tiny_config(**settings, callbacks=stop_at(4))) == 130
    DAMAGE[damage](run)
    capsys.readouterr()
    assert run_lmtune("train", tiny_config(**settings)) == 0
    err = " ".join(capsys.readouterr().err.split())
    if damage == "bad-index":
        assert "checkpoints.json is damaged" in err and "resuming from" in err and "checkpoint-4 at step 4" in err
    else:
        assert "skipping checkpoint-4" in err and "checkpoint-2 at step 2" in err
    assert_same_weights(uninterrupted, run)
    assert run_lmtune("checkpoints", run, "--verify") == 0


def test_verify_names_each_damaged_file(tiny_config, tmp_path, capsys):
    run = tmp_path / "run"
    assert run_lmtune("train", tiny_config(max_steps=4, save_steps=1)) == 0
    _truncate(run / "checkpoint-2" / "model.safetensors")
    (run / "checkpoint-3" / "rng_state.pth").write_bytes(b"")
    capsys.readouterr()
    assert run_lmtune("checkpoints", run, "--verify", "--json") == 1
    problems = {e["step"]: e["problems"] for e in json.loads(capsys.readouterr().out)["checkpoints"]}
    assert problems[1] == [] and problems[4] == []
    assert any("model.safetensors" in p for p in problems[2])
    assert any("rng_state.pth" in p for p in problems[3])


# --- the schedule that continues -----------------------------------------------------------------


def lrs_of(run: Path) -> dict[int, float]:
    return {r["step"]: r["lr"] for r in read_jsonl(run / "metrics.jsonl") if r["type"] == "train"}


def test_resume_lr_keep_continues_the_saved_schedule_when_its_type_changed(tiny_config, tmp_path, stop_at,
                                                                            uninterrupted):
    run = tmp_path / "run"
    settings = {"max_steps": 6, "save_steps": 2, "warmup_steps": 0}
    assert run_lmtune("train", tiny_config(**settings, lr_scheduler_type="cosine", callbacks=stop_at(4))) == 130
    assert run_lmtune("train", tiny_config(**settings, lr_scheduler_type="constant")) == 0
    straight = lrs_of(uninterrupted)
    assert lrs_of(run) == straight  # steps 1-4 before the stop, 5-6 on the saved cosine schedule
    assert_same_weights(uninterrupted, run)
    event = next(r for r in read_jsonl(run / "metrics.jsonl") if r.get("event") == "resume")
    assert any(line.startswith("lr_scheduler_type: 'cosine' -> 'constant' (not applied") for line in event["changes"])


def test_resume_lr_config_applies_a_new_scheduler_type(tiny_config, tmp_path, stop_at):
    run = tmp_path / "run"
    settings = {"max_steps": 6, "save_steps": 2}
    assert run_lmtune("train", tiny_config(**settings, lr_scheduler_type="cosine", callbacks=stop_at(4))) == 130
    assert run_lmtune("train", tiny_config(**settings, lr_scheduler_type="constant", learning_rate=1e-3,
                                           resume_lr="config")) == 0
    lrs = lrs_of(run)
    assert lrs[5] == lrs[6] == pytest.approx(1e-3)
    assert lrs[4] < 5e-3  # the cosine schedule before the stop


def test_extending_a_finished_run_says_what_the_rate_will_be(tiny_config, tmp_path, capsys):
    run = tmp_path / "run"
    assert run_lmtune("train", tiny_config(max_steps=4, lr_scheduler_type="linear")) == 0
    capsys.readouterr()
    assert run_lmtune("plan", tiny_config(max_steps=6, lr_scheduler_type="linear")) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "resumes from" in out and "checkpoint-4" in out
    assert "steps 5..6 keep its last rate 0" in out and "set resume_lr: config" in out
    assert run_lmtune("train", tiny_config(max_steps=6, lr_scheduler_type="linear")) == 0
    lrs = lrs_of(run)
    assert lrs[5] == lrs[6] == 0.0  # keep: the saved linear schedule had ended at step 4
    capsys.readouterr()
    assert run_lmtune("plan", tiny_config(max_steps=8, lr_scheduler_type="linear", resume_lr="config")) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "the config's schedule (linear, peak 0.005, 0 warm-up steps, 8 steps) applies from step 6" in out


def test_a_resume_says_when_the_data_changed(tiny_config, tmp_path, alpaca_file, stop_at):
    run = tmp_path / "run"
    assert run_lmtune("train", tiny_config(max_steps=4, save_steps=2, callbacks=stop_at(2))) == 130
    rows = json.loads(alpaca_file.read_text())
    alpaca_file.write_text(json.dumps(rows + rows[:4]))
    assert run_lmtune("train", tiny_config(max_steps=4, save_steps=2)) == 0
    event = next(r for r in read_jsonl(run / "metrics.jsonl") if r.get("event") == "resume")
    assert any(line.startswith("the data files differ from those checkpoint-2 was trained on")
               for line in event["changes"])


# --- stops at any step, finished runs that are whole ---------------------------------------------


def test_a_stop_in_the_last_step_finishes_the_run(tiny_config, tmp_path, capsys, stop_at):
    run = tmp_path / "run"
    assert run_lmtune("train", tiny_config(max_steps=3, callbacks=stop_at(3))) == 0
    assert "the stop came during the last step" in " ".join(capsys.readouterr().err.split())
    assert (run / "checkpoint-3" / "checkpoint_complete.json").is_file()
    assert_same_weights(run, run / "checkpoint-3")
    assert run_lmtune("train", tiny_config(max_steps=3)) == 0
    assert "already complete" in " ".join(capsys.readouterr().err.split())


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_a_finished_run_whose_final_model_is_damaged_writes_it_again(tiny_config, tmp_path, capsys, damage):
    run = tmp_path / "run"
    assert run_lmtune("train", tiny_config(max_steps=2)) == 0
    (run / "model.safetensors").unlink() if damage == "missing" else _truncate(run / "model.safetensors")
    capsys.readouterr()
    assert run_lmtune("train", tiny_config(max_steps=2)) == 0
    assert "final model is not whole" in " ".join(capsys.readouterr().err.split())
    assert_same_weights(run, run / "checkpoint-2")
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(run)  # the folder loads again


def test_sigterm_during_start_up_exits_130_and_writes_nothing(tiny_config, tmp_path):
    (tmp_path / "slow_import.py").write_text(
        "import pathlib, time\n"
        f"pathlib.Path({str(tmp_path / 'importing')!r}).touch()\n"
        "time.sleep(60)\n"
        "class Callback:\n    def on_train_begin(self, state, model): pass\n")
    config = tiny_config(max_steps=2, callbacks=["slow_import:Callback"])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    process = subprocess.Popen([sys.executable, "-m", "lmtune", "train", str(config)], env=env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    from test_resume import _wait_for

    _wait_for(lambda: (tmp_path / "importing").exists())
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130
    assert "SIGTERM before training began" in " ".join(stderr.split())
    assert not (tmp_path / "run").exists()


# --- the disk guard ------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["lora", "full"])
def test_the_disk_guard_counts_everything_the_run_writes(tiny_config, tmp_path, capsys, method):
    config = tiny_config(max_steps=3, save_steps=1, finetuning_type=method)
    assert run_lmtune("plan", config, "--json") == 0
    planned = json.loads(capsys.readouterr().out)["disk_bytes"]
    assert run_lmtune("train", config) == 0
    run = tmp_path / "run"
    written = sum(p.stat().st_size for p in run.rglob("*") if p.is_file() and p.name != "metrics.jsonl")
    assert written <= planned


# --- one saved state, one place for each key's meaning --------------------------------------------


def _a_value_for(field: dataclasses.Field, index: int):
    """A value unlike the default for every field type TrainState has; a new type needs a line here."""
    from lmtune.state import Schedule

    examples = {
        "int": 7 + index, "int | None": 7 + index, "float": 0.25 + index, "float | None": 1.5 + index,
        "dict[str, float]": {"loss": 0.5},
        "Schedule | None": Schedule("cosine", 3e-4, 5, 100), "dict[str, str]": {"data": "abc", "tokenizer": "def"},
        "dict[str, Any]": {"learning_rate": 3e-4},
        "list[dict[str, Any]]": [{"python": (3, tuple(range(625)), None), "numpy": [1, 2], "torch": torch.arange(4)}],
        "list[dict[str, Any]] | None": [{"position": [1, 2, 3]}],
    }
    return examples[field.type]


def test_every_field_of_the_saved_state_round_trips_through_a_checkpoint(tmp_path):
    from lmtune.checkpoint import CheckpointStore, Snapshot, read_state
    from lmtune.state import TrainState

    values = {f.name: _a_value_for(f, i) for i, f in enumerate(dataclasses.fields(TrainState))}
    state = TrainState(**values)
    store = CheckpointStore(tmp_path, None, None)
    store.write(Snapshot(step=state.step, weights={"w": torch.zeros(2)}, weights_name="model.safetensors",
                         write_model_files=lambda folder: None, optimizer={"state": {}}, state=state,
                         entry={"step": state.step, "reasons": ["steps"], "metrics": {}}))
    back = read_state(tmp_path / f"checkpoint-{state.step}")
    for f in dataclasses.fields(TrainState):
        got, expected = getattr(back, f.name), getattr(state, f.name)
        if f.name == "rng":
            assert got[0]["python"] == expected[0]["python"] and torch.equal(got[0]["torch"], expected[0]["torch"])
        else:
            assert got == expected, f.name


def test_every_config_key_says_what_a_change_means_on_resume():
    from lmtune.config import RESUME_EFFECTS, TrainConfig, field_meta

    unclassified = [key for key in TrainConfig.model_fields if field_meta(key).get("on_resume") not in RESUME_EFFECTS]
    assert unclassified == []


@pytest.mark.parametrize("stage, metric", [("sft", "eval_accuracy"), ("sft", "loss_eval"),
                                           ("dpo", "eval_rewards/acuracies"), ("dpo", "rewards/margin")])
def test_a_metric_for_best_model_no_evaluation_writes_is_exit_2_naming_the_valid_ones(tiny_config, stage, metric,
                                                                                       capsys):
    """It marked no checkpoint best by its own value: the best was chosen by eval_loss, in the direction of
    the misspelt name (higher is better for a name not ending in loss: the worst checkpoint kept as best)."""
    config = tiny_config(stage=stage, metric_for_best_model=metric, val_size=4, max_steps=2)
    assert run_lmtune("train", config) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "metric_for_best_model" in err and "eval_loss" in err and "Traceback" not in err
    assert ("eval_rewards/accuracies" in err) == (stage == "dpo")


def test_a_metric_named_without_eval_is_the_evaluations(tiny_config):
    from lmtune.config import build_config

    assert build_config({"stage": "dpo", "metric_for_best_model": "rewards/margins"}).metric_for_best_model == \
        "eval_rewards/margins"
    assert build_config({"metric_for_best_model": "loss"}).metric_for_best_model == "eval_loss"


def test_greater_is_better_marks_the_highest_metric_best(tmp_path):
    from test_checkpoint import snapshot

    from lmtune.checkpoint import CheckpointStore
    from lmtune.config import TrainConfig

    assert TrainConfig(stage="dpo", metric_for_best_model="eval_rewards/accuracies").best_is_greater
    assert not TrainConfig(metric_for_best_model="eval_loss").best_is_greater
    store = CheckpointStore(tmp_path, save_total_limit=1, best_metric="eval_accuracy", greater_is_better=True)
    for step, accuracy in ((1, 0.2), (2, 0.9), (3, 0.5), (4, 0.4)):
        store.write(snapshot(step, eval_accuracy=accuracy))
    index = json.loads((tmp_path / "checkpoints.json").read_text())["checkpoints"]
    assert [e["step"] for e in index if e["best"]] == [2]
    assert [e["step"] for e in index if e["status"] == "kept"] == [2, 4]
