"""Chat templates, and a conversation as LLaMA-Factory encodes it: (prompt ids, answer ids) per reply.

A named template (LLaMA-Factory's names) is a set of slots: each message is formatted with its slot, and
each piece of text is tokenised on its own, as LLaMA-Factory 0.9.5 does, so the ids are its ids. The
prompt of a reply (everything before it, up to and including the header that opens it) and the reply
(everything the template writes for it, its end-of-turn marker and what follows up to the next turn)
are never tokenised together: no token straddles them, and the prompt's tokens are the ones the model
sees at inference, where the prompt is tokenised alone and the answer is generated after it.

`template: null` uses the tokenizer's own Jinja template: the conversation is rendered, cut where each
reply starts and ends, and each piece tokenised on its own.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

IGNORE_INDEX = -100

Turn = tuple[list[int], list[int]]  # the prompt of one reply and the reply, as token ids


@dataclass(frozen=True)
class NamedTemplate:
    """A chat format by LLaMA-Factory's name, as slots: `{content}`, `{bos}` and `{eos}` are filled in.

    The assistant `header` opens a reply (it is also the generation prompt); `assistant` is the reply as
    written after it, all of it trained.
    """

    user: str
    assistant: str
    header: str = ""
    system: str = "{content}"
    prefix: str = ""
    default_system: str = ""
    system_in_first_user: bool = False  # llama2, mistral, gemma: the system text opens the first user turn
    empty_thought: str = ""  # reasoning templates: an empty thought is trained before a reply that has none
    # gemma2, glm4: the reply has no end-of-turn marker of its own; EOS is its label where the next turn
    # starts, and EOS ends the conversation (LLaMA-Factory's `efficient_eos`)
    efficient_eos: bool = False


_CHATML = dict(user="<|im_start|>user\n{content}<|im_end|>\n", header="<|im_start|>assistant\n",
               assistant="{content}<|im_end|>\n", system="<|im_start|>system\n{content}<|im_end|>\n")
_GEMMA = dict(prefix="{bos}", user="<start_of_turn>user\n{content}<end_of_turn>\n", header="<start_of_turn>model\n",
              assistant="{content}<end_of_turn>\n", system="{content}\n\n", system_in_first_user=True)
_QWEN = NamedTemplate(**_CHATML, default_system="You are Qwen, created by Alibaba Cloud. You are a helpful assistant.")
_PHI = NamedTemplate(user="<|user|>\n{content}<|end|>\n", header="<|assistant|>\n", assistant="{content}<|end|>\n",
                     system="<|system|>\n{content}<|end|>\n")

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
    "qwen2": _QWEN,  # not a LLaMA-Factory name: Qwen2 and Qwen2.5 use its `qwen`
    "qwen2_5": _QWEN,
    "qwen3": NamedTemplate(**_CHATML, empty_thought="<think>\n\n</think>\n\n"),
    "qwen3_nothink": NamedTemplate(**_CHATML),
    "yi": NamedTemplate(**_CHATML),
    "smollm": NamedTemplate(**_CHATML),
    "smollm2": NamedTemplate(**_CHATML, default_system="You are a helpful AI assistant named SmolLM, trained by "
                             "Hugging Face."),
    "llama3": NamedTemplate(
        prefix="{bos}", user="<|start_header_id|>user<|end_header_id|>\n\n{content}<|eot_id|>",
        header="<|start_header_id|>assistant<|end_header_id|>\n\n", assistant="{content}<|eot_id|>",
        system="<|start_header_id|>system<|end_header_id|>\n\n{content}<|eot_id|>",
    ),
    "llama2": NamedTemplate(user="{bos}[INST] {content} [/INST]", assistant="{content}{eos}",
                            system="<<SYS>>\n{content}\n<</SYS>>\n\n", system_in_first_user=True),
    "mistral": NamedTemplate(prefix="{bos}", user="[INST] {content}[/INST]", assistant=" {content}{eos}",
                             system="{content}\n\n", system_in_first_user=True),
    "gemma": NamedTemplate(**_GEMMA),
    "gemma2": NamedTemplate(**_GEMMA, efficient_eos=True),
    "gemma3": NamedTemplate(**_GEMMA),
    "phi": _PHI,
    "phi3": _PHI,  # not a LLaMA-Factory name: Phi-3 uses its `phi`
    "deepseek": NamedTemplate(prefix="{bos}", user="User: {content}\n\n", header="Assistant:",
                              assistant="{content}{eos}", system="{content}\n\n"),
    "glm4": NamedTemplate(prefix="[gMASK]<sop>", user="<|user|>\n{content}", header="<|assistant|>",
                          assistant="\n{content}", system="<|system|>\n{content}", efficient_eos=True),
    "cohere": NamedTemplate(
        prefix="{bos}", user="<|START_OF_TURN_TOKEN|><|USER_TOKEN|>{content}<|END_OF_TURN_TOKEN|>",
        header="<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>", assistant="{content}{eos}",
        system="<|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|>{content}<|END_OF_TURN_TOKEN|>",
    ),
}
# Markers that close a reply by opening the next turn (GLM-4's own template): trained with the reply.
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
    """The Jinja chat template of a named template: it renders the text the encoding tokenises."""
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
    if template.empty_thought:
        out += ("{% if message['role'] == 'assistant' and '<think>' not in content and '</think>' not in content %}"
                "{% set content = " + _jinja(template.empty_thought) + " + content %}{% endif %}")
    out += ("{% if message['role'] == 'user' %}{{ " + _jinja(template.user) + " }}"
            "{% elif message['role'] == 'assistant' %}{{ " + _jinja(template.header + template.assistant) + " }}"
            "{% endif %}{% endfor %}")
    if template.header:
        out += "{% if add_generation_prompt %}{{ " + _jinja(template.header) + " }}{% endif %}"
    if template.efficient_eos:
        out += "{% if not add_generation_prompt %}{{ eos_token }}{% endif %}"
    return out


def conversation_format(tokenizer: Any, name: str | None) -> NamedTemplate | str:
    """What `template` stands for: the named template (always: a name means that family's format, as in
    LLaMA-Factory), or for `null` the tokenizer's own Jinja template; a clear error when there is none."""
    from lmtune.errors import UserError

    if name is None:
        own = getattr(tokenizer, "chat_template", None)
        if not own:
            raise UserError("the tokenizer has no chat template of its own; set `template` to one of "
                            + ", ".join(sorted(TEMPLATES)))
        return own
    if name not in TEMPLATES:
        raise UserError(f"template '{name}' is not known; valid: {', '.join(sorted(TEMPLATES))}")
    return TEMPLATES[name]


def chat_template_for(tokenizer: Any, name: str | None) -> str:
    """The Jinja template chat, export and preview render with: the one the training data was encoded with."""
    chosen = conversation_format(tokenizer, name)
    return named_jinja(chosen) if isinstance(chosen, NamedTemplate) else chosen


def render(tokenizer: Any, template: str, messages: list[dict[str, Any]], generation_prompt: bool,
           tools: list[dict] | None = None) -> str:
    return tokenizer.apply_chat_template(
        messages, chat_template=template, tokenize=False, add_generation_prompt=generation_prompt, tools=tools
    )


def encode_turns(tokenizer: Any, template: NamedTemplate | str, messages: list[dict[str, str]]) -> list[Turn]:
    """(prompt ids, reply ids) for each assistant reply, in order; messages after the last reply are left out."""
    if isinstance(template, NamedTemplate):
        return _named_turns(tokenizer, template, messages)
    return _jinja_turns(tokenizer, template, messages)


def _slot_ids(tokenizer: Any, slot: str, content: str = "") -> list[int]:
    """A slot filled with the content: each piece of text tokenised on its own, {bos} and {eos} as the ids."""
    ids: list[int] = []
    for part in re.split(r"(\{bos\}|\{eos\})", slot):
        if part == "{bos}":
            ids += [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        elif part == "{eos}":
            ids += [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        elif part:
            text = part.replace("{content}", content, 1)
            ids += tokenizer.encode(text, add_special_tokens=False) if text else []
    return ids


def _named_turns(tokenizer: Any, template: NamedTemplate, messages: list[dict[str, str]]) -> list[Turn]:
    turns, _ = _named_encoding(tokenizer, template, messages)
    return turns


def _named_encoding(tokenizer: Any, template: NamedTemplate,
                    messages: list[dict[str, str]]) -> tuple[list[Turn], list[int]]:
    """The turns, and the prompt after the last reply (what a generation prompt ends with)."""
    system = template.default_system
    if messages and messages[0]["role"] == "system":
        system, messages = messages[0]["content"], messages[1:]
    turns: list[Turn] = []
    prompt: list[int] = []
    for index, message in enumerate(messages):
        content = message["content"]
        if index == 0:
            prompt += _slot_ids(tokenizer, template.prefix)
            if system and template.system_in_first_user:
                content = template.system.replace("{content}", system, 1) + content
            elif system:
                prompt += _slot_ids(tokenizer, template.system, system)
        if message["role"] != "assistant":
            slot = template.user + template.header if message["role"] == "user" else template.system
            prompt += _slot_ids(tokenizer, slot, content)
            continue
        reply = _slot_ids(tokenizer, template.assistant, content)
        if template.empty_thought and "<think>" not in content and "</think>" not in content:
            reply = tokenizer.encode(template.empty_thought, add_special_tokens=False) + reply
        turns.append((prompt, reply))
        prompt = []
    return turns, prompt


def generation_prompt_ids(tokenizer: Any, template: NamedTemplate | str, messages: list[dict[str, str]]) -> list[int]:
    """The token ids of a conversation that ends with the user's turn, the reply's header after it: the
    same tokens training gives the same turns, so the model sees at inference what it was trained on."""
    if isinstance(template, str):
        return _jinja_generation_prompt(tokenizer, template, messages)
    turns, prompt = _named_encoding(tokenizer, template, messages)
    return [token for earlier, reply in turns for token in earlier + reply] + prompt


def _jinja_generation_prompt(tokenizer: Any, template: str, messages: list[dict[str, str]]) -> list[int]:
    """The earlier turns in the pieces `_jinja_turns` tokenises them in (each prompt and each reply on its
    own), then the rest of the rendered prompt, the generation prompt included."""
    text, spans = reply_spans(tokenizer, template, messages)
    whole = render(tokenizer, template, messages, generation_prompt=True)
    if not spans or not whole.startswith(text[:spans[-1].stop]):
        return _text_ids(tokenizer, whole)
    ids, previous_end = [], 0
    for span in spans:
        ids += _text_ids(tokenizer, text[previous_end:span.start]) + _text_ids(tokenizer, text[span.start:span.stop])
        previous_end = span.stop
    return ids + _text_ids(tokenizer, whole[previous_end:])


def _jinja_turns(tokenizer: Any, template: str, messages: list[dict[str, str]]) -> list[Turn]:
    text, spans = reply_spans(tokenizer, template, messages)
    turns, previous_end = [], 0
    for index, span in enumerate(spans):
        end = len(text) if index == len(spans) - 1 else span.stop  # what follows the last reply is its end
        turns.append((_text_ids(tokenizer, text[previous_end:span.start]), _text_ids(tokenizer, text[span.start:end])))
        previous_end = end
    return turns


def _text_ids(tokenizer: Any, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False) if text else []


def reply_spans(tokenizer: Any, template: str, messages: list[dict[str, str]]) -> tuple[str, list[range]]:
    """The rendered conversation and the character ranges of the assistant replies in it: each from the
    end of its generation prompt to where the next turn starts."""
    text = render(tokenizer, template, messages, generation_prompt=False)
    closers = tuple(t for t in (*TURN_CLOSERS, tokenizer.eos_token) if t)
    spans: list[range] = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render(tokenizer, template, messages[:index], generation_prompt=True) if index else ""
        upto = render(tokenizer, template, messages[: index + 1], generation_prompt=False)
        previous_end = spans[-1].stop if spans else 0
        start = len(before) if text.startswith(before) and len(before) >= previous_end else \
            text.find(message["content"], previous_end)
        if text.startswith(upto) and upto.startswith(before):
            end = max(len(upto), start)
        else:
            # A template that renders a turn differently once more follow it: up to the end of the reply text.
            end = text.find(message["content"], start) + len(message["content"])
        # A marker that closes the reply right after it (EOS, or GLM-4's next-turn marker) is its end.
        closer = next((c for c in closers if text.startswith(c, end)), None)
        spans.append(range(start, end + len(closer) if closer else end))
    return text, spans
