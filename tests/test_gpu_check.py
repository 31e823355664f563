"""bench/gpu_check.py keeps working where no GPU is: its --smoke run on the CPU."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from conftest import REPO

FIGURES = re.compile(r"^gpu_check model=\S+ method=(lora|qlora|full) device=cpu tokens_per_s=\d+ mfu=[\d.]+ "
                     r"peak_mem_gb=[\d.]+ first_loss=([\d.]+) cpu_fp32_loss=([\d.]+) rel_diff=\S+ ok$", re.M)


def test_gpu_check_smoke_prints_a_line_of_figures_for_each_method(smollm2_dir):
    result = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), "--smoke"], capture_output=True,
                            text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    lines = FIGURES.findall(result.stdout)
    assert [method for method, _, _ in lines] == ["lora", "qlora", "full"], result.stdout
    for _, first_loss, cpu_loss in lines:  # the bf16 step's loss is the float32 model's on the same batch
        assert abs(float(first_loss) - float(cpu_loss)) < 0.05 * float(cpu_loss)
