"""How a family writes tool definitions, tool calls and tool results, for the named templates that have a
tool format (LLaMA-Factory's `qwen` and `llama3` tool formats, written as the families' own chat templates
write them), and how a generated reply's tool calls are read back.

A tool call is `{"type": "function", "function": {"name": str, "arguments": dict}}` (OpenAI's shape, the
arguments parsed); a tool definition is OpenAI's `{"type": "function", "function": {...}}`.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

QWEN_TOOLS_BEFORE = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
)
QWEN_TOOLS_AFTER = (
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}"
    "\n</tool_call>"
)
LLAMA3_TOOLS_BEFORE = (
    "You have access to the following functions. To call a function, please respond with JSON for a function "
    "call. Respond in the format {\"name\": function name, \"parameters\": dictionary of argument name and its "
    "value}. Do not use variables.\n\n"
)
QWEN_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


def dumps(value: Any) -> str:
    """JSON as the chat templates' `tojson` writes it (transformers: not ASCII-escaped, default separators)."""
    return json.dumps(value, ensure_ascii=False)


def as_function(tool: dict[str, Any]) -> dict[str, Any]:
    """A tool definition in OpenAI's shape: LLaMA-Factory's data gives the bare function."""
    return tool if tool.get("type") == "function" else {"type": "function", "function": tool}


@dataclass(frozen=True)
class ToolFormat:
    name: str
    tools_before: str  # the tool definitions: this text, each tool as JSON, then tools_after
    tools_after: str
    tool_indent: int | None  # each tool's JSON: on one line after a newline (None), or indented, a blank line after
    observation: str  # the slot of one block of tool results ({content}); the reply's header follows it
    results_joiner: str | None  # consecutive results in one block, joined by this (Qwen's); None: a block each
    system_joiner: str = "\n\n"  # between the system text and the tool definitions

    def definitions(self, tools: list[dict[str, Any]]) -> str:
        if self.tool_indent is None:
            each = ["\n" + dumps(tool) for tool in tools]
        else:
            each = [json.dumps(tool, indent=self.tool_indent, ensure_ascii=False) + "\n\n" for tool in tools]
        return self.tools_before + "".join(each) + self.tools_after

    def system_text(self, system: str, tools: list[dict[str, Any]]) -> str:
        return (system + self.system_joiner if system else "") + self.definitions(tools)

    def reply_text(self, content: str, calls: list[dict[str, Any]]) -> str:
        """An assistant message's text: its content, then its tool calls (arguments given as a JSON string are
        written as they are, as the chat templates write them)."""
        if not calls:
            return content
        functions = [call.get("function", call) for call in calls]
        if self.name == "qwen":
            text = "\n".join(f"<tool_call>\n{{\"name\": \"{f['name']}\", \"arguments\": {_arguments(f)}}}\n</tool_call>"
                             for f in functions)
            return content + "\n" + text if content else text
        objects = [f"{{\"name\": \"{f['name']}\", \"parameters\": {_arguments(f)}}}" for f in functions]
        return objects[0] if len(objects) == 1 else "[" + ", ".join(objects) + "]"

    def results_blocks(self, contents: list[str]) -> list[str]:
        """Consecutive tool results as the blocks the template writes."""
        return contents if self.results_joiner is None else [self.results_joiner.join(contents)]

    def parse(self, text: str) -> tuple[str, list[dict[str, Any]]]:
        """A generated reply: its text and the tool calls in it (none where it holds no well-formed call)."""
        if self.name == "qwen":
            found = [_loaded(match) for match in QWEN_CALL.findall(text)]
            if not found or any(call is None or "name" not in call for call in found):
                return text, []
            return QWEN_CALL.sub("", text).strip(), [_call(c["name"], c.get("arguments", {})) for c in found]
        loaded = _loaded(text.strip())
        objects = loaded if isinstance(loaded, list) else [loaded]
        if loaded is None or not all(isinstance(o, dict) and "name" in o for o in objects):
            return text, []
        return "", [_call(o["name"], o.get("parameters", o.get("arguments", {}))) for o in objects]


def _arguments(function: dict[str, Any]) -> str:
    arguments = function.get("arguments", {})
    return arguments if isinstance(arguments, str) else dumps(arguments)


def _loaded(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None


def _call(name: str, arguments: Any) -> dict[str, Any]:
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": name, "arguments": arguments}}


QWEN_TOOLS = ToolFormat(
    "qwen", QWEN_TOOLS_BEFORE, QWEN_TOOLS_AFTER, tool_indent=None,
    observation="<|im_start|>user\n<tool_response>\n{content}\n</tool_response><|im_end|>\n",
    results_joiner="\n</tool_response>\n<tool_response>\n")
LLAMA3_TOOLS = ToolFormat(
    "llama3", LLAMA3_TOOLS_BEFORE, "", tool_indent=4,
    observation="<|start_header_id|>ipython<|end_header_id|>\n\n{content}<|eot_id|>", results_joiner=None)
