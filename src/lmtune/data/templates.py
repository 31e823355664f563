"""Chat templates and the one rule of SFT labels: only the assistant's replies are trained.

A conversation is rendered with a Jinja chat template (the tokenizer's own, or a named one below),
tokenised once with character offsets, and every token that falls inside an assistant reply (its
end-of-turn marker included, so the model learns to stop; the newline after the marker is not) keeps
its label; the rest get -100.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

IGNORE_INDEX = -100


@dataclass(frozen=True)
class NamedTemplate:
    """A chat format by LLaMA-Factory's name, as slots: `{content}`, `{bos}` and `{eos}` are filled in.

    The assistant `header` opens a reply (it is also the generation prompt); `assistant` is the reply and
    its end-of-turn marker, the trained part. `own_marker`: the tokenizer's own chat template is used
    instead when what it renders contains this marker (the same family, often with more features).
    """

    user: str
    assistant: str
    header: str = ""
    system: str = "{content}"
    prefix: str = ""
    default_system: str = ""
    system_in_first_user: bool = False  # llama2, mistral, gemma: the system text opens the first user turn
    empty_thought: str = ""  # reasoning templates: an empty thought is trained before a reply that has none
    eos_at_end: bool = False  # glm4: a reply ends where the next turn starts, and the conversation with EOS
    own_marker: str | None = None
    enable_thinking: bool | None = None  # for the tokenizer's own template: false for *_nothink


_CHATML = dict(user="<|im_start|>user\n{content}<|im_end|>\n", header="<|im_start|>assistant\n",
               assistant="{content}<|im_end|>\n", system="<|im_start|>system\n{content}<|im_end|>\n")
_GEMMA = NamedTemplate(
    prefix="{bos}", user="<start_of_turn>user\n{content}<end_of_turn>\n", header="<start_of_turn>model\n",
    assistant="{content}<end_of_turn>\n", system="{content}\n\n", system_in_first_user=True,
    own_marker="<start_of_turn>",
)
_QWEN = NamedTemplate(**_CHATML, default_system="You are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
                      own_marker="<|im_start|>")
_PHI = NamedTemplate(user="<|user|>\n{content}<|end|>\n", header="<|assistant|>\n", assistant="{content}<|end|>\n",
                     system="<|system|>\n{content}<|end|>\n", own_marker="<|end|>")

TEMPLATES: dict[str, NamedTemplate] = {
    "default": NamedTemplate(user="Human: {content}{eos}\n", header="Assistant:", assistant="{content}{eos}\n",
                             system="System: {content}{eos}\n"),
    "empty": NamedTemplate(user="{content}", assistant="{content}"),
    "alpaca": NamedTemplate(
        user="### Instruction:\n{content}\n\n", header="### Response:\n", assistant="{content}{eos}\n\n",
        default_system="Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n",
    ),
    "vicuna": NamedTemplate(
        user="USER: {content}", header=" ASSISTANT:", assistant="{content}{eos}",
        default_system="A chat between a curious user and an artificial intelligence assistant. The assistant "
        "gives helpful, detailed, and polite answers to the user's questions.",
    ),
    "chatml": NamedTemplate(**_CHATML),
    "qwen": _QWEN,
    "qwen2": _QWEN,
    "qwen2_5": _QWEN,
    "qwen3": NamedTemplate(**_CHATML, empty_thought="<think>\n\n</think>\n\n", own_marker="<|im_start|>"),
    "qwen3_nothink": NamedTemplate(**_CHATML, own_marker="<|im_start|>", enable_thinking=False),
    "yi": NamedTemplate(**_CHATML, own_marker="<|im_start|>"),
    "smollm": NamedTemplate(**_CHATML, own_marker="<|im_start|>"),
    "smollm2": NamedTemplate(**_CHATML, default_system="You are a helpful AI assistant named SmolLM, trained by "
                             "Hugging Face.", own_marker="<|im_start|>"),
    "llama3": NamedTemplate(
        prefix="{bos}", user="<|start_header_id|>user<|end_header_id|>\n\n{content}<|eot_id|>",
        header="<|start_header_id|>assistant<|end_header_id|>\n\n", assistant="{content}<|eot_id|>",
        system="<|start_header_id|>system<|end_header_id|>\n\n{content}<|eot_id|>", own_marker="<|start_header_id|>",
    ),
    "llama2": NamedTemplate(user="{bos}[INST] {content} [/INST]", assistant="{content}{eos}",
                            system="<<SYS>>\n{content}\n<</SYS>>\n\n", system_in_first_user=True,
                            own_marker="[INST]"),
    "mistral": NamedTemplate(prefix="{bos}", user="[INST] {content}[/INST]", assistant=" {content}{eos}",
                             system="{content}\n\n", system_in_first_user=True, own_marker="[INST]"),
    "gemma": _GEMMA,
    "gemma2": _GEMMA,
    "gemma3": _GEMMA,
    "phi": _PHI,
    "phi3": _PHI,
    "deepseek": NamedTemplate(prefix="{bos}", user="User: {content}\n\n", header="Assistant:",
                              assistant="{content}{eos}", system="{content}\n\n", own_marker="\n\nAssistant:"),
    "glm4": NamedTemplate(prefix="[gMASK]<sop>", user="<|user|>\n{content}", header="<|assistant|>",
                          assistant="\n{content}", system="<|system|>\n{content}", eos_at_end=True,
                          own_marker="[gMASK]"),
    "cohere": NamedTemplate(
        prefix="{bos}", user="<|START_OF_TURN_TOKEN|><|USER_TOKEN|>{content}<|END_OF_TURN_TOKEN|>",
        header="<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>", assistant="{content}{eos}",
        system="<|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|>{content}<|END_OF_TURN_TOKEN|>",
        own_marker="<|START_OF_TURN_TOKEN|>",
    ),
}
# Markers that close a reply by opening the next turn (glm4); trained with the reply, as its end.
TURN_CLOSERS = ("<|user|>", "<|observation|>")


def _jinja(slot: str, content: str = "content") -> str:
    """A slot as a Jinja expression: string literals joined with the content and special-token variables."""
    parts = re.split(r"(\{content\}|\{bos\}|\{eos\})", slot)
    names = {"{content}": content, "{bos}": "bos_token", "{eos}": "eos_token"}
    pieces = [names.get(part) or _literal(part) for part in parts if part]
    return " + ".join(pieces) or "''"


def _literal(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n")
    return f"'{escaped}'"


def named_jinja(template: NamedTemplate) -> str:
    """The Jinja chat template of a named template, as LLaMA-Factory renders it."""
    out = "{{ " + _jinja(template.prefix) + " }}" if template.prefix else ""
    if template.default_system:
        out += "{% set system_message = " + _jinja(template.default_system) + " %}"
    out += ("{% if messages and messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
            "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% endif %}")
    has_system = "system_message is defined and system_message"
    if not template.system_in_first_user:
        out += "{% if " + has_system + " %}{{ " + _jinja(template.system, "system_message") + " }}{% endif %}"
    out += "{% for message in loop_messages %}{% set content = message['content'] %}"
    if template.system_in_first_user:
        out += ("{% if loop.first and " + has_system + " %}{% set content = "
                + _jinja(template.system, "system_message") + " + content %}{% endif %}")
    assistant = template.assistant
    if template.empty_thought:
        out += ("{% if message['role'] == 'assistant' and '<think>' not in content %}{% set content = "
                + _jinja(template.empty_thought) + " + content %}{% endif %}")
    out += ("{% if message['role'] == 'user' %}{{ " + _jinja(template.user) + " }}"
            "{% elif message['role'] == 'assistant' %}{{ " + _jinja(template.header + assistant) + " }}"
            "{% endif %}{% endfor %}")
    if template.header:
        out += "{% if add_generation_prompt %}{{ " + _jinja(template.header) + " }}{% endif %}"
    if template.eos_at_end:
        out += "{% if not add_generation_prompt %}{{ eos_token }}{% endif %}"
    return out


def chat_template_for(tokenizer: Any, name: str | None) -> str:
    """The Jinja template to render with: the tokenizer's own (for `null`, and for a named family its
    own template belongs to), else the named one; a clear error when there is none."""
    from lmtune.errors import UserError

    own = getattr(tokenizer, "chat_template", None)
    if name is None:
        if not own:
            raise UserError("the tokenizer has no chat template of its own; set `template` to one of "
                            + ", ".join(sorted(TEMPLATES)))
        return own
    if name not in TEMPLATES:
        raise UserError(f"template '{name}' is not known; valid: {', '.join(sorted(TEMPLATES))}")
    named = TEMPLATES[name]
    if own and named.own_marker and named.own_marker in _probe(tokenizer, own):
        if named.enable_thinking is None:
            return own
        flag = "true" if named.enable_thinking else "false"
        return "{% set enable_thinking = " + flag + " %}" + own
    return named_jinja(named)


def _probe(tokenizer: Any, template: str) -> str:
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    try:
        return render(tokenizer, template, messages, generation_prompt=False)
    except Exception:  # a template that refuses this conversation is not the family's
        return ""


def render(tokenizer: Any, template: str, messages: list[dict[str, Any]], generation_prompt: bool,
           tools: list[dict] | None = None) -> str:
    return tokenizer.apply_chat_template(
        messages, chat_template=template, tokenize=False, add_generation_prompt=generation_prompt, tools=tools
    )


def trained_spans(tokenizer: Any, template: str, messages: list[dict[str, str]]) -> tuple[str, list[range]]:
    """The rendered conversation and the character ranges of the assistant replies in it."""
    text = render(tokenizer, template, messages, generation_prompt=False)
    closers = tuple(t for t in (*TURN_CLOSERS, tokenizer.eos_token) if t)
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render(tokenizer, template, messages[:index], generation_prompt=True) if index else ""
        upto = render(tokenizer, template, messages[: index + 1], generation_prompt=False)
        previous_end = spans[-1].stop if spans else 0
        start = len(before) if text.startswith(before) and len(before) >= previous_end else \
            text.find(message["content"], previous_end)
        if text.startswith(upto) and upto.startswith(before):
            # The reply and its end-of-turn marker; the whitespace after the marker belongs to no one.
            end = max(len(upto.rstrip()), start)
        else:
            # A template that renders a turn differently once more follow it: up to the end of the reply text.
            end = text.find(message["content"], start) + len(message["content"])
        # A marker that closes the reply right after it (EOS, or glm4's next-turn marker) is its end.
        closer = next((c for c in closers if text.startswith(c, end)), None)
        spans.append(range(start, end + len(closer) if closer else end))
    return text, spans


def encode_conversation(
    tokenizer: Any, template: str, messages: list[dict[str, str]], last_reply_only: bool = False
) -> tuple[list[int], list[int]]:
    """Token ids and labels (-100 outside the assistant replies, or outside the last one: the answer of a
    preference pair, whose earlier turns are its prompt), not yet truncated."""
    text, spans = trained_spans(tokenizer, template, messages)
    if last_reply_only:
        spans = spans[-1:]
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    input_ids = list(encoded["input_ids"])
    labels = [IGNORE_INDEX] * len(input_ids)
    span_index = 0
    for position, (start, end) in enumerate(encoded["offset_mapping"]):
        while span_index < len(spans) and start >= spans[span_index].stop:
            span_index += 1
        if span_index == len(spans):
            break
        span = spans[span_index]
        if end > span.start and start < span.stop:
            labels[position] = input_ids[position]
    return input_ids, labels
