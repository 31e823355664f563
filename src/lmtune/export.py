"""`lmtune export`: a run or checkpoint as a standalone Hugging Face folder, LoRA merged into the weights.

The folder holds safetensors (sharded above --max-shard-size), config.json, generation_config.json and
the tokenizer (with the chat template the run trained with), and loads with transformers alone.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import torch

from lmtune.chat import load_model_for_inference, resolve_target, run_template
from lmtune.errors import UserError
from lmtune.models import drop_quantization

log = logging.getLogger("lmtune")

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

def export_model(target: str, out: Path, dtype: str = "auto", max_shard_size: str = "5GB",
                 gguf: bool = False) -> Path:
    """Merge, cast and write; the folder appears under its name only when complete."""
    if dtype != "auto" and dtype not in DTYPES:
        raise UserError(f"--dtype {dtype}: valid values are auto, {', '.join(DTYPES)}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {out} is not empty; choose a new folder (nothing was written)")
    resolved = resolve_target(target)
    model, tokenizer = load_model_for_inference(resolved, device="cpu")
    if resolved.is_adapter:
        model = model.merge_and_unload()
    chosen = _dtype_for(model, dtype)
    model = model.to(chosen)
    model.config.dtype = chosen
    drop_quantization(model.config)
    if "_name_or_path" in model.config.__dict__:
        delattr(model.config, "_name_or_path")
    template = run_template(resolved)
    if template is not None:
        from lmtune.data.templates import chat_template_for

        tokenizer.chat_template = chat_template_for(tokenizer, template)
    _align_generation_config(model, tokenizer)

    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(str(partial), safe_serialization=True, max_shard_size=max_shard_size)
    tokenizer.save_pretrained(str(partial))
    if gguf:
        from lmtune.gguf_export import write_gguf

        gguf_dtype = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[chosen]
        write_gguf(model, tokenizer, partial / "model.gguf", gguf_dtype)
    _readable_by_others(partial)
    if out.exists():
        out.rmdir()  # empty, checked above
    partial.rename(out)
    log.info("exported %s (%s, %s) to %s", resolved.given, "LoRA merged" if resolved.is_adapter else "full",
             str(chosen).removeprefix("torch."), out)
    return out


def _readable_by_others(folder: Path) -> None:
    """safetensors writes its files 0600; an export is for sharing, so give them the usual umask mode."""
    import os

    mask = os.umask(0)
    os.umask(mask)
    for file in folder.iterdir():
        file.chmod(0o666 & ~mask)


def _dtype_for(model: Any, dtype: str) -> torch.dtype:
    """--dtype auto keeps the dtype the base model was saved in (float32 when it does not say)."""
    if dtype != "auto":
        return DTYPES[dtype]
    saved = getattr(model.config, "dtype", None) or getattr(model.config, "torch_dtype", None)
    if isinstance(saved, str):
        saved = getattr(torch, saved, None)
    return saved if saved in DTYPES.values() else torch.float32


def _align_generation_config(model: Any, tokenizer: Any) -> None:
    """Generation stops at the tokenizer's end-of-turn token, as in `lmtune chat`."""
    from transformers import GenerationConfig

    if getattr(model, "generation_config", None) is None:
        model.generation_config = GenerationConfig.from_model_config(model.config)
    config = model.generation_config
    if config.eos_token_id is None and tokenizer.eos_token_id is not None:
        config.eos_token_id = tokenizer.eos_token_id
    if config.pad_token_id is None and tokenizer.pad_token_id is not None:
        config.pad_token_id = tokenizer.pad_token_id
