"""Every bench script's smoke mode, one after the other in this one process (what tests/test_bench.py runs).

    python bench/_smoke_all.py RESULTS.json [SCRIPT ...]

Each script runs as `python SCRIPT --smoke` would run it (`runpy` as `__main__`, with LMTUNE_BENCH_SMOKE=1),
but the imports of torch, transformers, datasets and lmtune are paid once for all of them instead of once a
script. What each printed, its exit status (a SystemExit's code; 1 for an exception, with its traceback)
its wall time and its CPU time (this process's and that of the child processes it waited for: the steadier
figure on a shared machine) go to RESULTS.json. The environment, the working folder and torch's thread count are
put back after each script, and accelerate's process-wide state is reset, so one script's settings do not
reach the next.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import resource
import runpy
import sys
import time
import traceback
from pathlib import Path

BENCH = Path(__file__).resolve().parent


def scripts() -> list[Path]:
    """The benchmarks: every bench/*.py but the shared helpers (`_*.py`)."""
    return sorted(path for path in BENCH.glob("*.py") if not path.name.startswith("_"))


def exit_code(stop: SystemExit) -> int:
    if stop.code is None or isinstance(stop.code, int):
        return stop.code or 0
    print(stop.code, file=sys.stderr)  # SystemExit("message"): Python prints it and exits 1
    return 1


def cpu_seconds() -> float:
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def run_one(script: Path) -> dict:
    environment, folder, argv = dict(os.environ), os.getcwd(), sys.argv
    threads = sys.modules["torch"].get_num_threads() if "torch" in sys.modules else None
    printed, errors = io.StringIO(), io.StringIO()
    started, cpu = time.monotonic(), cpu_seconds()
    sys.argv = [str(script), "--smoke"]
    os.environ["LMTUNE_BENCH_SMOKE"] = "1"
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(errors):
        try:
            runpy.run_path(str(script), run_name="__main__")
            code = 0
        except SystemExit as stop:
            code = exit_code(stop)
        except BaseException:  # noqa: BLE001 - a broken script is a result, and the next one still runs
            traceback.print_exc()
            code = 1
    sys.argv = argv
    os.chdir(folder)
    os.environ.clear()
    os.environ.update(environment)
    if threads is not None:
        sys.modules["torch"].set_num_threads(threads)
    if "accelerate.state" in sys.modules:  # the next script's Accelerator may ask for another precision
        sys.modules["accelerate.state"].AcceleratorState._reset_state(reset_partial_state=True)
    return {"code": code, "stdout": printed.getvalue(), "stderr": errors.getvalue()[-8000:],
            "seconds": round(time.monotonic() - started, 2), "cpu_seconds": round(cpu_seconds() - cpu, 2)}


def main() -> None:
    results_file = Path(sys.argv[1])
    chosen = [Path(name).resolve() for name in sys.argv[2:]] or scripts()
    results = {}
    for script in chosen:
        results[script.stem] = run_one(script)
        results_file.write_text(json.dumps(results, indent=1))  # what finished so far, should a script hang
        result = results[script.stem]
        print(f"{script.stem}: exit {result['code']} in {result['seconds']} s ({result['cpu_seconds']} s of CPU)",
              flush=True)


if __name__ == "__main__":
    main()
