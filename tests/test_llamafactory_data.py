"""Data as LLaMA-Factory reads it: dataset_info.json entries, column renames, tags, folders of shards,
identity placeholders, and what is refused (preference data for sft, tool calls for a template without a tool
format) with a clear message."""

from __future__ import annotations

import json
import logging

import datasets
import pytest
from test_data import IM_END, config_for, prompt_texts, trained_texts

from lmtune.data import prepare_data
from lmtune.errors import UserError


def write_info(folder, entries: dict) -> None:
    (folder / "dataset_info.json").write_text(json.dumps(entries))


def test_alpaca_entry_with_renamed_system_and_history_columns(tmp_path, tiny_model_dir, tokenizer):
    rows = [{"q": "Add these.", "ctx": "1 and 2", "a": "3", "sys": "Be brief.", "hist": [["Hi", "Hello!"]]}]
    (tmp_path / "renamed.json").write_text(json.dumps(rows))
    write_info(tmp_path, {"renamed": {"file_name": "renamed.json", "columns": {
        "prompt": "q", "query": "ctx", "response": "a", "system": "sys", "history": "hist"}}})
    data = prepare_data(config_for(tmp_path, tiny_model_dir, dataset="renamed"), tokenizer, use_cache=False)
    assert trained_texts(tokenizer, data) == [f"Hello!{IM_END}\n3{IM_END}\n"]
    prompt = prompt_texts(tokenizer, data)[0]
    assert "<|im_start|>system\nBe brief." in prompt and "<|im_start|>user\nAdd these.\n1 and 2" in prompt


def test_sharegpt_entry_with_its_own_tags(tmp_path, tiny_model_dir, tokenizer):
    rows = [{"dialog": [{"speaker": "narrator", "text": "Be kind."}, {"speaker": "person", "text": "Hi"},
                        {"speaker": "bot", "text": "Hello!"}]}]
    (tmp_path / "tagged.json").write_text(json.dumps(rows))
    write_info(tmp_path, {"tagged": {"file_name": "tagged.json", "formatting": "sharegpt",
                                     "columns": {"messages": "dialog"},
                                     "tags": {"role_tag": "speaker", "content_tag": "text", "user_tag": "person",
                                              "assistant_tag": "bot", "system_tag": "narrator"}}})
    data = prepare_data(config_for(tmp_path, tiny_model_dir, dataset="tagged"), tokenizer, use_cache=False)
    assert trained_texts(tokenizer, data) == [f"Hello!{IM_END}\n"]
    assert "<|im_start|>system\nBe kind." in prompt_texts(tokenizer, data)[0]


def test_pretraining_entry_reads_the_column_named_by_prompt(tmp_path, tiny_model_dir, tokenizer):
    (tmp_path / "c4.jsonl").write_text("\n".join(json.dumps({"body": f"Document number {i}."}) for i in range(3)))
    write_info(tmp_path, {"c4_demo": {"file_name": "c4.jsonl", "columns": {"prompt": "body"}}})
    data = prepare_data(config_for(tmp_path, tiny_model_dir, dataset="c4_demo", stage="pt", packing=False),
                        tokenizer, use_cache=False)
    decoded = [tokenizer.decode(row["input_ids"]) for row in data.train]
    assert sorted(decoded) == [f"Document number {i}.{tokenizer.eos_token}" for i in range(3)]


def test_a_folder_of_shards_is_one_data_set(tmp_path, tiny_model_dir, tokenizer):
    shards = tmp_path / "alpaca_shards"
    shards.mkdir()
    for index in range(2):
        rows = [{"instruction": f"Say {index}-{i}", "output": f"{index}-{i}"} for i in range(3)]
        datasets.Dataset.from_list(rows).to_parquet(str(shards / f"train-{index:05d}-of-00002.parquet"))
    write_info(tmp_path, {"sharded": {"file_name": "alpaca_shards"}})
    data = prepare_data(config_for(tmp_path, tiny_model_dir, dataset="sharded"), tokenizer, use_cache=False)
    assert sorted(trained_texts(tokenizer, data)) == sorted(f"{s}-{i}{IM_END}\n" for s in range(2) for i in range(3))


IDENTITY = [{"instruction": "Who are you?", "input": "",
             "output": "I am {{name}}, an AI assistant developed by {{author}}."}]


def test_identity_placeholders_are_filled_from_the_config(tmp_path, tiny_model_dir, tokenizer):
    (tmp_path / "identity.json").write_text(json.dumps(IDENTITY))
    write_info(tmp_path, {"identity": {"file_name": "identity.json"}})
    config = config_for(tmp_path, tiny_model_dir, dataset="identity", placeholders={"name": "Lumi", "author": "Ada"})
    data = prepare_data(config, tokenizer, use_cache=False)
    assert trained_texts(tokenizer, data) == [f"I am Lumi, an AI assistant developed by Ada.{IM_END}\n"]


def test_identity_placeholders_without_values_are_left_and_named(tmp_path, tiny_model_dir, tokenizer, caplog):
    (tmp_path / "identity.json").write_text(json.dumps(IDENTITY))
    write_info(tmp_path, {"identity": {"file_name": "identity.json"}})
    config = config_for(tmp_path, tiny_model_dir, dataset="identity", placeholders={"name": "Lumi"})
    with caplog.at_level(logging.WARNING, logger="lmtune"):
        data = prepare_data(config, tokenizer, use_cache=False)
    assert trained_texts(tokenizer, data) == [f"I am Lumi, an AI assistant developed by {{{{author}}}}.{IM_END}\n"]
    warnings = [r.getMessage() for r in caplog.records if "placeholders" in r.getMessage()]
    assert len(warnings) == 1 and "{{author}}" in warnings[0] and "{{name}}" not in warnings[0]


@pytest.mark.parametrize("entry, rows, words", [
    ({"file_name": "p.json", "ranking": True, "columns": {"prompt": "instruction", "chosen": "chosen",
                                                         "rejected": "rejected"}},
     [{"instruction": "q", "chosen": "good", "rejected": "bad"}], ["ranking: true", "for stage: dpo", "stage sft"]),
    ({"hf_hub_url": "llamafactory/alpaca_en"}, [], ["no file_name", "hf_hub_url", "local files"]),
    ({"file_name": "p.json", "formatting": "openai"}, [{"instruction": "q", "output": "a"}],
     ["formatting 'openai'", "alpaca, sharegpt"]),
    ({"file_name": "p.json", "columns": {"prompt": "instruction", "response": "output", "images": "images"}},
     [{"instruction": "q", "output": "a", "images": []}], ["images", "text only"]),
    ({"file_name": "p.json", "columns": {"prompt": "instruction", "response": "output", "tools": "tools"}},
     [{"instruction": "q", "output": "a", "tools": "[{\"name\": \"f\"}]"}], ["row 1", "has no tool format"]),
    ({"file_name": "p.json", "formatting": "sharegpt", "columns": {"messages": "conversations", "tools": "tools"}},
     [{"conversations": [{"from": "human", "value": "q"}, {"from": "function_call", "value": "{\"name\": \"f\"}"},
                         {"from": "observation", "value": "1"}, {"from": "gpt", "value": "a"}]}],
     ["row 1", "the tokenizer's own chat template (template: null) has no tool format", "qwen3"]),
])
def test_what_lmtune_cannot_train_is_refused_clearly(tmp_path, tiny_model_dir, tokenizer, entry, rows, words):
    (tmp_path / "p.json").write_text(json.dumps(rows))
    write_info(tmp_path, {"p": entry})
    with pytest.raises(UserError) as error:
        prepare_data(config_for(tmp_path, tiny_model_dir, dataset="p"), tokenizer, use_cache=False)
    for word in words:
        assert word in str(error.value), str(error.value)


def test_eval_dataset_is_the_eval_split(tmp_path, tiny_model_dir, tokenizer):
    (tmp_path / "train.json").write_text(json.dumps([{"instruction": f"t{i}", "output": f"T{i}"} for i in range(4)]))
    (tmp_path / "dev.json").write_text(json.dumps([{"instruction": "d", "output": "D"}]))
    data = prepare_data(config_for(tmp_path, tiny_model_dir, dataset="train.json", eval_dataset="dev.json"),
                        tokenizer, use_cache=False)
    assert len(data.train) == 4 and len(data.eval) == 1
    assert tokenizer.decode([t for t in data.eval[0]["labels"] if t != -100]) == f"D{IM_END}\n"


def test_overwrite_cache_processes_the_data_again(tmp_path, tiny_model_dir, tokenizer):
    (tmp_path / "rows.json").write_text(json.dumps([{"instruction": "q", "output": "a"}]))
    assert not prepare_data(config_for(tmp_path, tiny_model_dir, dataset="rows.json"), tokenizer).from_cache
    cached = prepare_data(config_for(tmp_path, tiny_model_dir, dataset="rows.json"), tokenizer)
    assert cached.from_cache
    written = (cached.cache_dir / "done").stat().st_mtime_ns
    again = prepare_data(config_for(tmp_path, tiny_model_dir, dataset="rows.json", overwrite_cache=True), tokenizer)
    assert not again.from_cache and len(again.train) == 1
    assert again.cache_dir == cached.cache_dir and (again.cache_dir / "done").stat().st_mtime_ns > written


def test_kto_data_under_sft_is_refused_so_that_no_answer_tagged_bad_is_trained(tmp_path, tiny_model_dir, tokenizer):
    """LLaMA-Factory's kto_en_demo: sharegpt rows, each answer tagged good or bad by a `label` column."""
    from lmtune.config import TrainConfig

    rows = [{"messages": [{"content": "Hi", "role": "user"}, {"content": "Go away.", "role": "assistant"}],
             "label": False}]
    (tmp_path / "kto_en_demo.json").write_text(json.dumps(rows))
    (tmp_path / "dataset_info.json").write_text(json.dumps({"kto_en_demo": {
        "file_name": "kto_en_demo.json", "formatting": "sharegpt",
        "columns": {"messages": "messages", "kto_tag": "label"},
        "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"}}}))
    config = TrainConfig(model_name_or_path=str(tiny_model_dir), dataset="kto_en_demo", dataset_dir=str(tmp_path),
                         output_dir=str(tmp_path / "run"))
    with pytest.raises(UserError, match="kto_tag.*the bad ones too"):
        prepare_data(config, tokenizer, use_cache=False)


def test_columns_no_stage_reads_are_named_once_in_the_log(tmp_path, tiny_model_dir, tokenizer, caplog):
    rows = [{"q": f"Question {i}", "a": "An answer", "source": "web", "score": i, "sys": None} for i in range(3)]
    (tmp_path / "qa.json").write_text(json.dumps(rows))
    write_info(tmp_path, {"qa": {"file_name": "qa.json", "columns": {
        "prompt": "q", "response": "a", "system": "sys", "chosen": "better"}}})
    config = config_for(tmp_path, tiny_model_dir, dataset="qa")
    with caplog.at_level(logging.INFO, logger="lmtune"):
        prepare_data(config, tokenizer, use_cache=False)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("qa: ")]
    assert lines == ["qa: columns score, source are not read by stage sft (no alpaca key of dataset_info's columns "
                     "names them)",
                     "qa: dataset_info columns.system: 'sys' is in none of the rows",
                     "qa: dataset_info columns.chosen: 'better' is not read by stage sft"]
    assert all(r.levelno == logging.INFO for r in caplog.records if r.getMessage().startswith("qa: "))
