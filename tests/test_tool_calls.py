"""Tool calls and reasoning: trained as the model sees them at inference.

For every reply, the tokens before it in training are exactly the tokens of the conversation up to it
rendered with the generation prompt (`apply_chat_template(..., add_generation_prompt=True)`, what a server
feeds the model); the reply (its tool calls and reasoning included) and its end-of-turn marker are trained,
tool definitions and tool results are not. Qwen3's real chat template is in tests/fixtures/qwen3.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from lmtune.config import build_config
from lmtune.data.encoding import RowEncoder
from lmtune.data.registry import DatasetSpec, resolve_datasets
from lmtune.data.templates import (
    IGNORE_INDEX,
    TEMPLATES,
    chat_template_for,
    conversation_format,
    generation_prompt_ids,
    render,
)
from lmtune.errors import UserError

FIXTURES = Path(__file__).parent / "fixtures"
LLAMAFACTORY_DATA = Path(__file__).parent / "data" / "llamafactory"
QWEN3_TEMPLATE = (FIXTURES / "qwen3" / "chat_template.jinja").read_text()
RATE = {"type": "function", "function": {
    "name": "get_exchange_rate", "description": "The exchange rate between two currencies",
    "parameters": {"type": "object", "properties": {"base": {"type": "string"}, "target": {"type": "string"}},
                   "required": ["base", "target"]}}}
OPENAI_ROW = {"tools": [RATE], "messages": [
    {"role": "system", "content": "You convert money."},
    {"role": "user", "content": "Dollars and pounds in euros?"},
    {"role": "assistant", "content": "Let me look both up.", "tool_calls": [
        {"id": "a", "type": "function", "function": {"name": "get_exchange_rate",
                                                      "arguments": '{"base": "USD", "target": "EUR"}'}},
        {"id": "b", "type": "function", "function": {"name": "get_exchange_rate",
                                                      "arguments": {"base": "GBP", "target": "EUR"}}}]},
    {"role": "tool", "tool_call_id": "a", "content": '{"rate": 0.92}'},
    {"role": "tool", "tool_call_id": "b", "content": '{"rate": 1.17}'},
    {"role": "assistant", "content": "A dollar is 0.92 euros, a pound 1.17."},
    {"role": "user", "content": "Thanks!"},
    {"role": "assistant", "content": "You are welcome."},
]}
THINKING_ROW = {"messages": [
    {"role": "user", "content": "What is 2 + 3?"},
    {"role": "assistant", "reasoning_content": "Two plus three makes five.", "content": "5"},
    {"role": "user", "content": "And times 4?"},
    {"role": "assistant", "content": "<think>\n5 times 4 is 20.\n</think>\n\n20"},
]}


@pytest.fixture(scope="module")
def qwen3_tokenizer(marked_tokenizer):
    """SmolLM2's tokenizer (ChatML's markers are its own) with Qwen3's added tokens and Qwen3's chat template."""
    qwen3 = copy.deepcopy(marked_tokenizer)
    qwen3.chat_template = QWEN3_TEMPLATE
    return qwen3


def encoder(tokenizer, template, **keys) -> RowEncoder:
    config = build_config({"stage": "sft", "template": template, "cutoff_len": 4096, **keys})
    return RowEncoder(config, tokenizer, chat_template_for(tokenizer, template))


def examples(tokenizer, template, row, **keys):
    return encoder(tokenizer, template, **keys).examples(DatasetSpec("rows", [], "sharegpt"), row, "row 1")


def trained_runs(tokenizer, labels) -> list[str]:
    """The trained targets, one string per run of consecutive trained tokens."""
    runs, current = [], []
    for label in [*labels, IGNORE_INDEX]:
        if label != IGNORE_INDEX:
            current.append(label)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    return runs


def inference_prompts(tokenizer, template, row, enable_thinking=True):
    """For each reply: the ids a server feeds the model before it (the tokenizer's own template, tokenised whole)."""
    messages = row["messages"]
    return [tokenizer.apply_chat_template(messages[:index], chat_template=template, tools=row.get("tools"),
                                          add_generation_prompt=True, tokenize=True, return_dict=False,
                                          enable_thinking=enable_thinking)
            for index, message in enumerate(messages) if message["role"] == "assistant"]


def prompts_in_training(sequences) -> list[list[int]]:
    """For each trained reply: the ids of its sequence before its first trained token."""
    prompts = []
    for example in sequences:
        trained = [i for i in range(1, len(example.labels)) if example.labels[i] != IGNORE_INDEX
                   and example.labels[i - 1] == IGNORE_INDEX]
        prompts += [example.input_ids[:start] for start in trained]
    return prompts


@pytest.mark.parametrize("enable_thinking", [True, False])
@pytest.mark.parametrize("row", [OPENAI_ROW, THINKING_ROW], ids=["tools", "thinking"])
def test_every_reply_is_trained_after_exactly_the_prompt_qwen3s_own_template_gives(qwen3_tokenizer, row,
                                                                                      enable_thinking):
    sequences = examples(qwen3_tokenizer, None, row, enable_thinking=enable_thinking)
    assert prompts_in_training(sequences) == inference_prompts(qwen3_tokenizer, QWEN3_TEMPLATE, row,
                                                               enable_thinking)


def test_qwen3s_own_template_drops_earlier_reasoning_so_those_turns_train_one_by_one(qwen3_tokenizer):
    first, second = examples(qwen3_tokenizer, None, THINKING_ROW)
    assert trained_runs(qwen3_tokenizer, first.labels) == [
        "<think>\nTwo plus three makes five.\n</think>\n\n5<|im_end|>\n"]
    assert trained_runs(qwen3_tokenizer, second.labels) == ["<think>\n5 times 4 is 20.\n</think>\n\n20<|im_end|>\n"]
    assert "five" not in qwen3_tokenizer.decode(second.input_ids)  # as at inference: the earlier thought is gone
    # enable_thinking: false: no reasoning trained; each prompt ends with the empty thought Qwen3's generation
    # prompt writes, which the template no longer shows once the reply is history: again turn by turn
    first, second = examples(qwen3_tokenizer, None, THINKING_ROW, enable_thinking=False)
    assert [trained_runs(qwen3_tokenizer, e.labels) for e in (first, second)] == [["5<|im_end|>\n"], ["20<|im_end|>\n"]]
    assert qwen3_tokenizer.decode(second.input_ids).endswith(
        "<|im_start|>assistant\n5<|im_end|>\n<|im_start|>user\nAnd times 4?<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n\n</think>\n\n20<|im_end|>\n")


def test_tool_calls_are_trained_and_tool_results_and_definitions_are_not(qwen3_tokenizer):
    for template in (None, "qwen3", "qwen"):
        runs = [run for example in examples(qwen3_tokenizer, template, OPENAI_ROW)
                for run in trained_runs(qwen3_tokenizer, example.labels)]
        text = "".join(runs)
        assert runs[0].endswith('Let me look both up.\n<tool_call>\n{"name": "get_exchange_rate", "arguments": '
                                '{"base": "USD", "target": "EUR"}}\n</tool_call>\n<tool_call>\n{"name": '
                                '"get_exchange_rate", "arguments": {"base": "GBP", "target": "EUR"}}\n</tool_call>'
                                '<|im_end|>\n'), template
        assert "0.92 euros" in text and "welcome" in text and "<|im_end|>" in runs[-1]
        assert '"rate": 0.92' not in text and "tool_response" not in text and "# Tools" not in text
        assert "exchange rate between" not in text


def test_the_named_qwen_tool_format_writes_what_qwen3s_own_template_writes(qwen3_tokenizer):
    """Before the last user message Qwen3 shows replies without reasoning: qwen3_nothink must match it."""
    messages = OPENAI_ROW["messages"][:-1]
    own = render(qwen3_tokenizer, QWEN3_TEMPLATE, messages, True, OPENAI_ROW["tools"])
    named = render(qwen3_tokenizer, chat_template_for(qwen3_tokenizer, "qwen3_nothink"), messages, True,
                   OPENAI_ROW["tools"])
    assert named == own
    ids = generation_prompt_ids(qwen3_tokenizer, TEMPLATES["qwen3_nothink"], messages, OPENAI_ROW["tools"])
    assert qwen3_tokenizer.decode(ids) == own


def tool_conversations(name):
    plain = [{"role": "system", "content": "Quote."}, {"role": "user", "content": 'Say "yes".'},
             {"role": "assistant", "content": '"Yes."'}, {"role": "user", "content": "Again:"},
             {"role": "assistant", "content": '"Yes."'}]
    rows = [{"messages": plain}]
    if TEMPLATES[name].tools:
        rows += [OPENAI_ROW]
    if TEMPLATES[name].empty_thought:
        rows += [THINKING_ROW]
    return rows


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_every_named_template_trains_each_reply_after_its_inference_prompt(qwen3_tokenizer, name):
    """The ids before every reply are the generation prompt lmtune chat and serve feed the model, and the
    named template's own Jinja (what export writes) renders the same text."""
    tokenizer = copy.copy(qwen3_tokenizer)
    tokenizer.chat_template = None
    for row in tool_conversations(name):
        for enable_thinking in (True, False):
            sequences = examples(tokenizer, name, row, enable_thinking=enable_thinking)
            expected = [generation_prompt_ids(tokenizer, conversation_format(tokenizer, name),
                                              row["messages"][:index], row.get("tools"), enable_thinking)
                        for index, message in enumerate(row["messages"]) if message["role"] == "assistant"]
            assert prompts_in_training(sequences) == expected
            rendered = [tokenizer.decode(ids) for ids in expected]
            jinja = chat_template_for(tokenizer, name)
            assert rendered == [render(tokenizer, jinja, row["messages"][:index], True, row.get("tools"),
                                       enable_thinking).replace("<s>", "").replace("</s>", "<|im_end|>")
                                for index, message in enumerate(row["messages"]) if message["role"] == "assistant"]
            assert all(example.labels[-1] != IGNORE_INDEX for example in sequences)  # the last reply's end trained


def test_a_template_without_a_tool_format_is_refused_naming_it(qwen3_tokenizer):
    with pytest.raises(UserError, match="row 1: template 'chatml' has no tool format; .*qwen3"):
        examples(qwen3_tokenizer, "chatml", OPENAI_ROW)
    smollm2 = copy.copy(qwen3_tokenizer)
    smollm2.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(UserError, match="the tokenizer's own"):
        examples(smollm2, None, OPENAI_ROW)


def test_llama_factorys_glaive_toolcall_demo_encodes_with_qwen(qwen3_tokenizer):
    (spec,) = resolve_datasets(["glaive_toolcall_en_demo"], str(LLAMAFACTORY_DATA), "sft")
    rows = json.loads((LLAMAFACTORY_DATA / "glaive_toolcall_en_demo.json").read_text())
    row_encoder = encoder(qwen3_tokenizer, "qwen")
    (plain,), (calls,), _, _ = [row_encoder.examples(spec, row, f"row {i}") for i, row in enumerate(rows)]
    assert "# Tools" not in qwen3_tokenizer.decode(plain.input_ids)  # "tools": "[]"
    text = qwen3_tokenizer.decode(calls.input_ids)
    assert text.startswith("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful "
                           "assistant.\n\n# Tools\n\n")
    assert trained_runs(qwen3_tokenizer, calls.labels) == [
        '<tool_call>\n{"name": "calculate_area", "arguments": {"shape": "rectangle", "dimensions": [5, 3]}}'
        '\n</tool_call><|im_end|>\n',
        "The rectangle's area is 15 square units.<|im_end|>\n",
        '<tool_call>\n{"name": "calculate_area", "arguments": {"shape": "circle", "dimensions": [2]}}'
        '\n</tool_call><|im_end|>\n',
        "About 12.57 square units.<|im_end|>\n"]
    assert '<|im_start|>user\n<tool_response>\n{"area": 15}\n</tool_response><|im_end|>\n<|im_start|>assistant\n' \
        in text


def test_glaive_toolcall_demo_and_an_openai_tool_file_preview_and_train(tiny_config, tmp_path, capsys):
    """LLaMA-Factory's glaive_toolcall_en_demo shape and an OpenAI tool conversation under sft with qwen: the
    preview shows the calls trained and the results masked, and a step trains."""
    from conftest import read_jsonl, run_lmtune

    openai_file = tmp_path / "openai_tools.jsonl"
    openai_file.write_text(json.dumps(OPENAI_ROW) + "\n")
    config = tiny_config(dataset="glaive_toolcall_en_demo," + str(openai_file), dataset_dir=str(LLAMAFACTORY_DATA),
                         template="qwen", cutoff_len=1024, max_steps=1, per_device_train_batch_size=5)
    capsys.readouterr()
    assert run_lmtune("preview", config, "--json", "-n", "5") == 0
    runs = [run for row in json.loads(capsys.readouterr().out)["examples"] for example in row["examples"]
            for run in example["runs"]]
    trained = "".join(run["text"] for run in runs if run["trained"])
    masked = "".join(run["text"] for run in runs if not run["trained"])
    assert '<tool_call>\n{"name": "get_exchange_rate", "arguments": {"base": "USD", "target": "EUR"}}' in trained
    assert "<tool_response>\n{\"rate\": 0.92}\n</tool_response>" in masked and "# Tools" in masked
    assert "tool_response" not in trained
    assert run_lmtune("train", config) == 0
    [row] = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if r["type"] == "train"]
    assert row["step"] == 1 and row["samples_seen"] == 5


@pytest.mark.parametrize("name", ["qwen", "llama3"])
def test_a_served_reply_that_calls_tools_comes_back_as_openai_tool_calls(name):
    from lmtune.serving.api import with_tool_calls

    tool_format = TEMPLATES[name].tools
    calls = [{"type": "function", "function": {"name": "get_exchange_rate", "arguments": {"base": "USD"}}},
             {"type": "function", "function": {"name": "add", "arguments": {"a": 1, "b": 2}}}]
    response = {"choices": [{"message": {"role": "assistant", "content": tool_format.reply_text("", calls)},
                             "finish_reason": "stop"},
                            {"message": {"role": "assistant", "content": "No tool needed."}, "finish_reason": "stop"}]}
    called, plain = with_tool_calls(response, tool_format)["choices"]
    assert called["finish_reason"] == "tool_calls" and called["message"]["content"] is None
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in called["message"]["tool_calls"]] \
        == [("get_exchange_rate", {"base": "USD"}), ("add", {"a": 1, "b": 2})]
    assert plain == {"message": {"role": "assistant", "content": "No tool needed."}, "finish_reason": "stop"}


def test_chat_prompts_with_the_tools_as_training_showed_them(qwen3_tokenizer, tmp_path):
    from lmtune.chat import read_tools
    from lmtune.generation import prompt_ids

    tools_file = tmp_path / "tools.json"
    tools_file.write_text(json.dumps([RATE["function"]]))  # LLaMA-Factory's bare function
    tools = read_tools(tools_file)
    messages = OPENAI_ROW["messages"][:2]
    (example,) = examples(qwen3_tokenizer, "qwen3", {"messages": OPENAI_ROW["messages"][:3], "tools": tools})
    assert prompts_in_training([example])[0] == prompt_ids(qwen3_tokenizer, "qwen3", messages, tools)
    assert "# Tools" in qwen3_tokenizer.decode(prompt_ids(qwen3_tokenizer, "qwen3", messages, tools))
    tools_file.write_text('{"name": "add"}')
    with pytest.raises(UserError, match="expected a JSON list of tool definitions"):
        read_tools(tools_file)


def test_the_tool_call_demo_encodes_under_qwen_as_llama_factory_encodes_it(tokenizer):
    """Recorded from LLaMA-Factory 0.9.5 by tests/fixtures/record_llamafactory_tool_encodings.py."""
    recorded = json.loads((FIXTURES / "llamafactory_tools" / "qwen_glaive_toolcall.json").read_text())
    marked = copy.deepcopy(tokenizer)
    marked.add_special_tokens({"additional_special_tokens": recorded["markers"]}, replace_extra_special_tokens=False)
    (spec,) = resolve_datasets(["glaive_toolcall_en_demo"], str(LLAMAFACTORY_DATA), "sft")
    rows = json.loads((LLAMAFACTORY_DATA / "glaive_toolcall_en_demo.json").read_text())
    row_encoder = encoder(marked, "qwen")
    encoded = [row_encoder.examples(spec, row, "row")[0] for row in rows]
    assert [{"input_ids": e.input_ids, "labels": e.labels} for e in encoded] == recorded["rows"]
