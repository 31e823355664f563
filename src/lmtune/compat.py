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
    "ddp_timeout": _ignore("lmtune keeps torch.distributed's default process-group timeout"),
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
    "deepspeed": _refuse("lmtune does not use DeepSpeed: data-parallel training runs with "
                         "`torchrun --nproc_per_node N -m lmtune train CONFIG`; for ZeRO-3-like sharding of weights, "
                         "gradients and optimizer state set fsdp: full_shard (ZeRO-2: shard_grad_op; offload: "
                         "fsdp_offload: true); remove deepspeed"),
    "double_quantization": _ignore("4-bit QLoRA (quantization_bit: 4) always uses double quantisation"),
    "train_on_prompt": _refuse("lmtune trains the assistant replies only (the rule of SFT labels); for training "
                               "on whole texts use stage: pt; remove train_on_prompt"),
    "tokenized_path": _refuse("lmtune caches processed data itself under $LMTUNE_HOME/data, keyed by the files, "
                              "tokenizer and data keys; remove tokenized_path"),
    "push_to_hub": _refuse("lmtune does not upload; `lmtune export RUN --out DIR` writes a folder to upload"),
    "hub_model_id": _refuse("lmtune does not upload; `lmtune export RUN --out DIR` writes a folder to upload"),
    "neftune_noise_alpha": _refuse(f"NEFTune noise is {NOT_YET}; remove neftune_noise_alpha"),
    "use_dora": _refuse(f"DoRA is {NOT_YET}; remove use_dora"),
    "use_rslora": _refuse(f"rsLoRA is {NOT_YET}; remove use_rslora"),
    "lr_scheduler_kwargs": _refuse("lmtune's schedules take no extra arguments; remove lr_scheduler_kwargs"),
}


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
        notes.append(f"mapped {key}: {value!r} -> {shown}")
    return Translated(own, notes)
