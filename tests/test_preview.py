"""`lmtune preview` and the sample `lmtune train` prints: what a user reads to see which tokens are trained
and how much of the data survives cutoff_len."""

from __future__ import annotations

import json
import re

import pytest
from conftest import ALPACA_ROWS, run_lmtune

IM_END = "<|im_end|>"
ESC = "\x1b["


@pytest.fixture
def wide(monkeypatch):
    """Plain output, long lines unwrapped."""
    monkeypatch.setenv("COLUMNS", "1000")
    monkeypatch.delenv("FORCE_COLOR", raising=False)
    monkeypatch.delenv("NO_COLOR", raising=False)


def prompt_tokens(tokenizer, row) -> int:
    """Tokens before the reply, counted with transformers alone: the rendered prompt and generation header."""
    return len(tokenizer.apply_chat_template([{"role": "user", "content": row["instruction"]}],
                                             add_generation_prompt=True, tokenize=True, return_dict=False))


def preview_json(capsys, config, *args) -> dict:
    capsys.readouterr()
    assert run_lmtune("preview", config, "--json", *args) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("no_color", [True, False], ids=["NO_COLOR", "piped"])
def test_preview_marks_the_masked_tokens_and_shows_the_trained_text(tiny_config, tokenizer, capsys, monkeypatch,
                                                                     wide, no_color):
    if no_color:
        monkeypatch.setenv("NO_COLOR", "1")
        monkeypatch.setenv("FORCE_COLOR", "1")  # NO_COLOR wins even where a terminal is forced
    assert run_lmtune("preview", tiny_config(), "-n", "2") == 0
    out = capsys.readouterr().out
    assert ESC not in out
    assert out.count("── train row ") == 2
    first = ALPACA_ROWS[0]
    masked = prompt_tokens(tokenizer, first)
    assert f"labels:\n[-100 x{masked}]{first['output']}{IM_END}\n\n" in out  # the reply trained, not the prompt
    assert f"<|im_start|>user\n{first['instruction']}{IM_END}" in out  # the decoded input, template applied
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": first["instruction"]}, {"role": "assistant", "content": first["output"]}],
        tokenize=True, return_dict=False)
    assert f"input_ids: {ids}\n" in out


def test_preview_colours_on_a_terminal(tiny_config, capsys, monkeypatch, wide):
    monkeypatch.setenv("FORCE_COLOR", "1")
    assert run_lmtune("preview", tiny_config(), "-n", "1") == 0
    out = capsys.readouterr().out
    first = ALPACA_ROWS[0]
    assert f"{ESC}1;32m{first['output']}{IM_END}" in out  # trained text in bold green
    assert f"{ESC}2m[-100 x" in out  # the masked run dim


def test_preview_json_has_the_rows_as_the_model_gets_them(tiny_config, tokenizer, capsys):
    result = preview_json(capsys, tiny_config(val_size=4), "-n", "3", "--split", "eval")
    assert result["split"] == "eval" and result["rows"] == 4 and len(result["examples"]) == 3
    for row in result["examples"]:
        ids, labels, positions = row["input_ids"], row["labels"], row["position_ids"]
        assert len(ids) == len(labels) == len(positions) == row["tokens"]
        assert all(label in (-100, token) for label, token in zip(labels, ids, strict=True))
        assert row["trained_tokens"] == sum(1 for label in labels if label != -100) > 0
        assert row["text"] == tokenizer.decode(ids)
        (example,) = row["examples"]
        assert example["labels_text"].endswith(f"{IM_END}\n")
    stats = result["stats"]
    assert (stats["examples_read"], stats["train_examples"], stats["eval_examples"]) == (32, 28, 4)


def test_preview_of_packed_rows_shows_where_each_example_starts(tiny_config, capsys, wide):
    result = preview_json(capsys, tiny_config(packing=True, cutoff_len=128), "-n", "1")
    row = result["examples"][0]
    starts = [i for i, p in enumerate(row["position_ids"]) if p == 0]
    assert len(starts) >= 2
    assert [e["start"] for e in row["examples"]] == starts
    for example in row["examples"]:
        assert example["labels_text"].startswith("[-100 x")  # a packed example's first token is never a target
    assert result["stats"]["train_rows"] < 32 and 0 < result["stats"]["row_fill"] <= 1
    assert run_lmtune("preview", tiny_config(packing=True, cutoff_len=128), "-n", "1") == 0
    out = capsys.readouterr().out
    assert f"· {len(starts)} examples packed" in out
    assert f"example 2 of {len(starts)} in this row: tokens {starts[1]}-" in out


def test_preview_rejects_an_unknown_split_and_a_missing_eval_split(tiny_config, capsys):
    assert run_lmtune("preview", tiny_config(), "--split", "test") == 2
    assert "valid values are train and eval" in capsys.readouterr().err
    assert run_lmtune("preview", tiny_config(), "--split", "eval") == 2
    assert "set val_size" in capsys.readouterr().err


# --- statistics, checked against the data -------------------------------------------------------


def mixed_rows() -> list[dict]:
    short = ALPACA_ROWS[:10]
    long_reply = [{"instruction": f"Count to {n}.", "output": " ".join(str(i) for i in range(60))} for n in (1, 2, 3)]
    long_prompt = [{"instruction": "Repeat: " + "word " * 80, "output": "word"} for _ in range(2)]
    return short + long_reply + long_prompt


def test_statistics_count_truncated_and_dropped_examples(tiny_config, tokenizer, tmp_path, capsys, wide):
    rows = mixed_rows()
    path = tmp_path / "mixed.json"
    path.write_text(json.dumps(rows))
    config = tiny_config(dataset=str(path), cutoff_len=64, max_samples=14, per_device_train_batch_size=1)
    full = [len(tokenizer.apply_chat_template(
        [{"role": "user", "content": r["instruction"]}, {"role": "assistant", "content": r["output"]}],
        tokenize=True, return_dict=False)) for r in rows[:14]]
    assert sum(n > 64 for n in full) == 4  # the data is what the test says: 3 long replies, 1 long prompt
    assert prompt_tokens(tokenizer, rows[13]) > 64 and all(prompt_tokens(tokenizer, r) < 60 for r in rows[:13])

    result = preview_json(capsys, config, "-n", "20")
    stats = result["stats"]
    assert stats["examples_read"] == 15 and stats["examples_after_max_samples"] == 14
    # LLaMA-Factory's cutoff: the long prompt is cut from its end and keeps part of its reply, the row kept
    assert stats["truncated"] == 4 and stats["dropped_no_response"] == 0
    assert stats["examples_kept"] == stats["train_rows"] == 14 == len(result["examples"])
    assert stats["train_tokens"] == sum(r["tokens"] for r in result["examples"])
    assert stats["trained_tokens"] == sum(r["trained_tokens"] for r in result["examples"])
    assert max(r["tokens"] for r in result["examples"]) == 64
    assert stats["length_percentiles"]["max"] == max(full) and stats["length_percentiles"]["min"] == min(full)
    assert stats["length_percentiles"]["p50"] == sorted(full)[6]
    assert sum(b["count"] for b in stats["length_histogram"]) == 14
    assert stats["padding_share"] == 0.0  # batches of one row are never padded

    assert run_lmtune("preview", config, "-n", "0") == 0
    out = capsys.readouterr().out
    assert "cutoff_len 64: 4 examples truncated; 0 lost their whole response" in out
    assert "rows read: 15; after max_samples: 14" in out
    assert re.search(r"> cutoff_len\n", out)  # the histogram marks the lengths past cutoff_len


def test_padding_share_at_the_configured_batch_size(tiny_config, tmp_path, capsys):
    path = tmp_path / "mixed.json"
    path.write_text(json.dumps(mixed_rows()[:13]))
    result = preview_json(capsys, tiny_config(dataset=str(path), per_device_train_batch_size=13, cutoff_len=256),
                          "-n", "13")
    lengths = [r["tokens"] for r in result["examples"]]
    assert result["stats"]["padding_share"] == pytest.approx(1 - sum(lengths) / (max(lengths) * 13))


def test_statistics_are_cached_with_the_processed_data(tiny_config, capsys, wide):
    config = tiny_config(cutoff_len=40)
    first = preview_json(capsys, config, "-n", "0")
    again = preview_json(capsys, config, "-n", "0")
    assert not first["from_cache"] and again["from_cache"] and again["cache_dir"] == first["cache_dir"]
    assert again["stats"] == first["stats"]
    assert first["stats"]["truncated"] > 0


# --- the sample printed when training starts ----------------------------------------------------


def train_log(tiny_config, capsys, **values) -> str:
    """The log of a one-step run, its line wrapping undone (the log wraps at the terminal's width)."""
    capsys.readouterr()
    assert run_lmtune("train", tiny_config(max_steps=1, **values)) == 0
    return " ".join(capsys.readouterr().err.split())


def test_train_prints_a_seeded_sample_of_the_data(tiny_config, capsys, wide, tmp_path):
    err = train_log(tiny_config, capsys, preview_samples=2, seed=3)
    assert "preview: 2 of 32 training examples, chosen at random with seed 3" in err
    shown = re.findall(r"── train row (\d+) of 32 ", err)
    assert len(shown) == 2
    assert re.search(r"labels: \[-100 x\d+\]\d plus \d is \d+\.<\|im_end\|> ", err)  # the newline after it too
    again = train_log(tiny_config, capsys, preview_samples=2, seed=3, output_dir=str(tmp_path / "again"))
    assert re.findall(r"── train row (\d+) of 32 ", again) == shown  # the run's seed picks them
    other = train_log(tiny_config, capsys, preview_samples=2, seed=4, output_dir=str(tmp_path / "other"))
    assert re.findall(r"── train row (\d+) of 32 ", other) != shown


def test_train_prints_no_sample_with_preview_samples_0(tiny_config, capsys, wide):
    err = train_log(tiny_config, capsys, preview_samples=0)
    assert "preview:" not in err and "── train row" not in err and "[-100 x" not in err


def test_preview_warns_when_the_template_does_not_fit_the_tokenizer(tiny_config, capsys, wide):
    assert run_lmtune("preview", tiny_config(template="llama3"), "-n", "0") == 0
    out = capsys.readouterr().out
    assert re.search(r"warning: template 'llama3' writes <\|eot_id\|>, which this tokenizer splits into \d+ tokens",
                     out)
    assert preview_json(capsys, tiny_config(template="chatml"), "-n", "0")["warnings"] == []
