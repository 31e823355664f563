"""`lmtune export --gguf`: a Llama-family model (Llama, SmolLM2, and others with the same layout) and its
byte-level BPE tokenizer written as one GGUF file with the `gguf` package.

The tensor names come from gguf's own name tables; the query and key projections are permuted into the
rotary layout GGUF uses for Llama (transformers undoes that permutation when it reads the file back).
Other architectures are refused with a message: their layouts differ.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmtune.errors import UserError

SUPPORTED = {"llama"}
FILE_TYPES = {"fp32": 0, "fp16": 1, "bf16": 32}  # gguf's LlamaFileType ALL_F32 / MOSTLY_F16 / MOSTLY_BF16


def _permute(weights: torch.Tensor, heads: int) -> torch.Tensor:
    """HF's rotary layout (halves) to GGUF's (interleaved pairs), per head."""
    return weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:]).swapaxes(1, 2).reshape(
        weights.shape)


def write_gguf(model: Any, tokenizer: Any, path: Path, dtype: str) -> Path:
    import gguf

    config = model.config
    if config.model_type not in SUPPORTED:
        raise UserError(f"--gguf: writes Llama-family models only; this one is '{config.model_type}' (export "
                        "without --gguf and use llama.cpp's convert_hf_to_gguf.py)")
    tokenizer_data = _bpe_vocabulary(tokenizer)
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    writer.add_name(Path(str(getattr(config, "_name_or_path", "")) or path.stem).name or "model")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(float(_rope_theta(config)))
    writer.add_rope_dimension_count(config.hidden_size // heads)
    writer.add_vocab_size(len(tokenizer_data["tokens"]))
    writer.add_file_type(FILE_TYPES[dtype])
    _add_tokenizer(writer, tokenizer, tokenizer_data)
    names = gguf.TensorNameMap(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    state = model.state_dict()
    if getattr(config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # GGUF reuses token_embd for the output
    for name, tensor in state.items():
        if name.endswith("rotary_emb.inv_freq"):
            continue
        target = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if target is None:
            raise UserError(f"--gguf: no GGUF name for tensor {name}; this model's layout is not plain Llama")
        tensor = tensor.detach().float()
        if name.endswith("q_proj.weight"):
            tensor = _permute(tensor, heads)
        elif name.endswith("k_proj.weight"):
            tensor = _permute(tensor, kv_heads)
        _add_tensor(writer, target, tensor.numpy(), dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _add_tensor(writer: Any, name: str, array: np.ndarray, dtype: str) -> None:
    """Matrices in the chosen precision; norms (1-D) stay float32, as llama.cpp writes them."""
    import gguf

    if array.ndim > 1 and dtype == "fp16":
        array = array.astype(np.float16)
    elif array.ndim > 1 and dtype == "bf16":
        kind = gguf.GGMLQuantizationType.BF16
        writer.add_tensor(name, gguf.quants.quantize(array, kind), raw_dtype=kind)
        return
    writer.add_tensor(name, array)


def _rope_theta(config: Any) -> float:
    parameters = getattr(config, "rope_parameters", None) or {}
    return parameters.get("rope_theta") or getattr(config, "rope_theta", 10000.0)


def _bpe_vocabulary(tokenizer: Any) -> dict[str, Any]:
    """Tokens by id, their types, and the merges of a byte-level BPE tokenizer (tokenizer.json)."""
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    if backend is None:
        raise UserError("--gguf: needs a fast (tokenizer.json) tokenizer")
    data = json.loads(backend.to_str())
    model = data.get("model", {})
    if model.get("type") != "BPE":
        raise UserError(f"--gguf: writes byte-level BPE tokenizers only; this one is {model.get('type')}")
    vocab = dict(model["vocab"])
    special = set()
    for added in data.get("added_tokens", []):
        vocab[added["content"]] = added["id"]
        if added.get("special"):
            special.add(added["id"])
    size = max(vocab.values()) + 1
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [gguf_token_type("unused")] * size
    for text, index in vocab.items():
        tokens[index] = text
        types[index] = gguf_token_type("control" if index in special else "normal")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return {"tokens": tokens, "types": types, "merges": merges}


def gguf_token_type(kind: str) -> int:
    import gguf

    return {"normal": gguf.TokenType.NORMAL, "control": gguf.TokenType.CONTROL,
            "unused": gguf.TokenType.UNUSED}[kind]


def _add_tokenizer(writer: Any, tokenizer: Any, data: dict[str, Any]) -> None:
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(data["tokens"])
    writer.add_token_types(data["types"])
    writer.add_token_merges(data["merges"])
    for setter, token_id in (("add_bos_token_id", tokenizer.bos_token_id), ("add_eos_token_id", tokenizer.eos_token_id),
                             ("add_pad_token_id", tokenizer.pad_token_id)):
        if token_id is not None:
            getattr(writer, setter)(token_id)
    if getattr(tokenizer, "chat_template", None):
        writer.add_chat_template(tokenizer.chat_template)
