"""The data rules of the pipeline: which tokens are trained, how rows of every format become examples,
that packed examples stay apart, that bad input stops with one clear message, and the cache."""

from __future__ import annotations

import json

import datasets
import pytest
import torch
from conftest import ALPACA_ROWS, run_lmtune

from lmtune.batching import Collator
from lmtune.config import TrainConfig
from lmtune.data import IGNORE_INDEX, prepare_data
from lmtune.data.templates import chat_template_for
from lmtune.models import load_model
from lmtune.paths import cache_home

IM_END = "<|im_end|>"
M = IGNORE_INDEX


def ids_of(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def chatml_expected(tokenizer, messages) -> tuple[list[int], list[int]]:
    """ChatML, piece by piece: `<|im_start|>role\\n` and the prompt masked, reply, <|im_end|> and the
    newline after it trained, as LLaMA-Factory trains them."""
    ids, labels = [], []
    for message in messages:
        head = ids_of(tokenizer, f"<|im_start|>{message['role']}\n")
        body = ids_of(tokenizer, message["content"] + IM_END)
        tail = ids_of(tokenizer, "\n")
        ids += head + body + tail
        trained = message["role"] == "assistant"
        labels += [M] * len(head) + (body + tail if trained else [M] * (len(body) + len(tail)))
    return ids, labels


def encode_conversation(tokenizer, template, messages):
    from lmtune.config import build_config
    from lmtune.data.encoding import RowEncoder
    from lmtune.data.registry import DatasetSpec

    config = build_config({"stage": "sft", "template": template, "cutoff_len": 1024})
    encoder = RowEncoder(config, tokenizer, chat_template_for(tokenizer, template))
    (example,) = encoder.examples(DatasetSpec("rows", [], "sharegpt"), {"messages": messages}, "row")
    return example.input_ids, example.labels


CONVERSATION = [
    {"role": "system", "content": "You answer sums."},
    {"role": "user", "content": "What is 2 plus 2?"},
    {"role": "assistant", "content": "2 plus 2 is 4."},
    {"role": "user", "content": "And 3 plus 5?"},
    {"role": "assistant", "content": "3 plus 5 is 8."},
]


@pytest.mark.parametrize("template", [None, "chatml"], ids=["smollm2-own-template", "named-chatml"])
def test_only_assistant_replies_and_their_end_marker_are_trained(tokenizer, template):
    ids, labels = encode_conversation(tokenizer, template, CONVERSATION)
    expected_ids, expected_labels = chatml_expected(tokenizer, CONVERSATION)
    assert ids == expected_ids
    assert labels == expected_labels  # token by token
    trained = tokenizer.decode([t for t in labels if t != M])
    assert trained == f"2 plus 2 is 4.{IM_END}\n3 plus 5 is 8.{IM_END}\n"  # every assistant turn


def test_smollm2_template_adds_its_default_system_prompt_masked(tokenizer):
    messages = CONVERSATION[1:3]
    ids, labels = encode_conversation(tokenizer, None, messages)
    default_system = {"role": "system",
                      "content": "You are a helpful AI assistant named SmolLM, trained by Hugging Face"}
    assert (ids, labels) == chatml_expected(tokenizer, [default_system, *messages])


def test_unknown_template_name_lists_the_valid_ones(tokenizer):
    from lmtune.errors import UserError

    with pytest.raises(UserError, match="template 'chatlm' is not known; valid: .*chatml"):
        chat_template_for(tokenizer, "chatlm")


# --- rows of every format through prepare_data ------------------------------------------------


def config_for(tmp_path, tiny_model_dir, **values) -> TrainConfig:
    defaults = dict(model_name_or_path=str(tiny_model_dir), cutoff_len=256, output_dir=str(tmp_path / "run"),
                    dataset_dir=str(tmp_path))
    return TrainConfig(**{**defaults, **values})


def trained_texts(tokenizer, data) -> list[str]:
    return [tokenizer.decode([t for t in row["labels"] if t != M]) for row in data.train]


def prompt_texts(tokenizer, data) -> list[str]:
    return [tokenizer.decode([t for t, label in zip(row["input_ids"], row["labels"], strict=True) if label == M])
            for row in data.train]


def test_alpaca_rows_with_input_system_and_history(tmp_path, tiny_model_dir, tokenizer):
    rows = [
        {"instruction": "Add these.", "input": "1 and 2", "output": "3", "system": "Be brief.",
         "history": [["Hi", "Hello!"]]},
        {"instruction": "Name a colour.", "input": "", "output": "Blue", "system": "", "history": []},
    ]
    (tmp_path / "a.json").write_text(json.dumps(rows))
    data = prepare_data(config_for(tmp_path, tiny_model_dir, dataset="a.json"), tokenizer, use_cache=False)
    assert trained_texts(tokenizer, data) == [f"Hello!{IM_END}\n3{IM_END}\n", f"Blue{IM_END}\n"]
    prompt = prompt_texts(tokenizer, data)[0]
    assert "<|im_start|>system\nBe brief." in prompt and "<|im_start|>user\nAdd these.\n1 and 2" in prompt
    assert "<|im_start|>user\nHi" in prompt


def test_sharegpt_rows_through_the_registry(tmp_path, tiny_model_dir, tokenizer):
    rows = [{"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"},
                               {"from": "human", "value": "Bye"}, {"from": "gpt", "value": "Goodbye!"}],
             "system": "Be kind."}]
    (tmp_path / "chats.json").write_text(json.dumps(rows))
    (tmp_path / "dataset_info.json").write_text(json.dumps(
        {"chats": {"file_name": "chats.json", "formatting": "sharegpt",
                   "columns": {"messages": "conversations", "system": "system"}}}))
    data = prepare_data(config_for(tmp_path, tiny_model_dir, dataset="chats"), tokenizer, use_cache=False)
    assert trained_texts(tokenizer, data) == [f"Hello!{IM_END}\nGoodbye!{IM_END}\n"]
    assert "<|im_start|>system\nBe kind." in prompt_texts(tokenizer, data)[0]


def test_openai_messages_rows_from_a_jsonl_file(tmp_path, tiny_model_dir, tokenizer):
    rows = [{"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q1"},
                          {"role": "assistant", "content": "A1"}]},
            {"messages": [{"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A2"}]}]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    data = prepare_data(config_for(tmp_path, tiny_model_dir, dataset=str(tmp_path / "m.jsonl")), tokenizer,
                        use_cache=False)
    assert trained_texts(tokenizer, data) == [f"A1{IM_END}\n", f"A2{IM_END}\n"]


def test_text_rows_for_pretraining_are_chunked_at_cutoff_len(tmp_path, tiny_model_dir, tokenizer):
    texts = ["The quick brown fox jumps over the lazy dog. " * 6, "A short line."]
    (tmp_path / "corpus.txt").write_text("\n".join(texts) + "\n")
    config = config_for(tmp_path, tiny_model_dir, dataset="corpus.txt", stage="pt", cutoff_len=16, packing=False)
    data = prepare_data(config, tokenizer, use_cache=False)
    chunks = [row["input_ids"] for row in data.train]
    assert all(1 < len(chunk) <= 16 for chunk in chunks)
    # each text once, in order, ended by EOS; SmolLM2 adds no BOS of its own, so none is added
    expected = [t for text in texts for t in ids_of(tokenizer, text) + [tokenizer.eos_token_id]]
    assert [t for chunk in chunks for t in chunk] == expected
    for row in data.train:  # every token is a target but the first, which nothing predicts
        assert row["labels"] == [M] + row["input_ids"][1:]
    assert data.stats.truncated == 0


def test_pretraining_packs_by_default_and_restarts_positions(tmp_path, tiny_model_dir, tokenizer):
    (tmp_path / "corpus.txt").write_text("\n".join(f"Line number {i} of the corpus." for i in range(12)) + "\n")
    config = config_for(tmp_path, tiny_model_dir, dataset="corpus.txt", stage="pt", cutoff_len=32)
    data = prepare_data(config, tokenizer, use_cache=False)
    assert data.stats.examples_encoded == 12 and len(data.train) < 12  # several lines share a row
    for row in data.train:
        assert len(row["input_ids"]) <= 32
        starts = [i for i, p in enumerate(row["position_ids"]) if p == 0]
        assert all(row["labels"][i] == M for i in starts)


# --- packing keeps examples apart -------------------------------------------------------------


def test_packed_example_has_the_same_logits_as_alone(tmp_path, tiny_model_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    rows = [{"instruction": "Hi" * (1 + i % 3), "output": "Hello " * (1 + i)} for i in range(6)]
    (tmp_path / "p.json").write_text(json.dumps(rows))
    config = config_for(tmp_path, tiny_model_dir, dataset="p.json", packing=True, cutoff_len=256)
    data = prepare_data(config, tokenizer, use_cache=False)
    row = max(data.train, key=lambda r: r["position_ids"].count(0))
    starts = [i for i, p in enumerate(row["position_ids"]) if p == 0]
    assert len(starts) >= 3
    assert all(row["labels"][i] == M for i in starts)  # never predicted from the example before

    model = load_model(str(tiny_model_dir), config).eval()  # the model as training loads it
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    batch, _ = Collator(tokenizer.pad_token_id, packed=True)([row])
    assert set(batch) == {"input_ids", "labels", "position_ids"}  # no attention mask: positions separate them
    with torch.no_grad():
        packed = model(**batch).logits[0]  # called as the training loop calls it
        naive = model(input_ids=batch["input_ids"]).logits[0]  # one long sequence: attends across examples
        for start, end in zip(starts, starts[1:] + [len(row["input_ids"])], strict=True):
            alone = reference(input_ids=torch.tensor([row["input_ids"][start:end]])).logits[0]
            torch.testing.assert_close(packed[start:end], alone, rtol=1e-4, atol=1e-5)
    last = starts[-1]
    assert not torch.allclose(naive[last:], packed[last:], atol=1e-4)  # the check above can tell


# --- bad input: exit 2, one message naming the problem, nothing written ------------------------


def write_rows(path, rows) -> None:
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")


def bad_missing_file(tmp_path):
    return {"dataset": str(tmp_path / "nowhere.json")}, ["file not found", "nowhere.json"]


def bad_unknown_name(tmp_path):
    (tmp_path / "info").mkdir()
    (tmp_path / "info" / "dataset_info.json").write_text(json.dumps({"sums": {"file_name": "sums.json"}}))
    return {"dataset": "sumz", "dataset_dir": str(tmp_path / "info")}, ["'sumz'", "known: sums"]


def bad_row_without_output(tmp_path):
    rows = [{"instruction": "a", "output": "b"}] * 2 + [{"instruction": "c", "answer": "d"}]
    write_rows(tmp_path / "rows.jsonl", rows)
    return {"dataset": str(tmp_path / "rows.jsonl")}, ["rows.jsonl, row 3", "no 'output' text"]


def bad_malformed_json(tmp_path):
    (tmp_path / "broken.json").write_text('[{"instruction": "a", "output": "b"},\n {"instruction": "c", "output": }]')
    return {"dataset": str(tmp_path / "broken.json")}, ["broken.json", "not valid JSON at line 2"]


def bad_empty(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    return {"dataset": str(tmp_path / "empty.jsonl")}, ["empty.jsonl: the file is empty"]


def test_a_cutoff_len_below_every_prompt_shares_it_between_prompt_and_reply(tmp_path, tiny_model_dir, tokenizer):
    """As LLaMA-Factory cuts (infer_seqlen): the prompt is cut from its end, the reply keeps its share, the row
    is kept."""
    write_rows(tmp_path / "ok.jsonl", ALPACA_ROWS[:4])
    assert all(len(tokenizer.apply_chat_template([{"role": "user", "content": row["instruction"]}], tokenize=True,
                                                 return_dict=False)) > 12
               for row in ALPACA_ROWS[:4])
    data = prepare_data(config_for(tmp_path, tiny_model_dir, dataset=str(tmp_path / "ok.jsonl"), cutoff_len=12),
                        tokenizer, use_cache=False)
    assert len(data.train) == 4 and data.stats.dropped_no_response == 0
    for row, source in zip(data.train, ALPACA_ROWS[:4], strict=True):
        assert len(row["input_ids"]) == 12
        trained = tokenizer.decode([label for label in row["labels"] if label != M])
        assert trained and source["output"].startswith(trained)


@pytest.mark.parametrize("case", [bad_missing_file, bad_unknown_name, bad_row_without_output, bad_malformed_json,
                                  bad_empty])
def test_bad_input_exits_2_with_one_clear_message_and_writes_nothing(case, tmp_path, tiny_config, capsys):
    values, expected = case(tmp_path)
    config = tiny_config(**values)
    cache_before = set((cache_home() / "data").glob("*")) if (cache_home() / "data").exists() else set()
    assert run_lmtune("train", config) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err
    for part in expected:
        assert part in err, (part, err)
    assert "Traceback" not in err
    assert not (tmp_path / "run").exists()
    cache_after = set((cache_home() / "data").glob("*")) if (cache_home() / "data").exists() else set()
    assert cache_after == cache_before


def test_row_error_names_the_right_row_with_several_workers(tmp_path, tiny_model_dir, tokenizer):
    from lmtune.errors import UserError

    rows = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(40)]
    rows[29] = {"instruction": "q29"}
    write_rows(tmp_path / "many.jsonl", rows)
    config = config_for(tmp_path, tiny_model_dir, dataset="many.jsonl", preprocessing_num_workers=2)
    with pytest.raises(UserError, match=r"many.jsonl, row 30: no 'output' text"):
        prepare_data(config, tokenizer, use_cache=False)


def test_preprocessing_num_workers_is_used_and_gives_the_same_data(tmp_path, tiny_model_dir, tokenizer,
                                                                   monkeypatch):
    write_rows(tmp_path / "rows.jsonl", ALPACA_ROWS)
    seen = []
    real_map = datasets.Dataset.map

    def spy(self, function=None, *args, **kwargs):
        if str(kwargs.get("desc", "")).startswith("tokenising"):
            seen.append(kwargs.get("num_proc"))
        return real_map(self, function, *args, **kwargs)

    monkeypatch.setattr(datasets.Dataset, "map", spy)
    one = prepare_data(config_for(tmp_path, tiny_model_dir, dataset="rows.jsonl"), tokenizer, use_cache=False)
    two = prepare_data(config_for(tmp_path, tiny_model_dir, dataset="rows.jsonl", preprocessing_num_workers=2),
                       tokenizer, use_cache=False)
    assert seen == [None, 2]
    assert one.train.to_dict() == two.train.to_dict()


# --- the cache --------------------------------------------------------------------------------


def test_processed_data_is_reused_and_rebuilt_when_the_file_or_cutoff_len_changes(tmp_path, tiny_model_dir,
                                                                                  tokenizer):
    path = tmp_path / "rows.jsonl"
    write_rows(path, ALPACA_ROWS[:10])
    config = config_for(tmp_path, tiny_model_dir, dataset="rows.jsonl")
    first = prepare_data(config, tokenizer)
    assert not first.from_cache and (first.cache_dir / "stats.json").is_file()
    again = prepare_data(config, tokenizer)
    assert again.from_cache and again.cache_dir == first.cache_dir
    assert again.train.to_dict() == first.train.to_dict() and again.stats == first.stats

    shorter = prepare_data(config_for(tmp_path, tiny_model_dir, dataset="rows.jsonl", cutoff_len=45), tokenizer)
    assert not shorter.from_cache and shorter.cache_dir != first.cache_dir
    assert max(len(ids) for ids in shorter.train["input_ids"]) == 45

    write_rows(path, ALPACA_ROWS[:12])
    changed = prepare_data(config, tokenizer)
    assert not changed.from_cache and changed.cache_dir != first.cache_dir
    assert len(changed.train) == 12


def test_pretraining_text_gets_the_tokenizers_own_bos_and_one_eos(tokenizer):
    from lmtune.config import build_config
    from lmtune.data.encoding import RowEncoder
    from lmtune.data.registry import DatasetSpec

    class AddsBos:  # a Llama-style tokenizer: BOS in front when special tokens are asked for
        bos_token_id, eos_token_id = 1, 2

        def __call__(self, text, add_special_tokens=True):
            return {"input_ids": ([1] if add_special_tokens else []) + [10 + len(w) for w in text.split()]}

    config = build_config({"stage": "pt", "cutoff_len": 64})
    spec = DatasetSpec("corpus", [], "text")

    def ids_of_text(tokenizer):
        (example,) = RowEncoder(config, tokenizer, None).examples(spec, {"text": "the tide rises"}, "corpus.txt")
        return example.input_ids

    ids = ids_of_text(AddsBos())
    assert ids == [1, 13, 14, 15, 2]
    ids = ids_of_text(tokenizer)
    assert ids[0] != tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id  # SmolLM2 adds no BOS
    assert ids[:-1] == tokenizer("the tide rises", add_special_tokens=False)["input_ids"]


def test_a_missing_data_file_names_each_place_looked_once(tmp_path, monkeypatch):
    from lmtune.data.registry import resolve_datasets
    from lmtune.errors import UserError

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    with pytest.raises(UserError) as raised:
        resolve_datasets(["data/missing.json"], ".", "sft")
    message = str(raised.value)
    assert message.count("missing.json") == 2  # the name given, and the one path looked at (not twice)
    with pytest.raises(UserError) as raised:
        resolve_datasets(["missing.json"], "data", "sft")
    assert f"{tmp_path / 'missing.json'} and {tmp_path / 'data' / 'missing.json'}" in str(raised.value)


# --- one data path: streamed and map-style data give the same rows ------------------------------


@pytest.mark.parametrize("stage", ["sft", "pt"])
def test_streamed_and_map_style_data_give_the_same_rows(tmp_path, tiny_model_dir, tokenizer, stage):
    import itertools

    from lmtune.data.streaming import open_stream

    long_reply = {"instruction": "Count the waves.", "output": "wave " * 200}  # cut at cutoff_len
    no_room = {"instruction": "Why? " * 200, "output": "Because."}  # no response left: dropped both ways
    rows = ALPACA_ROWS[:6] + [long_reply, no_room] + ALPACA_ROWS[6:10]
    if stage == "pt":
        rows = [{"text": row["instruction"] + " " + row["output"]} for row in rows]
    write_rows(tmp_path / "rows.jsonl", rows)
    config = config_for(tmp_path, tiny_model_dir, dataset="rows.jsonl", stage=stage, packing=False, cutoff_len=96)
    mapped = prepare_data(config, tokenizer, use_cache=False).train
    assert mapped.num_rows >= 11 and any(len(ids) == 96 for ids in mapped["input_ids"])

    stream, _ = open_stream(config.model_copy(update={"streaming": True, "buffer_size": 1}), tokenizer)
    streamed = list(itertools.islice(iter(stream), mapped.num_rows))
    keys = ("input_ids", "labels", "position_ids")
    assert [{k: row[k] for k in keys} for row in streamed] == [{k: row[k] for k in keys} for row in mapped]
    assert all(row["labels"][0] == M for row in streamed)  # the first-label mask, applied once for both
