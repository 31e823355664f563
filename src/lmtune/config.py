"""Every config key: its type, default and help, YAML + `key=value` loading, cross-key checks.

Key names follow LLaMA-Factory and the Hugging Face `TrainingArguments` where the meaning is the
same, so that an existing config can be brought over.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable
from pathlib import Path
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from lmtune.compat import FOREIGN_KEYS, NOT_YET, translate
from lmtune.errors import UserError

BUILTIN_MODEL = "smollm2-135m-instruct"

# What a changed key means when a run is resumed (each field's `on_resume`):
RESUME_EFFECTS = {
    "neutral": "does not change what the next step computes (logging, saving, evaluation, workers)",
    "schedule": "the learning-rate schedule: applied only with resume_lr: config",
    "length": "the length of the run",
    "batch": "how a step's rows are split over micro-batches and processes: only the global batch changes them",
    "run": "what is trained: data, model, method or batches",
}


def on_resume(effect: str, *, data: bool = False, checkpoint_size: bool = False) -> dict[str, Any]:
    """A field's metadata: its effect on a resume (RESUME_EFFECTS), whether the tokenised data depend
    on it (the processed-data cache and the planner key on these), and whether it sizes a checkpoint."""
    assert effect in RESUME_EFFECTS, effect
    return {"on_resume": effect, "data": data, "checkpoint_size": checkpoint_size}


def field_meta(key: str) -> dict[str, Any]:
    return TrainConfig.model_fields[key].json_schema_extra or {}


def keys_where(meta: str, value: Any = True) -> list[str]:
    """Config keys whose metadata `meta` is `value`, in the config's order."""
    return [key for key in TrainConfig.model_fields if field_meta(key).get(meta) == value]


class SavePhase(BaseModel):
    """One phase of `save_schedule`: its own save rules until an epoch or a step."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    until_epoch: float | None = Field(None, gt=0, description="the phase ends at this epoch")
    until_step: int | None = Field(None, gt=0, description="the phase ends at this step")
    save_steps: int | None = Field(None, gt=0, description="save every N optimizer steps")
    save_epochs: float | None = Field(None, gt=0, description="save every X epochs (float)")
    saves_per_epoch: int | None = Field(None, gt=0, description="K evenly spaced saves per epoch")

    @field_validator("save_steps", mode="before")
    @classmethod
    def _whole_steps(cls, value: Any) -> Any:
        if isinstance(value, float) and not value.is_integer():
            raise ValueError(f"a float save_steps ({value}) is not a number of steps; "
                             f"for a fraction of an epoch use save_epochs: {value}")
        return value

    @model_validator(mode="after")
    def _one_end(self) -> SavePhase:
        if (self.until_epoch is None) == (self.until_step is None):
            raise ValueError("each save_schedule phase needs exactly one of until_epoch or until_step")
        return self


# what a dpo step and evaluation measure besides the loss (TRL's names)
PREFERENCE_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                      "logps/chosen", "logps/rejected")
# what a kto step measures (TRL's names): rewards and log-probabilities are means over the desirable or the
# undesirable examples, kl the estimate of the policy's KL divergence from the reference
KTO_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected", "kl")
# what an rm step measures: how often the chosen answer scores higher, and by how much
REWARD_METRICS = ("accuracy", "margin")
STAGE_METRICS = {"dpo": PREFERENCE_METRICS, "kto": KTO_METRICS, "rm": REWARD_METRICS}
PAIRED_STAGES = ("dpo", "rm")  # stages trained on preference pairs (ranking data)

GRPO_LOSS_TYPES = ("dapo", "grpo", "dr_grpo")

# report_to values and the package each needs (installed with `pip install 'lmtune[NAME]'`)
TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "swanlab": "swanlab", "none": None}


def _names(value: str | list[str] | None) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


class TrainConfig(BaseModel):
    """The whole run, one flat set of keys."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)  # .inf, .nan refused
    _brought_key_notes: list[str] = PrivateAttr(default_factory=list)

    # model
    model_name_or_path: str = Field(
        BUILTIN_MODEL, description=f"local HF folder, a .gguf file, or the built-in '{BUILTIN_MODEL}'",
        json_schema_extra=on_resume("run", data=True, checkpoint_size=True)
    )
    template: str | None = Field(
        None, description="chat template name (chatml, llama3, mistral, qwen, alpaca, ...); "
        "null uses the tokenizer's own chat template", json_schema_extra=on_resume("run", data=True)
    )
    enable_thinking: bool = Field(
        True, description="reasoning templates (qwen3, or a chat template that reads enable_thinking): true trains "
        "each reply's reasoning (an empty thought where it has none); false leaves reasoning out, the empty thought "
        "in the untrained prompt (LLaMA-Factory's meaning)", json_schema_extra=on_resume("run", data=True))
    trust_remote_code: bool = Field(False, description="allow code shipped with a model folder to run",
                                    json_schema_extra=on_resume("run", data=True))

    # method
    stage: Literal["pt", "sft", "dpo", "kto", "rm", "grpo"] = Field(
        "sft", description="pt: continued pre-training on text; sft: supervised; dpo: preference pairs "
        "(chosen / rejected answers); kto: answers marked desirable or undesirable (kto_tag); rm: a reward "
        "model (a scalar score head) trained on preference pairs; grpo: online RL, completions generated in "
        "the run and scored by reward_funcs", json_schema_extra=on_resume("run", data=True))
    finetuning_type: Literal["lora", "full", "freeze"] = Field("lora", description="what is trained",
                                                               json_schema_extra=on_resume("run", checkpoint_size=True))
    lora_rank: int = Field(8, gt=0, description="LoRA rank r", json_schema_extra=on_resume("run", checkpoint_size=True))
    lora_alpha: int | None = Field(None, gt=0, description="LoRA alpha; null means 2 x lora_rank",
                                   json_schema_extra=on_resume("run"))
    lora_dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the LoRA path",
                                json_schema_extra=on_resume("run"))
    lora_target: str | list[str] = Field(
        "all", description="'all' linear layers but the output head, or module names (list or comma separated)",
        json_schema_extra=on_resume("run", checkpoint_size=True)
    )
    use_dora: bool = Field(False, description="LoRA: DoRA, each weight's magnitude and direction adapted apart "
                           "(PEFT's use_dora)", json_schema_extra=on_resume("run", checkpoint_size=True))
    use_rslora: bool = Field(False, description="LoRA: rank-stabilised scaling lora_alpha / sqrt(lora_rank) instead "
                             "of lora_alpha / lora_rank (PEFT's use_rslora)", json_schema_extra=on_resume("run"))
    adapter_name_or_path: str | None = Field(
        None, description="LoRA: start from this adapter folder (a run, a checkpoint or a PEFT adapter) and train it "
        "on; its own rank, alpha and target modules are used", json_schema_extra=on_resume("run", checkpoint_size=True))
    loraplus_lr_ratio: float | None = Field(
        None, gt=0, description="LoRA+: LoRA's B matrices train at learning_rate x this ratio (PEFT's "
        "create_loraplus_optimizer); null: off", json_schema_extra=on_resume("run"))
    loraplus_lr_embedding: float = Field(1e-6, gt=0, description="LoRA+: the learning rate of LoRA on embedding "
                                         "layers", json_schema_extra=on_resume("run"))
    pissa_init: bool = Field(False, description="LoRA: PiSSA initialisation, the adapter starts from the weights' "
                             "principal singular vectors; the final adapter is converted to apply to the unchanged "
                             "base model", json_schema_extra=on_resume("run"))
    pissa_iter: int = Field(16, ge=-1, description="pissa_init: iterations of the fast (randomised) SVD; -1: the "
                            "full SVD", json_schema_extra=on_resume("run"))
    use_muon: bool = Field(False, description="train the hidden layers' weight matrices with torch's Muon optimizer "
                           "(AdamW for embeddings, the output head, norms and biases)",
                           json_schema_extra=on_resume("run"))
    freeze_trainable_layers: int = Field(
        2, description="finetuning_type freeze: train the last N decoder layers (negative: the first N)",
        json_schema_extra=on_resume("run", checkpoint_size=True)
    )
    quantization_bit: Literal[4, 8] | None = Field(
        None, description="QLoRA: load the base weights in 4 (NF4, double quantisation) or 8 bits with "
        "bitsandbytes and train LoRA on top", json_schema_extra=on_resume("run"))
    quantization_method: Literal["bnb"] = Field(
        "bnb", description="how the base weights are quantised: bnb (bitsandbytes)", json_schema_extra=on_resume("run"))

    moe_aux_loss_coef: float | None = Field(
        None, ge=0, description="mixture-of-experts families: train with the router's load-balancing loss, "
        "weighted by this (sets the model's router_aux_loss_coef and output_router_logits); null: the model's "
        "own setting", json_schema_extra=on_resume("run"))

    pref_beta: float = Field(0.1, gt=0, description="dpo, kto: the beta of the preference loss (how far the "
                             "model may move from the reference)", json_schema_extra=on_resume("run"))
    pref_loss: Literal["sigmoid", "ipo", "simpo", "orpo"] = Field(
        "sigmoid", description="dpo: sigmoid (DPO), ipo, or the reference-free simpo and orpo",
        json_schema_extra=on_resume("run"))
    pref_ftx: float = Field(0.0, ge=0, description="dpo, kto: weight of an SFT loss (mean over the chosen or "
                            "desirable answer's tokens) added to the preference loss",
                            json_schema_extra=on_resume("run"))
    kto_chosen_weight: float = Field(1.0, gt=0, description="kto: weight of the loss of a desirable example",
                                     json_schema_extra=on_resume("run"))
    kto_rejected_weight: float = Field(1.0, gt=0, description="kto: weight of the loss of an undesirable example",
                                       json_schema_extra=on_resume("run"))
    simpo_gamma: float = Field(0.5, description="pref_loss simpo: the target reward margin gamma",
                               json_schema_extra=on_resume("run"))
    precompute_ref_log_probs: bool = Field(
        False, description="dpo, kto with finetuning_type full / freeze: the reference log-probabilities computed once "
        "before training and kept with the processed data, instead of a frozen copy of the model in memory",
        json_schema_extra=on_resume("run"))

    # grpo (TRL's GRPOConfig names and meanings)
    reward_funcs: list[str] = Field(
        default_factory=list, description="grpo: reward functions, each 'path/to/file.py:function' or a built-in "
        "(math_answer, format, length); a completion's reward is their weighted sum",
        json_schema_extra=on_resume("run"))
    reward_weights: list[float] | None = Field(
        None, description="grpo: one weight per reward function; null: all 1", json_schema_extra=on_resume("run"))
    num_generations: int = Field(8, description="grpo: completions generated per prompt (the group)",
                                 json_schema_extra=on_resume("run"))
    max_prompt_length: int = Field(512, gt=0, description="grpo: longest prompt in tokens; a longer one is an error "
                                   "naming its row", json_schema_extra=on_resume("run", data=True))
    max_completion_length: int = Field(256, gt=0, description="grpo: most tokens generated per completion",
                                       json_schema_extra=on_resume("run"))
    temperature: float = Field(1.0, gt=0, description="grpo: sampling temperature of the generation",
                               json_schema_extra=on_resume("run"))
    top_p: float = Field(1.0, gt=0, le=1, description="grpo: nucleus sampling of the generation (1: off)",
                         json_schema_extra=on_resume("run"))
    top_k: int = Field(0, ge=0, description="grpo: sample among the k likeliest tokens (0: off)",
                       json_schema_extra=on_resume("run"))
    beta: float = Field(0.0, ge=0, description="grpo: weight of the KL penalty to the reference model (0: no "
                        "reference; LoRA: the base with the adapter off, full/freeze: a frozen copy)",
                        json_schema_extra=on_resume("run"))
    loss_type: str = Field("dapo", description="grpo: dapo (token mean over the step), grpo (mean of each "
                           "completion's token mean) or dr_grpo (token sum / max_completion_length)",
                           json_schema_extra=on_resume("run"))
    epsilon: float = Field(0.2, gt=0, description="grpo: the ratio is clipped to [1 - epsilon, 1 + epsilon_high]",
                           json_schema_extra=on_resume("run"))
    epsilon_high: float | None = Field(None, gt=0, description="grpo: upper clipping bound; null: epsilon",
                                       json_schema_extra=on_resume("run"))
    scale_rewards: Literal["group", "batch", "none"] = Field(
        "group", description="grpo: advantages divided by the std of the group's rewards, of the step's, or not "
        "at all", json_schema_extra=on_resume("run"))
    num_iterations: int = Field(1, gt=0, description="grpo: optimizer steps on each generated batch (mu)",
                                json_schema_extra=on_resume("run"))
    mask_truncated_completions: bool = Field(
        False, description="grpo: completions cut by max_completion_length train nothing",
        json_schema_extra=on_resume("run"))
    reward_answer_column: str = Field("answer", description="grpo, built-in reward math_answer: the column "
                                      "holding the correct answer", json_schema_extra=on_resume("run"))
    reward_format_regex: str = Field(
        r"^<think>.*?</think>\s*<answer>.*?</answer>$", description="grpo, built-in reward format: 1 when the "
        "whole completion matches this regex (dot matches newlines), else 0", json_schema_extra=on_resume("run"))
    reward_max_words: int = Field(50, gt=0, description="grpo, built-in reward length: 1 up to this many words, "
                                  "falling to 0 at twice as many", json_schema_extra=on_resume("run"))
    use_vllm: bool = Field(False, description="grpo: generate with vLLM (not available in lmtune yet; generation "
                           "runs in the training process)", json_schema_extra=on_resume("neutral"))

    # scale
    gradient_checkpointing: bool = Field(
        False, description="recompute each decoder layer's activations in the backward pass (non-reentrant): "
        "less memory, about a third more compute", json_schema_extra=on_resume("neutral"))
    fsdp: Literal["full_shard", "shard_grad_op", False] = Field(
        False, description="shard weights, gradients and AdamW state over the processes (FSDP2): full_shard "
        "gathers each decoder layer's weights for its forward and again for its backward, shard_grad_op keeps "
        "them gathered in between; false: each process holds the whole model (DDP)",
        json_schema_extra=on_resume("neutral"))
    fsdp_offload: bool = Field(False, description="with fsdp: keep the weights and AdamW state in CPU memory, "
                               "the GPU holds one layer at a time", json_schema_extra=on_resume("neutral"))
    ddp_timeout: int = Field(
        1800, gt=0, description="seconds a process waits for the others in a collective (a step's gradient "
        "all-reduce, a save, an evaluation) before the run stops with an error naming the operation and the "
        "process that stopped answering; preparing the data is not bound by it", json_schema_extra=on_resume("neutral"))
    flash_attn: Literal["auto", "disabled", "sdpa", "fa2"] = Field(
        "auto", description="attention kernel: auto (on a GPU, flash-attn or flex attention for padding-free and "
        "packed rows, else transformers' pick), disabled (eager), sdpa, fa2 (flash-attn)",
        json_schema_extra=on_resume("neutral"))
    torch_compile: bool = Field(False, description="compile each decoder layer with torch.compile (compiled on "
                                "the first step; faster steps on a GPU)", json_schema_extra=on_resume("neutral"))
    torch_compile_backend: str | None = Field(
        None, description="torch_compile: the torch.compile backend; null: inductor",
        json_schema_extra=on_resume("neutral"))

    # data
    dataset: str | list[str] | None = Field(
        None, description="names in dataset_dir/dataset_info.json, or file paths, comma separated",
        json_schema_extra=on_resume("run", data=True)
    )
    dataset_dir: str = Field("data", description="folder holding dataset_info.json and the data files",
                             json_schema_extra=on_resume("run", data=True))
    eval_dataset: str | list[str] | None = Field(
        None, description="data sets to evaluate on (names or paths, as dataset), instead of a val_size split",
        json_schema_extra=on_resume("run", data=True),
    )
    placeholders: dict[str, str] = Field(
        default_factory=dict, description="values for {{key}} placeholders in the data, e.g. "
        "{name: Lumi, author: Ada} for LLaMA-Factory's identity data", json_schema_extra=on_resume("run", data=True),
    )
    overwrite_cache: bool = Field(
        False, description="process the data again instead of reusing the cache",
        json_schema_extra=on_resume("neutral"),
    )
    cutoff_len: int = Field(1024, gt=0, description="longest tokenised example; longer ones are truncated",
                            json_schema_extra=on_resume("run", data=True))
    max_samples: int | None = Field(None, gt=0, description="use at most this many examples of each data set",
                                    json_schema_extra=on_resume("run", data=True))
    val_size: float = Field(
        0.0, ge=0, description="held-out eval data: a fraction (< 1) or a number of examples; "
        "with streaming, a number of rows: the first rows of the data", json_schema_extra=on_resume("run", data=True)
    )
    packing: bool | None = Field(
        None, description="pack examples into cutoff_len sequences; null: on for pt, off for sft",
        json_schema_extra=on_resume("run", data=True)
    )
    padding_free: bool | None = Field(
        None, description="micro-batches laid end to end in one row, no padding; null: on for sft, dpo and kto, "
        "off for pt and rm",
        json_schema_extra=on_resume("run"))
    streaming: bool = Field(False, description="read the data as a stream (needs max_steps, or num_samples hints)",
                            json_schema_extra=on_resume("run", data=True))
    buffer_size: int = Field(16384, gt=0, description="shuffle buffer of a streamed data set",
                             json_schema_extra=on_resume("run", data=True))
    mix_strategy: Literal["concat", "interleave_under", "interleave_over"] = Field(
        "concat", description="how several data sets are mixed", json_schema_extra=on_resume("run", data=True)
    )
    interleave_probs: list[float] | None = Field(
        None, description="sampling probabilities of the data sets when interleaving",
        json_schema_extra=on_resume("run", data=True)
    )
    preprocessing_num_workers: int | None = Field(
        None, gt=0, description="processes for tokenisation (datasets num_proc); null: one",
        json_schema_extra=on_resume("neutral")
    )
    dataloader_num_workers: int = Field(0, ge=0, description="worker processes of the data loader",
                                        json_schema_extra=on_resume("neutral"))
    preview_samples: int = Field(1, ge=0, description="processed examples printed when training starts",
                                 json_schema_extra=on_resume("neutral"))

    # optimisation
    learning_rate: float = Field(1e-4, gt=0, description="peak learning rate (AdamW)",
                                 json_schema_extra=on_resume("schedule"))
    num_train_epochs: float = Field(3.0, gt=0, description="epochs to train when max_steps is not set",
                                    json_schema_extra=on_resume("length"))
    max_steps: int | None = Field(
        None, description="optimizer steps to train; overrides num_train_epochs (-1 or null: unset)",
        json_schema_extra=on_resume("length")
    )
    per_device_train_batch_size: int = Field(4, gt=0, description="examples per micro-batch per process",
                                             json_schema_extra=on_resume("batch"))
    gradient_accumulation_steps: int = Field(1, gt=0, description="micro-batches per optimizer step",
                                             json_schema_extra=on_resume("batch"))
    lr_scheduler_type: Literal[
        "linear", "cosine", "constant", "constant_with_warmup", "polynomial", "inverse_sqrt",
        "cosine_with_restarts",
    ] = Field("cosine", description="learning rate schedule after warm-up", json_schema_extra=on_resume("schedule"))
    warmup_steps: float = Field(
        0, ge=0, description="warm-up steps (int), or a fraction of total steps (float < 1)",
        json_schema_extra=on_resume("schedule")
    )
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay", json_schema_extra=on_resume("run"))
    max_grad_norm: float = Field(1.0, ge=0, description="clip the gradient norm to this (0: no clipping)",
                                 json_schema_extra=on_resume("run"))
    seed: int = Field(42, description="seed of the data order, initialisation and dropout",
                      json_schema_extra=on_resume("run", data=True))
    bf16: bool = Field(False, description="train in bfloat16 mixed precision where the hardware has it",
                       json_schema_extra=on_resume("run"))

    # saving
    save_steps: int | None = Field(None, description="save every N optimizer steps (int)",
                                   json_schema_extra=on_resume("neutral"))
    save_epochs: float | None = Field(None, gt=0, description="save every X epochs, e.g. 0.25",
                                      json_schema_extra=on_resume("neutral"))
    saves_per_epoch: int | None = Field(None, gt=0, description="K evenly spaced saves in every epoch",
                                        json_schema_extra=on_resume("neutral"))
    save_minutes: float | None = Field(None, gt=0, description="save every M minutes of wall clock",
                                       json_schema_extra=on_resume("neutral"))
    save_strategy: Literal["steps", "epoch", "no"] | None = Field(
        None, description="for configs brought from elsewhere: epoch = save_epochs 1, no = final only",
        json_schema_extra=on_resume("neutral")
    )
    save_total_limit: int | None = Field(
        None, gt=0, description="keep at most this many checkpoints (+ the best); null keeps all",
        json_schema_extra=on_resume("neutral")
    )
    metric_for_best_model: str | None = Field(
        None, description="metric that marks the best checkpoint, e.g. eval_loss",
        json_schema_extra=on_resume("neutral")
    )
    greater_is_better: bool | None = Field(
        None, description="whether a higher metric_for_best_model is better; null: false for metrics ending in "
        "'loss', true otherwise", json_schema_extra=on_resume("neutral"))
    load_best_model_at_end: bool = Field(
        False, description="the final model is the best checkpoint's (by metric_for_best_model, eval_loss when "
        "unset), not the last step's", json_schema_extra=on_resume("neutral"))
    save_on_eval: bool = Field(False, description="save a checkpoint at every evaluation",
                               json_schema_extra=on_resume("neutral"))
    save_only_model: bool = Field(False, description="checkpoints without optimizer state (not resumable)",
                                  json_schema_extra=on_resume("neutral", checkpoint_size=True))
    save_schedule: list[SavePhase] | None = Field(
        None, description="phases, each with until_epoch or until_step and its own save rules",
        json_schema_extra=on_resume("neutral")
    )

    # evaluation
    eval_steps: int | None = Field(None, description="evaluate every N optimizer steps",
                                   json_schema_extra=on_resume("neutral"))
    eval_epochs: float | None = Field(None, gt=0, description="evaluate every X epochs",
                                      json_schema_extra=on_resume("neutral"))
    evals_per_epoch: int | None = Field(None, gt=0, description="K evenly spaced evaluations per epoch",
                                        json_schema_extra=on_resume("neutral"))
    eval_minutes: float | None = Field(None, gt=0, description="evaluate every M minutes",
                                       json_schema_extra=on_resume("neutral"))
    per_device_eval_batch_size: int = Field(8, gt=0, description="examples per eval batch per process",
                                            json_schema_extra=on_resume("neutral"))

    # resuming
    resume_from_checkpoint: str | bool = Field(
        "auto", description="auto (or null): newest complete checkpoint in output_dir; false: fresh; or a path",
        json_schema_extra=on_resume("neutral")
    )
    resume_lr: Literal["keep", "config"] = Field(
        "keep", description="on resume, keep the saved LR schedule or apply the config's from now on",
        json_schema_extra=on_resume("neutral")
    )
    overwrite_output_dir: bool = Field(False, description="start fresh in an output_dir that holds a run",
                                       json_schema_extra=on_resume("neutral"))

    # logging
    output_dir: str = Field("out", description="folder of the run: checkpoints, metrics, final model",
                            json_schema_extra=on_resume("neutral"))
    logging_steps: int = Field(10, gt=0, description="log the loss every N optimizer steps",
                               json_schema_extra=on_resume("neutral"))
    report_to: str | list[str] = Field(
        "tensorboard", description="tensorboard, wandb, mlflow, swanlab or none; a list (or comma separated) "
        "for several", json_schema_extra=on_resume("neutral"),
    )
    run_name: str | None = Field(
        None, description="the run's name in W&B, MLflow or SwanLab; null: the name of output_dir",
        json_schema_extra=on_resume("neutral"),
    )
    plot_loss: bool = Field(True, description="write loss.png at the end of the run",
                            json_schema_extra=on_resume("neutral"))
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="terminal verbosity",
                                                                    json_schema_extra=on_resume("neutral"))

    # extension
    callbacks: list[str] = Field(
        default_factory=list, description="import paths of callback classes, e.g. mypkg.cbs:MyCallback",
        json_schema_extra=on_resume("neutral")
    )

    @field_validator("max_steps", mode="before")
    @classmethod
    def _unset_max_steps(cls, value: Any) -> Any:
        return None if value in (-1, "-1") else value

    @field_validator("save_steps", "eval_steps", mode="before")
    @classmethod
    def _whole_steps(cls, value: Any, info) -> Any:
        if isinstance(value, float) and not value.is_integer():
            hint = "save_epochs" if info.field_name == "save_steps" else "eval_epochs"
            raise ValueError(
                f"a float {info.field_name} ({value}) is not a number of steps; "
                f"for a fraction of an epoch use {hint}: {value}"
            )
        return value

    @field_validator("stage", mode="before")
    @classmethod
    def _stage_not_yet(cls, value: Any) -> Any:
        if value in ("orpo", "simpo"):
            raise ValueError(f"stage {value}: lmtune trains it as stage: dpo with pref_loss: {value}")
        if value == "ppo":
            raise ValueError(f"stage ppo is {NOT_YET}; valid: 'pt', 'sft', 'dpo', 'kto', 'rm', 'grpo'")
        return value

    @field_validator("scale_rewards", mode="before")
    @classmethod
    def _scale_rewards_bool(cls, value: Any) -> Any:
        """TRL's older form: true is group, false is none."""
        return {True: "group", False: "none"}.get(value, value) if isinstance(value, bool) else value

    @field_validator("reward_funcs", mode="before")
    @classmethod
    def _reward_list(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return [] if value is None else value

    @field_validator("report_to", mode="after")
    @classmethod
    def _trackers(cls, value: Any) -> Any:
        names = [value] if isinstance(value, str) else list(value)
        names = [name.strip() for item in names for name in item.split(",") if name.strip()]
        unknown = [name for name in names if name not in TRACKERS]
        if unknown:
            raise ValueError(f"{', '.join(map(repr, unknown))} is not a tracker; valid: {', '.join(TRACKERS)}")
        if "none" in names and len(names) > 1:
            raise ValueError("none cannot be listed with other trackers")
        for name in names:
            package = TRACKERS[name]
            if package is not None and importlib.util.find_spec(package) is None:
                raise ValueError(f"{name} needs the {package} package, which is not installed: "
                                 f"pip install 'lmtune[{name}]' (or set report_to: none)")
        return names[0] if len(names) == 1 else names

    @field_validator("lora_target", "dataset", "eval_dataset", mode="before")
    @classmethod
    def _split_commas(cls, value: Any) -> Any:
        if isinstance(value, str) and "," in value:
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("interleave_probs", mode="before")
    @classmethod
    def _probabilities(cls, value: Any) -> Any:
        if isinstance(value, str):
            try:
                return [float(part) for part in value.split(",") if part.strip()]
            except ValueError:
                raise ValueError(f"'{value}' is not a comma separated list of numbers, e.g. 0.7,0.3") from None
        return value

    @field_validator("resume_from_checkpoint", mode="before")
    @classmethod
    def _resume_value(cls, value: Any) -> Any:
        # null is "auto", as in LLaMA-Factory: the newest checkpoint unless overwrite_output_dir is set
        if value is None or value is True:
            return "auto"
        if isinstance(value, str) and value.lower() in ("false", "no", "none"):
            return False
        return value

    @model_validator(mode="before")
    @classmethod
    def _fsdp_words(cls, values: Any) -> Any:
        """The Hugging Face forms of fsdp: true, "full_shard auto_wrap", "shard_grad_op offload", "no_shard"."""
        if not isinstance(values, dict) or "fsdp" not in values:
            return values
        value = values["fsdp"]
        if value is True:
            return {**values, "fsdp": "full_shard"}
        if value is None or value is False:
            return {**values, "fsdp": False}
        if not isinstance(value, str):
            return values
        words = value.replace(",", " ").lower().split()
        unknown = [w for w in words if w not in ("full_shard", "shard_grad_op", "no_shard", "offload", "auto_wrap",
                                                 "false", "no")]
        modes = [w for w in words if w in ("full_shard", "shard_grad_op")]
        if unknown or len(modes) > 1:
            raise ValueError(f"fsdp: {value!r}: valid: full_shard, shard_grad_op or false, with Hugging Face's "
                             "'offload' and 'auto_wrap' words accepted (lmtune always wraps each decoder layer)"
                             + (f"; {', '.join(unknown)} is not available in lmtune" if unknown else ""))
        values = {**values, "fsdp": modes[0] if modes else False}
        if "offload" in words:
            if values.get("fsdp_offload") is False:
                raise ValueError(f"fsdp: {value!r} asks for offload and fsdp_offload is false; keep one of them")
            values["fsdp_offload"] = True
        return values

    @model_validator(mode="before")
    @classmethod
    def _best_metric_for_load_best(cls, values: Any) -> Any:
        """As in the Hugging Face Trainer: load_best_model_at_end without a metric means eval_loss, and a
        metric named without its `eval_` prefix means the evaluation's."""
        if not isinstance(values, dict):
            return values
        metric = values.get("metric_for_best_model")
        if values.get("load_best_model_at_end") and not metric:
            values = {**values, "metric_for_best_model": "eval_loss"}
        elif isinstance(metric, str) and metric and not metric.startswith("eval_"):
            values = {**values, "metric_for_best_model": f"eval_{metric}"}
        return values

    @model_validator(mode="after")
    def _best_metric_is_measured(self) -> TrainConfig:
        metric = self.metric_for_best_model
        if metric is not None and metric not in self.eval_metrics:
            raise ValueError(f"metric_for_best_model: {metric!r} is not a metric an evaluation of stage "
                             f"{self.stage} writes (it would never mark a checkpoint best); valid: "
                             f"{', '.join(self.eval_metrics)}")
        return self

    @model_validator(mode="after")
    def _save_checks(self) -> TrainConfig:
        if self.save_strategy == "no":
            others = [key for key in ("save_steps", "save_epochs", "saves_per_epoch", "save_minutes", "save_schedule",
                                      "metric_for_best_model") if getattr(self, key) is not None]
            others += ["save_on_eval"] if self.save_on_eval else []
            if others:
                raise ValueError(f"save_strategy: no (only the final save) contradicts {', '.join(others)}; "
                                 "remove save_strategy or " + (" and ".join(others)))
        return self

    @model_validator(mode="after")
    def _cross_checks(self) -> TrainConfig:
        if self.quantization_bit is not None and self.finetuning_type != "lora":
            raise ValueError(f"quantization_bit: {self.quantization_bit} trains LoRA on quantised base weights "
                             f"(QLoRA); finetuning_type {self.finetuning_type} would train the quantised weights "
                             "themselves: set finetuning_type: lora, or remove quantization_bit")
        lora_only = [key for key in ("use_dora", "use_rslora", "adapter_name_or_path", "loraplus_lr_ratio",
                                     "pissa_init") if getattr(self, key)]
        if lora_only and self.finetuning_type != "lora":
            raise ValueError(f"{', '.join(lora_only)} change LoRA adapters; finetuning_type {self.finetuning_type} "
                             "trains none: set finetuning_type: lora, or remove " + " and ".join(lora_only))
        if self.pissa_init:
            self._pissa_checks()
        if self.adapter_name_or_path is not None and "," in self.adapter_name_or_path:
            raise ValueError(f"adapter_name_or_path: {self.adapter_name_or_path!r}: lmtune starts from one adapter; "
                             "merge the others into a model folder first (`lmtune export RUN --out DIR`, given as "
                             "model_name_or_path)")
        if self.use_muon and (self.fsdp or self.loraplus_lr_ratio is not None):
            raise ValueError(f"use_muon with {'fsdp' if self.fsdp else 'loraplus_lr_ratio'}: " + (
                f"Muon on sharded weights is {NOT_YET}" if self.fsdp else "LoRA+ sets AdamW's learning rates")
                + "; remove one of them")
        if self.fsdp_offload and not self.fsdp:
            raise ValueError("fsdp_offload moves sharded weights to the CPU and fsdp is false: set fsdp: full_shard, "
                             "or remove fsdp_offload")
        if self.fsdp and self.quantization_bit is not None:
            raise ValueError(f"fsdp with quantization_bit (QLoRA) is {NOT_YET}: QLoRA fits a model on one device; "
                             "remove fsdp or quantization_bit")
        if self.flash_attn == "fa2" and self.use_packing and not self.use_padding_free:
            raise ValueError("flash_attn: fa2 keeps packed examples apart only in padding-free micro-batches: set "
                             "padding_free: true, or flash_attn: auto")
        if self.max_steps is not None and self.max_steps <= 0:
            raise ValueError("max_steps must be a positive number of steps (or -1 / null for unset)")
        for key in ("save_steps", "eval_steps"):
            value = getattr(self, key)
            if value is not None and value <= 0:
                raise ValueError(f"{key} must be a positive number of steps")
        if self.eval_dataset is not None and self.val_size:
            raise ValueError("eval_dataset and val_size both name the eval data; keep one of them")
        if self.eval_dataset is not None and self.streaming:
            raise ValueError("eval_dataset is not read as a stream; with streaming: true, val_size: N holds out "
                             "the first N rows for evaluation")
        if self.warmup_steps >= 1 and not float(self.warmup_steps).is_integer():
            raise ValueError("warmup_steps is a whole number of steps, or a fraction < 1 of the total steps")
        if self.val_size >= 1 and not float(self.val_size).is_integer():
            raise ValueError(f"val_size {self.val_size:g} is neither a fraction < 1 of the data nor a whole number "
                             "of examples: write e.g. 0.15 or 150")
        probs, datasets = self.interleave_probs, self.datasets
        if probs is not None and datasets and self.mix_strategy != "concat" and len(probs) != len(datasets):
            raise ValueError(f"interleave_probs has {len(probs)} values for {len(datasets)} data sets "
                             f"({', '.join(datasets)}); give one probability a data set")
        if self.stage in ("dpo", "kto", "rm"):
            self._preference_checks()
        if self.stage == "grpo":
            self._grpo_checks()
        return self  # streaming without max_steps is refused where the file sizes can suggest a value

    def _pissa_checks(self) -> None:
        """PiSSA moves the weights' principal part from the base weights into the adapter: what reads the base
        weights as the model's own cannot take it."""
        clashes = {
            "quantization_bit": (self.quantization_bit is not None, "PiSSA rewrites the base weights, which QLoRA "
                                 "holds quantised"),
            "adapter_name_or_path": (self.adapter_name_or_path is not None, "an existing adapter has its own "
                                     "initialisation"),
            "fsdp": (bool(self.fsdp), f"PiSSA with sharded weights is {NOT_YET}"),
            f"stage: {self.stage}": (self.uses_reference, "the reference is the base model with the adapter off, "
                                     "which PiSSA has changed"),
        }
        for key, (clash, why) in clashes.items():
            if clash:
                raise ValueError(f"pissa_init: true with {key}: {why}; remove pissa_init")

    def _preference_checks(self) -> None:
        stage = self.stage
        if self.packing:
            raise ValueError(f"packing: true with stage: {stage}: a preference example is trained as its own "
                             "sequences, never packed with others; remove packing")
        if self.streaming:
            raise ValueError(f"streaming: true with stage: {stage}: streamed preference data is {NOT_YET}; "
                             "remove streaming (map-style data is cached after the first run)")
        if stage == "kto" and self.pref_loss != "sigmoid":
            raise ValueError(f"pref_loss: {self.pref_loss} with stage: kto: kto has its own loss (KTO's, with the "
                             "KL estimate); remove pref_loss")
        if stage == "rm" and self.padding_free:
            raise ValueError("padding_free: true with stage: rm: a reward model scores each sequence at its last "
                             "token, so each sequence is its own padded row; remove padding_free")
        if self.precompute_ref_log_probs and not self.uses_reference:
            what = "stage: rm" if stage == "rm" else f"pref_loss: {self.pref_loss}"
            raise ValueError(f"precompute_ref_log_probs: true with {what}, which needs no reference model; "
                             "remove precompute_ref_log_probs")

    def _grpo_checks(self) -> None:
        if self.loss_type not in GRPO_LOSS_TYPES:
            others = "; TRL's bnpo, cispo, sapo, luspo and vespo are " + NOT_YET if self.loss_type in (
                "bnpo", "cispo", "sapo", "luspo", "vespo") else ""
            raise ValueError(f"loss_type {self.loss_type!r}: valid: {', '.join(GRPO_LOSS_TYPES)}{others}")
        if self.use_vllm:
            raise ValueError(f"use_vllm: true: generation with vLLM is {NOT_YET}; completions are generated in the "
                             "training process with transformers; remove use_vllm")
        if self.num_generations < 2:
            raise ValueError(f"num_generations {self.num_generations}: a completion's advantage is its reward minus "
                             "its group's mean, so a group of one learns nothing; use 2 or more (TRL's default 8)")
        if not self.reward_funcs:
            raise ValueError("stage grpo needs reward_funcs: a list of 'path/to/file.py:function' or the built-ins "
                             "math_answer, format, length")
        if self.reward_weights is not None and len(self.reward_weights) != len(self.reward_funcs):
            raise ValueError(f"reward_weights has {len(self.reward_weights)} values for {len(self.reward_funcs)} "
                             "reward_funcs; give one weight a function")
        refused = {"packing": self.packing, "streaming": self.streaming, "val_size": self.val_size,
                   "eval_dataset": self.eval_dataset, "precompute_ref_log_probs": self.precompute_ref_log_probs}
        for key, value in refused.items():
            if value:
                raise ValueError(f"{key} with stage: grpo is {NOT_YET} (grpo trains on prompts, map-style, without "
                                 f"an evaluation split); remove {key}")

    # --- derived values -------------------------------------------------------------------------

    @property
    def datasets(self) -> list[str]:
        return _names(self.dataset)

    @property
    def eval_datasets(self) -> list[str]:
        return _names(self.eval_dataset)

    @property
    def trackers(self) -> list[str]:
        names = [self.report_to] if isinstance(self.report_to, str) else self.report_to
        return [name for name in names if name != "none"]

    @property
    def brought_key_notes(self) -> list[str]:
        """What lmtune made of the keys brought from LLaMA-Factory or TrainingArguments (mapped, ignored)."""
        return list(self._brought_key_notes)

    @property
    def eval_metrics(self) -> tuple[str, ...]:
        """The metrics of an eval row of metrics.jsonl."""
        measured = STAGE_METRICS.get(self.stage, ())
        return ("eval_loss", *(f"eval_{name}" for name in measured))

    @property
    def best_is_greater(self) -> bool:
        if self.greater_is_better is not None:
            return self.greater_is_better
        return not (self.metric_for_best_model or "loss").endswith("loss")

    @property
    def use_packing(self) -> bool:
        return self.stage == "pt" if self.packing is None else self.packing

    @property
    def use_padding_free(self) -> bool:
        return self.stage in ("sft", "dpo", "kto", "grpo") if self.padding_free is None else self.padding_free

    @property
    def sample_name(self) -> str:
        """What one training row is: a preference pair, a packed row, or an example."""
        if self.stage == "grpo":
            return "prompts"
        return "pairs" if self.stage in PAIRED_STAGES else "packed rows" if self.use_packing else "examples"

    @property
    def uses_reference(self) -> bool:
        """Whether the loss compares the model with a reference (kto does; simpo and orpo need none; grpo with
        beta > 0)."""
        if self.stage == "grpo":
            return self.beta > 0
        return (self.stage == "dpo" and self.pref_loss in ("sigmoid", "ipo")) or self.stage == "kto"

    @property
    def effective_lora_alpha(self) -> int:
        return self.lora_alpha if self.lora_alpha is not None else 2 * self.lora_rank

    def warmup_for(self, total_steps: int) -> int:
        if self.warmup_steps < 1:
            return int(round(self.warmup_steps * total_steps))
        return int(self.warmup_steps)

    def to_yaml_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


# --- loading ----------------------------------------------------------------------------------


def parse_override(text: str) -> tuple[str, Any]:
    """`key=value` from the command line; the value is read as YAML (numbers, lists, null)."""
    if "=" not in text:
        raise UserError(f"'{text}' is not a key=value override (for example: learning_rate=2e-4)")
    key, raw = text.split("=", 1)
    try:
        value = load_yaml(raw, f"command line: {key.strip()}") if raw != "" else None
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


MAX_YAML_VALUES = 100_000  # a config holds hundreds; an alias bomb ("billion laughs") expands to billions


def load_yaml(text: str, source: str) -> Any:
    """YAML as `yaml.safe_load` reads it, refused (UserError) when its aliases expand it beyond
    MAX_YAML_VALUES values: what reads the result (validation, its messages) would walk every copy."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_size(node, {}) > MAX_YAML_VALUES:
            raise UserError(f"{source}: its aliases (*name) expand it to more than {MAX_YAML_VALUES:,} values; "
                            "refused as an alias bomb: write the values out")
        return loader.construct_document(node)
    except RecursionError:
        raise UserError(f"{source}: nested too deeply to be a config") from None
    finally:
        loader.dispose()


def _expanded_size(node: yaml.Node, sizes: dict[int, int]) -> int:
    """The number of values `node` stands for with every alias written out (a shared node once per use)."""
    if id(node) not in sizes:
        sizes[id(node)] = 1  # a node that holds itself counts once
        children = node.value if isinstance(node, yaml.SequenceNode) else \
            [part for pair in node.value for part in pair] if isinstance(node, yaml.MappingNode) else []
        sizes[id(node)] = 1 + sum(_expanded_size(child, sizes) for child in children)
    return sizes[id(node)]


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance: insertions, deletions and substitutions that turn a into b."""
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, start=1):
        current = [i]
        for j, char_b in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b)))
        previous = current
    return previous[-1]


def nearest_key(key: str, taken: Iterable[str] = ()) -> str | None:
    """A real near miss: a key lmtune takes (its own, or one it maps or ignores; not a refused one, nor one of
    `taken`, which the config already sets) a few edits away (a third of the key's length at most), else None."""
    known = [name for name in [*TrainConfig.model_fields, *FOREIGN_KEYS]
             if name not in taken and (name not in FOREIGN_KEYS or FOREIGN_KEYS[name].kind != "refused")]
    distance, best = min((edit_distance(key, name), name) for name in known)
    return best if distance <= max(1, len(key) // 3) else None


def _check_known_keys(values: dict[str, Any], source: str) -> None:
    for key in values:
        if key not in TrainConfig.model_fields and key not in FOREIGN_KEYS:
            suggestion = nearest_key(key, taken=values)
            hint = f"; did you mean '{suggestion}'?" if suggestion else "; see `lmtune train --help-config`"
            raise UserError(f"{source}: unknown key '{key}'{hint}")


def _describe_validation_error(error: ValidationError, source: str) -> str:
    lines = []
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"]) or "config"
        message = item["msg"].removeprefix("Value error, ")
        given = item.get("input")
        if item["loc"] and not isinstance(given, dict):
            lines.append(f"{source}: {key}: {message} (got {given!r})")
        else:
            lines.append(f"{source}: {message}")
    return "\n".join(lines)


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        values = load_yaml(path.read_text(encoding="utf-8"), str(path)) or {}
    except UnicodeDecodeError as error:
        raise UserError(f"{path}: not UTF-8 text ({error})") from None
    except yaml.YAMLError as error:
        raise UserError(f"{path}: not valid YAML: {error}") from None
    if not isinstance(values, dict):
        raise UserError(f"{path}: the config must be a mapping of key: value lines")
    return values


def build_config(values: dict[str, Any], source: str = "config") -> TrainConfig:
    _check_known_keys(values, source)
    translated = translate(values, source)
    try:
        config = TrainConfig(**translated.values)
    except ValidationError as error:
        raise UserError(_describe_validation_error(error, source)) from None
    config._brought_key_notes = translated.notes
    return config


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> TrainConfig:
    """The config of a run: the YAML file, then each `key=value` override on top."""
    values = read_yaml(path) if path is not None else {}
    source = str(path) if path is not None else "config"
    parsed = dict(parse_override(item) for item in overrides or [])
    _check_known_keys(parsed, "command line")
    values.update(parsed)
    config = build_config(values, source)
    return _resolve_relative_paths(config, Path(path).parent if path is not None else Path.cwd())


def _resolve_relative_paths(config: TrainConfig, base: Path) -> TrainConfig:
    """A dataset_dir written relative to the config file is found from anywhere; output_dir stays
    relative to where the user runs the command, as in the Hugging Face Trainer."""
    dataset_dir = Path(config.dataset_dir)
    if not dataset_dir.is_absolute() and not dataset_dir.exists() and (base / dataset_dir).exists():
        config.dataset_dir = str(base / dataset_dir)
    config.reward_funcs = [_found_from(source, base) for source in config.reward_funcs]
    return config


def _found_from(reward_source: str, base: Path) -> str:
    """A reward file written relative to the config file is found from anywhere, as dataset_dir is."""
    path, _, name = reward_source.rpartition(":")
    if path and not Path(path).is_absolute() and not Path(path).exists() and (base / path).exists():
        return f"{base / path}:{name}"
    return reward_source


def config_help_rows() -> list[tuple[str, str, str, str]]:
    """(key, type, default, help) for every key, in the order of the config sections."""
    rows = []
    for name, field in TrainConfig.model_fields.items():
        default = field.default_factory() if field.default_factory else field.default
        rows.append((name, yaml_type_name(field.annotation), yaml_value(default), field.description or ""))
    return rows


def yaml_type_name(annotation: Any) -> str:
    """A type as a YAML writer thinks of it: `int | null`, `pt | sft`, `list`."""
    origin = get_origin(annotation)
    if origin is Literal:
        return " | ".join(yaml_value(choice) for choice in get_args(annotation))
    if origin in (Union, UnionType):
        return " | ".join(yaml_type_name(member) for member in get_args(annotation))
    if annotation is type(None):
        return "null"
    return getattr(origin or annotation, "__name__", str(annotation))


def yaml_value(value: Any) -> str:
    """A default as it is written in the YAML file: null, false, sft, [q_proj, v_proj]."""
    text = yaml.safe_dump(value, default_flow_style=True, width=1000).strip()
    return text.removesuffix("...").strip()


def write_run_config(config: TrainConfig, path: Path) -> None:
    path.write_text(yaml.safe_dump(config.to_yaml_dict(), sort_keys=False))
