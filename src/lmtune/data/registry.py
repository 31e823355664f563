"""Where the data comes from: `dataset_info.json` entries (as in LLaMA-Factory) or plain file paths,
read into rows of one shape: `{"messages": [...]}` for SFT, `{"messages": [...], "chosen": ..., "rejected": ...}`
for preference pairs (the prompt's messages and the two answers' texts), `{"messages": [...], "completion": ...,
"kto_tag": bool}` for KTO's marked answers, or `{"text": ...}` for pre-training."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets

from lmtune.config import PAIRED_STAGES
from lmtune.data.tool_formats import as_function
from lmtune.errors import UserError

FILE_LOADERS = {
    ".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text", ".text": "text",
}
ALPACA_COLUMNS = {"prompt": "instruction", "query": "input", "response": "output", "system": "system",
                  "history": "history"}
SHAREGPT_COLUMNS = {"messages": "conversations", "system": "system"}
SHAREGPT_TAGS = {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt",
                 "system_tag": "system", "function_tag": "function_call", "observation_tag": "observation"}
OPENAI_TAGS = {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant",
               "system_tag": "system", "function_tag": "function_call", "observation_tag": "tool"}


@dataclass
class DatasetSpec:
    """One data set: its files and how its rows are laid out."""

    name: str
    files: list[Path]
    formatting: str  # alpaca | sharegpt | text
    columns: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    num_samples: int | None = None  # a size hint for streamed data
    ranking: bool = False  # preference pairs: a prompt, a chosen and a rejected answer (stages dpo, rm)
    feedback: bool = False  # an answer marked desirable or not (`kto_tag`, stage kto)
    prompt_only: bool = False  # prompts to generate from, the other columns kept for the rewards (stage grpo)
    placeholders: dict[str, str] = field(default_factory=dict)  # {{key}} in the text -> value


def resolve_datasets(names: list[str], dataset_dir: str, stage: str,
                     placeholders: dict[str, str] | None = None) -> list[DatasetSpec]:
    if not names:
        raise UserError("no data: set `dataset` to a name in dataset_info.json or to a file path")
    registry = _read_registry(Path(dataset_dir))
    specs = [_resolve_one(name, Path(dataset_dir), registry, stage) for name in names]
    for spec in specs:
        spec.placeholders = dict(placeholders or {})
    return specs


def data_files(config: Any) -> list[Path]:
    """Every file a run's data sets read, in order."""
    return [file for spec in resolve_datasets(config.datasets, config.dataset_dir, config.stage) for file in spec.files]


def _read_registry(dataset_dir: Path) -> dict[str, Any]:
    info_path = dataset_dir / "dataset_info.json"
    if not info_path.is_file():
        return {}
    try:
        return json.loads(info_path.read_text())
    except json.JSONDecodeError as error:
        raise UserError(f"{info_path}: not valid JSON (line {error.lineno}): {error.msg}") from None


def _resolve_one(name: str, dataset_dir: Path, registry: dict[str, Any], stage: str) -> DatasetSpec:
    if name in registry:
        entry = registry[name]
        _check_entry(name, entry, stage)
        files = _files_of(dataset_dir / entry["file_name"], name)
        formatting = "text" if stage == "pt" else entry.get("formatting", "alpaca")
        columns = dict(entry.get("columns", {}))
        tags = dict(entry.get("tags", {}))
        return DatasetSpec(name, files, formatting, columns, tags, entry.get("num_samples"), stage in PAIRED_STAGES,
                           stage == "kto", prompt_only=stage == "grpo")
    path = Path(name)
    if not path.exists() and (dataset_dir / name).exists():
        path = dataset_dir / name
    if not path.exists() and path.is_symlink():
        raise UserError(f"dataset '{name}': {path} is a symbolic link that leads to no file (a loop, or its "
                        "target is gone)")
    if not path.exists() and (path.suffix in FILE_LOADERS or "/" in name):
        looked = dict.fromkeys([os.path.abspath(path), os.path.abspath(dataset_dir / name)])
        raise UserError(f"dataset '{name}': file not found (looked for {' and '.join(looked)})")
    if not path.exists():
        known = ", ".join(sorted(registry)) or "none"
        raise UserError(
            f"dataset '{name}' is neither a name in {dataset_dir / 'dataset_info.json'} "
            f"(known: {known}) nor an existing file"
        )
    files = _files_of(path, name)
    formatting = "text" if stage == "pt" else _guess_formatting(files[0])
    columns = {"kto_tag": "label"} if stage == "kto" else {}  # a plain file: TRL's prompt / completion / label
    return DatasetSpec(name, files, formatting, columns, ranking=stage in PAIRED_STAGES, feedback=stage == "kto",
                       prompt_only=stage == "grpo")


HUB_KEYS = ("hf_hub_url", "ms_hub_url", "om_hub_url", "script_url", "cloud_file_name")


def _check_entry(name: str, entry: dict[str, Any], stage: str) -> None:
    """What lmtune cannot read in a dataset_info.json entry, said before anything is read."""
    where = f"dataset_info.json: entry '{name}'"
    if "file_name" not in entry:
        hub = [key for key in HUB_KEYS if key in entry]
        source = f" ({', '.join(hub)})" if hub else ""
        raise UserError(f"{where} has no file_name: lmtune reads local files and folders only{source}; download "
                        "the data and give its file or folder as file_name")
    if entry.get("ranking") and stage not in PAIRED_STAGES:
        if stage == "grpo":
            raise UserError(f"{where} is preference data (ranking: true); stage grpo generates its own answers "
                            "from prompts: give it an entry without ranking (alpaca instruction, messages ending "
                            "with the user's turn, or a prompt column)")
        raise UserError(f"{where} is preference data (ranking: true, chosen/rejected answers), for stage: dpo or "
                        f"rm; stage {stage} needs an alpaca or sharegpt data set without ranking")
    if stage in PAIRED_STAGES and not entry.get("ranking"):
        raise UserError(f"{where}: stage {stage} trains on preference pairs; this entry has no ranking: true (add "
                        "it, with chosen and rejected columns, if its rows hold chosen/rejected answers)")
    if "kto_tag" in entry.get("columns", {}) and stage != "kto":
        # LLaMA-Factory drops such rows under sft; training them would teach the answers tagged bad too
        raise UserError(f"{where} is KTO data (columns.kto_tag: each answer tagged good or bad); stage {stage} "
                        "would train every answer, the bad ones too: use stage: kto, or a data set without kto_tag")
    if stage == "kto" and "kto_tag" not in entry.get("columns", {}):
        raise UserError(f"{where}: stage kto trains on answers marked desirable or undesirable; this entry has no "
                        "kto_tag column (add \"columns\": {\"kto_tag\": \"label\"} naming the column of true/false "
                        "marks)")
    if entry.get("formatting", "alpaca") not in ("alpaca", "sharegpt"):
        raise UserError(f"{where}: formatting {entry['formatting']!r} is not one of alpaca, sharegpt")
    multimodal = [key for key in ("images", "videos", "audios") if key in entry.get("columns", {})]
    if multimodal:
        raise UserError(f"{where}: {', '.join(multimodal)} columns: lmtune trains on text only")


def _files_of(path: Path, name: str) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in FILE_LOADERS)
    elif path.is_file():
        files = [path]
    else:
        raise UserError(f"dataset '{name}': file not found: {path}")
    if not files:
        raise UserError(f"dataset '{name}': no data files ({', '.join(FILE_LOADERS)}) in {path}")
    unknown = [f for f in files if f.suffix not in FILE_LOADERS]
    if unknown:
        raise UserError(f"dataset '{name}': {unknown[0]} is not one of {', '.join(FILE_LOADERS)}")
    return files


def _guess_formatting(file: Path) -> str:
    """A plain file path: alpaca if it has instruction, sharegpt if it has messages (or, for preference
    pairs, TRL's prompt)."""
    columns = set(_first_row(file))
    if "instruction" not in columns and {"messages", "conversations", "prompt"} & columns:
        return "sharegpt"
    return "alpaca"


def _first_row(file: Path) -> dict[str, Any]:
    try:
        rows = load_rows(file)
    except UserError:
        return {}
    return rows[0] if len(rows) else {}


def load_rows(file: Path) -> datasets.Dataset:
    loader = FILE_LOADERS[file.suffix]
    if file.stat().st_size == 0:
        raise UserError(f"{file}: the file is empty: no rows to train on")
    if loader == "json":
        _check_json_text(file)
    try:
        return datasets.load_dataset(loader, data_files=str(file), split="train")
    except Exception as error:  # datasets wraps parser errors in several types
        where = _json_error(file) if loader == "json" else None
        raise UserError(f"{file}: could not be read as {loader}: {where or _root_cause(error)}") from None


def _check_json_text(file: Path) -> None:
    """A JSON or JSON Lines file is UTF-8 throughout, and a .json file that is one JSON object (not a list
    of rows, nor one row a line) is refused: read as rows, its keys would become columns of a single row."""
    first = b""
    with file.open("rb") as handle:
        for number, line in enumerate(handle, start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as error:
                raise UserError(f"{file}, line {number}: not UTF-8 text ({error.reason} at byte {error.start} of the "
                                "line); save the file as UTF-8") from None
            first = first or line.strip()[:1]
    if file.suffix != ".json" or first != b"{":
        return
    try:
        document = json.loads(file.read_bytes())
    except json.JSONDecodeError:
        return  # JSON lines, or broken JSON: the loader says where
    if isinstance(document, dict):
        keys = ", ".join(list(document)[:3])
        raise UserError(f"{file}: its top level is a JSON object (keys {keys}), not a list of rows: write the rows "
                        "as a list [{...}, {...}], or one object a line (.jsonl)")


def _json_error(file: Path) -> str | None:
    """Where a JSON or JSON Lines file is broken, by line and column (the Arrow parser counts from 0)."""
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        return str(error)
    try:
        document = json.loads(text)
        if not document:
            return "holds no rows (an empty JSON document)"
        return None  # one JSON document: valid, so the problem is elsewhere
    except json.JSONDecodeError as whole:
        if file.suffix == ".json" and not text.lstrip().startswith("{"):
            return f"not valid JSON at line {whole.lineno}, column {whole.colno}: {whole.msg}"
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            json.loads(line)
        except json.JSONDecodeError as error:
            return f"not valid JSON at line {number}, column {error.colno}: {error.msg}"
    return None


def _root_cause(error: BaseException) -> str:
    while error.__cause__ is not None:
        error = error.__cause__
    return str(error).splitlines()[0] if str(error) else type(error).__name__


# --- rows to one shape ------------------------------------------------------------------------


PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")


def standard_row(spec: DatasetSpec, row: dict[str, Any]) -> dict[str, Any]:
    """`{"messages": [...]}` or `{"text": ...}`, placeholders filled; ValueError says what the row lacks."""
    convert = {"alpaca": _alpaca_row, "sharegpt": _sharegpt_row, "text": _text_row}[spec.formatting]
    if spec.ranking:
        convert = _preference_row
    elif spec.feedback:
        convert = _feedback_row
    elif spec.prompt_only:
        convert = _prompt_row
    try:
        standard = convert(row, spec)
    except (KeyError, TypeError, AttributeError, IndexError) as error:
        raise ValueError(f"malformed row ({error})") from None
    tools = _tools(row, spec) if spec.formatting != "text" else None
    if tools:
        standard["tools"] = tools
    return _fill_placeholders(standard, spec.placeholders) if spec.placeholders else standard


def _fill_placeholders(standard: dict[str, Any], values: dict[str, str]) -> dict[str, Any]:
    """LLaMA-Factory's identity data writes {{name}} and {{author}}; `placeholders` gives their values."""

    def fill(text: str) -> str:
        return PLACEHOLDER.sub(lambda match: values.get(match.group(1), match.group(0)), text)

    if "text" in standard:
        return {"text": fill(standard["text"])}
    answers = {key: fill(standard[key]) for key in (*ANSWERS, "completion") if key in standard}
    return {**standard, "messages": [{**m, "content": fill(m["content"])} for m in standard["messages"]], **answers}


def left_placeholders(spec: DatasetSpec, rows: Any, limit: int = 200) -> set[str]:
    """Placeholders ({{name}}) still in the first `limit` rows after filling: the config gives no value."""
    left: set[str] = set()
    for row in rows.select(range(min(limit, len(rows)))):
        try:
            standard = standard_row(spec, row)
        except ValueError:
            continue  # the row's fault is reported, with its number, when it is encoded
        texts = [standard["text"]] if "text" in standard else [m["content"] for m in standard["messages"]]
        texts += [standard[key] for key in (*ANSWERS, "completion") if key in standard]
        left.update(match for text in texts for match in PLACEHOLDER.findall(text))
    return left


class _RecordedRow(dict):
    """A row that records which of its columns a conversion reads."""

    def __init__(self, row: dict[str, Any]):
        super().__init__(row)
        self.read: set[str] = set()

    def get(self, key: str, default: Any = None) -> Any:
        self.read.add(key)
        return super().get(key, default)

    def __getitem__(self, key: str) -> Any:
        self.read.add(key)
        return super().__getitem__(key)

    def __contains__(self, key: object) -> bool:
        self.read.add(str(key))
        return super().__contains__(key)

    def items(self) -> Any:  # every column (grpo passes the others to the rewards)
        self.read.update(self.keys())
        return super().items()


def unused_columns(spec: DatasetSpec, rows: Any, stage: str, limit: int = 200) -> list[str]:
    """What the first `limit` rows hold that the stage does not read, and what the data set's columns mapping
    (dataset_info.json) names that the stage does not read or the rows do not have: one line each."""
    read, present = set(), set()
    for row in rows.select(range(min(limit, len(rows)))):
        recorded = _RecordedRow(row)
        try:
            standard_row(spec, recorded)
        except ValueError:
            continue  # the row's fault is reported, with its number, when it is encoded
        read |= recorded.read
        present |= {name for name, value in row.items() if value is not None}
    if not read:
        return []
    lines = []
    unread = sorted(present - read)
    if unread:
        lines.append(f"columns {', '.join(unread)} are not read by stage {stage} (no {spec.formatting} key of "
                     "dataset_info's columns names them)")
    for key, column in spec.columns.items():
        if column not in read:
            lines.append(f"dataset_info columns.{key}: '{column}' is not read by stage {stage}")
        elif column not in present:
            lines.append(f"dataset_info columns.{key}: '{column}' is in none of the rows")
    return lines


def _tools(row: dict[str, Any], spec: DatasetSpec) -> list[dict[str, Any]] | None:
    """The tool definitions of a row (the `tools` column: a JSON string as in LLaMA-Factory's data, or a list), in
    OpenAI's shape."""
    column = spec.columns.get("tools", "tools")
    tools = row.get(column)
    if isinstance(tools, str):
        tools = _json(tools, f"'{column}'") if tools.strip() else None
    if not tools:
        return None
    if not isinstance(tools, list) or not all(isinstance(tool, dict) for tool in tools):
        raise ValueError(f"'{column}' is not a list of tool definitions (JSON objects with a name and parameters)")
    return [as_function(tool) for tool in tools]


def _json(text: str, what: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{what} is not valid JSON ({error.msg} at character {error.pos})") from None


def _column(row: dict[str, Any], spec: DatasetSpec, defaults: dict[str, str], key: str) -> Any:
    return row.get(spec.columns.get(key, defaults[key]))


def _alpaca_row(row: dict[str, Any], spec: DatasetSpec) -> dict[str, Any]:
    response = _column(row, spec, ALPACA_COLUMNS, "response")
    needed = ", ".join(spec.columns.get(k, ALPACA_COLUMNS[k]) for k in ("prompt", "response"))
    messages = _alpaca_prompt(row, spec, needed)
    if not isinstance(response, str) or not response.strip():
        raise ValueError(f"no '{spec.columns.get('response', 'output')}' text (alpaca rows need {needed})")
    return {"messages": messages + [{"role": "assistant", "content": response}]}


def _alpaca_prompt(row: dict[str, Any], spec: DatasetSpec, needed: str) -> list[dict[str, str]]:
    """System, history and the instruction (+ input) as messages, ending with the user's."""
    instruction = _column(row, spec, ALPACA_COLUMNS, "prompt")
    query = _column(row, spec, ALPACA_COLUMNS, "query")
    if not isinstance(instruction, str) or not instruction.strip():
        raise ValueError(f"no '{spec.columns.get('prompt', 'instruction')}' text (alpaca rows need {needed})")
    messages = []
    system = _column(row, spec, ALPACA_COLUMNS, "system")
    if isinstance(system, str) and system.strip():
        messages.append({"role": "system", "content": system})
    for turn in _column(row, spec, ALPACA_COLUMNS, "history") or []:
        messages += [{"role": "user", "content": turn[0]}, {"role": "assistant", "content": turn[1]}]
    user = instruction if not query else f"{instruction}\n{query}"
    return messages + [{"role": "user", "content": user}]


def _sharegpt_row(row: dict[str, Any], spec: DatasetSpec) -> dict[str, Any]:
    messages = _sharegpt_messages(row, spec, ("messages", "conversations"))
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError("no assistant message to train on")
    return {"messages": messages}


def _sharegpt_messages(row: dict[str, Any], spec: DatasetSpec, keys: tuple[str, ...]) -> list[dict[str, str]]:
    """The system column and the turns of the first of `keys` the row has (a plain string is one user turn,
    as TRL's `prompt`); a file's rows all have every column, None where a row has none."""
    key = spec.columns.get("messages") or next((k for k in keys if row.get(k) is not None), keys[-1])
    turns = row.get(key)
    prompt_forms = spec.ranking or spec.feedback or spec.prompt_only
    if isinstance(turns, str) and turns.strip() and prompt_forms:
        turns = [{"role": "user", "content": turns}]
    if not isinstance(turns, list) or not turns:
        what = "prompt (a string or a list of messages)" if prompt_forms else "list of messages"
        raise ValueError(f"no '{key}' {what}")
    messages = []
    system = row.get(spec.columns.get("system", "system"))
    if isinstance(system, str) and system.strip():
        messages.append({"role": "system", "content": system})
    return messages + [_message(turn, spec) for turn in turns]


def _message(turn: dict[str, Any], spec: DatasetSpec) -> dict[str, Any]:
    """One turn in sharegpt (from / value) or OpenAI (role / content) tags, as {role, content}, with
    `tool_calls` and `reasoning_content` where it has them. A sharegpt function_call turn is the assistant's
    tool calls (its value: a JSON call or list of calls, LLaMA-Factory's); an observation or `tool` turn is
    a tool result (role `tool`)."""
    tags = {**(OPENAI_TAGS if "role" in turn else SHAREGPT_TAGS), **spec.tags}
    roles = {tags["user_tag"]: "user", tags["assistant_tag"]: "assistant", tags["system_tag"]: "system",
             tags["function_tag"]: "function_call", tags["observation_tag"]: "tool", "tool": "tool"}
    role = roles.get(turn.get(tags["role_tag"]))
    content = turn.get(tags["content_tag"])
    if role is None:
        raise ValueError(f"unknown role {turn.get(tags['role_tag'])!r} (expected one of {sorted(roles)})")
    calls = turn.get("tool_calls")
    if role == "function_call":
        role, content, calls = "assistant", "", _json(content, f"the {tags['function_tag']} turn") \
            if isinstance(content, str) else content
    if calls:
        return {"role": "assistant", "content": content or "", "tool_calls": _tool_calls(calls),
                **_reasoning(turn)}
    if not isinstance(content, str):
        raise ValueError(f"a message without '{tags['content_tag']}' text")
    return {"role": role, "content": content, **(_reasoning(turn) if role == "assistant" else {})}


def _reasoning(turn: dict[str, Any]) -> dict[str, str]:
    reasoning = turn.get("reasoning_content")
    return {"reasoning_content": reasoning} if isinstance(reasoning, str) else {}


def _tool_calls(calls: Any) -> list[dict[str, Any]]:
    """Tool calls in OpenAI's shape, their arguments parsed: from OpenAI's `tool_calls` or LLaMA-Factory's
    function_call value (`{"name": ..., "arguments": {...}}` or a list of them)."""
    calls = calls if isinstance(calls, list) else [calls]
    out = []
    for call in calls:
        function = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise ValueError(f"a tool call without a function name: {call!r}")
        arguments = function.get("arguments", function.get("parameters", {}))
        if isinstance(arguments, str):
            arguments = _json(arguments, f"the arguments of the call to '{function['name']}'") if arguments else {}
        out.append({"type": "function", "function": {"name": function["name"], "arguments": arguments}})
    return out


ANSWERS = ("chosen", "rejected")


def _preference_row(row: dict[str, Any], spec: DatasetSpec) -> dict[str, Any]:
    """A prompt and its two answers. The prompt: alpaca's instruction (+ input, history, system), or a
    conversation (sharegpt `conversations`, OpenAI `messages`, TRL `prompt` as a string or messages) that
    ends with the user's turn; each answer a string, an assistant message, or a list of one."""
    if spec.formatting == "alpaca":
        prompt = _alpaca_prompt(row, spec, ", ".join(spec.columns.get(k, k) for k in ("prompt", *ANSWERS)))
    else:
        prompt = _sharegpt_messages(row, spec, ("messages", "conversations", "prompt"))
    if prompt[-1]["role"] != "user":
        raise ValueError(f"the prompt's last message is the {prompt[-1]['role']}'s; the chosen and rejected "
                         "answers reply to the user's last message, so the prompt must end with it")
    answers = {}
    for key in ANSWERS:
        column = spec.columns.get(key, key)
        answers[key] = _answer_text(row.get(column), column, spec)
    if answers["chosen"] == answers["rejected"]:
        raise ValueError("its chosen and rejected answers are the same text: the pair prefers nothing (the loss "
                         "would stay at its start); fix or remove the row")
    return {"messages": prompt, **answers}


def _prompt_row(row: dict[str, Any], spec: DatasetSpec) -> dict[str, Any]:
    """A prompt to generate from (alpaca's instruction + input, or a conversation ending with the user's
    turn: OpenAI `messages`, sharegpt `conversations`, TRL's `prompt`), and the row's other columns, which
    the reward functions receive."""
    if spec.formatting == "alpaca":
        prompt = _alpaca_prompt(row, spec, spec.columns.get("prompt", "instruction"))
        used = {spec.columns.get(key, ALPACA_COLUMNS[key]) for key in ("prompt", "query", "system", "history")}
    else:
        key = spec.columns.get("messages") or next(
            (k for k in ("messages", "conversations", "prompt") if row.get(k) is not None), "prompt")
        prompt = _sharegpt_messages(row, spec, (key,))
        used = {key, spec.columns.get("system", "system")}
    if prompt[-1]["role"] != "user":
        raise ValueError(f"the prompt's last message is the {prompt[-1]['role']}'s; stage grpo generates the reply "
                         "to the user's last message, so the prompt must end with it")
    return {"messages": prompt, "columns": {name: value for name, value in row.items() if name not in used}}


def _feedback_row(row: dict[str, Any], spec: DatasetSpec) -> dict[str, Any]:
    """A prompt, one answer and its mark (`kto_tag`: true for desirable): alpaca's instruction and output,
    a conversation whose last message is the assistant's answer (LLaMA-Factory), or TRL's prompt and
    completion."""
    column = spec.columns["kto_tag"]
    tag = row.get(column)
    if not isinstance(tag, bool):
        raise ValueError(f"kto_tag column '{column}' is {tag!r}; it must be true (desirable) or false (undesirable)")
    if spec.formatting == "alpaca":
        standard = _alpaca_row(row, spec)
        prompt, completion = standard["messages"][:-1], standard["messages"][-1]["content"]
    elif row.get(spec.columns.get("completion", "completion")) is not None:  # TRL's prompt and completion
        prompt = _sharegpt_messages(row, spec, ("messages", "conversations", "prompt"))
        completion = _answer_text(row[spec.columns.get("completion", "completion")],
                                  spec.columns.get("completion", "completion"), spec)
    else:
        messages = _sharegpt_messages(row, spec, ("messages", "conversations", "prompt"))
        if messages[-1]["role"] != "assistant" or not messages[-1]["content"].strip():
            raise ValueError("the last message is not the assistant's answer (a kto row is a conversation ending "
                             "with the answer that kto_tag marks, or a prompt and a completion)")
        prompt, completion = messages[:-1], messages[-1]["content"]
    if not prompt or prompt[-1]["role"] != "user":
        raise ValueError("the answer does not reply to a user's message (the prompt must end with the user's turn)")
    return {"messages": prompt, "completion": completion, "kto_tag": tag}


def _answer_text(answer: Any, column: str, spec: DatasetSpec) -> str:
    if isinstance(answer, list) and len(answer) == 1:
        answer = answer[0]
    if isinstance(answer, dict):
        message = _message(answer, spec)
        if message["role"] != "assistant":
            raise ValueError(f"'{column}' is a {message['role']} message; it must be the assistant's answer")
        answer = message["content"]
    if isinstance(answer, list):
        raise ValueError(f"'{column}' holds {len(answer)} messages; a preference answer is one assistant message")
    if not isinstance(answer, str) or not answer.strip():
        raise ValueError(f"no '{column}' answer (preference rows need a prompt and the chosen and rejected answers)")
    return answer


def _text_row(row: dict[str, Any], spec: DatasetSpec) -> dict[str, Any]:
    column = spec.columns.get("prompt", "text")
    text = row.get(column)
    if not isinstance(text, str):
        raise ValueError(f"no '{column}' text column (pre-training reads raw text)")
    return {"text": text}
