"""LLaMA-Factory's LoRA and optimizer keys: adapter_name_or_path, loraplus_lr_ratio, pissa_init and use_muon."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import run_lmtune
from safetensors.torch import load_file
from test_resume import assert_same_run, straight_and_resumed

from lmtune.config import build_config
from lmtune.errors import UserError
from lmtune.lr_schedule import build_scheduler, config_schedule
from lmtune.models import load_model
from lmtune.optimizers import build_optimizer


def tiny(tiny_model_dir, **values):
    return build_config({"model_name_or_path": str(tiny_model_dir), "finetuning_type": "lora", **values})


def lr_of(optimizer, parameter) -> float:
    return next(group["lr"] for group in optimizer.param_groups if any(p is parameter for p in group["params"]))


# --- adapter_name_or_path -----------------------------------------------------------------------


def test_a_run_from_an_existing_adapter_starts_from_its_weights_and_trains_them_on(tiny_config, tmp_path,
                                                                                   tiny_model_dir):
    first = tmp_path / "first"
    assert run_lmtune("train", tiny_config(finetuning_type="lora", lora_rank=4, max_steps=1,
                                           output_dir=str(first))) == 0
    trained = load_file(first / "adapter_model.safetensors")
    assert any(name.endswith("lora_B.weight") and value.abs().sum() > 0 for name, value in trained.items())

    # lora_rank 8 is the config's, rank 4 the adapter's: the adapter's own settings are used
    config = tiny(tiny_model_dir, adapter_name_or_path=str(first), lora_rank=8)
    model = load_model(str(tiny_model_dir), config)
    from peft import get_peft_model_state_dict

    start = get_peft_model_state_dict(model)
    assert start.keys() == trained.keys()
    assert all(torch.equal(start[name], trained[name]) for name in trained)
    assert all(p.requires_grad for name, p in model.named_parameters() if "lora_" in name)

    second = tmp_path / "second"
    assert run_lmtune("train", tiny_config(finetuning_type="lora", adapter_name_or_path=str(first), max_steps=1,
                                           output_dir=str(second))) == 0
    saved = json.loads((second / "adapter_config.json").read_text())
    assert saved["r"] == 4 and saved["base_model_name_or_path"] == str(tiny_model_dir)
    after = load_file(second / "adapter_model.safetensors")
    assert any(not torch.equal(after[name], trained[name]) for name in trained)

    # LLaMA-Factory's inference config (examples/inference/llama3_lora_sft.yaml) for chat and export
    from lmtune.chat import load_for_chat

    inference = tmp_path / "llama3_lora_sft.yaml"
    inference.write_text(f"model_name_or_path: {tiny_model_dir}\nadapter_name_or_path: {first}\n"
                         "template: llama3\ninfer_backend: huggingface\n")
    session = load_for_chat(str(inference))
    assert session.template == "llama3"
    loaded = get_peft_model_state_dict(session.model)
    assert all(torch.equal(loaded[name], trained[name]) for name in trained)
    assert run_lmtune("chat", inference, "--prompt", "hi", "--max-new-tokens", "2") == 0


def test_adapter_name_or_path_is_checked_before_anything_is_written(tiny_config, tmp_path):
    with pytest.raises(UserError, match="finetuning_type: lora"):
        build_config({"finetuning_type": "full", "adapter_name_or_path": "somewhere"})
    with pytest.raises(UserError, match="one adapter"):
        build_config({"adapter_name_or_path": "a,b"})
    run = tmp_path / "run"
    assert run_lmtune("train", tiny_config(finetuning_type="lora", adapter_name_or_path=str(tmp_path / "none"),
                                           output_dir=str(run))) == 2
    assert not run.exists()


# --- loraplus_lr_ratio --------------------------------------------------------------------------


def test_loraplus_trains_the_b_matrices_at_the_ratio_through_the_schedule_and_a_resume(tiny_model_dir):
    config = tiny(tiny_model_dir, loraplus_lr_ratio=16.0, learning_rate=1e-3, lr_scheduler_type="linear",
                  warmup_steps=0)
    model = load_model(str(tiny_model_dir), config)
    a, b = (next(p for name, p in model.named_parameters() if f"q_proj.{part}" in name) for part in ("lora_A",
                                                                                                     "lora_B"))
    optimizer = build_optimizer(model, config)
    build_scheduler(optimizer, config_schedule(config, 10), step=5)  # half way down the linear schedule
    assert lr_of(optimizer, a) == pytest.approx(5e-4)
    assert lr_of(optimizer, b) == pytest.approx(16 * 5e-4)

    assert lr_of(build_optimizer(model, config.model_copy(update={"loraplus_lr_ratio": None})), b) == \
        lr_of(build_optimizer(model, config.model_copy(update={"loraplus_lr_ratio": None})), a)  # LoRA: one rate


# --- pissa_init ---------------------------------------------------------------------------------


def test_a_pissa_run_starts_from_the_principal_part_and_saves_an_adapter_for_the_unchanged_base(
        tiny_config, tmp_path, tiny_model_dir):
    from lmtune.chat import load_model_for_inference
    from lmtune.checkpoint import read_state
    from lmtune.resume import ResumePoint, load_weights

    config = tiny(tiny_model_dir, pissa_init=True, pissa_iter=-1, lora_rank=4)
    model = load_model(str(tiny_model_dir), config)
    base = load_file(tiny_model_dir / "model.safetensors")
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.lora_B["default"].weight.abs().sum() > 0  # not LoRA's zero start
    assert not torch.equal(layer.base_layer.weight, base["model.layers.0.self_attn.q_proj.weight"])  # the residual

    run = tmp_path / "run"
    assert run_lmtune("train", tiny_config(finetuning_type="lora", pissa_init=True, pissa_iter=-1, lora_rank=4,
                                           pissa_convert=True, max_steps=2, learning_rate=1e-2,
                                           output_dir=str(run))) == 0
    assert json.loads((run / "adapter_config.json").read_text())["r"] == 8  # converted: rank doubled
    # the trained model: the residual base with the checkpoint's PiSSA adapter, as a resume rebuilds it
    torch.manual_seed(0)
    trained = load_model(str(tiny_model_dir), config).eval()
    load_weights(trained, ResumePoint(run / "checkpoint-2", read_state(run / "checkpoint-2")))
    shipped, _ = load_model_for_inference(str(run), device="cpu")  # the unchanged base + the final adapter
    ids = torch.tensor([[1, 20, 300, 4000, 50]])
    with torch.no_grad():
        torch.testing.assert_close(shipped(input_ids=ids).logits, trained(input_ids=ids).logits, atol=1e-4,
                                   rtol=1e-4)


def test_pissa_is_refused_where_the_base_weights_are_read_as_the_models_own():
    with pytest.raises(UserError, match="pissa_init: true with stage: dpo"):
        build_config({"pissa_init": True, "stage": "dpo"})
    with pytest.raises(UserError, match="pissa_convert: false"):
        build_config({"pissa_init": True, "pissa_convert": False})


# --- use_muon -----------------------------------------------------------------------------------


def test_use_muon_steps_the_hidden_matrices_with_torchs_muon_and_the_rest_with_adamw(tiny_model_dir):
    config = build_config({"model_name_or_path": str(tiny_model_dir), "finetuning_type": "full", "use_muon": True,
                           "learning_rate": 1e-2, "weight_decay": 0.1})
    model = load_model(str(tiny_model_dir), config)
    optimizer = build_optimizer(model, config)
    build_scheduler(optimizer, config_schedule(config, 10))
    matrix = model.model.layers[0].mlp.up_proj.weight
    embeddings = model.get_input_embeddings().weight
    before = {name: p.detach().clone() for name, p in (("matrix", matrix), ("embeddings", embeddings))}
    grads = {"matrix": torch.randn_like(matrix), "embeddings": torch.randn_like(embeddings)}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    matrix.grad, embeddings.grad = grads["matrix"].clone(), grads["embeddings"].clone()
    optimizer.step()

    expected = {}
    for name, kind in (("matrix", "muon"), ("embeddings", "adamw")):
        alone = torch.nn.Parameter(before[name].clone())
        alone.grad = grads[name].clone()
        step = torch.optim.Muon([alone], lr=1e-2, weight_decay=0.1, adjust_lr_fn="match_rms_adamw") \
            if kind == "muon" else torch.optim.AdamW([alone], lr=1e-2, weight_decay=0.1)
        step.step()
        expected[name] = alone.detach()
    torch.testing.assert_close(matrix.detach(), expected["matrix"])
    torch.testing.assert_close(embeddings.detach(), expected["embeddings"])


def test_a_resumed_muon_run_gives_the_same_losses_and_weights(tiny_config, tmp_path):
    straight, resumed = straight_and_resumed(tiny_config, tmp_path, 2, max_steps=3, finetuning_type="full",
                                             use_muon=True)
    assert_same_run(straight, resumed, 2)
