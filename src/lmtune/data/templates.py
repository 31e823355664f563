"""Chat templates and the one rule of SFT labels: only the assistant's replies are trained.

A conversation is rendered with a Jinja chat template (the tokenizer's own, or a named one below),
tokenised once with character offsets, and every token that falls inside an assistant reply (its
end-of-turn marker included, so the model learns to stop; the newline after the marker is not) keeps
its label; the rest get -100.
"""

from __future__ import annotations

from typing import Any

IGNORE_INDEX = -100

_CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] "
    "+ '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_LLAMA3 = (
    "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] "
    "+ '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
_MISTRAL = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ message['content'] + eos_token }}{% else %}{{ message['content'] + '\n\n' }}{% endif %}{% endfor %}"
)
_GEMMA = (
    "{{ bos_token }}{% for message in messages %}{% set role = 'model' if message['role'] == 'assistant' "
    "else 'user' %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
_ALPACA = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{ message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'user' %}{{ '### Instruction:\n' + message['content'] + '\n\n' }}"
    "{% else %}{{ '### Response:\n' + message['content'] + eos_token + '\n\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Response:\n' }}{% endif %}"
)
_PHI3 = (
    "{% for message in messages %}{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

NAMED_TEMPLATES: dict[str, str] = {
    "chatml": _CHATML,
    "qwen": _CHATML,
    "smollm": _CHATML,
    "llama3": _LLAMA3,
    "mistral": _MISTRAL,
    "gemma": _GEMMA,
    "alpaca": _ALPACA,
    "phi3": _PHI3,
}


def chat_template_for(tokenizer: Any, name: str | None) -> str:
    """The Jinja template to render with; a clear error when there is none."""
    from lmtune.errors import UserError

    if name is None:
        if not getattr(tokenizer, "chat_template", None):
            raise UserError(
                "the tokenizer has no chat template of its own; set `template` to one of "
                + ", ".join(sorted(NAMED_TEMPLATES))
            )
        return tokenizer.chat_template
    if name not in NAMED_TEMPLATES:
        raise UserError(f"template '{name}' is not known; valid: {', '.join(sorted(NAMED_TEMPLATES))}")
    return NAMED_TEMPLATES[name]


def render(tokenizer: Any, template: str, messages: list[dict[str, str]], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(
        messages, chat_template=template, tokenize=False, add_generation_prompt=generation_prompt
    )


def trained_spans(tokenizer: Any, template: str, messages: list[dict[str, str]]) -> tuple[str, list[range]]:
    """The rendered conversation and the character ranges of the assistant replies in it."""
    text = render(tokenizer, template, messages, generation_prompt=False)
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render(tokenizer, template, messages[:index], generation_prompt=True) if index else ""
        upto = render(tokenizer, template, messages[: index + 1], generation_prompt=False)
        if not text.startswith(upto) or not upto.startswith(before):
            # A template that rewrites earlier turns: fall back to the reply text itself.
            start = text.find(message["content"], spans[-1].stop if spans else 0)
            spans.append(range(start, start + len(message["content"])))
        else:
            # The reply and its end-of-turn marker; the whitespace after the marker belongs to no one.
            end = len(upto.rstrip())
            spans.append(range(len(before), max(end, len(before))))
    return text, spans


def encode_conversation(
    tokenizer: Any, template: str, messages: list[dict[str, str]]
) -> tuple[list[int], list[int]]:
    """Token ids and labels (-100 outside the assistant replies), not yet truncated."""
    text, spans = trained_spans(tokenizer, template, messages)
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
