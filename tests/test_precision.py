"""Training in bfloat16, and how lmtune lays out a run for a GPU (attention kernel, weight dtype, sharding
precision), checked here on the CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO, read_jsonl, run_lmtune


def losses_of(run) -> list[float]:
    return [r["loss"] for r in read_jsonl(run / "metrics.jsonl") if r["type"] == "train"]


def test_bf16_trains_in_bfloat16_with_losses_close_to_float32(tiny_config, tmp_path):
    """bf16 in a process of its own: accelerate keeps one mixed-precision setting per process. The same
    process shows the command's start-up without the garbage collector."""
    common = {"max_steps": 3, "callbacks": ["model_probes:ComputeDtypes"]}
    fp32, bf16 = tmp_path / "fp32", tmp_path / "bf16"
    assert run_lmtune("train", tiny_config(output_dir=str(fp32), **common)) == 0
    config = tiny_config(output_dir=str(bf16), bf16=True,
                         **{**common, "callbacks": [*common["callbacks"], "model_probes:CollectorStates"]})
    path = os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])
    result = subprocess.run([sys.executable, "-m", "lmtune", "train", str(config)], capture_output=True, text=True,
                            timeout=600, env={**os.environ, "PYTHONPATH": path})
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((fp32 / "compute_dtypes.json").read_text()) == {"weight": "torch.float32",
                                                                      "output": "torch.float32"}
    # on a CPU, bf16 is autocast: the weights (and AdamW's state) stay float32, the matrix products run in bfloat16
    assert json.loads((bf16 / "compute_dtypes.json").read_text()) == {"weight": "torch.float32",
                                                                      "output": "torch.bfloat16"}
    # the command's start-up (imports, model) ran without the cyclic garbage collector, and training with it,
    # the start-up's objects frozen out of its scans
    states = json.loads((bf16 / "collector_states.json").read_text())
    assert states["start-up"] is False and states["training"] is True and states["frozen"] > 100_000
    plain, mixed = losses_of(fp32), losses_of(bf16)
    assert len(mixed) == 3 and mixed != plain
    assert mixed == pytest.approx(plain, rel=2e-2)  # bfloat16 keeps 8 bits of mantissa: about 3 digits


def test_torch_compile_compiles_each_decoder_layer_and_trains_the_same(tiny_config, tmp_path):
    """Through dynamo with its eager backend: inductor's compile takes minutes on a small CPU."""
    import torch._dynamo
    from model_probes import ModelLayout

    common = {"max_steps": 2, "callbacks": ["model_probes:ModelLayout"], "flash_attn": "disabled"}
    assert run_lmtune("train", tiny_config(output_dir=str(tmp_path / "plain"), **common)) == 0
    assert ModelLayout.compiled == [False, False] and ModelLayout.attention == "eager"
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = tmp_path / "compiled"
    assert run_lmtune("train", tiny_config(output_dir=str(compiled), torch_compile=True,
                                           torch_compile_backend="eager", **common)) == 0
    assert ModelLayout.compiled == [True, True]
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # dynamo traced the layers
    assert losses_of(compiled) == pytest.approx(losses_of(tmp_path / "plain"), rel=1e-5)


def _config(**values):
    from lmtune.config import build_config

    return build_config({"model_name_or_path": "m", "dataset": "d", **values})


@pytest.mark.parametrize(("values", "flash", "expected"), [
    ({"stage": "sft"}, True, "flash_attention_2"),  # padding-free rows: varlen boundaries from the position ids
    ({"stage": "sft"}, False, "flex_attention"),  # no flash-attn: a block-sparse mask, never a dense one
    ({"stage": "pt"}, True, "flex_attention"),  # packed rows padded to a batch: flash-attn cannot see boundaries
    ({"stage": "sft", "padding_free": False}, True, None),  # padded examples: transformers' own (sdpa)
    ({"stage": "sft", "flash_attn": "sdpa"}, True, "sdpa"),
    ({"stage": "sft", "flash_attn": "disabled"}, True, "eager"),
], ids=["padding-free", "padding-free-no-flash-attn", "packed", "padded", "sdpa", "disabled"])
def test_on_a_gpu_attention_stays_linear_in_the_row_length(monkeypatch, values, flash, expected):
    import transformers.utils

    from lmtune.models import attention_implementation

    monkeypatch.setattr(transformers.utils, "is_flash_attn_2_available", lambda: flash)
    monkeypatch.setattr(transformers.utils, "is_torch_flex_attn_available", lambda: True)
    assert attention_implementation(_config(bf16=True, **values), "cuda") == expected
    assert attention_implementation(_config(bf16=True, **values), "cpu") in (None, "sdpa", "eager")


def test_flash_attn_fa2_is_refused_where_it_cannot_run(tiny_config, tmp_path, capsys):
    assert run_lmtune("train", tiny_config(flash_attn="fa2")) == 2  # no GPU, no flash-attn here
    assert "flash_attn: fa2 needs a GPU and the flash-attn package" in " ".join(capsys.readouterr().err.split())
    assert run_lmtune("train", tiny_config(flash_attn="fa2", stage="pt", dataset_dir=str(tmp_path))) == 2
    assert "set padding_free: true" in " ".join(capsys.readouterr().err.split())
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("values", "device", "expected"), [
    ({"finetuning_type": "lora", "bf16": True}, "cuda", "bfloat16"),  # the frozen base, only read
    ({"finetuning_type": "lora", "bf16": True}, "cpu", "float32"),  # autocast over float32 weights
    ({"finetuning_type": "lora", "bf16": False}, "cuda", "float32"),
    ({"finetuning_type": "full", "bf16": True}, "cuda", "float32"),  # AdamW updates float32 weights
    ({"finetuning_type": "lora", "bf16": True, "fsdp": "full_shard"}, "cuda", "float32"),  # FSDP's policy casts
    ({"finetuning_type": "lora", "bf16": True, "quantization_bit": 4}, "cuda", "float32"),  # bnb compute dtype
])
def test_weights_are_loaded_in_the_dtype_each_mode_needs(monkeypatch, values, device, expected):
    import torch

    from lmtune.models import weights_dtype

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert weights_dtype(_config(**values), device) == getattr(torch, expected)


def test_fsdp_with_bf16_gathers_bfloat16_and_reduces_float32():
    import torch

    from lmtune.sharding import FullySharded

    policy = FullySharded(reshard_after_forward=True, offload=False, bf16=True).precision_policy()
    assert (policy.param_dtype, policy.reduce_dtype) == (torch.bfloat16, torch.float32)
    assert FullySharded(reshard_after_forward=True, offload=False).precision_policy().param_dtype is None
