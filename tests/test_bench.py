"""Every benchmark under bench/ runs in its smoke mode (bench/README.md): a benchmark that breaks fails here
the day it breaks. Only that it runs and prints its figures is checked, never a time.

The scripts run one after the other in one child process (bench/_smoke_all.py), which pays the imports of
torch, transformers and lmtune once for all of them; each test reads its script's result."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
SCRIPTS = sorted(path for path in BENCH.glob("*.py") if not path.name.startswith("_"))
FIGURE = re.compile(r"^([A-Za-z_][\w/.-]*): (\S+)")
GPU_CHECK_FIGURES = re.compile(r"^gpu_check model=\S+ method=(lora|qlora|full) device=cpu tokens_per_s=\d+ "
                               r"mfu=[\d.]+ peak_mem_gb=[\d.]+ first_loss=([\d.]+) cpu_fp32_loss=([\d.]+) "
                               r"rel_diff=\S+ ok$", re.M)


@pytest.fixture(scope="module")
def smoke_results(isolated_cache, smollm2_dir, tmp_path_factory) -> dict:
    results = tmp_path_factory.mktemp("bench") / "results.json"
    env = {**os.environ, "LMTUNE_BENCH_SMOKE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("LMTUNE_BENCH_LLAMAFACTORY_VENV", None)
    run = subprocess.run([sys.executable, str(BENCH / "_smoke_all.py"), str(results)], capture_output=True,
                         text=True, env=env, timeout=1800)
    assert results.exists(), f"the smoke runner failed before any script:\n{run.stdout[-3000:]}\n{run.stderr[-5000:]}"
    return json.loads(results.read_text())


def test_every_script_is_found():
    assert {"e2e.py", "step_overhead.py", "throughput.py", "optimizer_step.py"} <= {path.name for path in SCRIPTS}


@pytest.mark.parametrize("script", SCRIPTS, ids=[path.stem for path in SCRIPTS])
def test_benchmark_runs_in_smoke_mode(script, smoke_results):
    assert script.stem in smoke_results, f"{script.name} did not finish (the runner stopped before it)"
    result = smoke_results[script.stem]
    assert result["code"] == 0, f"{script.name} failed:\n{result['stdout'][-3000:]}\n{result['stderr'][-5000:]}"
    lines = [line for line in result["stdout"].splitlines() if line.strip()]
    assert lines, f"{script.name} printed nothing"
    if lines[-1].startswith("skipped: "):
        pytest.skip(f"{script.name}: {lines[-1]}")
    figure = FIGURE.match(lines[-1])
    assert figure, f"{script.name}: its last line is not `name: value`: {lines[-1]!r}"
    assert re.match(r"^-?\d", figure.group(2)), f"{script.name}: its figure is not a number: {lines[-1]!r}"


def test_gpu_check_smoke_prints_a_line_of_figures_for_each_method(smoke_results):
    """bench/gpu_check.py keeps working where no GPU is: its smoke run checks each method on the CPU."""
    stdout = smoke_results["gpu_check"]["stdout"]
    lines = GPU_CHECK_FIGURES.findall(stdout)
    assert [method for method, _, _ in lines] == ["lora", "qlora", "full"], stdout
    for _, first_loss, cpu_loss in lines:  # the bf16 step's loss is the float32 model's on the same batch
        assert abs(float(first_loss) - float(cpu_loss)) < 0.05 * float(cpu_loss)
