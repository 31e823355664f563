"""End to end through the CLI on the tiny Llama: files, numbers, and the HF stack loading the result."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from conftest import EXAMPLES, read_jsonl, run_lmtune
from safetensors.torch import load_file


def test_loss_falls_and_run_folder_is_complete(tiny_config, tmp_path):
    config = tiny_config(num_train_epochs=6, learning_rate=1e-2)
    assert run_lmtune("train", config) == 0
    run = tmp_path / "run"
    for name in ("run_config.yaml", "metrics.jsonl", "checkpoints.json", "model.safetensors", "config.json",
                 "tokenizer.json"):
        assert (run / name).is_file(), name
    rows = [r for r in read_jsonl(run / "metrics.jsonl") if r["type"] == "train"]
    assert [r["step"] for r in rows] == list(range(1, 49))  # 32 rows / 4 per batch = 8 steps x 6 epochs
    first, last = rows[0]["loss"], sum(r["loss"] for r in rows[-8:]) / 8
    assert last < first * 0.6, (first, last)
    for key in ("epoch", "samples_seen", "tokens_seen", "lr", "grad_norm", "tokens_per_s", "eta_s", "mem_peak_mb"):
        assert key in rows[-1]
    assert rows[-1]["samples_seen"] == 32 * 6
    assert rows[-1]["epoch"] == pytest.approx(6.0)


def test_final_model_loads_with_transformers_alone(tiny_config, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert run_lmtune("train", tiny_config(max_steps=3)) == 0
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "run")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "run")
    output = model.generate(**tokenizer("What is 1 plus 1?", return_tensors="pt"), max_new_tokens=3)
    assert output.shape[1] > 0
    assert model.config.use_cache is True  # trained without a KV cache, saved to generate with one


def test_lora_adapter_loads_with_peft_alone(tiny_config, tmp_path, tiny_model_dir):
    from peft import AutoPeftModelForCausalLM

    assert run_lmtune("train", tiny_config(finetuning_type="lora", max_steps=3, lora_rank=4)) == 0
    run = tmp_path / "run"
    assert (run / "adapter_model.safetensors").is_file() and (run / "adapter_config.json").is_file()
    assert not (run / "model.safetensors").exists()
    model = AutoPeftModelForCausalLM.from_pretrained(run)
    lora_b = [v for k, v in load_file(run / "adapter_model.safetensors").items() if "lora_B" in k]
    assert lora_b and any(float(t.abs().sum()) > 0 for t in lora_b)  # the adapter learned something
    assert model.peft_config["default"].r == 4


def test_freeze_trains_only_the_last_layers(tiny_config, tmp_path, tiny_model_dir):
    before = load_file(tiny_model_dir / "model.safetensors")
    assert run_lmtune("train", tiny_config(finetuning_type="freeze", freeze_trainable_layers=1, max_steps=2)) == 0
    after = load_file(tmp_path / "run" / "model.safetensors")
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("model.layers.1.") for k in changed), changed


def _final_weights(run_dir):
    return load_file(run_dir / "model.safetensors")


def test_accumulation_4x1_equals_batch_4(tiny_config, tmp_path):
    common = dict(max_steps=3, learning_rate=1e-2, seed=7)
    assert run_lmtune("train", tiny_config(per_device_train_batch_size=4, output_dir=str(tmp_path / "a"),
                                           **common)) == 0
    assert run_lmtune("train", tiny_config(per_device_train_batch_size=1, gradient_accumulation_steps=4,
                                           output_dir=str(tmp_path / "b"), **common)) == 0
    losses_a = [r["loss"] for r in read_jsonl(tmp_path / "a" / "metrics.jsonl") if r["type"] == "train"]
    losses_b = [r["loss"] for r in read_jsonl(tmp_path / "b" / "metrics.jsonl") if r["type"] == "train"]
    assert losses_a == pytest.approx(losses_b, rel=1e-4)
    a, b = _final_weights(tmp_path / "a"), _final_weights(tmp_path / "b")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=3e-5)  # summation order: float noise


def test_eval_rows_and_loss_plot(tiny_config, tmp_path):
    assert run_lmtune("train", tiny_config(val_size=0.25, eval_steps=2, max_steps=4, plot_loss=True)) == 0
    evals = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if r["type"] == "eval"]
    assert [r["step"] for r in evals] == [2, 4]
    assert all(r["eval_loss"] > 0 for r in evals)
    assert (tmp_path / "run" / "loss.png").stat().st_size > 1000


def test_tensorboard_events_are_written(tiny_config, tmp_path):
    assert run_lmtune("train", tiny_config(max_steps=2, report_to="tensorboard")) == 0
    assert list((tmp_path / "run" / "runs").glob("events.out.tfevents.*"))


def test_user_callback_sees_every_step(tiny_config, tmp_path, monkeypatch):
    module = tmp_path / "my_callbacks.py"
    module.write_text(
        "import json\n"
        "class Recorder:\n"
        "    def on_step_end(self, state, metrics):\n"
        "        with open(state.output_dir / 'seen.txt', 'a') as f:\n"
        "            f.write(f'{state.step}\\n')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert run_lmtune("train", tiny_config(max_steps=3, callbacks=["my_callbacks:Recorder"])) == 0
    assert (tmp_path / "run" / "seen.txt").read_text().split() == ["1", "2", "3"]


def test_a_gguf_file_is_a_model_to_import_and_to_train(tiny_config, tiny_model_dir, tokenizer, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from lmtune.gguf_export import write_gguf

    original = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    (tmp_path / "gguf").mkdir()
    gguf = write_gguf(original, tokenizer, tmp_path / "gguf" / "tiny.gguf", "fp32")

    assert run_lmtune("model", "import", gguf, "--out", tmp_path / "imported") == 0
    imported = AutoModelForCausalLM.from_pretrained(tmp_path / "imported", dtype=torch.float32)
    expected = original.state_dict()
    for name, weights in imported.state_dict().items():
        torch.testing.assert_close(weights, expected[name], msg=name)
    capsys.readouterr()
    assert run_lmtune("model", "import", gguf, "--out", tmp_path / "imported") == 2  # never over a folder
    assert "not empty" in capsys.readouterr().err

    assert run_lmtune("train", tiny_config(model_name_or_path=str(gguf), max_steps=2)) == 0
    trained = load_file(tmp_path / "run" / "model.safetensors")
    assert set(trained) and not torch.equal(trained["model.norm.weight"], expected["model.norm.weight"])


def test_quiet_shows_only_warnings_and_log_level_is_the_same_choice(tiny_config, tmp_path, capsys):
    assert run_lmtune("train", tiny_config(max_steps=2), "-q") == 0
    quiet = capsys.readouterr().err
    assert "step 1/2" not in quiet and "INFO" not in quiet
    assert (tmp_path / "run" / "model.safetensors").is_file()
    assert run_lmtune("train", tiny_config(max_steps=2, log_level="warning", output_dir=str(tmp_path / "b"))) == 0
    assert "INFO" not in capsys.readouterr().err
    assert run_lmtune("train", tiny_config(max_steps=2, output_dir=str(tmp_path / "c"))) == 0
    assert "step 1/2" in capsys.readouterr().err


def test_two_processes_train_with_gloo(tiny_config, tmp_path):
    config = tiny_config(max_steps=3, dataloader_num_workers=0)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
               "-m", "lmtune", "train", str(config)]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if r["type"] == "train"]
    assert [r["step"] for r in rows] == [1, 2, 3]  # one process writes
    assert rows[-1]["samples_seen"] == 3 * 4 * 2  # two processes, batch 4 each
    assert (tmp_path / "run" / "model.safetensors").is_file()


@pytest.mark.slow
def test_real_smollm2_trains_a_few_steps(tmp_path):
    config = EXAMPLES / "quickstart.yaml"
    out = tmp_path / "quick"
    code = run_lmtune("train", config, f"output_dir={out}", "max_steps=2", "val_size=0", "evals_per_epoch=null",
                      "report_to=none", "saves_per_epoch=null", "logging_steps=1")
    assert code == 0
    rows = [r for r in read_jsonl(out / "metrics.jsonl") if r["type"] == "train"]
    assert [r["step"] for r in rows] == [1, 2] and all(r["loss"] > 0 for r in rows)
    assert (out / "adapter_model.safetensors").is_file()
