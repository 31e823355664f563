"""Reward functions of stage grpo: the user's Python and a few built-ins, loaded and checked at start-up.

A reward function is called once a step with every completion of this process:

    f(prompts=[...], completions=[...], completion_ids=[...], step=N, **columns) -> [float | None, ...]

`prompts` are the conversations (lists of {role, content}) the completions answer, `completions` the
generated texts, `completion_ids` their token ids, `step` the optimizer steps done so far, and each
other column of the data rows is a keyword argument holding one value per completion (as in TRL). It
returns one number per completion, or None where it does not apply; it may be `async`. A function is
named `path/to/file.py:function` in `reward_funcs`; built-ins by their name (BUILT_INS).
"""

from __future__ import annotations

import asyncio
import importlib.util
import inspect
import math
import re
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmtune.config import TrainConfig
from lmtune.errors import RunFailed, UserError

BUILT_INS = ("math_answer", "format", "length")
CONTRACT = "a reward function is `def f(prompts, completions, **kwargs)` returning one float (or None) a completion"


class RewardFailed(RunFailed):
    """A reward function raised or returned something unusable during the run: exit 1, after a checkpoint."""


@dataclass
class RewardFunction:
    name: str  # as in the metrics: rewards/<name>/mean
    source: str  # as written in reward_funcs
    function: Callable[..., Any]

    def __call__(self, **kwargs: Any) -> list[float]:
        """The rewards, NaN where the function returned None; ValueError when its answer is unusable."""
        if inspect.iscoroutinefunction(self.function):
            values = asyncio.run(self.function(**kwargs))
        else:
            values = self.function(**kwargs)
        count = len(kwargs["completions"])
        if not isinstance(values, (list, tuple)) or len(values) != count:
            got = f"{len(values)} values" if isinstance(values, (list, tuple)) else type(values).__name__
            raise ValueError(f"returned {got} for {count} completions; {CONTRACT}")
        rewards = []
        for value in values:
            if value is None:
                rewards.append(math.nan)
                continue
            try:
                rewards.append(float(value))
            except (TypeError, ValueError):
                raise ValueError(f"returned {value!r}, not a number or None; {CONTRACT}") from None
        return rewards


def load_reward_functions(config: TrainConfig) -> list[RewardFunction]:
    """The functions of `reward_funcs`, in order; UserError naming the one that cannot be loaded."""
    return [_load_one(source, config) for source in config.reward_funcs]


def _load_one(source: str, config: TrainConfig) -> RewardFunction:
    if source in BUILT_INS:
        return RewardFunction(source, source, _built_in(source, config))
    path_text, _, name = source.rpartition(":")
    if not path_text or not name:
        raise UserError(f"reward_funcs: '{source}' is neither a built-in ({', '.join(BUILT_INS)}) nor "
                        "'path/to/file.py:function'")
    path = Path(path_text)
    if not path.is_file():
        raise UserError(f"reward_funcs: '{source}': file {path.resolve()} not found")
    module_name = f"lmtune_rewards_{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    try:
        sys.modules[module_name] = module  # so that dataclasses and pickling inside the file work
        spec.loader.exec_module(module)
    except Exception as error:  # the user's file: any error is theirs to see, with where it happened
        where = traceback.extract_tb(error.__traceback__)[-1]
        raise UserError(f"reward_funcs: '{source}': importing {path} failed at line {where.lineno}: "
                        f"{type(error).__name__}: {error}") from None
    function = getattr(module, name, None)
    if not callable(function):
        defined = sorted(n for n, v in vars(module).items() if inspect.isfunction(v) and not n.startswith("_"))
        raise UserError(f"reward_funcs: '{source}': {path} defines no function '{name}' "
                        f"(its functions: {', '.join(defined) or 'none'})")
    return RewardFunction(name, source, function)


def check_reward_functions(functions: list[RewardFunction], prompts: list[list[dict[str, str]]],
                           columns: list[dict[str, Any]]) -> None:
    """The start-up dry run: each function called as in the run, on two made-up completions of the first
    prompts; UserError naming the function that cannot take the call or whose answer is unusable."""
    completions = ["42", "I am not sure."]
    kwargs = reward_arguments([prompts[i % len(prompts)] for i in range(2)], completions, [[0], [0]],
                              [columns[i % len(columns)] for i in range(2)], step=0)
    for reward in functions:
        try:
            inspect.signature(reward.function).bind(**kwargs)
        except TypeError as error:
            raise UserError(f"reward_funcs: '{reward.source}' cannot take the arguments of a reward call ({error}); "
                            f"it is called with {', '.join(kwargs)}; {CONTRACT}") from None
        except ValueError:
            pass  # a callable whose signature Python cannot read: the call below tells
        try:
            reward(**kwargs)
        except ValueError as error:
            raise UserError(f"reward_funcs: '{reward.source}' on a dry run of two completions: {error}") from None
        except Exception as error:  # the user's code
            where = traceback.extract_tb(error.__traceback__)[-1]
            raise UserError(f"reward_funcs: '{reward.source}' raised on a dry run of two completions "
                            f"({where.filename}, line {where.lineno}): {type(error).__name__}: {error}") from None


def reward_arguments(prompts: list[Any], completions: list[str], completion_ids: list[list[int]],
                     columns: list[dict[str, Any]], step: int) -> dict[str, Any]:
    """The keyword arguments of a reward call: one value per completion for each data column."""
    names = sorted({name for row in columns for name in row})
    kwargs: dict[str, Any] = {"prompts": prompts, "completions": completions, "completion_ids": completion_ids,
                              "step": step}
    kwargs.update({name: [row.get(name) for row in columns] for name in names if name not in kwargs})
    return kwargs


# --- built-ins ----------------------------------------------------------------------------------


def _built_in(name: str, config: TrainConfig) -> Callable[..., list[float | None]]:
    if name == "math_answer":
        column = config.reward_answer_column

        def math_answer(completions: list[str], **kwargs: Any) -> list[float | None]:
            if column not in kwargs:
                shown = ", ".join(k for k in kwargs if k not in ("prompts", "completion_ids", "step")) or "none"
                raise ValueError(f"the data has no '{column}' column to check answers against (its columns: "
                                 f"{shown}); set reward_answer_column")
            return [None if answer is None else float(same_answer(final_answer(text), final_answer(str(answer))))
                    for text, answer in zip(completions, kwargs[column], strict=True)]

        return math_answer
    if name == "format":
        pattern = re.compile(config.reward_format_regex, re.DOTALL)

        def format(completions: list[str], **kwargs: Any) -> list[float]:  # noqa: A001 - the metric's name
            return [float(pattern.fullmatch(text.strip()) is not None) for text in completions]

        return format
    limit = config.reward_max_words

    def length(completions: list[str], **kwargs: Any) -> list[float]:
        return [max(0.0, 1.0 - max(0, len(text.split()) - limit) / limit) for text in completions]

    return length


NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def final_answer(text: str) -> str:
    """The final answer of a worked solution: \\boxed{...}, after '####', after 'answer is', or the last number."""
    boxed = text.rfind("\\boxed{")
    if boxed >= 0:
        depth, start = 0, boxed + len("\\boxed{")
        for index in range(start, len(text)):
            depth += {"{": 1, "}": -1}.get(text[index], 0)
            if depth < 0:
                return text[start:index].strip()
    for marker in ("####", "answer is", "Answer:", "<answer>"):
        at = text.rfind(marker)
        if at >= 0:
            return text[at + len(marker):].split("</answer>")[0].strip().rstrip(".").strip()
    numbers = NUMBER.findall(text)
    return numbers[-1] if numbers else text.strip()


def same_answer(given: str, expected: str) -> bool:
    """Equal as numbers where both are numbers (1,000 = 1000.0), else as text without case or spaces."""
    def number(text: str) -> float | None:
        text = text.replace("$", "").replace(",", "").strip().rstrip(".")
        try:
            return float(text)
        except ValueError:
            return None

    a, b = number(given), number(expected)
    if a is not None and b is not None:
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9)
    return "".join(given.lower().split()) == "".join(expected.lower().split())
