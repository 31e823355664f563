"""Shared fixtures: the real SmolLM2 tokenizer, a tiny random Llama, small data sets, the CLI."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lmtune.paths import cache_home

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"


# The files that take longest, longest first. `make test` hands files to its workers in collection order
# (--no-loadscope-reorder): started first, no long file is left running alone at the end.
LONGEST_FILES = ["test_webui.py", "test_bench.py", "test_nodes.py", "test_webui_train.py", "test_fsdp.py",
                 "test_streaming.py", "test_webui_after_training.py", "test_resume.py", "test_grpo.py",
                 "test_families.py", "test_dpo.py", "test_kto_rm.py", "test_reshard.py"]


def pytest_collection_modifyitems(items):
    rank = {name: place for place, name in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory):
    """Processed data goes to a fresh cache; converted models are shared with the user's cache."""
    user_models = cache_home() / "models"
    user_models.mkdir(parents=True, exist_ok=True)
    home = tmp_path_factory.mktemp("lmtune-home")
    (home / "models").symlink_to(user_models, target_is_directory=True)
    previous = os.environ.get("LMTUNE_HOME")
    os.environ["LMTUNE_HOME"] = str(home)
    yield home
    if previous is None:
        os.environ.pop("LMTUNE_HOME", None)
    else:
        os.environ["LMTUNE_HOME"] = previous


@pytest.fixture(scope="session")
def smollm2_dir(isolated_cache) -> Path:
    from lmtune.models import import_builtin

    return import_builtin()


@pytest.fixture(scope="session")
def tokenizer(smollm2_dir):
    from lmtune.models import load_tokenizer

    return load_tokenizer(str(smollm2_dir))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smollm2_dir, tokenizer) -> Path:
    """A random Llama with the SmolLM2 tokenizer: small enough to train in a second."""
    from lmtune.models import save_tiny_llama

    return save_tiny_llama(tokenizer, tmp_path_factory.mktemp("tiny-llama"))


# Every family's chat markers and tool/reasoning tags, each one token as in the family's own tokenizer.
FAMILY_MARKERS = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<start_of_turn>", "<end_of_turn>",
                  "[INST]", "[/INST]", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>", "[gMASK]", "<sop>",
                  "<|observation|>", "<|START_OF_TURN_TOKEN|>", "<|END_OF_TURN_TOKEN|>", "<|USER_TOKEN|>",
                  "<|CHATBOT_TOKEN|>", "<|SYSTEM_TOKEN|>", "<<SYS>>", "<</SYS>>", "<think>", "</think>",
                  "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"]


@pytest.fixture(scope="session")
def marked_tokenizer(tokenizer):
    """The SmolLM2 tokenizer without a chat template of its own and with every family's markers."""
    import copy

    marked = copy.deepcopy(tokenizer)
    marked.chat_template = None
    marked.add_special_tokens({"additional_special_tokens": FAMILY_MARKERS}, replace_extra_special_tokens=False)
    return marked


ALPACA_ROWS = [
    {"instruction": f"What is {a} plus {b}?", "input": "", "output": f"{a} plus {b} is {a + b}."}
    for a in range(1, 9) for b in range(1, 5)
]


@pytest.fixture
def alpaca_file(tmp_path) -> Path:
    path = tmp_path / "data" / "sums.json"
    path.parent.mkdir()
    path.write_text(json.dumps(ALPACA_ROWS))
    return path


def write_config(folder: Path, **values) -> Path:
    import yaml

    path = folder / "run.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


@pytest.fixture
def tiny_config(tmp_path, tiny_model_dir, alpaca_file):
    """A config writer for the tiny model on the sums data; keyword arguments override."""

    def make(**overrides) -> Path:
        values = dict(
            model_name_or_path=str(tiny_model_dir), dataset=str(alpaca_file), finetuning_type="full",
            output_dir=str(tmp_path / "run"), learning_rate=5e-3, per_device_train_batch_size=4,
            num_train_epochs=1, logging_steps=1, report_to="none", plot_loss=False, preview_samples=0,
            cutoff_len=128, lr_scheduler_type="constant",
        )
        values.update(overrides)
        return write_config(tmp_path, **values)

    return make


class SteppedClock:
    """The engine's `time`, with minutes added on purpose: time-based rules are tested without waiting."""

    def __init__(self):
        self.added_s = 0.0

    def monotonic(self) -> float:
        return time.monotonic() + self.added_s

    def __getattr__(self, name: str):
        return getattr(time, name)


@pytest.fixture
def minutes_pass_after(tmp_path, monkeypatch):
    """`minutes_pass_after(steps, minutes)`: a `callbacks` entry that moves the engine's clock on by
    `minutes` at the end of each of `steps`, as if those steps had been that slow."""
    import lmtune.engine

    monkeypatch.setattr(lmtune.engine, "time", SteppedClock())
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "slow_steps", raising=False)  # this test's steps, not an earlier test's

    def make(steps: tuple[int, ...], minutes: float) -> list[str]:
        (tmp_path / "slow_steps.py").write_text(
            "import lmtune.engine\n"
            "class SlowSteps:\n"
            "    def on_step_end(self, state, metrics):\n"
            f"        if state.step in {tuple(steps)!r}:\n"
            f"            lmtune.engine.time.added_s += {minutes * 60!r}\n"
        )
        return ["slow_steps:SlowSteps"]

    return make


def run_lmtune(*args: str) -> int:
    """`lmtune ARGS` in this process; returns the exit code."""
    from lmtune.cli import main

    argv = sys.argv
    try:
        main([str(a) for a in args])
    except SystemExit as done:
        return int(done.code or 0)
    finally:
        sys.argv = argv
    return 0


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def torchrun_command(config: Path, processes: int = 2, *extra: str) -> list[str]:
    """`torchrun --nproc_per_node PROCESSES -m lmtune train CONFIG EXTRA` on a free port."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
            "--master_port", str(free_port()), "-m", "lmtune", "train", str(config), *extra]


def torchrun(config: Path, processes: int = 2, *extra: str, env: dict[str, str] | None = None,
             check: bool = True) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node PROCESSES -m lmtune train CONFIG EXTRA` on a free port."""
    result = subprocess.run(torchrun_command(config, processes, *extra), capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result
