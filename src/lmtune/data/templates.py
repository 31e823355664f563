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
from dataclasses import dataclass, replace
from typing import Any

from lmtune.data.tool_formats import LLAMA3_TOOLS, QWEN_TOOLS, ToolFormat
from lmtune.errors import UserError

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
    tools: ToolFormat | None = None  # how tool definitions, calls and results are written; None: no tool format
    drops_past_thoughts: bool = False  # qwen3: the reasoning of replies before the last user message is not shown
    strips_thoughts: bool = False  # enable_thinking: false: no reply keeps its reasoning


_CHATML = dict(user="<|im_start|>user\n{content}<|im_end|>\n", header="<|im_start|>assistant\n",
               assistant="{content}<|im_end|>\n", system="<|im_start|>system\n{content}<|im_end|>\n")
_GEMMA = dict(prefix="{bos}", user="<start_of_turn>user\n{content}<end_of_turn>\n", header="<start_of_turn>model\n",
              assistant="{content}<end_of_turn>\n", system="{content}\n\n", system_in_first_user=True)
_QWEN_CHATML = dict(_CHATML, tools=QWEN_TOOLS)
_QWEN = NamedTemplate(**_QWEN_CHATML,
                      default_system="You are Qwen, created by Alibaba Cloud. You are a helpful assistant.")
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
    "qwen3": NamedTemplate(**_QWEN_CHATML, empty_thought="<think>\n\n</think>\n\n", drops_past_thoughts=True),
    "qwen3_nothink": NamedTemplate(**_QWEN_CHATML),
    "yi": NamedTemplate(**_CHATML),
    "smollm": NamedTemplate(**_CHATML),
    "smollm2": NamedTemplate(**_CHATML, default_system="You are a helpful AI assistant named SmolLM, trained by "
                             "Hugging Face."),
    "llama3": NamedTemplate(
        prefix="{bos}", user="<|start_header_id|>user<|end_header_id|>\n\n{content}<|eot_id|>",
        header="<|start_header_id|>assistant<|end_header_id|>\n\n", assistant="{content}<|eot_id|>",
        system="<|start_header_id|>system<|end_header_id|>\n\n{content}<|eot_id|>", tools=LLAMA3_TOOLS,
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
    """The Jinja chat template of a named template: it renders the text the encoding tokenises, tools, tool
    calls, tool results and reasoning included, and reads `enable_thinking` as the encoding does."""
    out = "{{ " + _jinja(template.prefix) + " }}" if template.prefix else ""
    if template.default_system:
        out += "{% set system_message = " + _jinja(template.default_system) + " %}"
    out += ("{% if messages and messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
            "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% endif %}")
    if template.tools:
        out += _tools_jinja(template.tools)
    has_system = "system_message is defined and system_message"
    if not template.system_in_first_user:
        out += "{% if " + has_system + " %}{{ " + _jinja(template.system, "system_message") + " }}{% endif %}"
    header = _jinja(template.header)
    if template.empty_thought:
        out += ("{% set thinking = enable_thinking is not defined or enable_thinking %}"
                "{% set header = " + header + " + ('' if thinking else " + _jinja(template.empty_thought) + ") %}")
        header = "header"
    out += ("{% set ns = namespace(last_user=-1) %}{% for message in loop_messages %}"
            "{% if message['role'] == 'user' %}{% set ns.last_user = loop.index0 %}{% endif %}{% endfor %}"
            "{% for message in loop_messages %}{% set content = message['content'] or '' %}")
    if template.system_in_first_user:
        out += ("{% if loop.first and " + has_system + " %}{% set content = "
                + _jinja(template.system, "system_message") + " + content %}{% endif %}")
    out += ("{% if message['role'] == 'assistant' and message['reasoning_content'] is defined and "
            "message['reasoning_content'] is not none %}{% set content = '<think>\\n' + "
            "message['reasoning_content'].strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') %}{% endif %}")
    strip = []
    if template.empty_thought:
        strip.append("not thinking")
    if template.drops_past_thoughts:
        strip.append("loop.index0 < ns.last_user")
    if strip:
        out += ("{% if message['role'] == 'assistant' and '</think>' in content and (" + " or ".join(strip) + ") %}"
                "{% set content = content.split('</think>')[-1].lstrip('\\n') %}{% endif %}")
    if template.tools:
        out += _tool_calls_jinja(template.tools)
    if template.empty_thought:
        out += ("{% if thinking and message['role'] == 'assistant' and '<think>' not in content and "
                "'</think>' not in content %}{% set content = " + _jinja(template.empty_thought) + " + content %}"
                "{% endif %}")
    out += "{% if message['role'] == 'user' %}{{ " + _jinja(template.user) + " }}"
    if template.tools:
        out += _tool_results_jinja(template.tools)
    out += ("{% elif message['role'] == 'assistant' %}{{ " + header + " + " + _jinja(template.assistant) + " }}"
            "{% endif %}{% endfor %}")
    if template.header:
        out += "{% if add_generation_prompt %}{{ " + header + " }}{% endif %}"
    if template.efficient_eos:
        out += "{% if not add_generation_prompt %}{{ eos_token }}{% endif %}"
    return out


def _tools_jinja(tool_format: ToolFormat) -> str:
    """The tool definitions after the system text (the system message is written whenever there are tools)."""
    each = "'\\n' + (tool | tojson)" if tool_format.tool_indent is None else \
        f"(tool | tojson(indent={tool_format.tool_indent})) + '\\n\\n'"
    return ("{% if tools %}{% set listed = namespace(text=" + _literal(tool_format.tools_before) + ") %}"
            "{% for tool in tools %}{% set listed.text = listed.text + " + each + " %}{% endfor %}"
            "{% set system_message = (system_message + " + _literal(tool_format.system_joiner) + " if system_message "
            "is defined and system_message else '') + listed.text + " + _literal(tool_format.tools_after) + " %}"
            "{% endif %}")


def _tool_calls_jinja(tool_format: ToolFormat) -> str:
    """An assistant message's tool calls after its content, as ToolFormat.reply_text writes them."""
    arguments = "(f['arguments'] if f['arguments'] is string else f['arguments'] | tojson)"
    if tool_format.name == "qwen":
        each = ("('\\n' if not loop.first else '') + '<tool_call>\\n{\"name\": \"' + f['name'] "
                "+ '\", \"arguments\": ' + " + arguments + " + '}\\n</tool_call>'")
        joined = "{% set content = (content + '\\n' if content else '') + calls.text %}"
    else:
        each = ("(', ' if not loop.first else '') + '{\"name\": \"' + f['name'] + '\", \"parameters\": ' + "
                + arguments + " + '}'")
        joined = ("{% set content = calls.text if message['tool_calls'] | length == 1 else '[' + calls.text + ']' %}")
    return ("{% if message['role'] == 'assistant' and message['tool_calls'] is defined and message['tool_calls'] %}"
            "{% set calls = namespace(text='') %}{% for call in message['tool_calls'] %}"
            "{% set f = call['function'] if call['function'] is defined else call %}"
            "{% set calls.text = calls.text + " + each + " %}{% endfor %}" + joined + "{% endif %}")


def _tool_results_jinja(tool_format: ToolFormat) -> str:
    """A tool message: a block of its own, or (Qwen) one block for consecutive results."""
    opening, closing = tool_format.observation.split("{content}")
    if tool_format.results_joiner is None:
        return ("{% elif message['role'] == 'tool' %}{{ " + _literal(opening) + " + content + " + _literal(closing)
                + " }}")
    joiner = tool_format.results_joiner
    return ("{% elif message['role'] == 'tool' %}"
            "{% if loop.first or loop.previtem['role'] != 'tool' %}{{ " + _literal(opening) + " }}"
            "{% else %}{{ " + _literal(joiner) + " }}{% endif %}{{ content }}"
            "{% if loop.last or loop.nextitem['role'] != 'tool' %}{{ " + _literal(closing) + " }}{% endif %}")


def conversation_format(tokenizer: Any, name: str | None) -> NamedTemplate | str:
    """What `template` stands for: the named template (always: a name means that family's format, as in
    LLaMA-Factory), or for `null` the tokenizer's own Jinja template; a clear error when there is none."""
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
           tools: list[dict] | None = None, enable_thinking: bool = True) -> str:
    """The conversation as the Jinja template writes it; `enable_thinking` goes to the templates that read it."""
    return tokenizer.apply_chat_template(
        messages, chat_template=template, tokenize=False, add_generation_prompt=generation_prompt, tools=tools or None,
        enable_thinking=enable_thinking,
    )


def encode_conversation(tokenizer: Any, template: NamedTemplate | str, messages: list[dict[str, Any]],
                        tools: list[dict] | None = None, enable_thinking: bool = True) -> list[list[Turn]]:
    """The conversation's training sequences, each a list of (prompt ids, reply ids), one per assistant reply;
    messages after the last reply are left out.

    Every reply's prompt (all of its sequence before it) is exactly the generation prompt of the
    conversation up to it (`generation_prompt_ids`): what a server feeds the model. Where a template renders
    earlier turns differently once the conversation goes on (Qwen3 drops the reasoning of replies before the
    last user message), the reply starts a sequence of its own: the conversation is trained turn by turn."""
    if isinstance(template, NamedTemplate):
        template = thinking(template, enable_thinking)
        if not _rewrites_history(template, messages):
            return [_named_encoding(tokenizer, template, messages, tools)[0]]
    sequences: list[list[Turn]] = []
    before: list[int] = []  # the ids of the sequence so far
    for prompt, reply in _turns_at_inference(tokenizer, template, messages, tools, enable_thinking):
        if sequences and prompt[:len(before)] == before:
            sequences[-1].append((prompt[len(before):], reply))
        else:
            sequences.append([(prompt, reply)])
        before = prompt + reply
    if isinstance(template, NamedTemplate):
        return sequences
    return [_with_closers(tokenizer, turns) for turns in sequences]


def thinking(template: NamedTemplate, enable_thinking: bool) -> NamedTemplate:
    """A reasoning template with `enable_thinking: false` (LLaMA-Factory's meaning): the replies' reasoning is
    left out, and the empty thought goes to the prompt, untrained, as Qwen3's generation prompt writes it."""
    if enable_thinking or not template.empty_thought:
        return template
    return replace(template, header=template.header + template.empty_thought, empty_thought="", strips_thoughts=True)


def generation_prompt_ids(tokenizer: Any, template: NamedTemplate | str, messages: list[dict[str, Any]],
                          tools: list[dict] | None = None, enable_thinking: bool = True) -> list[int]:
    """The token ids of a conversation that ends with the user's turn (or tool results), the reply's header
    after it: what the model is fed at inference, and what training gives the same turns before a reply."""
    if isinstance(template, str):
        text = render(tokenizer, template, messages, True, tools, enable_thinking)
        return tokenizer.encode(text, add_special_tokens=False)
    template = thinking(template, enable_thinking)
    turns, prompt = _named_encoding(tokenizer, template, _as_at_inference(template, messages), tools)
    return [token for earlier, reply in turns for token in earlier + reply] + prompt


def _turns_at_inference(tokenizer: Any, template: NamedTemplate | str, messages: list[dict[str, Any]],
                        tools: list[dict] | None, enable_thinking: bool) -> list[Turn]:
    """For each reply: its whole generation prompt and the reply, each as the template writes them then."""
    turns = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        if isinstance(template, NamedTemplate):
            earlier, (prompt, reply) = _split_last(_named_encoding(
                tokenizer, template, _as_at_inference(template, messages[: index + 1]), tools)[0])
            turns.append((earlier + prompt, reply))
            continue
        if not enable_thinking:
            message = {**message, "content": strip_thought(assistant_content(message))}
            message.pop("reasoning_content", None)
        before = render(tokenizer, template, messages[:index], True, tools, enable_thinking) if index else ""
        upto = render(tokenizer, template, [*messages[:index], message], False, tools, enable_thinking)
        if not upto.startswith(before):
            raise UserError("the chat template writes a reply differently from the generation prompt before it "
                            f"(message {index + 1}); set `template` to a named template")
        turns.append((_text_ids(tokenizer, before), _text_ids(tokenizer, upto[len(before):])))
    return turns


def _split_last(turns: list[Turn]) -> tuple[list[int], Turn]:
    return [token for prompt, reply in turns[:-1] for token in prompt + reply], turns[-1]


def _with_closers(tokenizer: Any, turns: list[Turn]) -> list[Turn]:
    """A marker that closes a reply by opening the next turn (GLM-4's <|user|>, or EOS) is trained with the
    reply: the model learns to stop there."""
    closers = {tokenizer.convert_tokens_to_ids(marker) for marker in TURN_CLOSERS} | {tokenizer.eos_token_id}
    closers.discard(tokenizer.unk_token_id)
    closers.discard(None)
    out = list(turns)
    for index in range(1, len(out)):
        prompt, reply = out[index]
        previous_prompt, previous_reply = out[index - 1]
        if prompt and prompt[0] in closers and (not previous_reply or previous_reply[-1] not in closers):
            out[index - 1] = (previous_prompt, previous_reply + prompt[:1])
            out[index] = (prompt[1:], reply)
    return out


def assistant_content(message: dict[str, Any]) -> str:
    """An assistant message's text with its reasoning (`reasoning_content`) before it, as Qwen3 writes it."""
    content = message.get("content") or ""
    reasoning = message.get("reasoning_content")
    if reasoning is None:
        return content
    return "<think>\n" + reasoning.strip("\n") + "\n</think>\n\n" + content.lstrip("\n")


def strip_thought(content: str) -> str:
    """The text after the reasoning (Qwen3's rule: what follows the last </think>)."""
    return content.split("</think>")[-1].lstrip("\n") if "</think>" in content else content


def has_thought(content: str) -> bool:
    return "<think>" in content or "</think>" in content


def _last_user(messages: list[dict[str, Any]]) -> int:
    return max((index for index, message in enumerate(messages) if message["role"] == "user"), default=-1)


def _as_at_inference(template: NamedTemplate, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The conversation as the template shows it to the model: without the reasoning of replies before the
    last user message, where the template drops it."""
    if not template.drops_past_thoughts:
        return messages
    last_user = _last_user(messages)
    return [{**message, "content": strip_thought(assistant_content(message)), "reasoning_content": None}
            if message["role"] == "assistant" and index < last_user else message
            for index, message in enumerate(messages)]


def _rewrites_history(template: NamedTemplate, messages: list[dict[str, Any]]) -> bool:
    if not template.drops_past_thoughts:
        return False
    last_user = _last_user(messages)
    return any(message["role"] == "assistant" and index < last_user and has_thought(assistant_content(message))
               for index, message in enumerate(messages))


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


def _named_encoding(tokenizer: Any, template: NamedTemplate, messages: list[dict[str, Any]],
                    tools: list[dict] | None = None) -> tuple[list[Turn], list[int]]:
    """The turns, and the prompt after the last reply (what a generation prompt ends with)."""
    system = template.default_system
    if messages and messages[0]["role"] == "system":
        system, messages = messages[0]["content"], messages[1:]
    if tools:
        system = tool_format_of(template).system_text(system, tools)
    turns: list[Turn] = []
    prompt: list[int] = []
    index = 0
    while index < len(messages):
        message = messages[index]
        content = message.get("content") or ""
        if index == 0:
            prompt += _slot_ids(tokenizer, template.prefix)
            if system and template.system_in_first_user:
                content = template.system.replace("{content}", system, 1) + content
            elif system:
                prompt += _slot_ids(tokenizer, template.system, system)
        if message["role"] == "tool":
            results = [message.get("content") or ""]
            while index + 1 < len(messages) and messages[index + 1]["role"] == "tool":
                index += 1
                results.append(messages[index].get("content") or "")
            prompt += _text_ids(tokenizer, tool_results_text(template, results) + template.header)
        elif message["role"] != "assistant":
            slot = template.user + template.header if message["role"] == "user" else template.system
            prompt += _slot_ids(tokenizer, slot, content)
        else:
            turns.append((prompt, _reply_ids(tokenizer, template, message)))
            prompt = []
        index += 1
    return turns, prompt


def _reply_ids(tokenizer: Any, template: NamedTemplate, message: dict[str, Any]) -> list[int]:
    content = assistant_content(message)
    if template.strips_thoughts:
        content = strip_thought(content)
    if message.get("tool_calls"):
        content = tool_format_of(template).reply_text(content, message["tool_calls"])
    reply = _slot_ids(tokenizer, template.assistant, content)
    if template.empty_thought and not has_thought(content):
        reply = tokenizer.encode(template.empty_thought, add_special_tokens=False) + reply
    return reply


def tool_format_of(template: NamedTemplate, name: str | None = None) -> ToolFormat:
    """The template's tool format; a clear error for a template that has none."""
    if template.tools is None:
        raise UserError(no_tool_format(name))
    return template.tools


def takes_tools(template: NamedTemplate | str) -> bool:
    """Whether the template writes tool definitions and calls: a named template with a tool format, or a Jinja
    template that reads `tools`."""
    if isinstance(template, NamedTemplate):
        return template.tools is not None
    return re.search(r"\btools\b", template) is not None


def reply_tool_format(tokenizer: Any, name: str | None) -> ToolFormat | None:
    """How a model's replies write tool calls, to read them back: the named template's tool format, or for the
    tokenizer's own template Qwen's where it writes <tool_call> blocks."""
    chosen = conversation_format(tokenizer, name)
    if isinstance(chosen, NamedTemplate):
        return chosen.tools
    return QWEN_TOOLS if "<tool_call>" in chosen else None


def no_tool_format(name: str | None) -> str:
    with_tools = ", ".join(sorted(known for known, named in TEMPLATES.items() if named.tools))
    which = f"template '{name}'" if name else "the tokenizer's own chat template (template: null)"
    return (f"{which} has no tool format; rows with tools or tool calls need one of {with_tools}, or template: null "
            "with a tokenizer whose chat template takes tools")


def tool_results_text(template: NamedTemplate, results: list[str]) -> str:
    """Consecutive tool results, as the template's tool format writes them (before the reply's header)."""
    tool_format = tool_format_of(template)
    return "".join(tool_format.observation.replace("{content}", block, 1)
                   for block in tool_format.results_blocks(results))


def _text_ids(tokenizer: Any, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False) if text else []
