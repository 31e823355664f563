"""What the benchmarks share: a scratch cache, the models, generated data, device helpers, FLOPs."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

WORDS = ("tide moon sea harbour light keeper storm wind rain ship rope sail north south gull wave rock salt fog "
         "bell chart compass anchor deck crew lamp beam night dawn shore cliff current").split()
H100_BF16_DENSE_TFLOPS = 989.0


def smoke_requested(args: Any) -> bool:
    """The smoke mode of bench/README.md: `--smoke`, or LMTUNE_BENCH_SMOKE=1 in the environment."""
    return bool(getattr(args, "smoke", False)) or os.environ.get("LMTUNE_BENCH_SMOKE") == "1"


def add_device_args(parser: Any) -> None:
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cuda: bf16 autocast, synchronised timings, MFU")
    parser.add_argument("--peak-tflops", type=float, default=H100_BF16_DENSE_TFLOPS,
                        help="peak of the GPU for MFU (default: H100 bf16 dense)")


def select_device(name: str) -> None:
    """Before the first CUDA call: `cpu` hides the GPUs, so the engine's Accelerator stays on the CPU too."""
    import torch

    if name == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    elif not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible")


def sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def autocast(device: str) -> Any:
    """What the engine does with bf16: true on a GPU (accelerate's autocast); nothing on the CPU."""
    import torch

    if device == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@contextlib.contextmanager
def scratch_home():
    """A fresh LMTUNE_HOME (processed data lands there), sharing the user's converted models."""
    from lmtune.paths import cache_home

    models = cache_home() / "models"
    models.mkdir(parents=True, exist_ok=True)
    previous = os.environ.get("LMTUNE_HOME")
    with tempfile.TemporaryDirectory(prefix="lmtune-bench-") as tmp:
        home = Path(tmp) / "home"
        home.mkdir()
        (home / "models").symlink_to(models.resolve(), target_is_directory=True)
        os.environ["LMTUNE_HOME"] = str(home)
        try:
            yield Path(tmp)
        finally:
            if previous is None:
                os.environ.pop("LMTUNE_HOME", None)
            else:
                os.environ["LMTUNE_HOME"] = previous


def model_dir(name: str, folder: Path) -> Path:
    """`smollm2`: the built-in SmolLM2-135M (converted once, cached); `tiny`: the random Llama of the tests."""
    from lmtune.models import import_builtin, load_tokenizer, save_tiny_llama

    smollm2 = import_builtin()
    if name == "smollm2":
        return smollm2
    return save_tiny_llama(load_tokenizer(str(smollm2)), folder / "tiny-llama")


def write_sft_data(path: Path, rows: int, min_words: int, max_words: int, seed: int = 0) -> Path:
    """Alpaca rows whose response lengths are spread evenly between min_words and max_words."""
    rng = random.Random(seed)

    def text(low: int, high: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high)))

    data = [{"instruction": f"Describe the {text(2, 6)}.", "input": "", "output": text(min_words, max_words)}
            for _ in range(rows)]
    path.write_text(json.dumps(data))
    return path


def base_config(model: Path, data: Path, output_dir: Path, device: str, **overrides: Any) -> Any:
    """A config as a user would write it for a short SFT run (logging on, nothing saved mid-run)."""
    from lmtune.config import build_config

    values: dict[str, Any] = dict(
        model_name_or_path=str(model), dataset=str(data), output_dir=str(output_dir), report_to="none",
        plot_loss=False, preview_samples=0, bf16=device == "cuda", learning_rate=1e-4, max_steps=1_000_000,
        logging_steps=10, max_grad_norm=1.0,
    )
    values.update(overrides)
    return build_config(values)


def matmul_flops_per_token(model: Any, seq_len: float) -> float:
    """Model FLOPs of one trained token, forward and backward: 2 per weight of every linear layer forward,
    2 more backward for the input gradient, 2 more for the weight gradient of trainable weights; attention
    scores and values 4 x layers x width x sequence forward, three times that in all (PaLM's count)."""
    import torch

    linear = trainable = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            linear += module.weight.numel()
            trainable += module.weight.numel() if module.weight.requires_grad else 0
    config = getattr(model, "config", None)
    layers, width = getattr(config, "num_hidden_layers", 0), getattr(config, "hidden_size", 0)
    return 4 * linear + 2 * trainable + 12 * layers * width * seq_len


def mfu(tokens_per_s: float, flops_per_token: float, peak_tflops: float) -> float:
    return tokens_per_s * flops_per_token / (peak_tflops * 1e12)


def median(values: list[float]) -> float:
    return statistics.median(values)


class EngineSteps:
    """lmtune's loop, driven step by step as `TrainingLoop.run` drives it."""

    def __init__(self, config):
        from lmtune.callbacks import CallbackList, RunState
        from lmtune.engine import TrainingLoop, set_up

        setup = set_up(config)
        setup.output_dir.mkdir(parents=True, exist_ok=True)
        self.state = RunState(config=config, output_dir=setup.output_dir, is_main_process=True,
                              total_steps=setup.plan.total_steps, steps_per_epoch=setup.plan.steps_per_epoch)
        self.loop = TrainingLoop(setup, self.state)
        self.loop.callbacks = CallbackList(self.loop._callbacks())  # as `TrainingLoop.run` builds them
        self.loop._start = time.monotonic()
        self.loop.callbacks = CallbackList(self.loop._callbacks())
        self.loop.callbacks.fire("on_train_begin", self.state, setup.model)
        self.model = setup.model

    def groups(self, count: int) -> list:
        return list(itertools.islice(self.loop._step_groups(), count))

    def step(self, group) -> None:
        self.loop._optimizer_step(group)
        self.loop._after_step()
