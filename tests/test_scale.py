"""Bigger models on the same engine: activation checkpointing and QLoRA (4-bit base weights)."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from conftest import read_jsonl, run_lmtune
from model_probes import BaseLayers, LayerCalls
from safetensors.torch import load_file


def losses_of(run) -> list[float]:
    return [r["loss"] for r in read_jsonl(run / "metrics.jsonl") if r["type"] == "train"]


@pytest.mark.parametrize("settings", [
    {"finetuning_type": "full"},
    {"finetuning_type": "lora", "lora_dropout": 0.3},
    {"finetuning_type": "freeze", "freeze_trainable_layers": 1},
], ids=["full", "lora-dropout", "freeze"])
def test_gradient_checkpointing_recomputes_the_layers_and_gives_the_same_losses(tiny_config, tmp_path, settings):
    plain, checkpointed = tmp_path / "plain", tmp_path / "checkpointed"
    common = {"max_steps": 4, "callbacks": ["model_probes:LayerCalls"], **settings}
    assert run_lmtune("train", tiny_config(output_dir=str(plain), **common)) == 0
    # one forward of each of the 2 layers a step (the first step also checks the loss against full logits)
    assert LayerCalls.per_step[1:] == [[1, 1]] * 3
    assert run_lmtune("train", tiny_config(output_dir=str(checkpointed), gradient_checkpointing=True, **common)) == 0
    # the backward pass runs each layer again: its activations were dropped
    assert LayerCalls.per_step[1:] == [[2, 2]] * 3
    assert losses_of(checkpointed) == pytest.approx(losses_of(plain), rel=1e-5)
    name = "adapter_model.safetensors" if settings["finetuning_type"] == "lora" else "model.safetensors"
    a, b = load_file(plain / name), load_file(checkpointed / name)
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6), key


@pytest.fixture(scope="session")
def wider_tiny_model(tmp_path_factory, tokenizer):
    """bitsandbytes quantises in blocks of 64: a random Llama 128 wide (the usual tiny one is 32)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny-llama-128")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_qlora_trains_resumes_and_exports_a_full_precision_model(tiny_config, tmp_path, wider_tiny_model):
    run = tmp_path / "run"
    config = tiny_config(model_name_or_path=str(wider_tiny_model), finetuning_type="lora", quantization_bit=4,
                         max_steps=6, save_steps=3, learning_rate=2e-2, gradient_checkpointing=True,
                         callbacks=["model_probes:BaseLayers"])
    assert run_lmtune("train", config) == 0
    # the layers under the adapter, as training ran them: bitsandbytes' 4-bit layers, their weights packed in bytes
    assert BaseLayers.classes == {"bitsandbytes.nn.modules.Linear4bit"} and BaseLayers.dtypes == {torch.uint8}
    assert (run / "adapter_model.safetensors").is_file() and not (run / "model.safetensors").exists()
    losses = losses_of(run)
    assert len(losses) == 6 and losses[-1] < losses[0]
    checkpoint = run / "checkpoint-3"
    assert (checkpoint / "adapter_model.safetensors").is_file() and not (checkpoint / "model.safetensors").exists()
    adapter = load_file(checkpoint / "adapter_model.safetensors")
    assert adapter and all("lora_" in key for key in adapter)  # the adapter only: the 4-bit base is not saved

    resumed = tmp_path / "resumed"
    resumed.mkdir()
    import shutil

    shutil.copytree(checkpoint, resumed / "checkpoint-3")
    resume = tiny_config(model_name_or_path=str(wider_tiny_model), finetuning_type="lora", quantization_bit=4,
                         max_steps=6, save_steps=3, learning_rate=2e-2, gradient_checkpointing=True,
                         output_dir=str(resumed))
    assert run_lmtune("train", resume) == 0
    assert losses_of(resumed) == losses[3:]

    out = tmp_path / "exported"
    assert run_lmtune("export", str(run), "--out", str(out)) == 0
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(type(m).__name__ != "Linear4bit" for m in model.modules())


def test_qlora_in_8_bits_trains_on_int8_base_layers(tiny_config, tmp_path, wider_tiny_model):
    run = tmp_path / "run"
    config = tiny_config(model_name_or_path=str(wider_tiny_model), finetuning_type="lora", quantization_bit=8,
                         max_steps=2, learning_rate=2e-2, callbacks=["model_probes:BaseLayers"])
    assert run_lmtune("train", config) == 0
    assert BaseLayers.classes == {"bitsandbytes.nn.modules.Linear8bitLt"} and BaseLayers.dtypes == {torch.int8}
    assert len(losses_of(run)) == 2
    adapter = load_file(run / "adapter_model.safetensors")
    assert adapter and all("lora_" in key for key in adapter) and not (run / "model.safetensors").exists()


def test_qlora_is_refused_for_full_fine_tuning(tiny_config, tmp_path, capsys):
    assert run_lmtune("train", tiny_config(finetuning_type="full", quantization_bit=4)) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "quantization_bit" in err and "set finetuning_type: lora" in err
    assert not (tmp_path / "run").exists()


def test_qlora_without_bitsandbytes_names_the_package(tiny_config, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if it were not installed
    assert run_lmtune("train", tiny_config(finetuning_type="lora", quantization_bit=4)) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "needs the bitsandbytes package" in err and "lmtune[qlora]" in err
    assert not (tmp_path / "run").exists()


def test_the_plan_estimates_the_memory_of_a_process(tiny_config, wider_tiny_model, capsys):
    def memory(**settings) -> dict:
        capsys.readouterr()
        assert run_lmtune("plan", tiny_config(model_name_or_path=str(wider_tiny_model), **settings), "--json") == 0
        return json.loads(capsys.readouterr().out)["memory"]

    from transformers import AutoModelForCausalLM

    parameters = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(wider_tiny_model).parameters())
    full = memory(finetuning_type="full")
    assert full["weights"] == full["gradients"] == 4 * parameters and full["optimizer"] == 8 * parameters
    lora = memory(finetuning_type="lora")
    assert lora["weights"] > 4 * parameters and 0 < lora["gradients"] < full["gradients"] / 10  # the adapter only
    qlora = memory(finetuning_type="lora", quantization_bit=4)
    assert qlora["weights"] < lora["weights"] and qlora["gradients"] == lora["gradients"]
    checkpointed = memory(finetuning_type="full", gradient_checkpointing=True)
    assert checkpointed["activations_per_token"] < full["activations_per_token"]  # 2 layers: one kept whole
    assert run_lmtune("plan", tiny_config(model_name_or_path=str(wider_tiny_model))) == 0
    assert "memory per process (estimate): weights" in " ".join(capsys.readouterr().out.split())
