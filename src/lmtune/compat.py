"""Keys brought from LLaMA-Factory and the Hugging Face `TrainingArguments` that are not lmtune keys.

Each has one of three treatments, in the one table below (the README's key table is this table):

- mapped: the same meaning in lmtune, written as lmtune keys (`warmup_ratio: 0.1` -> `warmup_steps: 0.1`);
- ignored: no effect in lmtune; accepted, and listed once when a run or a plan starts, with why;
- refused: something lmtune does another way, or not yet: exit 2 with a message that names the lmtune way.

Values of lmtune's own keys that come from those tools (`stage: kto`, `report_to: [wandb]`) are
checked in config.py with the key.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from lmtune.errors import UserError

NOT_YET = "not available in lmtune yet"


@dataclass(frozen=True)
class Treatment:
    kind: Literal["mapped", "ignored", "refused"]
    why: str
    # mapped: (value, all values) -> the lmtune keys it sets; may raise UserError for a value it cannot take
    apply: Callable[[Any, dict[str, Any]], dict[str, Any]] | None = None


def _warmup_ratio(value: Any, values: dict[str, Any]) -> dict[str, Any]:
    if not isinstance(value, int | float) or not 0 <= value < 1:
        raise UserError(f"warmup_ratio: {value!r} is not a fraction between 0 and 1 (lmtune: warmup_steps: 0.1)")
    if values.get("warmup_steps"):
        return {}  # as in TrainingArguments: a warmup_steps above 0 wins over warmup_ratio
    return {"warmup_steps": float(value)}


def _eval_strategy(value: Any, values: dict[str, Any]) -> dict[str, Any]:
    rules = [key for key in ("eval_steps", "eval_epochs", "evals_per_epoch", "eval_minutes") if values.get(key)]
    if value == "steps":
        # TrainingArguments evaluates every logging_steps when eval_steps is not given
        return {} if rules else {"eval_steps": values.get("logging_steps", 10)}
    if value == "epoch":
        return {} if rules else {"eval_epochs": 1.0}
    if value == "no":
        if rules:
            raise UserError(f"eval_strategy: no contradicts {', '.join(rules)}; remove one of them")
        return {}
    raise UserError(f"eval_strategy: {value!r} is not one of steps, epoch, no")


ADAMW_OPTIMIZERS = ("adamw_torch", "adamw_torch_fused", "adamw_hf", "adamw")


def _optim(value: Any, values: dict[str, Any]) -> dict[str, Any]:
    if value not in ADAMW_OPTIMIZERS:
        raise UserError(f"optim: {value!r}: lmtune trains with torch's AdamW only ({', '.join(ADAMW_OPTIMIZERS)} "
                        "are accepted); remove optim")
    return {}


def _fp16(value: Any, values: dict[str, Any]) -> dict[str, Any]:
    if value:
        raise UserError("fp16: true: lmtune trains in float32 or with bfloat16 autocast (fp16 needs loss "
                        "scaling, which lmtune does not do); set bf16: true instead")
    return {}


def _neat_packing(value: Any, values: dict[str, Any]) -> dict[str, Any]:
    return {"packing": True} if value else {}


FSDP_CONFIG_KEYS = {"offload_params": "fsdp_offload", "activation_checkpointing": "gradient_checkpointing"}


def _fsdp_config(value: Any, values: dict[str, Any]) -> dict[str, Any]:
    """The Hugging Face `fsdp_config` dict (keys with or without the `fsdp_` prefix): what lmtune has a key
    for is mapped; the rest (wrap policy, prefetching, state dict type) is how lmtune does it anyway."""
    if not isinstance(value, dict):
        raise UserError(f"fsdp_config: {value!r}: lmtune reads no FSDP config file; write its settings as lmtune "
                        "keys (fsdp: full_shard, fsdp_offload: true, gradient_checkpointing: true)")
    settings = {key.removeprefix("fsdp_"): setting for key, setting in value.items()}
    changes = {FSDP_CONFIG_KEYS[key]: bool(setting) for key, setting in settings.items()
               if key in FSDP_CONFIG_KEYS and setting}
    if settings.get("reshard_after_forward") is False and values.get("fsdp"):
        changes["fsdp"] = "shard_grad_op"
    return changes


DEEPSPEED_WAY = ("write the sharding as lmtune keys: fsdp: full_shard (ZeRO-3), shard_grad_op (ZeRO-2), "
                 "fsdp_offload: true (offload), and run `torchrun --nproc_per_node N -m lmtune train CONFIG`")


def _deepspeed(value: Any, values: dict[str, Any]) -> dict[str, Any]:
    """A DeepSpeed ZeRO config as lmtune's FSDP keys: ZeRO-3 shards weights, gradients and optimizer state
    (fsdp: full_shard), ZeRO-2 gradients and optimizer state (shard_grad_op), ZeRO-0/1 plain data parallel;
    CPU offload is fsdp_offload. The stage is read from the file, or from its name (ds_z3_offload_config.json)
    where the file is not on this machine, as with LLaMA-Factory's examples/deepspeed paths."""
    stage, offload = _zero_settings(str(value))
    if stage is None:
        raise UserError(f"deepspeed: {value!r}: no ZeRO stage in the file or its name; {DEEPSPEED_WAY}")
    changes: dict[str, Any] = {}
    if stage >= 2 and not values.get("fsdp"):
        changes["fsdp"] = "full_shard" if stage == 3 else "shard_grad_op"
    if offload and (changes.get("fsdp") or values.get("fsdp")):
        changes["fsdp_offload"] = True
    return changes


def _zero_settings(value: str) -> tuple[int | None, bool]:
    import json
    import re
    from pathlib import Path

    path = Path(value)
    if path.is_file():
        try:
            zero = json.loads(path.read_text()).get("zero_optimization", {})
        except (OSError, ValueError, AttributeError):
            raise UserError(f"deepspeed: {value}: not a readable DeepSpeed JSON config; {DEEPSPEED_WAY}") from None
        devices = [zero.get(key, {}).get("device") for key in ("offload_optimizer", "offload_param")
                   if isinstance(zero.get(key), dict)]
        return int(zero.get("stage", 0)), "cpu" in devices
    match = re.search(r"z(?:ero)?_?([0-3])", path.name)
    return (int(match.group(1)) if match else None), "offload" in path.name


def _pissa_convert(value: Any, values: dict[str, Any]) -> dict[str, Any]:
    if not value:
        raise UserError("pissa_convert: false: lmtune's final adapter applies to the unchanged base model (the "
                        "converted form, as transformers and PEFT load it); remove pissa_convert")
    return {}


def _refuse(message: str) -> Treatment:
    return Treatment("refused", message)


def _ignore(why: str) -> Treatment:
    return Treatment("ignored", why)


FOREIGN_KEYS: dict[str, Treatment] = {
    # mapped: the same meaning, as lmtune keys
    "warmup_ratio": Treatment("mapped", "warmup_steps as a fraction of the total steps", _warmup_ratio),
    "eval_strategy": Treatment("mapped", "steps: eval_steps (logging_steps when not given); epoch: eval_epochs 1",
                               _eval_strategy),
    "evaluation_strategy": Treatment("mapped", "the older name of eval_strategy", _eval_strategy),
    "optim": Treatment("mapped", "the AdamW variants are lmtune's optimizer (torch AdamW); others are refused",
                       _optim),
    "fp16": Treatment("mapped", "false is lmtune's default; true is refused: use bf16", _fp16),
    "neat_packing": Treatment("mapped", "packing: lmtune's packing never attends across examples", _neat_packing),
    "fsdp_config": Treatment("mapped", "offload_params: fsdp_offload; activation_checkpointing: "
                             "gradient_checkpointing; reshard_after_forward false: fsdp shard_grad_op; the rest is "
                             "how lmtune shards anyway (FSDP2, each decoder layer a unit)", _fsdp_config),
    # ignored: no effect in lmtune
    "do_train": _ignore("`lmtune train` trains; `lmtune plan` and `lmtune preview` look without training"),
    "do_eval": _ignore("lmtune evaluates by val_size / eval_dataset and the eval rules; `lmtune eval` measures a run"),
    "do_predict": _ignore("lmtune has no predict stage; `lmtune chat` and `lmtune eval` work on a run"),
    "logging_dir": _ignore("TensorBoard events go to output_dir/runs"),
    "logging_first_step": _ignore("lmtune logs every logging_steps from step logging_steps on"),
    "enable_liger_kernel": _ignore("lmtune uses the model's own kernels; the result is the same, only speed differs"),
    "use_unsloth": _ignore("lmtune uses the model's own kernels; the result is the same, only speed differs"),
    "ddp_find_unused_parameters": _ignore("accelerate's default for the model is used"),
    "remove_unused_columns": _ignore("lmtune keeps only the columns its format reads"),
    "include_num_input_tokens_seen": _ignore("metrics.jsonl always has tokens_seen"),
    "disable_tqdm": _ignore("the progress bar shows only on a terminal"),
    "dataloader_pin_memory": _ignore("lmtune pins host memory itself when it copies to a GPU"),
    "preprocessing_batch_size": _ignore("lmtune tokenises in batches of 256 rows"),
    "trust_remote_code_tokenizer": _ignore("trust_remote_code covers the tokenizer too"),
    # refused: lmtune does it another way, or not yet
    "deepspeed": Treatment("mapped", "mapped from DeepSpeed ZeRO-N: ZeRO-3 -> fsdp: full_shard, ZeRO-2 -> "
                           "shard_grad_op, ZeRO-0/1 -> plain data parallel, CPU offload -> fsdp_offload; run with "
                           "torchrun (on one process there is nothing to shard)", _deepspeed),
    "double_quantization": _ignore("4-bit QLoRA (quantization_bit: 4) always uses double quantisation"),
    "train_on_prompt": _refuse("lmtune trains the assistant replies only (the rule of SFT labels); for training "
                               "on whole texts use stage: pt; remove train_on_prompt"),
    "tokenized_path": _refuse("lmtune caches processed data itself under $LMTUNE_HOME/data, keyed by the files, "
                              "tokenizer and data keys; remove tokenized_path"),
    "push_to_hub": _refuse("lmtune does not upload; `lmtune export RUN --out DIR` writes a folder to upload"),
    "hub_model_id": _refuse("lmtune does not upload; `lmtune export RUN --out DIR` writes a folder to upload"),
    "neftune_noise_alpha": _refuse(f"NEFTune noise is {NOT_YET}; remove neftune_noise_alpha"),
    "pissa_convert": Treatment("mapped", "lmtune always converts a PiSSA run's final adapter to apply to the "
                               "unchanged base model; false is refused", _pissa_convert),
    "lr_scheduler_kwargs": _refuse("lmtune's schedules take no extra arguments; remove lr_scheduler_kwargs"),
    "disable_gradient_checkpointing": Treatment("mapped", "gradient_checkpointing: the opposite",
                                                lambda value, values: {"gradient_checkpointing": not value}),
    "use_v1_kernels": _ignore("lmtune uses the model's own kernels; the result is the same, only speed differs"),
    "fsdp_transformer_layer_cls_to_wrap": _ignore("lmtune's FSDP makes each decoder layer a unit, whatever its class"),
    "pure_bf16": _refuse("lmtune keeps float32 weights and trains with bfloat16 autocast: set bf16: true; "
                         "remove pure_bf16"),
    "predict_with_generate": _refuse("lmtune has no predict stage: `lmtune eval RUN` measures a run and "
                                     "`lmtune chat RUN` generates with it; remove predict_with_generate"),
    "ray_num_workers": _refuse("lmtune does not run on Ray: run `torchrun --nproc_per_node N -m lmtune train CONFIG` "
                               "on each machine; remove ray_num_workers"),
    "use_kt": _refuse("KTransformers (CPU-offloaded MoE experts) is not in lmtune: for less GPU memory use "
                      "quantization_bit: 4 or fsdp_offload: true; remove use_kt"),
    "mixture_of_depths": _refuse("mixture-of-depths conversion is not in lmtune; remove mixture_of_depths"),
    "use_llama_pro": _refuse("LLaMA Pro's added blocks are not in lmtune: finetuning_type: freeze with "
                             "freeze_trainable_layers trains the last layers; remove use_llama_pro"),
    "freeze_trainable_modules": _refuse("lmtune's finetuning_type: freeze trains whole decoder layers "
                                        "(freeze_trainable_layers); remove freeze_trainable_modules"),
}
# Families of keys with one answer: the key that switches the feature on, and its settings.
_FAMILIES = {
    ("use_galore", "galore_layerwise", "galore_rank", "galore_scale", "galore_target", "galore_update_interval",
     "galore_proj_type"): "GaLore is not in lmtune",
    ("use_apollo", "apollo_layerwise", "apollo_rank", "apollo_scale", "apollo_scale_type", "apollo_target",
     "apollo_update_interval", "apollo_proj", "apollo_proj_type", "apollo_scale_front"): "APOLLO is not in lmtune",
    ("use_badam", "badam_mode", "badam_switch_interval", "badam_switch_mode", "badam_verbose", "badam_start_block",
     "badam_update_ratio", "badam_mask_mode"): "BAdam is not in lmtune",
    ("use_adam_mini",): "Adam-mini is not in lmtune",
}
for _keys, _what in _FAMILIES.items():
    for _key in _keys:
        FOREIGN_KEYS[_key] = _refuse(
            f"{_what}: lmtune trains with torch's AdamW; for less optimizer memory train LoRA "
            f"(finetuning_type: lora) or shard it over processes (fsdp: full_shard); remove {_keys[0]}"
            + (f" and the {_keys[1].split('_')[0]}_* keys" if len(_keys) > 1 else ""))
_REFUSED_FAMILIES = {
    ("use_dft_loss", "use_asft_loss", "asft_alpha", "use_eaft_loss", "eaft_alpha"):
        "lmtune's SFT loss is the cross-entropy of the reply tokens (loss_type picks how it is averaged); remove {key}",
    ("oft_block_size", "oft_rank", "oft_target", "module_dropout", "create_oft"):
        "OFT adapters are not in lmtune: finetuning_type: lora (or freeze, full); remove {key}",
    ("image_max_pixels", "image_min_pixels", "video_max_pixels", "video_min_pixels", "video_fps", "video_maxlen",
     "freeze_vision_tower", "freeze_multi_modal_projector", "freeze_language_model", "audio_sampling_rate"):
        "lmtune trains text models on text: images, videos and audio are not supported; remove {key}",
    ("fp8", "fp8_backend", "fp8_enable_fsdp_float8_all_gather"):
        "FP8 training is not in lmtune (it needs a GPU with FP8 units, Hopper or newer, and torchao); on any GPU "
        "bf16: true trains with bfloat16 autocast; remove {key}",
    ("tensor_model_parallel_size", "pipeline_model_parallel_size", "expert_model_parallel_size", "sequence_parallel",
     "use_distributed_optimizer", "overlap_grad_reduce", "overlap_param_gather", "moe_grouped_gemm",
     "moe_token_dispatcher_type", "recompute_granularity", "apply_rope_fusion", "bias_activation_fusion"):
        "Megatron parallelism is not in lmtune: data parallel with `torchrun --nproc_per_node N`, and fsdp: "
        "full_shard to shard weights, gradients and optimizer state; remove {key}",
}
for _keys, _why in _REFUSED_FAMILIES.items():
    for _key in _keys:
        FOREIGN_KEYS[_key] = _refuse(_why.format(key=_key))


@dataclass
class Translated:
    values: dict[str, Any]  # only lmtune keys
    notes: list[str]  # "key: value -> what lmtune does", for the start of a run and of a plan


def translate(values: dict[str, Any], source: str) -> Translated:
    """The lmtune keys a config brought from another tool stands for; refused keys raise UserError."""
    own = {key: value for key, value in values.items() if key not in FOREIGN_KEYS}
    notes = []
    for key, value in values.items():
        treatment = FOREIGN_KEYS.get(key)
        if treatment is None:
            continue
        if treatment.kind == "refused":
            raise UserError(f"{source}: {key}: {treatment.why}")
        if treatment.kind == "ignored":
            notes.append(f"ignored {key}: {value!r}: {treatment.why}")
            continue
        try:
            changes = treatment.apply(value, values)
        except UserError as error:
            raise UserError(f"{source}: {error}") from None
        own.update(changes)
        shown = ", ".join(f"{k}: {v!r}" for k, v in changes.items()) or "nothing to change"
        origin = f" (mapped from DeepSpeed ZeRO-{_zero_settings(str(value))[0]})" if key == "deepspeed" else ""
        notes.append(f"mapped {key}: {value!r} -> {shown}{origin}")
    return Translated(own, notes)
