"""`lmtune chat`: talk to a base model, a run's final model or a checkpoint, adapter applied.

`resolve_target` says what a folder or name is (a model, a run, a checkpoint, an adapter); `eval` and
`export` load their models through it too, so all three commands accept the same things.
"""

from __future__ import annotations

import json
import logging
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from lmtune.checkpoint import DamagedCheckpoint, is_sharded
from lmtune.errors import UserError

EXPECTED = ("a Hugging Face model folder (config.json), a run folder (run_config.yaml and its final model), "
            "a checkpoint folder (checkpoint-<step>/), an adapter folder (adapter_config.json), a .gguf file "
            "or the built-in name 'smollm2-135m-instruct'")


@dataclass
class Target:
    """What a command was pointed at, and where its weights are."""

    given: str
    kind: str  # "model" | "run" | "checkpoint" | "adapter"
    model_path: str  # the folder with the weights (or a hub id / resolved built-in)
    base_model: str | None = None  # for an adapter: the base model it is applied to
    run_dir: Path | None = None
    template: str | None = None  # a template named by a LLaMA-Factory inference config

    @property
    def is_adapter(self) -> bool:
        return self.base_model is not None

    def describe(self) -> dict[str, Any]:
        return {"path": self.model_path, "kind": self.kind, "base_model": self.base_model,
                "run_dir": str(self.run_dir) if self.run_dir else None}


def resolve_target(target: str) -> Target:
    """A model folder, a run folder, a checkpoint folder (full or adapter), a .gguf, the built-in or a hub id."""
    from lmtune.config import BUILTIN_MODEL
    from lmtune.models import resolve_model_path

    folder = Path(target).expanduser()
    if folder.suffix in (".yaml", ".yml") and folder.is_file():
        return _target_of_config(folder)
    if target == BUILTIN_MODEL or folder.suffix == ".gguf":
        return Target(target, "model", resolve_model_path(target))
    if not folder.exists():
        if target.count("/") == 1 and not target.startswith((".", "/", "~")):
            return Target(target, "model", target)  # a hub id, for users with a network
        raise UserError(f"{target} does not exist; expected {EXPECTED}")
    if not folder.is_dir():
        raise UserError(f"{target} is a file; expected {EXPECTED}")
    if (folder / "checkpoint_complete.json").is_file() or (folder / "train_state.json").is_file():
        kind, run_dir = "checkpoint", folder.parent if (folder.parent / "run_config.yaml").is_file() else None
    elif (folder / "run_config.yaml").is_file():
        kind, run_dir = "run", folder
    else:
        kind, run_dir = "model", None
    if (folder / "adapter_config.json").is_file():
        return Target(target, "adapter" if kind == "model" else kind, str(folder), _base_of(folder, run_dir), run_dir)
    if (folder / "config.json").is_file():
        return Target(target, kind, str(folder), None, run_dir)
    if kind == "run":
        newest = _newest_checkpoint(folder)
        hint = f"; its newest complete checkpoint is {newest}" if newest else "; it has no complete checkpoint yet"
        raise UserError(f"{folder} is a run folder without a final model (adapter_config.json or config.json): "
                        f"the run has not finished{hint}")
    raise UserError(f"{folder} holds no model: expected {EXPECTED}")


def _target_of_config(path: Path) -> Target:
    """A LLaMA-Factory inference or export config (examples/inference/*.yaml): model_name_or_path, with
    adapter_name_or_path applied to it, in its template. Its other keys (infer_backend, export_*) are not
    read: lmtune chats with transformers and `lmtune export` takes --out."""
    from lmtune.config import read_yaml
    from lmtune.models import resolve_model_path

    values = read_yaml(path)
    model, adapter = values.get("model_name_or_path"), values.get("adapter_name_or_path")
    if not model:
        raise UserError(f"{path}: no model_name_or_path; expected a LLaMA-Factory inference config, or {EXPECTED}")
    if adapter is None:
        return replace(resolve_target(str(model)), given=str(path), template=values.get("template"))
    if "," in str(adapter) or not (Path(adapter).expanduser() / "adapter_config.json").is_file():
        raise UserError(f"{path}: adapter_name_or_path: {adapter} is not one LoRA adapter folder "
                        "(adapter_config.json)")
    return Target(str(path), "adapter", str(Path(adapter).expanduser()), resolve_model_path(str(model)),
                  template=values.get("template"))


def _newest_checkpoint(run_dir: Path) -> Path | None:
    done = [p for p in run_dir.glob("checkpoint-*") if (p / "checkpoint_complete.json").is_file()]
    steps = [(int(p.name.split("-")[1]), p) for p in done if p.name.split("-")[1].isdigit()]
    return max(steps)[1] if steps else None


def _base_of(adapter_dir: Path, run_dir: Path | None) -> str:
    """The base model of an adapter: as the adapter names it, else as its run's config names it."""
    import yaml

    from lmtune.config import BUILTIN_MODEL
    from lmtune.models import resolve_model_path

    named = json.loads((adapter_dir / "adapter_config.json").read_text()).get("base_model_name_or_path")
    candidates = [named]
    if run_dir is not None:
        candidates.append((yaml.safe_load((run_dir / "run_config.yaml").read_text()) or {}).get("model_name_or_path"))
    for name in candidates:
        if not name:
            continue
        path = Path(name).expanduser()
        if name == BUILTIN_MODEL or (path.is_dir() and (path / "config.json").is_file()) or (
                path.suffix == ".gguf" and path.is_file()):
            return resolve_model_path(name)
        if not path.exists() and name.count("/") == 1 and not name.startswith((".", "/", "~")):
            return name  # a hub id
    raise UserError(
        f"{adapter_dir} is a LoRA adapter whose base model '{named}' is missing: expected a Hugging Face model "
        "folder (config.json) there; put the base model back, or set base_model_name_or_path in "
        f"{adapter_dir / 'adapter_config.json'} to where it is now"
    )


def quiet_transformers() -> None:
    """No progress bars or deprecation chatter between the user and the answer."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)
    # bitsandbytes (imported by PEFT where it is installed) offers a hub kernel for 4-bit CPU layers at import
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def load_model_for_inference(target: str | Target, device: str | None = None) -> tuple[Any, Any]:
    """The model (in float32, adapter applied as a PeftModel) and its tokenizer, ready for eval(). A reward
    model (stage rm) is its sequence-classification model, scoring at the tokenizer's pad token."""
    from lmtune.models import drop_quantization, is_reward_model, load_tokenizer, model_class

    resolved = target if isinstance(target, Target) else resolve_target(target)
    reward = Path(resolved.model_path).is_dir() and is_reward_model(resolved.model_path)
    auto_class = model_class(reward)
    label = {"num_labels": 1} if reward else {}
    try:
        tokenizer = load_tokenizer(resolved.model_path)
        if resolved.kind == "checkpoint" and is_sharded(Path(resolved.model_path)):
            model = _from_shards(resolved, auto_class, label)
        elif resolved.is_adapter:
            from peft import PeftModel

            base = auto_class.from_pretrained(resolved.base_model, dtype=torch.float32, **label)
            if reward:
                base.config.pad_token_id = tokenizer.pad_token_id
            model = PeftModel.from_pretrained(base, resolved.model_path)
        else:
            model = auto_class.from_pretrained(resolved.model_path, dtype=torch.float32)
    except OSError as error:
        raise UserError(f"{resolved.given}: could not load the model: {error}") from None
    drop_quantization(model.config)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(device).eval(), tokenizer


def _from_shards(resolved: Target, auto_class: Any, label: dict[str, int]) -> Any:
    """A sharded checkpoint (fsdp): the model built from its config (LoRA: the adapter on its base model),
    its weights read from the shards, whatever the number of processes that wrote them."""
    from transformers import AutoConfig

    from lmtune.checkpoint import read_state
    from lmtune.resume import ResumePoint, load_sharded_checkpoint

    folder = Path(resolved.model_path)
    if resolved.is_adapter:
        from peft import LoraConfig, get_peft_model

        base = auto_class.from_pretrained(resolved.base_model, dtype=torch.float32, **label)
        model = get_peft_model(base, LoraConfig.from_pretrained(str(folder)))
    else:
        model = auto_class.from_config(AutoConfig.from_pretrained(folder), dtype=torch.float32)
    try:
        load_sharded_checkpoint(model, None, ResumePoint(folder, read_state(folder)))
    except DamagedCheckpoint as error:
        raise UserError(str(error)) from None
    return model


@dataclass
class ChatSession:
    model: Any
    tokenizer: Any
    template: str | None
    tools: list[dict[str, Any]] | None = None  # shown to the model through the template
    enable_thinking: bool = True  # the run's: a run trained without reasoning is prompted as it was trained


def read_tools(path: Path) -> list[dict[str, Any]]:
    """`--tools FILE.json`: a list of tool definitions (OpenAI's, or LLaMA-Factory's bare functions)."""
    from lmtune.data.tool_formats import as_function

    try:
        tools = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise UserError(f"--tools {path}: not a readable JSON file ({error})") from None
    if not isinstance(tools, list) or not all(isinstance(tool, dict) for tool in tools):
        raise UserError(f"--tools {path}: expected a JSON list of tool definitions")
    return [as_function(tool) for tool in tools]


def load_for_chat(target: str, tools: list[dict[str, Any]] | None = None) -> ChatSession:
    from lmtune.models import is_reward_model

    resolved = resolve_target(target)
    if Path(resolved.model_path).is_dir() and is_reward_model(resolved.model_path):
        raise UserError(f"{target} is a reward model (stage rm): it scores texts and does not write; score "
                        "pairs with `lmtune eval`, or load it with AutoModelForSequenceClassification")
    model, tokenizer = load_model_for_inference(resolved)
    return ChatSession(model, tokenizer, run_template(resolved), tools, run_setting(resolved, "enable_thinking", True))


def run_template(target: Target) -> str | None:
    """The named template the run trained with, if any (null: the tokenizer's own)."""
    return run_setting(target, "template", None)


def run_setting(target: Target, key: str, default: Any) -> Any:
    """A key of the run's resolved config; `default` for a model that is no run."""
    import yaml

    if target.run_dir is None:
        return target.template if key == "template" else default
    return (yaml.safe_load((target.run_dir / "run_config.yaml").read_text()) or {}).get(key, default)


def check_settings(max_new_tokens: int, temperature: float, top_p: float) -> None:
    if max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be at least 1 (got {max_new_tokens})")
    if temperature < 0:
        raise UserError(f"--temperature must be 0 (greedy) or more (got {temperature})")
    if not 0 < top_p <= 1:
        raise UserError(f"--top-p must be in (0, 1] (got {top_p})")


def sampling_of(max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0,
                stop: Sequence[str] = ()) -> Any:
    """The checked settings of one answer, as `lmtune chat` and the web UI's Chat tab take them."""
    from lmtune.generation import Sampling

    check_settings(max_new_tokens, temperature, top_p)
    return Sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                    stop=tuple(s for s in stop if s))


def with_system(system: str | None, messages: list[dict[str, str]]) -> list[dict[str, str]]:
    return ([{"role": "system", "content": system}] if system else []) + messages


def generate(session: ChatSession, messages: list[dict[str, str]], sampling: Any = None, on_text: Any = None,
             cancelled: Any = None) -> Any:
    """The answer to the conversation (a generation.Completion), streamed piece by piece to on_text as it is
    generated; cancelled() -> True ends it early."""
    from lmtune.generation import reply

    return reply(session.model, session.tokenizer, session.template, messages, sampling or sampling_of(), on_text,
                 session.tools, session.enable_thinking, cancelled)


def chat_loop(session: ChatSession, prompt: str | None, sampling: Any = None, system: str | None = None) -> None:
    def show(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    if prompt is not None:
        generate(session, with_system(system, [{"role": "user", "content": prompt}]), sampling, on_text=show)
        sys.stdout.write("\n")
        return
    print("chat: /reset starts over, /exit leaves")
    messages: list[dict[str, str]] = []
    while True:
        try:
            text = input("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if text == "/exit":
            return
        if text == "/reset":
            messages = []
            print("(conversation cleared)")
            continue
        if not text:
            continue
        messages.append({"role": "user", "content": text})
        sys.stdout.write("model> ")
        answer = generate(session, with_system(system, messages), sampling, on_text=show)
        sys.stdout.write("\n")
        messages.append({"role": "assistant", "content": answer.text})
