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
    """bf16 in a process of its own: accelerate keeps one mixed-precision setting per process."""
    common = {"max_steps": 3, "callbacks": ["model_probes:ComputeDtypes"]}
    fp32, bf16 = tmp_path / "fp32", tmp_path / "bf16"
    assert run_lmtune("train", tiny_config(output_dir=str(fp32), **common)) == 0
    config = tiny_config(output_dir=str(bf16), bf16=True, **common)
    path = os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])
    result = subprocess.run([sys.executable, "-m", "lmtune", "train", str(config)], capture_output=True, text=True,
                            timeout=600, env={**os.environ, "PYTHONPATH": path})
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((fp32 / "compute_dtypes.json").read_text()) == {"weight": "torch.float32",
                                                                      "output": "torch.float32"}
    # on a CPU, bf16 is autocast: the weights (and AdamW's state) stay float32, the matrix products run in bfloat16
    assert json.loads((bf16 / "compute_dtypes.json").read_text()) == {"weight": "torch.float32",
                                                                      "output": "torch.bfloat16"}
    plain, mixed = losses_of(fp32), losses_of(bf16)
    assert len(mixed) == 3 and mixed != plain
    assert mixed == pytest.approx(plain, rel=2e-2)  # bfloat16 keeps 8 bits of mantissa: about 3 digits
