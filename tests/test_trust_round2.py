"""A user can trust a run, round two: a stream is checked before anything is changed, the same command
continues a run from the first byte it wrote, wrong values are refused, damage is found by content, a
finished run's final model is whole, and a full disk during the final save is survived."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import test_trust
from conftest import ALPACA_ROWS, read_jsonl, run_lmtune
from test_trust import assert_same_weights, folder_hashes

stop_at = test_trust.stop_at  # a fixture: SIGINT at the end of a step


def error_of(capsys) -> str:
    err = " ".join(capsys.readouterr().err.split())
    assert "Traceback" not in err
    return err


# --- 1. a stream is checked to its end before anything is changed --------------------------------


def write_rows(path: Path, rows: list[dict], bad_line: bytes | None = None, at: int = 30) -> Path:
    """JSON lines; with `bad_line`, line `at` (from 1) is that line instead."""
    lines = [json.dumps(row).encode() for row in rows]
    if bad_line is not None:
        lines[at - 1] = bad_line
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


STREAM_ROWS = ALPACA_ROWS[:32] + ALPACA_ROWS[:8]  # 40 rows
BAD_STREAM_LINES = {
    "invalid-json": b'{"instruction": "What is 1 plus 1?", "output": ',
    "missing-output": json.dumps({"instruction": "What is 1 plus 1?", "input": ""}).encode(),
    "invalid-utf8": b'{"instruction": "What is \xff\xfe plus 1?", "input": "", "output": "2"}',
}


@pytest.fixture
def stream_data(tmp_path):
    return write_rows(tmp_path / "data" / "stream.jsonl", STREAM_ROWS)


@pytest.mark.parametrize("folder", ["fresh", "stopped", "finished", "finished-overwrite"])
def test_a_bad_row_late_in_a_stream_is_refused_before_anything_changes(tiny_config, tmp_path, capsys, stop_at,
                                                                        stream_data, folder):
    settings = {"dataset": str(stream_data), "streaming": True, "max_steps": 4, "save_steps": 2,
                "per_device_train_batch_size": 2, "buffer_size": 4}
    run = tmp_path / "run"
    if folder == "stopped":
        assert run_lmtune("train", tiny_config(**settings, callbacks=stop_at(2))) == 130
    elif folder != "fresh":
        assert run_lmtune("train", tiny_config(**settings)) == 0
    before = folder_hashes(run) if run.exists() else None
    for name, line in BAD_STREAM_LINES.items():
        write_rows(stream_data, STREAM_ROWS, line, at=30)
        capsys.readouterr()
        config = tiny_config(**settings, overwrite_output_dir=folder == "finished-overwrite")
        assert run_lmtune("train", config) == 2, name
        err = error_of(capsys)
        assert f"{stream_data}, line 30" in err, (name, err)
        if before is None:
            assert not run.exists(), name
        else:
            assert folder_hashes(run) == before, name


# --- 2. the same command continues from the first byte a run writes --------------------------------


@pytest.fixture
def dies_at(tmp_path, monkeypatch):
    """`dies_at(step)`: a `callbacks` entry that ends the run at once at the end of `step`, as SIGKILL would
    (nothing after it runs in the loop: no checkpoint, no final model)."""
    monkeypatch.syspath_prepend(str(tmp_path))

    def make(step: int) -> list[str]:
        (tmp_path / f"dies_at_{step}.py").write_text(
            "class Dies:\n"
            "    def on_step_end(self, state, metrics):\n"
            f"        if state.step == {step}:\n"
            "            raise SystemExit(137)\n"
        )
        return [f"dies_at_{step}:Dies"]

    return make


def test_a_run_killed_before_its_first_checkpoint_restarts_with_the_same_command(tiny_config, tmp_path, capsys,
                                                                                 dies_at):
    run = tmp_path / "run"
    settings = {"max_steps": 4, "save_steps": 10}
    assert run_lmtune("train", tiny_config(**settings, callbacks=dies_at(2))) == 137
    assert {p.name for p in run.iterdir()} >= {"run_config.yaml", "metrics.jsonl"}
    assert not list(run.glob("checkpoint-*"))
    capsys.readouterr()
    assert run_lmtune("train", tiny_config(**settings, learning_rate=1e-3)) == 2  # another run: refused
    assert "holds another run" in error_of(capsys)
    assert run_lmtune("train", tiny_config(**settings)) == 0
    assert "started again from step 0" in error_of(capsys)
    steps = [r["step"] for r in read_jsonl(run / "metrics.jsonl") if r["type"] == "train"]
    assert steps == [1, 2, 3, 4]
    assert_same_weights(run, run / "checkpoint-4")


def _train_process(config: Path, prelude: str = "") -> subprocess.Popen:
    """`lmtune train CONFIG` in a child process, `prelude` run once lmtune.cli is imported."""
    code = f"from lmtune.cli import main\n{prelude}\nmain(['train', {str(config)!r}])"
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_two_sigterms_during_the_final_save_exit_130_and_the_same_command_finishes_the_run(tiny_config, tmp_path,
                                                                                           capsys):
    from test_resume import _wait_for

    run, marker = tmp_path / "run", tmp_path / "final-save"
    slow_final_save = (
        "import pathlib, time, lmtune.engine as e\n"
        "write = e.TrainingLoop._write_final_model\n"
        f"def slow(self):\n    pathlib.Path({str(marker)!r}).touch(); time.sleep(30); write(self)\n"
        "e.TrainingLoop._write_final_model = slow\n")
    config = tiny_config(max_steps=2)
    process = _train_process(config, slow_final_save)
    _wait_for(marker.exists)
    process.send_signal(signal.SIGTERM)
    import time

    time.sleep(1.0)  # the first signal is handled (the final save goes on) before the second comes
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    said = " ".join(stderr.split())
    assert process.returncode == 130, said
    assert "Traceback" not in said and "SIGTERM during the final save" in said and "stopped at once" in said
    capsys.readouterr()
    assert run_lmtune("train", config) == 0
    assert "final model is not whole" in error_of(capsys)
    assert_same_weights(run, run / "checkpoint-2")
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(run)


def test_sigterm_while_a_library_swallows_exceptions_exits_130_at_once(tiny_config, tmp_path, monkeypatch):
    """A signal raised as an exception into code that catches it (numpy's lazy import, half done, then
    recursed without end: a RecursionError) must not depend on that code: start-up stops at once."""
    marker = tmp_path / "importing"
    (tmp_path / "swallowing_import.py").write_text(
        "import pathlib, time\n"
        f"pathlib.Path({str(marker)!r}).touch()\n"
        "for _ in range(30):\n"
        "    try:\n"
        "        time.sleep(1)\n"
        "    except BaseException:\n"
        "        pass  # as library code that retries whatever went wrong\n"
        "class Callback:\n    def on_train_begin(self, state, model): pass\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    process = _train_process(tiny_config(max_steps=2, callbacks=["swallowing_import:Callback"]))
    from test_resume import _wait_for

    _wait_for(marker.exists)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    said = " ".join(stderr.split())
    assert process.returncode == 130, said
    assert "Traceback" not in said and "SIGTERM before training began" in said
    assert not (tmp_path / "run").exists()


# --- 3. values that train although wrong ------------------------------------------------------------


@pytest.mark.parametrize("key, value", [("learning_rate", ".inf"), ("learning_rate", ".nan"),
                                        ("max_grad_norm", ".inf"), ("num_train_epochs", ".inf"),
                                        ("warmup_steps", ".nan")])
def test_a_non_finite_number_is_refused_naming_the_key(tiny_config, tmp_path, capsys, key, value):
    assert run_lmtune("train", tiny_config(max_steps=2), f"{key}={value}") == 2
    assert key in error_of(capsys)
    assert not (tmp_path / "run").exists()


def test_a_json_file_whose_top_level_is_an_object_is_refused_naming_the_file(tiny_config, tmp_path, capsys):
    data = tmp_path / "object.json"
    data.write_text(json.dumps({"rows": ALPACA_ROWS}))
    assert run_lmtune("train", tiny_config(dataset=str(data), max_steps=2)) == 2
    err = error_of(capsys)
    assert str(data) in err and "list of rows" in err
    assert not (tmp_path / "run").exists()


def test_a_pair_whose_chosen_equals_its_rejected_is_refused_naming_the_row(tiny_config, tmp_path, capsys):
    rows = [{"prompt": f"Question {i}?", "chosen": "Yes.", "rejected": f"No {i}."} for i in range(8)]
    rows[5]["rejected"] = rows[5]["chosen"]
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(json.dumps(row) for row in rows))
    config = tiny_config(stage="dpo", dataset=str(data), finetuning_type="lora", max_steps=1)
    assert run_lmtune("train", config) == 2
    err = error_of(capsys)
    assert "row 6" in err and "chosen" in err and "rejected" in err
    assert not (tmp_path / "run").exists()


# --- 4. a message, not a traceback ------------------------------------------------------------------


CALLBACK_FILES = {
    "syntax-error": "class Callback(:\n    pass\n",
    "raises-on-import": "raise RuntimeError('no config here')\n",
    "raises-in-init": "class Callback:\n    def __init__(self):\n        raise ValueError('needs a key')\n"
                      "    def on_step_end(self, state, metrics): pass\n",
}


@pytest.mark.parametrize("fault", sorted(CALLBACK_FILES))
def test_a_callbacks_file_that_fails_is_exit_2_naming_it(tiny_config, tmp_path, capsys, monkeypatch, fault):
    module = f"broken_callback_{fault.replace('-', '_')}"
    (tmp_path / f"{module}.py").write_text(CALLBACK_FILES[fault])
    monkeypatch.syspath_prepend(str(tmp_path))
    assert run_lmtune("train", tiny_config(max_steps=2, callbacks=[f"{module}:Callback"])) == 2
    assert f"{module}:Callback" in error_of(capsys)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("suffix", ["json", "jsonl"])
def test_invalid_utf8_in_a_data_file_is_exit_2_naming_the_file(tiny_config, tmp_path, capsys, suffix):
    data = tmp_path / f"bad-utf8.{suffix}"
    text = json.dumps(ALPACA_ROWS) if suffix == "json" else "\n".join(json.dumps(r) for r in ALPACA_ROWS)
    data.write_bytes(text.replace("What is 3", "What is \udcff").encode("utf-8", "surrogateescape"))
    assert run_lmtune("train", tiny_config(dataset=str(data), max_steps=2)) == 2
    err = error_of(capsys)
    assert str(data) in err and "UTF-8" in err
    assert not (tmp_path / "run").exists()


def test_a_dataset_path_that_is_a_symlink_loop_is_exit_2_naming_it(tiny_config, tmp_path, capsys):
    loop = tmp_path / "loop.json"
    loop.symlink_to(loop)
    assert run_lmtune("train", tiny_config(dataset=str(loop), max_steps=2)) == 2
    assert str(loop) in error_of(capsys)
    assert not (tmp_path / "run").exists()


def test_a_model_folder_with_truncated_weights_is_exit_2_naming_the_file(tiny_config, tmp_path, capsys,
                                                                          tiny_model_dir):
    import shutil

    model = tmp_path / "cut-model"
    shutil.copytree(tiny_model_dir, model)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert run_lmtune("train", tiny_config(model_name_or_path=str(model), max_steps=2)) == 2
    assert str(weights) in error_of(capsys)
    assert not (tmp_path / "run").exists()


# --- 5. YAML alias bombs -----------------------------------------------------------------------------


def alias_bomb(levels: int = 6) -> str:
    """A flow mapping whose last entry expands to 9**levels strings through aliases (billion laughs)."""
    names = "abcdefghij"[: levels + 1]
    entries = ['a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]']
    entries += [f"{b}: &{b} [{', '.join(['*' + a] * 9)}]" for a, b in zip(names, names[1:], strict=False)]
    return "{" + ", ".join(entries) + "}"


def test_a_yaml_alias_bomb_in_the_file_is_refused(tiny_config, tmp_path, capsys):
    config = tiny_config(max_steps=2)
    config.write_text(config.read_text() + f"template: {alias_bomb()}\n")
    for command in ("plan", "train"):
        assert run_lmtune(command, config) == 2
        assert "aliases" in error_of(capsys)
    assert not (tmp_path / "run").exists()


def test_a_yaml_alias_bomb_in_an_override_is_refused(tiny_config, tmp_path, capsys):
    assert run_lmtune("train", tiny_config(max_steps=2), f"template={alias_bomb()}") == 2
    err = error_of(capsys)
    assert "aliases" in err and "template" in err
    assert not (tmp_path / "run").exists()


# --- 6. damage found by content -----------------------------------------------------------------------


def _zero_the_tensors(path: Path) -> None:
    """The tensor data of a safetensors file zeroed, its header (names, shapes, offsets) kept: it opens."""
    data = path.read_bytes()
    header_end = 8 + int.from_bytes(data[:8], "little")
    path.write_bytes(data[:header_end] + b"\0" * (len(data) - header_end))


def _mark_agrees(folder: Path, name: str) -> None:
    """The completion mark edited to the file's new size and content, as if it had been written so."""
    import hashlib

    mark_path = folder / "checkpoint_complete.json"
    mark = json.loads(mark_path.read_text())
    mark["files"][name] = (folder / name).stat().st_size
    mark.setdefault("sha256", {})[name] = hashlib.sha256((folder / name).read_bytes()).hexdigest()
    mark_path.write_text(json.dumps(mark))


def _wrong_rng(run: Path) -> None:
    import torch

    torch.save({"rng": [{"seed": 1}], "data_loader": None}, run / "checkpoint-4" / "rng_state.pth")
    _mark_agrees(run / "checkpoint-4", "rng_state.pth")


def _mark_a_list(run: Path) -> None:
    (run / "checkpoint-4" / "checkpoint_complete.json").write_text("[1, 2, 3]")


def _cut_with_the_size_fixed_up(run: Path) -> None:
    """A file no check opens (the tokenizer), cut short, and the size in the mark fixed up to match."""
    folder = run / "checkpoint-4"
    tokenizer = folder / "tokenizer.json"
    tokenizer.write_bytes(tokenizer.read_bytes()[:-64])
    mark = json.loads((folder / "checkpoint_complete.json").read_text())
    mark["files"]["tokenizer.json"] = tokenizer.stat().st_size
    (folder / "checkpoint_complete.json").write_text(json.dumps(mark))


CONTENT_DAMAGE = {
    "zeroed-weights": lambda run: _zero_the_tensors(run / "checkpoint-4" / "model.safetensors"),
    "wrong-rng-content": _wrong_rng,
    "mark-not-an-object": _mark_a_list,
    "cut-with-size-fixed-up": _cut_with_the_size_fixed_up,
}


@pytest.mark.parametrize("damage", sorted(CONTENT_DAMAGE))
def test_damage_of_the_same_size_is_found_and_skipped(tiny_config, tmp_path, capsys, stop_at, damage):
    run = tmp_path / "run"
    settings = {"max_steps": 6, "save_steps": 2, "lr_scheduler_type": "cosine"}
    assert run_lmtune("train", tiny_config(**settings, callbacks=stop_at(4))) == 130
    CONTENT_DAMAGE[damage](run)
    capsys.readouterr()
    assert run_lmtune("checkpoints", run, "--verify", "--json") == 1
    problems = {e["step"]: e["problems"] for e in json.loads(capsys.readouterr().out)["checkpoints"]}
    assert problems[2] == [] and problems[4], problems
    assert run_lmtune("train", tiny_config(**settings)) == 0
    err = error_of(capsys)
    assert "skipping checkpoint-4" in err and "checkpoint-2 at step 2" in err
    straight = tmp_path / "straight"
    assert run_lmtune("train", tiny_config(**settings, output_dir=str(straight))) == 0
    assert_same_weights(straight, run)


def test_verify_names_a_changed_file_by_its_content(tiny_config, tmp_path, capsys):
    run = tmp_path / "run"
    assert run_lmtune("train", tiny_config(max_steps=2, save_steps=1)) == 0
    _zero_the_tensors(run / "checkpoint-1" / "model.safetensors")
    capsys.readouterr()
    assert run_lmtune("checkpoints", run, "--verify", "--json") == 1
    problems = {e["step"]: e["problems"] for e in json.loads(capsys.readouterr().out)["checkpoints"]}
    assert problems[2] == []
    assert any("model.safetensors" in p and "content" in p for p in problems[1])


def test_a_checkpoint_written_before_content_hashes_still_resumes(tiny_config, tmp_path, capsys, stop_at):
    run = tmp_path / "run"
    settings = {"max_steps": 4, "save_steps": 2}
    assert run_lmtune("train", tiny_config(**settings, callbacks=stop_at(2))) == 130
    mark_path = run / "checkpoint-2" / "checkpoint_complete.json"
    mark = json.loads(mark_path.read_text())
    assert set(mark["sha256"]) == set(mark["files"])  # every file has its hash
    del mark["sha256"]
    mark_path.write_text(json.dumps(mark))
    capsys.readouterr()
    assert run_lmtune("checkpoints", run, "--verify") == 0
    assert "no content hashes" in " ".join(capsys.readouterr().out.split())
    assert run_lmtune("train", tiny_config(**settings)) == 0
    assert "resuming from" in error_of(capsys)


def test_verify_of_a_deleted_run_folder_or_checkpoint_says_so(tiny_config, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    assert run_lmtune("train", tiny_config(max_steps=2, save_steps=1)) == 0
    shutil.rmtree(run / "checkpoint-1")
    capsys.readouterr()
    assert run_lmtune("checkpoints", run, "--verify", "--json") == 1
    problems = {e["step"]: e["problems"] for e in json.loads(capsys.readouterr().out)["checkpoints"]}
    assert any("deleted" in p for p in problems[1]), problems
    shutil.rmtree(run)
    assert run_lmtune("checkpoints", run, "--verify") == 2
    assert str(run) in error_of(capsys)


# --- 7. a finished run's final model is checked file by file --------------------------------------------


FINAL_DAMAGE = {
    "tokenizer-truncated": lambda run: (run / "tokenizer.json").write_text((run / "tokenizer.json").read_text()[:999]),
    "tokenizer-deleted": lambda run: (run / "tokenizer.json").unlink(),
    "chat-template-deleted": lambda run: (run / "chat_template.jinja").unlink(),
    "generation-config-garbage": lambda run: (run / "generation_config.json").write_text("garbage"),
}


@pytest.mark.parametrize("damage", sorted(FINAL_DAMAGE))
def test_a_finished_run_with_any_file_of_its_final_model_damaged_writes_it_again(tiny_config, tmp_path, capsys,
                                                                                  damage):
    run = tmp_path / "run"
    assert run_lmtune("train", tiny_config(max_steps=2)) == 0
    before = folder_hashes(run)
    FINAL_DAMAGE[damage](run)
    capsys.readouterr()
    assert run_lmtune("train", tiny_config(max_steps=2)) == 0
    assert "final model is not whole" in error_of(capsys)
    after = folder_hashes(run)
    model_files = [name for name in before if "/" not in name and name not in ("metrics.jsonl", "checkpoints.json")]
    assert {name: after.get(name) for name in model_files} == {name: before[name] for name in model_files}
    assert run_lmtune("chat", run, "--prompt", "What is 1 plus 1?", "--max-new-tokens", "4") == 0


# --- 8. a full disk during the final save ------------------------------------------------------------------


def test_a_full_disk_during_the_final_save_fails_cleanly_and_the_rerun_repairs_it(tiny_config, tmp_path, capsys,
                                                                                  monkeypatch):
    import transformers.modeling_utils

    run = tmp_path / "run"
    real_save = transformers.modeling_utils.safe_save_file

    def full_disk(tensors, filename, metadata=None):  # the final model's weights (a checkpoint's are lmtune's own)
        Path(filename).write_bytes(b"\0" * 1000)
        raise OSError(28, "No space left on device (simulated)")

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", full_disk)
    config = tiny_config(max_steps=2)
    capsys.readouterr()
    assert run_lmtune("train", config) == 1
    err = error_of(capsys)
    assert "failed: writing the final model" in err and "No space left on device" in err
    assert "the checkpoints written before are intact (newest: checkpoint-2)" in err
    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", real_save)
    assert run_lmtune("train", config) == 0
    assert "final model is not whole" in error_of(capsys)
    assert_same_weights(run, run / "checkpoint-2")
