"""Keys brought from LLaMA-Factory and TrainingArguments: mapped, ignored with why, or refused naming the lmtune way."""

from __future__ import annotations

import json

import pytest
from conftest import run_lmtune

from lmtune.compat import FOREIGN_KEYS
from lmtune.config import build_config, nearest_key
from lmtune.errors import UserError


@pytest.mark.parametrize("given, expected", [
    ({"warmup_ratio": 0.1}, {"warmup_steps": 0.1}),
    ({"warmup_ratio": 0.1, "warmup_steps": 5}, {"warmup_steps": 5}),
    ({"eval_strategy": "steps", "logging_steps": 7}, {"eval_steps": 7}),
    ({"eval_strategy": "steps", "eval_steps": 3}, {"eval_steps": 3}),
    ({"evaluation_strategy": "epoch"}, {"eval_epochs": 1.0}),
    ({"eval_strategy": "no"}, {"eval_steps": None, "eval_epochs": None}),
    ({"optim": "adamw_torch"}, {}),
    ({"optim": "adamw_torch_fused"}, {}),
    ({"fp16": False, "bf16": True}, {"bf16": True}),
    ({"neat_packing": True}, {"packing": True}),
    ({"pissa_init": True, "pissa_convert": True}, {"pissa_init": True}),
    ({"fsdp": "full_shard", "fsdp_config": {"fsdp_offload_params": True, "fsdp_activation_checkpointing": True}},
     {"fsdp_offload": True, "gradient_checkpointing": True}),
    ({"resume_from_checkpoint": None}, {"resume_from_checkpoint": "auto"}),
    ({"report_to": ["tensorboard", "wandb"]}, {"trackers": ["tensorboard", "wandb"]}),
    ({"report_to": "none"}, {"trackers": []}),
    ({"overwrite_cache": True}, {"overwrite_cache": True}),
    ({"eval_dataset": "a,b"}, {"eval_datasets": ["a", "b"]}),
])
def test_mapped_keys_become_lmtune_keys(given, expected):
    config = build_config(given)
    for key, value in expected.items():
        assert getattr(config, key) == value, key
    for key in given:
        if key in FOREIGN_KEYS:
            assert any(note.startswith(f"mapped {key}:") for note in config.brought_key_notes)


IGNORED = ["do_train", "do_eval", "do_predict", "logging_dir", "logging_first_step",
           "enable_liger_kernel", "use_unsloth", "ddp_find_unused_parameters", "remove_unused_columns",
           "include_num_input_tokens_seen", "disable_tqdm", "dataloader_pin_memory", "preprocessing_batch_size",
           "trust_remote_code_tokenizer", "double_quantization", "use_v1_kernels",
           "fsdp_transformer_layer_cls_to_wrap"]
# The keys of LLaMA-Factory's examples lmtune refuses (tests/test_llamafactory_configs.py runs the examples)
LLAMAFACTORY_REFUSED = [
    "apollo_layerwise", "apollo_proj", "apollo_proj_type", "apollo_rank",
    "apollo_scale", "apollo_scale_front", "apollo_scale_type", "apollo_target", "apollo_update_interval",
    "apply_rope_fusion", "asft_alpha", "audio_sampling_rate", "badam_mask_mode", "badam_mode",
    "badam_start_block", "badam_switch_interval", "badam_switch_mode", "badam_update_ratio", "badam_verbose",
    "bias_activation_fusion", "create_oft", "eaft_alpha", "expert_model_parallel_size", "fp8", "fp8_backend",
    "fp8_enable_fsdp_float8_all_gather", "freeze_language_model", "freeze_multi_modal_projector",
    "freeze_trainable_modules", "freeze_vision_tower", "galore_layerwise", "galore_proj_type", "galore_rank",
    "galore_scale", "galore_target", "galore_update_interval", "image_max_pixels", "image_min_pixels",
    "mixture_of_depths", "module_dropout", "moe_grouped_gemm",
    "moe_token_dispatcher_type", "oft_block_size", "oft_rank", "oft_target", "overlap_grad_reduce",
    "overlap_param_gather", "pipeline_model_parallel_size", "predict_with_generate", "pure_bf16", "ray_num_workers",
    "recompute_granularity", "sequence_parallel",
    "tensor_model_parallel_size", "use_adam_mini", "use_apollo", "use_asft_loss", "use_badam", "use_dft_loss",
    "use_distributed_optimizer", "use_eaft_loss", "use_galore", "use_kt", "use_llama_pro", "video_fps",
    "video_max_pixels", "video_maxlen", "video_min_pixels",
]


@pytest.mark.parametrize("key", LLAMAFACTORY_REFUSED)
def test_each_refused_llamafactory_key_exits_naming_itself_and_what_to_do(key):
    with pytest.raises(UserError) as error:
        build_config({key: True}, "run.yaml")
    message = str(error.value)
    assert message.startswith(f"run.yaml: {key}: ") and ("remove" in message or "set " in message)


@pytest.mark.parametrize("key", IGNORED)
def test_ignored_keys_are_accepted_and_listed_with_why(key):
    config = build_config({key: True})
    notes = [note for note in config.brought_key_notes if note.startswith(f"ignored {key}: True: ")]
    assert len(notes) == 1 and len(notes[0]) > len(f"ignored {key}: True: ") + 10
    assert key not in config.to_yaml_dict()


@pytest.mark.parametrize("values, words", [
    ({"deepspeed": "my_deepspeed.json"}, ["deepspeed", "no ZeRO stage", "torchrun", "fsdp: full_shard"]),
    ({"stage": "ppo"}, ["stage ppo", "not available", "'pt', 'sft', 'dpo', 'kto', 'rm'"]),
    ({"stage": "orpo"}, ["stage orpo", "stage: dpo", "pref_loss: orpo"]),
    ({"stage": "dpo", "pref_loss": "simpo", "precompute_ref_log_probs": True}, ["precompute_ref_log_probs",
                                                                               "no reference"]),
    ({"stage": "dpo", "packing": True}, ["packing", "stage: dpo"]),
    ({"train_on_prompt": True}, ["train_on_prompt", "stage: pt"]),
    ({"tokenized_path": "cache"}, ["tokenized_path", "LMTUNE_HOME"]),
    ({"push_to_hub": True}, ["push_to_hub", "lmtune export"]),
    ({"hub_model_id": "me/model"}, ["hub_model_id", "lmtune export"]),
    ({"neftune_noise_alpha": 5}, ["neftune_noise_alpha", "not available"]),
    ({"lr_scheduler_kwargs": {"min_lr": 0}}, ["lr_scheduler_kwargs"]),
    ({"optim": "adamw_8bit"}, ["optim", "AdamW", "adamw_torch"]),
    ({"fp16": True}, ["fp16", "bf16: true"]),
    ({"warmup_ratio": 1.5}, ["warmup_ratio", "fraction"]),
    ({"eval_strategy": "no", "eval_steps": 5}, ["eval_strategy: no", "eval_steps"]),
    ({"report_to": "comet_ml"}, ["report_to", "comet_ml", "wandb", "mlflow"]),
    ({"report_to": ["none", "wandb"]}, ["none cannot be listed"]),
])
def test_refused_keys_name_the_lmtune_way(values, words):
    with pytest.raises(UserError) as error:
        build_config(values, "run.yaml")
    message = str(error.value)
    for word in words:
        assert word in message, message


def test_every_table_entry_is_covered_by_a_test():
    mapped = {"warmup_ratio", "eval_strategy", "evaluation_strategy", "optim", "fp16", "neat_packing", "fsdp_config",
              "deepspeed", "disable_gradient_checkpointing", "pissa_convert"}
    refused = {"train_on_prompt", "tokenized_path", "push_to_hub", "hub_model_id", "neftune_noise_alpha",
               "lr_scheduler_kwargs", *LLAMAFACTORY_REFUSED}
    assert {k for k, t in FOREIGN_KEYS.items() if t.kind == "mapped"} == mapped
    assert {k for k, t in FOREIGN_KEYS.items() if t.kind == "refused"} == refused
    assert {k for k, t in FOREIGN_KEYS.items() if t.kind == "ignored"} == set(IGNORED)


@pytest.mark.parametrize("typo, suggestion", [
    ("learnig_rate", "learning_rate"), ("do_trian", "do_train"), ("warmup_ration", "warmup_ratio"),
    ("lora_ranks", "lora_rank"), ("save_step", "save_steps"), ("dataset_di", "dataset_dir"),
])
def test_a_near_miss_suggests_the_key_meant(typo, suggestion):
    assert nearest_key(typo) == suggestion


@pytest.mark.parametrize("unrelated", ["xyz", "colour", "batch", "my_custom_flag", "colour_depth"])
def test_an_unrelated_key_suggests_nothing(unrelated):
    assert nearest_key(unrelated) is None


def test_an_unknown_key_without_a_near_miss_points_to_the_key_list(tiny_config, capsys):
    capsys.readouterr()
    assert run_lmtune("plan", tiny_config(my_custom_flag=1)) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "unknown key 'my_custom_flag'" in err and "did you mean" not in err and "--help-config" in err


def test_plan_prints_what_it_mapped_and_ignored_before_the_plan(tiny_config, capsys):
    config = tiny_config(do_train=True, logging_first_step=True, warmup_ratio=0.1, max_steps=4)
    capsys.readouterr()
    assert run_lmtune("plan", config) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("config: ")]
    assert any("ignored do_train" in line for line in lines)
    assert any("ignored logging_first_step" in line for line in lines)
    assert any("mapped warmup_ratio: 0.1 -> warmup_steps: 0.1" in line for line in lines)
    assert out.index("config: ") < out.index("optimizer steps")
    assert run_lmtune("plan", config, "--json") == 0
    notes = json.loads(capsys.readouterr().out)["brought_keys"]
    assert len(notes) == 3


def test_a_refused_key_exits_2_and_writes_nothing(tiny_config, tmp_path, capsys):
    capsys.readouterr()
    assert run_lmtune("train", tiny_config(ray_num_workers=4)) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "ray_num_workers" in err and "torchrun" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_the_readme_key_table_is_the_code_table():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    rows = {line.split("|")[1].strip().strip("`"): line.split("|")[2].strip()
            for line in readme.splitlines() if line.startswith("| `") and line.count("|") == 4}
    assert {key: t.kind for key, t in FOREIGN_KEYS.items()} == {key: rows.get(key) for key in FOREIGN_KEYS}


def test_load_best_model_at_end_makes_the_best_checkpoint_the_final_model(tiny_config, tmp_path, capsys):
    import torch
    from safetensors.torch import load_file

    run = tmp_path / "run"
    # the eval loss falls as the run trains: "best" as the highest one is an early checkpoint, never the last
    config = tiny_config(max_steps=8, val_size=8, eval_steps=2, save_steps=2, greater_is_better=True,
                         load_best_model_at_end=True)
    assert run_lmtune("train", config) == 0
    index = json.loads((run / "checkpoints.json").read_text())["checkpoints"]
    best = next(e for e in index if e["best"])
    assert index[0]["metrics"].get("eval_loss") is not None and best["step"] != 8
    final, chosen = load_file(run / "model.safetensors"), load_file(run / best["path"] / "model.safetensors")
    assert all(torch.equal(final[key], chosen[key]) for key in final)
    assert f"the final model is checkpoint-{best['step']}'s (best eval_loss)" in " ".join(
        capsys.readouterr().err.split())
