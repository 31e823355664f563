"""Every benchmark under bench/ runs in its smoke mode (bench/README.md): a benchmark that breaks fails here
the day it breaks. Only that it runs and prints its figures is checked, never a time."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
SCRIPTS = sorted(path for path in BENCH.glob("*.py") if not path.name.startswith("_"))
FIGURE = re.compile(r"^([A-Za-z_][\w/.-]*): (\S+)")


def test_every_script_is_found():
    assert {"e2e.py", "step_overhead.py", "throughput.py"} <= {path.name for path in SCRIPTS}


@pytest.mark.parametrize("script", SCRIPTS, ids=[path.stem for path in SCRIPTS])
def test_benchmark_runs_in_smoke_mode(script, isolated_cache, smollm2_dir):
    env = {**os.environ, "LMTUNE_BENCH_SMOKE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("LMTUNE_BENCH_LLAMAFACTORY_VENV", None)
    result = subprocess.run([sys.executable, str(script), "--smoke"], capture_output=True, text=True, env=env,
                            timeout=600)
    assert result.returncode == 0, f"{script.name} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    assert lines, f"{script.name} printed nothing"
    if lines[-1].startswith("skipped: "):
        pytest.skip(f"{script.name}: {lines[-1]}")
    figure = FIGURE.match(lines[-1])
    assert figure, f"{script.name}: its last line is not `name: value`: {lines[-1]!r}"
    assert re.match(r"^-?\d", figure.group(2)), f"{script.name}: its figure is not a number: {lines[-1]!r}"
