"""`lmtune plan`: the schedule of a run from its config, printed before anything is trained."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from lmtune.batching import batching_line, batching_of
from lmtune.config import TrainConfig
from lmtune.errors import UserError
from lmtune.schedule import Plan, make_plan

log = logging.getLogger("lmtune")

WEIGHT_SUFFIXES = {".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack"}
STATE_FILES_BYTES = 64 << 10  # train_state.json, rng_state.pth, checkpoint_complete.json
DISK_MARGIN = 1.1
DISK_MARGIN_BYTES = 16 << 20


def plan_for_config(config: TrainConfig, world_size: int = 1) -> Plan:
    """The plan `lmtune train` on `world_size` processes would follow, resume included."""
    from lmtune.data import prepare_data
    from lmtune.models import load_tokenizer, resolve_model_path
    from lmtune.resume import check_compatible, epoch_origin, find_resume_point, settle_data_position

    point = find_resume_point(config, Path(config.output_dir))
    if point is not None:
        check_compatible(point, config, world_size)  # what `lmtune train` would refuse, the plan refuses
    model_path = resolve_model_path(config.model_name_or_path)
    tokenizer = load_tokenizer(model_path, config.trust_remote_code)
    if config.streaming:
        from lmtune.data.streaming import prepare_stream, stream_size, with_planned_steps

        _, info = prepare_stream(config, tokenizer, 0, world_size)  # the same checks as `train`
        plan = make_plan(with_planned_steps(config, info, world_size), None, world_size, bool(info.held_out),
                         **estimate_sizes(model_path, config, world_size))
        plan.stream = stream_size(config, info, world_size)
        plan.batching = batching_of(config, [])
    else:
        data = prepare_data(config, tokenizer)
        if point is not None:
            settle_data_position(point, len(data.train))
        plan = make_plan(config, len(data.train), world_size, data.eval is not None,
                         **estimate_sizes(model_path, config, world_size),
                         epoch_origin=epoch_origin(point, config, len(data.train), world_size))
        plan.batching = batching_of(config, data.stats.train_row_lengths)
        plan.data = {"train": len(data.train), "eval": len(data.eval) if data.eval is not None else 0,
                     "unit": config.sample_name}
    if point is not None:
        plan.resume = resume_lines(point, config, tokenizer, plan, world_size)
    return plan


def resume_lines(point, config: TrainConfig, tokenizer, plan: Plan, world_size: int) -> list[str]:
    """Where `lmtune train` would resume, what changed since, and what the learning rate does to the end."""
    from lmtune.data.registry import data_files
    from lmtune.lr_schedule import resume_lr_lines
    from lmtune.resume import batch_lines, data_fingerprint, describe_changes

    total_steps = plan.total_steps
    lines = [f"resumes from {point.path} at step {point.step}"]
    lines += [f"changed since the checkpoint: {line}" for line in
              describe_changes(point, config, data_fingerprint(data_files(config), tokenizer))]
    lines += batch_lines(point, config, world_size, plan.steps_per_epoch)
    if point.step >= total_steps:
        return lines + [f"the run is complete at step {point.step}: raise max_steps or num_train_epochs to go on"]
    return lines + resume_lr_lines(point.state.schedule, config, point.step, total_steps)


def estimate_sizes(model_path: str, config: TrainConfig, processes: int = 1) -> dict[str, int | None]:
    """`checkpoint_bytes` and `final_model_bytes` from the model's shape, built on the meta device (no
    weights read)."""
    import torch
    from transformers import AutoConfig

    from lmtune.models import count_parameters, model_class, prepare_for_training

    try:
        model_config = AutoConfig.from_pretrained(model_path, trust_remote_code=config.trust_remote_code,
                                                  **({"num_labels": 1} if config.stage == "rm" else {}))
        with torch.device("meta"):
            model = model_class(config.stage == "rm").from_config(model_config,
                                                                  trust_remote_code=config.trust_remote_code)
    except (OSError, ValueError) as error:
        log.warning("could not size a checkpoint of %s: %s", model_path, error)
        return {"checkpoint_bytes": None, "final_model_bytes": None, "memory": None}
    with torch.device("meta"):
        model = prepare_for_training(model, config)  # refused as `lmtune train` refuses it (lora_target, ...)
    trainable, total = count_parameters(model)
    return {"checkpoint_bytes": checkpoint_bytes(trainable, config, model_path),
            "final_model_bytes": final_model_bytes(trainable, total, config, model_path),
            "memory": memory_estimate(model, config, processes)}


def memory_estimate(model, config: TrainConfig, processes: int = 1) -> dict[str, int | None]:
    """Bytes one process holds while training: weights (fp32; the decoder layers' linear weights in 4 or 8
    bits with quantization_bit), gradients and AdamW's two moments of what is trained, and the activations
    kept for the backward pass per token of a micro-batch (a Llama-like layer keeps about 8 x hidden +
    4 x intermediate values a token; with gradient_checkpointing only each layer's input, plus one layer).

    With fsdp over `processes`, gradients and AdamW state are 1/processes each; full_shard also shards the
    weights, gathering the embeddings and output layer and one decoder layer at a time, shard_grad_op keeps
    them all gathered from forward to backward. fsdp_offload (on a GPU) keeps the shards in CPU memory
    (`cpu`), the device holds the gathered weights alone."""
    quantised_bytes = {4: 0.53, 8: 1.0}.get(config.quantization_bit)  # NF4 with its block scales
    weights = trained = one_layer = 0.0
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            trained += parameter.numel()
        quantised = quantised_bytes is not None and parameter.ndim == 2 and not parameter.requires_grad and \
            ".layers." in name and "embed" not in name
        size = parameter.numel() * (quantised_bytes if quantised else 4)
        weights += size
        one_layer += size if ".layers.0." in name else 0
    shards = processes if config.fsdp and processes > 1 else 1
    memory: dict[str, int | None] = {"weights": int(weights), "gradients": int(trained * 4 / shards),
                                     "optimizer": int(trained * 8 / shards), "cpu": 0, "processes": shards}
    if shards > 1 and config.fsdp == "full_shard":
        layers = getattr(model.config, "num_hidden_layers", 1) or 1
        gathered = weights - one_layer * (layers - 1)  # embeddings, output layer, norms and one layer
        memory["weights"] = int(weights / shards + gathered)
    if shards > 1 and config.fsdp_offload:
        memory["cpu"] = int(weights / shards) + memory["gradients"] + memory["optimizer"]
        memory["weights"] = memory["weights"] - int(weights / shards)
        memory["gradients"] = memory["optimizer"] = 0
    memory["activations_per_token"] = activations_per_token(model.config, config)
    return memory


def activations_per_token(shape, config: TrainConfig) -> int | None:
    hidden, layers = getattr(shape, "hidden_size", None), getattr(shape, "num_hidden_layers", None)
    if not (hidden and layers):
        return None
    value_bytes = 2 if config.bf16 else 4
    per_layer = (8 * hidden + 4 * getattr(shape, "intermediate_size", 4 * hidden)) * value_bytes
    return (layers * hidden * value_bytes + per_layer) if config.gradient_checkpointing else layers * per_layer


def memory_line(memory: dict[str, int | None], tokens_per_micro_batch: int) -> str:
    fixed = memory["weights"] + memory["gradients"] + memory["optimizer"]
    where = "process" if memory.get("processes", 1) == 1 else f"process (fsdp over {memory['processes']})"
    line = (f"memory per {where} (estimate): weights {human_bytes(memory['weights'])}, gradients "
            f"{human_bytes(memory['gradients'])}, AdamW state {human_bytes(memory['optimizer'])}")
    if memory.get("cpu"):
        line += f" (fsdp_offload: {human_bytes(memory['cpu'])} of shards in CPU memory)"
    if memory["activations_per_token"] is None:
        return line + f"; {human_bytes(fixed)} before activations"
    activations = memory["activations_per_token"] * tokens_per_micro_batch
    return (line + f", activations about {human_bytes(memory['activations_per_token'])} a token: "
            f"{human_bytes(activations)} for a full micro-batch of {tokens_per_micro_batch} tokens; "
            f"about {human_bytes(fixed + activations)} in all")


def side_file_bytes(model_path: str) -> int:
    """What every checkpoint and the final model write besides weights: tokenizer, configs, chat template
    (as large as the model folder's own), and the train state, RNG state and completion mark."""
    folder = Path(model_path)
    if not folder.is_dir():
        return STATE_FILES_BYTES
    own = sum(p.stat().st_size for p in folder.glob("*") if p.is_file() and p.suffix not in WEIGHT_SUFFIXES)
    return own + STATE_FILES_BYTES


def checkpoint_bytes(trainable_parameters: int, config: TrainConfig, model_path: str) -> int:
    """Weights of what is trained (fp32) plus AdamW's two moments, unless only the model is kept, plus the
    tokenizer and configs."""
    weights = trainable_parameters * 4
    return (weights if config.save_only_model else weights * 3) + side_file_bytes(model_path)


def final_model_bytes(trainable_parameters: int, total_parameters: int, config: TrainConfig, model_path: str) -> int:
    """The final model: the adapter for LoRA, every weight (fp32) for full and freeze; and its tokenizer."""
    parameters = trainable_parameters if config.finetuning_type == "lora" else total_parameters
    return parameters * 4 + side_file_bytes(model_path)


def plan_summary_lines(plan: Plan, config: TrainConfig) -> list[str]:
    """The lines `lmtune plan` and `lmtune train` both print about saving and rotation."""
    written = len(plan.save_steps)
    lines = plan.resume + ([stream_line(plan.stream)] if plan.stream else [])
    if plan.memory:
        sequences = 2 if config.stage in ("dpo", "kto", "rm") else 1  # a pair (or kto example) is two sequences
        tokens = config.per_device_train_batch_size * config.cutoff_len * sequences
        if config.stage == "grpo":  # a prompt's group of completions, each after the prompt
            tokens = config.per_device_train_batch_size * config.num_generations * (
                config.max_prompt_length + config.max_completion_length)
        lines.append(memory_line(plan.memory, tokens))
    if plan.generation:
        lines.append(generation_line(plan.generation, config))
    if plan.batching:
        lines += [batching_line(plan.batching)] + ([plan.batching["note"]] if plan.batching["note"] else [])
    if config.save_total_limit is None:
        lines.append(f"{written} checkpoints will be written; save_total_limit is null: all are kept")
    elif plan.deleted:
        best = " (+ best)" if config.metric_for_best_model else ""
        lines.append(
            f"{written} checkpoints will be written, save_total_limit {config.save_total_limit} keeps the last "
            f"{config.save_total_limit}{best}: {len(plan.deleted)} will be deleted "
            f"(save_total_limit: {written} would keep them all)"
        )
    else:
        lines.append(f"{written} checkpoints will be written; save_total_limit {config.save_total_limit} "
                     "keeps them all")
    if plan.save_minutes:
        lines.append(f"plus a save every {plan.save_minutes:g} minutes (not counted above)")
    if config.metric_for_best_model:
        lines.append(f"plus a save after each evaluation that sets a new best {config.metric_for_best_model}")
    needed = disk_needed(plan)
    if needed is not None:
        free = free_bytes(Path(config.output_dir))
        lines.append(f"needs about {human_bytes(needed)} (checkpoints, final model and a margin); "
                     f"{human_bytes(free)} free")
        if needed > free:
            lines.append("warning: the kept checkpoints do not fit on the disk; `lmtune train` will refuse to start")
    return lines + [f"warning: {w}" for w in plan.warnings]


def generation_line(budget: dict, config: TrainConfig) -> str:
    every = "each step" if config.num_iterations == 1 else f"every {config.num_iterations} steps (num_iterations)"
    return (f"grpo: {budget['completions_per_step']:,} completions generated {every} ({config.num_generations} per "
            f"prompt), at most {budget['max_tokens_per_step']:,} tokens each time (max_completion_length "
            f"{config.max_completion_length}); {budget['generating_steps']} generating steps, at most "
            f"{budget['max_tokens']:,} tokens generated in the run")


def stream_line(size: dict) -> str:
    line = f"a stream of {human_bytes(size['total_bytes'])}"
    if size["stops_after_passes"]:
        line += (f", about {size['rows']:,} rows to train on (from {size['rows_from']}): num_train_epochs stops it "
                 f"after {size['stops_after_passes']:g} passes, about {size['steps_estimate']} steps without "
                 "packing (estimated)")
    elif size["rows"]:
        line += (f", about {size['rows']:,} rows to train on (estimated from {size['rows_from']}): one pass is about "
                 f"{size['steps_per_pass_estimate']} steps without packing, so max_steps is about "
                 f"{size['passes_estimate']} passes (estimated)")
    else:
        line += "; its number of rows is unknown"
    if size["held_out_rows"]:
        line += f"; its first {size['held_out_rows']} rows are held out for evaluation"
    return line


def disk_needed(plan: Plan) -> int | None:
    """The plan's peak disk use with a margin (file-system blocks, metrics, logs, loss.png)."""
    return None if plan.disk_bytes is None else int(plan.disk_bytes * DISK_MARGIN) + DISK_MARGIN_BYTES


def check_disk(plan: Plan, config: TrainConfig, freed_bytes: int = 0) -> None:
    """`freed_bytes`: what the run deletes before it writes (an earlier run, with overwrite_output_dir)."""
    needed = disk_needed(plan)
    if needed is None:
        return
    free = free_bytes(Path(config.output_dir)) + freed_bytes
    if needed > free:
        raise UserError(
            f"the kept checkpoints and the final model need about {human_bytes(needed)} but only "
            f"{human_bytes(free)} is free at {config.output_dir}; lower save_total_limit, set save_only_model: "
            "true, or free some disk"
        )


def free_bytes(folder: Path) -> int:
    existing = folder.resolve()
    while not existing.exists():
        existing = existing.parent
    return shutil.disk_usage(existing).free


def human_bytes(value: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            return f"{value:.1f} {unit}" if unit != "B" else f"{value:.0f} B"
        value /= 1000
    return f"{value:.1f} TB"


def render_plan(plan: Plan, config: TrainConfig) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    epochs = f"{plan.epochs:.2f}" if plan.epochs is not None else "unknown (stream)"
    if plan.stream and plan.stream["stops_after_passes"]:
        console.print(f"[bold]about {plan.total_steps} optimizer steps[/] (estimated): the stream stops after "
                      f"{plan.stream['stops_after_passes']:g} passes (num_train_epochs)")
    else:
        over = f" over {plan.data['train']:,} training {plan.data['unit']}" if plan.data else ""
        console.print(f"[bold]{plan.total_steps} optimizer steps[/], {plan.steps_per_epoch or '?'} per epoch, "
                      f"{epochs} epochs{over}")
    for phase in plan.phases:
        console.print(f"save_schedule[{phase['phase']}]: steps {phase['from_step']}..{phase['until_step']}: "
                      f"{len(phase['saves'])} saves")
    table = Table(title="saves and evaluations")
    for column in ("step", "epoch", "save", "eval", "after rotation"):
        table.add_column(column)
    deleted = set(plan.deleted)
    for step in sorted(set(plan.save_steps) | set(plan.eval_steps)):
        epoch = f"{step / plan.steps_per_epoch:.3f}" if plan.steps_per_epoch else "-"
        save = ",".join(plan.save_steps.get(step, []))
        evaluation = ",".join(plan.eval_steps.get(step, []))
        fate = "" if not save else "deleted" if step in deleted else "kept"
        table.add_row(str(step), epoch, save, evaluation, fate)
    console.print(table)
    for line in plan_summary_lines(plan, config):
        console.print(line, soft_wrap=True)  # a path in a line stays whole, to copy
