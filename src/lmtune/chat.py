"""`lmtune chat`: talk to a base model, a run's final model or a checkpoint, adapter applied."""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lmtune.errors import UserError


@dataclass
class ChatSession:
    model: Any
    tokenizer: Any
    template: str | None


def load_model_for_inference(target: str) -> tuple[Any, Any]:
    """A model folder, a run folder, a checkpoint folder (full or adapter), a .gguf or the built-in."""
    from transformers import AutoModelForCausalLM

    from lmtune.models import load_tokenizer, resolve_model_path

    folder = Path(target)
    if folder.is_dir() and (folder / "adapter_config.json").is_file():
        from peft import PeftModel

        base_name = json.loads((folder / "adapter_config.json").read_text()).get("base_model_name_or_path")
        if not base_name or not (Path(base_name).exists() or base_name.count("/") == 1):
            raise UserError(f"{folder}: the adapter's base model '{base_name}' is missing")
        base = AutoModelForCausalLM.from_pretrained(resolve_model_path(base_name), dtype=torch.float32)
        model = PeftModel.from_pretrained(base, str(folder))
        return model.eval(), load_tokenizer(str(folder))
    if folder.is_dir() and not (folder / "config.json").is_file():
        raise UserError(
            f"{folder} is neither a model folder (config.json), a run's final model nor a checkpoint "
            "(adapter_config.json); a run that has not finished has its checkpoints in checkpoint-<step>/"
        )
    path = resolve_model_path(target)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model.eval(), load_tokenizer(path)


def load_for_chat(target: str) -> ChatSession:
    model, tokenizer = load_model_for_inference(target)
    template = _run_template(Path(target))
    return ChatSession(model, tokenizer, template)


def _run_template(folder: Path) -> str | None:
    """The named template a run trained with, if any (a checkpoint's run is its parent)."""
    import yaml

    for candidate in (folder / "run_config.yaml", folder.parent / "run_config.yaml"):
        if candidate.is_file():
            return (yaml.safe_load(candidate.read_text()) or {}).get("template")
    return None


def generate(session: ChatSession, messages: list[dict[str, str]], max_new_tokens: int = 256,
             temperature: float = 0.0, top_p: float = 1.0, on_text: Any = None) -> str:
    from transformers import TextIteratorStreamer

    from lmtune.data.templates import chat_template_for, render

    template = chat_template_for(session.tokenizer, session.template)
    prompt = render(session.tokenizer, template, messages, generation_prompt=True)
    inputs = session.tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    streamer = TextIteratorStreamer(session.tokenizer, skip_prompt=True, skip_special_tokens=True)
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else {
        "do_sample": False}
    kwargs = dict(**inputs, max_new_tokens=max_new_tokens, streamer=streamer,
                  pad_token_id=session.tokenizer.pad_token_id, eos_token_id=session.tokenizer.eos_token_id,
                  **sampling)
    worker = threading.Thread(target=_generate_quietly, args=(session.model, kwargs))
    worker.start()
    pieces = []
    for piece in streamer:
        pieces.append(piece)
        if on_text is not None:
            on_text(piece)
    worker.join()
    return "".join(pieces).strip()


def _generate_quietly(model: Any, kwargs: dict) -> None:
    with torch.no_grad():
        model.generate(**kwargs)


def chat_loop(session: ChatSession, prompt: str | None, **settings: Any) -> None:
    import sys

    def show(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    if prompt is not None:
        generate(session, [{"role": "user", "content": prompt}], on_text=show, **settings)
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
            continue
        if not text:
            continue
        messages.append({"role": "user", "content": text})
        sys.stdout.write("model> ")
        answer = generate(session, messages, on_text=show, **settings)
        sys.stdout.write("\n")
        messages.append({"role": "assistant", "content": answer})
