"""Streamed data: no made-up epochs, max_steps required, and a resume that continues the stream exactly."""

from __future__ import annotations

import itertools
import json
import os
import shutil

import pytest
from conftest import read_jsonl, run_lmtune, torchrun
from test_resume import assert_same_run


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def texts(count, tag="doc"):
    return [{"text": f"{tag} {i}: the tide rises and falls " + "and the moon pulls the sea " * (i % 4)}
            for i in range(count)]


@pytest.fixture
def stream_config(tiny_config, tmp_path):
    corpus = write_jsonl(tmp_path / "data" / "corpus.jsonl", texts(60))

    def make(**overrides):
        values = dict(dataset=str(corpus), stage="pt", streaming=True, max_steps=6, buffer_size=8,
                      cutoff_len=32, per_device_train_batch_size=2)
        values.update(overrides)
        return tiny_config(**values)

    return make


def test_streaming_without_max_steps_names_it_and_writes_nothing(stream_config, tmp_path, capsys):
    assert run_lmtune("train", stream_config(max_steps=None)) == 2
    message = capsys.readouterr().err
    assert "max_steps" in message and "about max_steps:" in message
    assert not (tmp_path / "run").exists()


def test_streamed_progress_counts_samples_and_tokens_with_an_epoch_marked_as_estimate(stream_config, tmp_path):
    assert run_lmtune("train", stream_config()) == 0
    rows = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if r["type"] == "train"]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    epochs = [r["epoch"] for r in rows]
    assert all(r["epoch_estimated"] for r in rows)  # bytes read against the file's size, never a plain epoch
    assert epochs == sorted(epochs) and 0 < epochs[0] and epochs[-1] < 1
    samples = [r["samples_seen"] for r in rows]
    tokens = [r["tokens_seen"] for r in rows]
    assert samples == sorted(samples) and samples[0] > 0 and tokens == sorted(tokens) and tokens[-1] > tokens[0]


def test_size_hint_gives_an_epoch_marked_as_estimate(stream_config, tmp_path):
    data = tmp_path / "data"
    (data / "dataset_info.json").write_text(json.dumps({"corpus": {"file_name": "corpus.jsonl", "num_samples": 60}}))
    assert run_lmtune("train", stream_config(dataset="corpus", dataset_dir=str(data))) == 0
    rows = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if r["type"] == "train"]
    assert rows[-1]["epoch_estimated"] is True
    assert rows[-1]["epoch"] == pytest.approx(rows[-1]["samples_seen"] / 60, abs=1e-3)


def test_the_plan_of_a_stream_gives_its_size_and_passes_as_estimates(stream_config, tmp_path, capsys, monkeypatch):
    data = tmp_path / "data"
    (data / "dataset_info.json").write_text(json.dumps({"corpus": {"file_name": "corpus.jsonl", "num_samples": 60}}))
    config = stream_config(dataset="corpus", dataset_dir=str(data), max_steps=15, val_size=4, packing=False)
    capsys.readouterr()
    assert run_lmtune("plan", config, "--json") == 0
    stream = json.loads(capsys.readouterr().out)["stream"]
    # 60 rows less the 4 held out, 2 a step: a pass is 28 steps, and 15 steps are about half of one
    assert stream["total_bytes"] == (data / "corpus.jsonl").stat().st_size
    assert (stream["rows"], stream["rows_from"], stream["held_out_rows"]) == (56, "num_samples", 4)
    assert (stream["steps_per_pass_estimate"], stream["passes_estimate"]) == (28, 0.54)
    monkeypatch.setenv("COLUMNS", "250")
    assert run_lmtune("train", config) == 0
    said = " ".join(capsys.readouterr().err.split())
    assert "about 56 rows to train on (estimated from num_samples): one pass is about 28 steps" in said
    assert "0.54 passes (estimated); its first 4 rows are held out for evaluation" in said


def test_train_on_a_stream_prints_its_first_rows(stream_config, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("COLUMNS", "250")
    capsys.readouterr()
    assert run_lmtune("train", stream_config(preview_samples=2, packing=False, max_steps=1)) == 0
    err = " ".join(capsys.readouterr().err.split())  # the log wraps at the terminal's width
    assert "preview: the first 2 training rows of the stream, in file order" in err
    assert err.count("── train row") == 2 and "doc 0:" in err and "doc 1:" in err
    assert run_lmtune("train", stream_config(preview_samples=0, max_steps=1, output_dir=str(tmp_path / "b"))) == 0
    assert "── train row" not in capsys.readouterr().err


def test_a_stream_resumes_only_with_the_loader_workers_that_read_it(stream_config, tmp_path, capsys):
    assert run_lmtune("train", stream_config(max_steps=2, save_steps=1, dataloader_num_workers=2)) == 0
    shutil.rmtree(tmp_path / "run" / "checkpoint-2")
    before = sorted(p.name for p in (tmp_path / "run").iterdir())
    assert run_lmtune("train", stream_config(max_steps=2, save_steps=1, dataloader_num_workers=0)) == 2
    assert "set dataloader_num_workers: 2 to resume" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == before


def test_a_stream_resumes_only_on_the_number_of_processes_that_read_it(stream_config, tmp_path):
    assert run_lmtune("train", stream_config(max_steps=2, save_steps=1)) == 0
    shutil.rmtree(tmp_path / "run" / "checkpoint-2")
    before = sorted(p.name for p in (tmp_path / "run").iterdir())
    result = torchrun(stream_config(max_steps=2, save_steps=1), 2, check=False)
    err = " ".join(result.stderr.split())
    assert result.returncode != 0 and "exitcode : 2" in err  # torchrun's report of the first process's exit
    assert "a stream read by 1 process (each reads its own share of the files" in err
    assert "start it with --nproc_per_node 1 to resume it" in err
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == before
    assert run_lmtune("plan", stream_config(max_steps=2, save_steps=1), "--processes", "2") == 2  # as train


def test_the_stream_starts_over_and_says_so(stream_config, tmp_path):
    assert run_lmtune("train", stream_config(max_steps=40, packing=False)) == 0  # 60 docs, 2 per step
    events = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if r.get("event") == "stream_pass"]
    assert events and events[0]["stream_pass"] == 2
    rows = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if r["type"] == "train"]
    assert rows[-1]["stream_pass"] >= 2 and rows[-1]["epoch"] > 1


@pytest.mark.parametrize(
    ("from_step", "settings"),
    [
        (3, {}),
        (4, {"packing": False, "max_steps": 40}),  # resumes after the stream wrapped
        (3, {"dataloader_num_workers": 2}),
        (2, {"stage": "sft", "packing": True, "gradient_accumulation_steps": 2, "cutoff_len": 128}),
        (3, {"val_size": 5, "eval_steps": 2, "packing": False, "max_steps": 40, "preview_samples": 2}),
    ],
    ids=["packed-pt", "after-wrap", "loader-workers", "sft-packed", "held-out-eval"],
)
def test_streamed_resume_continues_exactly(stream_config, tmp_path, alpaca_file, from_step, settings):
    if settings.get("stage") == "sft":
        rows = json.loads(alpaca_file.read_text())
        settings = {**settings, "dataset": str(write_jsonl(tmp_path / "data" / "sums.jsonl", rows))}
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert run_lmtune("train", stream_config(output_dir=str(straight), save_steps=1, **settings)) == 0
    resumed.mkdir()
    shutil.copytree(straight / f"checkpoint-{from_step}", resumed / f"checkpoint-{from_step}")
    assert run_lmtune("train", stream_config(output_dir=str(resumed), save_steps=1, **settings)) == 0
    assert_same_run(straight, resumed, from_step)
    first = [r for r in read_jsonl(resumed / "metrics.jsonl") if r["type"] == "train"][0]
    expected = {r["step"]: r for r in read_jsonl(straight / "metrics.jsonl") if r["type"] == "train"}
    assert (first["samples_seen"], first["tokens_seen"]) == (expected[first["step"]]["samples_seen"],
                                                              expected[first["step"]]["tokens_seen"])
    passes = [(r["step"], r["stream_pass"]) for r in read_jsonl(straight / "metrics.jsonl")
              if r.get("event") == "stream_pass" and r["step"] > from_step]
    assert [(r["step"], r["stream_pass"]) for r in read_jsonl(resumed / "metrics.jsonl")
            if r.get("event") == "stream_pass"] == passes  # the pass the checkpoint was in is not announced again


def test_a_stream_holds_out_its_first_rows_for_evaluation_and_never_trains_on_them(tmp_path, tokenizer):
    from lmtune.config import build_config
    from lmtune.data.streaming import prepare_stream

    corpus = write_jsonl(tmp_path / "data" / "corpus.jsonl", texts(20))
    config = build_config(dict(dataset=str(corpus), stage="pt", streaming=True, max_steps=1, buffer_size=1,
                               packing=False, cutoff_len=64, val_size=3))
    stream, info = prepare_stream(config, tokenizer, 0, 1)
    held_out = [tokenizer.decode(ids, skip_special_tokens=True).split(":")[0] for ids, _ in info.held_out]
    assert held_out == ["doc 0", "doc 1", "doc 2"]
    trained = [tokenizer.decode(row["input_ids"], skip_special_tokens=True).split(":")[0]
               for row in itertools.islice(iter(stream), 17 * 3)]  # three passes over the other rows
    assert sorted(set(trained)) == sorted(f"doc {i}" for i in range(3, 20))
    assert all(trained.count(doc) == 3 for doc in set(trained))
    shares = []  # two processes: each trains on its own part of what is not held out
    for rank in (0, 1):
        stream, _ = prepare_stream(config, tokenizer, rank, 2)
        shares.append({tokenizer.decode(row["input_ids"], skip_special_tokens=True).split(":")[0]
                       for row in itertools.islice(iter(stream), 40)})
    assert not shares[0] & shares[1] and shares[0] | shares[1] == set(trained)


def test_a_streamed_run_evaluates_on_steps_and_on_minutes(stream_config, tmp_path, minutes_pass_after):
    callbacks = minutes_pass_after(steps=(3,), minutes=2)
    config = stream_config(val_size=6, eval_steps=4, eval_minutes=1, save_minutes=1, max_steps=6,
                           callbacks=callbacks)
    assert run_lmtune("train", config) == 0
    run = tmp_path / "run"
    evals = [r for r in read_jsonl(run / "metrics.jsonl") if r["type"] == "eval"]
    assert [r["step"] for r in evals][:2] == [3, 4] and all(r["eval_loss"] > 0 for r in evals)
    index = json.loads((run / "checkpoints.json").read_text())
    assert [(e["step"], e["reasons"]) for e in index["checkpoints"]][0] == (3, ["minutes"])


def test_lmtune_eval_of_a_streamed_run_measures_the_rows_it_held_out(stream_config, tmp_path, capsys):
    assert run_lmtune("train", stream_config(val_size=6, eval_steps=3, save_steps=3, max_steps=6)) == 0
    run = tmp_path / "run"
    logged = {r["step"]: r["eval_loss"] for r in read_jsonl(run / "metrics.jsonl") if r["type"] == "eval"}
    capsys.readouterr()
    assert run_lmtune("eval", run, "--checkpoint", run / "checkpoint-3") == 0
    report = json.loads(capsys.readouterr().out)
    assert report["examples"] == 6 and "first 6 rows" in report["data"]["split"]
    assert report["loss"] == pytest.approx(logged[3], rel=1e-4)


def test_preview_of_a_streams_eval_split_shows_the_held_out_rows(stream_config, capsys, monkeypatch):
    monkeypatch.setenv("NO_COLOR", "1")
    assert run_lmtune("preview", stream_config(val_size=2, packing=False), "--split", "eval", "-n", "5") == 0
    out = capsys.readouterr().out
    assert out.count("── eval row") == 2 and "doc 0:" in out and "doc 1:" in out and "doc 2:" not in out
    assert "the first 2 rows of the data" in out
    assert run_lmtune("preview", stream_config(), "--split", "eval") == 2
    assert "val_size" in capsys.readouterr().err


def test_a_fraction_of_a_stream_or_all_of_a_mixed_data_set_cannot_be_held_out(stream_config, tmp_path, capsys):
    assert run_lmtune("train", stream_config(val_size=0.1)) == 2
    assert "val_size 0.1" in capsys.readouterr().err and not (tmp_path / "run").exists()
    small = write_jsonl(tmp_path / "data" / "small.jsonl", texts(4, tag="small"))
    mixed = stream_config(dataset=f"{small},{tmp_path / 'data' / 'corpus.jsonl'}", mix_strategy="interleave_under",
                          val_size=4)
    assert run_lmtune("train", mixed) == 2
    assert "every row of data set" in capsys.readouterr().err and not (tmp_path / "run").exists()


def test_interleaved_streams_mix_both_data_sets(stream_config, tmp_path):
    other = write_jsonl(tmp_path / "data" / "other.jsonl", texts(30, tag="zebra"))
    corpus = tmp_path / "data" / "corpus.jsonl"
    config = stream_config(dataset=f"{corpus},{other}", mix_strategy="interleave_under", interleave_probs="0.5,0.5",
                           max_steps=3)
    assert run_lmtune("train", config) == 0
    assert [r["step"] for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if r["type"] == "train"] == [1, 2, 3]


@pytest.mark.parametrize("strategy, passes_after_small_wraps", [("interleave_under", 1), ("interleave_over", 0)])
def test_a_pass_over_a_mix_ends_with_the_first_data_set_under_and_with_the_last_over(
        tmp_path, tokenizer, strategy, passes_after_small_wraps):
    from lmtune.config import build_config
    from lmtune.data.streaming import prepare_stream

    small = write_jsonl(tmp_path / "data" / "small.jsonl", texts(4, tag="small"))
    big = write_jsonl(tmp_path / "data" / "big.jsonl", texts(40, tag="big"))
    config = build_config(dict(dataset=f"{small},{big}", stage="pt", streaming=True, max_steps=1, buffer_size=1,
                               packing=False, cutoff_len=64, mix_strategy=strategy, interleave_probs="0.5,0.5"))
    stream, _ = prepare_stream(config, tokenizer, 0, 1)
    rows = list(itertools.islice(iter(stream), 30))
    decoded = [tokenizer.decode(row["input_ids"], skip_special_tokens=True) for row in rows]
    positions = [row["stream"]["done"] / row["stream"]["per_pass"] for row in rows]  # passes over the mix
    small_wrapped = [i for i, text in enumerate(decoded) if text.startswith("small")][4]  # the 5th small row
    assert int(positions[small_wrapped]) == passes_after_small_wraps
    assert sum(text.startswith("big") for text in decoded) < 40  # the big set has not ended within these rows
    if strategy == "interleave_over":
        assert max(positions) < 1  # still the first pass of the mix: the big set is not through
    else:
        assert positions[-1] >= 2  # each time the small set ends, a pass of the mix ends


def test_a_stream_with_nothing_to_train_on_is_a_clear_error(stream_config, tmp_path, alpaca_file, capsys):
    rows = json.loads(alpaca_file.read_text())
    sums = write_jsonl(tmp_path / "data" / "sums.jsonl", rows)
    # at cutoff_len 1 no reply keeps a token
    assert run_lmtune("train", stream_config(dataset=str(sums), stage="sft", cutoff_len=1)) == 2
    assert "cutoff_len 1" in capsys.readouterr().err


def test_a_json_array_cannot_be_streamed(stream_config, tmp_path, capsys):
    array = tmp_path / "data" / "array.json"
    array.write_text(json.dumps(texts(5)))
    assert run_lmtune("train", stream_config(dataset=str(array))) == 2
    assert "JSON lines" in capsys.readouterr().err


def test_parquet_csv_and_a_folder_of_shards_stream(tmp_path, tokenizer):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from lmtune.config import build_config
    from lmtune.data.streaming import prepare_stream

    shards = tmp_path / "data" / "shards"
    shards.mkdir(parents=True)
    rows = texts(40)
    pq.write_table(pa.Table.from_pylist(rows[:20]), shards / "a.parquet", row_group_size=5)
    (shards / "b.csv").write_text("text\n" + "".join(f'"{r["text"]}"\n' for r in rows[20:]))
    config = build_config(dict(dataset=str(shards), stage="pt", streaming=True, max_steps=1, buffer_size=1,
                               packing=False, cutoff_len=64))
    stream, info = prepare_stream(config, tokenizer, 0, 1)
    rows_out = itertools.islice(iter(stream), 40)
    seen = [tokenizer.decode(row["input_ids"], skip_special_tokens=True) for row in rows_out]
    assert sorted(seen) == sorted(r["text"] for r in rows)  # every row once per pass, from both formats
    assert info.estimated_rows and info.estimated_rows >= 20

    # holding out 22 rows takes the whole Parquet file (in folder order) and the first two CSV rows
    stream, info = prepare_stream(config.model_copy(update={"val_size": 22}), tokenizer, 0, 1)
    held_out = sorted(tokenizer.decode(ids, skip_special_tokens=True) for ids, _ in info.held_out)
    assert held_out == sorted(r["text"] for r in rows[:22])
    seen = [tokenizer.decode(row["input_ids"], skip_special_tokens=True) for row in itertools.islice(iter(stream), 18)]
    assert sorted(seen) == sorted(r["text"] for r in rows[22:])


def test_preview_of_a_stream_shows_its_first_rows_without_reading_it_all(stream_config, capsys, monkeypatch):
    monkeypatch.setenv("NO_COLOR", "1")
    assert run_lmtune("preview", stream_config(max_steps=None), "-n", "2") == 0
    out = capsys.readouterr().out
    assert out.count("── train row") == 2 and "of the stream" in out
    assert "statistics of the whole data are not computed for a stream" in out
    assert run_lmtune("preview", stream_config(), "--split", "eval") == 2


def test_a_resume_in_a_later_pass_keeps_its_pass_count(stream_config, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    settings = {"packing": False, "max_steps": 36, "save_steps": 2}
    assert run_lmtune("train", stream_config(output_dir=str(straight), **settings)) == 0
    wrapped_at = next(r["step"] for r in read_jsonl(straight / "metrics.jsonl") if r.get("event") == "stream_pass")
    from_step = wrapped_at + 2 - wrapped_at % 2  # the first checkpoint in the second pass
    resumed.mkdir()
    shutil.copytree(straight / f"checkpoint-{from_step}", resumed / f"checkpoint-{from_step}")
    assert run_lmtune("train", stream_config(output_dir=str(resumed), **settings)) == 0
    rows = [r for r in read_jsonl(resumed / "metrics.jsonl") if r["type"] == "train"]
    expected = {r["step"]: r for r in read_jsonl(straight / "metrics.jsonl") if r["type"] == "train"}
    assert [r["stream_pass"] for r in rows] == [expected[r["step"]]["stream_pass"] for r in rows] == [2] * len(rows)
    assert not [r for r in read_jsonl(resumed / "metrics.jsonl") if r.get("event") == "stream_pass"]


# --- a pass is a pass: every row once a pass, the default shuffle buffer, 1.5 passes ---------------------


def numbered(count):
    """Rows of equal length, so that a byte split of the file gives every reader as many rows."""
    return [{"text": f"row {i:03d}: the tide rises and falls"} for i in range(count)]


def row_id(tokenizer, row):
    return tokenizer.decode(row["input_ids"], skip_special_tokens=True).split(":")[0]


@pytest.mark.parametrize(("processes", "workers", "buffer_size"),
                         [(1, 0, 16384), (1, 2, 16384), (2, 0, 16384), (2, 2, 16384), (1, 0, 16)])
def test_a_pass_yields_every_row_once_and_the_next_pass_a_new_order(tmp_path, tokenizer, processes, workers,
                                                                     buffer_size):
    from torchdata.stateful_dataloader import StatefulDataLoader

    from lmtune.config import build_config
    from lmtune.data.streaming import prepare_stream

    corpus = write_jsonl(tmp_path / "data" / "rows.jsonl", numbered(400))
    config = build_config(dict(dataset=str(corpus), stage="pt", streaming=True, max_steps=1, packing=False,
                               cutoff_len=32, buffer_size=buffer_size))
    passes: dict[int, list[str]] = {0: [], 1: []}
    for rank in range(processes):
        stream, _ = prepare_stream(config, tokenizer, rank, processes)
        loader = StatefulDataLoader(stream, batch_size=4, num_workers=workers, collate_fn=list)
        for row in itertools.chain.from_iterable(itertools.islice(loader, 800 // 4 // processes)):
            progress = row["stream"]
            passes[-(-progress["done"] // progress["per_pass"]) - 1].append(row_id(tokenizer, row))
    every_row = [f"row {i:03d}" for i in range(400)]
    assert sorted(passes[0]) == every_row and sorted(passes[1]) == every_row  # each row exactly once a pass
    assert passes[0] != every_row and passes[1] != passes[0]  # shuffled, and each pass in its own order


@pytest.fixture
def pass_and_a_half(tiny_config, tmp_path, monkeypatch):
    """A config for 40 rows, the default buffer, 4 rows a step: 10 steps a pass, 15 steps in all.
    One thread: a model this small trains several times faster without torch's second thread."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield from _pass_and_a_half(tiny_config, tmp_path, monkeypatch)
    torch.set_num_threads(threads)


def _pass_and_a_half(tiny_config, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "save_around.py").write_text(  # a save just before and just after the end of the first pass
        "class SaveAround:\n"
        "    def on_step_end(self, state, metrics):\n"
        "        if state.step in (9, 11):\n"
        "            state.save_reasons.add('steps')\n")
    corpus = write_jsonl(tmp_path / "data" / "rows.jsonl", numbered(40))

    def make(**overrides):
        values = dict(dataset=str(corpus), stage="pt", streaming=True, max_steps=15, packing=False, cutoff_len=32,
                      per_device_train_batch_size=4, callbacks=["save_around:SaveAround"], logging_steps=1)
        return tiny_config(**{**values, **overrides})

    yield make


def assert_one_and_a_half_passes(run, pass_event_steps=(10,)):
    rows = read_jsonl(run / "metrics.jsonl")
    train = [r for r in rows if r["type"] == "train"]
    epochs = [r["epoch"] for r in train]
    assert [r["step"] for r in train] == list(range(1, 16))
    assert epochs[0] <= 0.2 and epochs == sorted(epochs) and epochs[-1] == pytest.approx(1.5, abs=0.011)
    assert not train[-1]["epoch_estimated"]  # the whole stream fits in the buffer: its size is known at once
    events = [r for r in rows if r.get("event") == "stream_pass"]
    assert [e["stream_pass"] for e in events] == [2] and events[0]["step"] in pass_event_steps
    passes = {r["step"]: r["stream_pass"] for r in train}
    assert passes[events[0]["step"]] == 1 and passes[events[0]["step"] + 1] == 2
    size = next(r for r in rows if r.get("event") == "stream_size")
    assert size["rows"] * size["processes"] == 40


def assert_same_progress(straight, resumed):
    """The resumed run shows the epoch, pass and pass event of the run that never stopped."""
    def progress(run):
        rows = read_jsonl(run / "metrics.jsonl")
        return ({r["step"]: (r["epoch"], r["stream_pass"], r["epoch_estimated"]) for r in rows if r["type"] == "train"},
                [r["step"] for r in rows if r.get("event") == "stream_pass"])

    (expected, expected_events), (got, got_events) = progress(straight), progress(resumed)
    assert got == {step: expected[step] for step in got}
    assert got_events == [step for step in expected_events if step >= min(got)]


@pytest.mark.parametrize("workers", [0, 2])
def test_one_and_a_half_passes_count_what_was_trained_and_resume_exactly(pass_and_a_half, tmp_path, workers):
    straight = tmp_path / "straight"
    assert run_lmtune("train", pass_and_a_half(output_dir=str(straight), dataloader_num_workers=workers)) == 0
    assert_one_and_a_half_passes(straight)
    # the epoch counts rows trained: 4 a step of 40, never the 40 rows read into the buffer at once
    epochs = {r["step"]: r["epoch"] for r in read_jsonl(straight / "metrics.jsonl") if r["type"] == "train"}
    assert (epochs[2], epochs[10], epochs[11], epochs[15]) == (0.2, 1.0, 1.1, 1.5)
    for step in (9, 11):  # the checkpoint just before the end of the pass, and the one just after
        resumed = tmp_path / f"resumed-{step}"
        resumed.mkdir()
        shutil.copytree(straight / f"checkpoint-{step}", resumed / f"checkpoint-{step}")
        assert run_lmtune("train", pass_and_a_half(output_dir=str(resumed), dataloader_num_workers=workers)) == 0
        assert_same_run(straight, resumed, step)
        assert_same_progress(straight, resumed)


def test_two_processes_train_one_and_a_half_passes_and_resume_exactly(pass_and_a_half, tmp_path):
    settings = dict(per_device_train_batch_size=2, dataloader_num_workers=2)  # 2 x 2 rows a step: 10 a pass
    callbacks_on_path = {"PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))}
    straight = tmp_path / "straight"
    torchrun(pass_and_a_half(output_dir=str(straight), **settings), env=callbacks_on_path)
    assert_one_and_a_half_passes(straight)
    for step in (9, 11):
        resumed = tmp_path / f"resumed-{step}"
        resumed.mkdir()
        shutil.copytree(straight / f"checkpoint-{step}", resumed / f"checkpoint-{step}")
        torchrun(pass_and_a_half(output_dir=str(resumed), **settings), env=callbacks_on_path)
        assert_same_run(straight, resumed, step)
        assert_same_progress(straight, resumed)


def test_num_train_epochs_stops_a_hinted_stream_after_its_passes(stream_config, tmp_path, capsys):
    data = tmp_path / "data"
    write_jsonl(data / "rows.jsonl", numbered(40))
    # the hint says 48 rows, so the plan estimates 18 steps; the 40 rows make 10 steps a pass, 15 for 1.5
    (data / "dataset_info.json").write_text(json.dumps({"rows": {"file_name": "rows.jsonl", "num_samples": 48}}))
    config = stream_config(dataset="rows", dataset_dir=str(data), max_steps=None, num_train_epochs=1.5,
                           packing=False, per_device_train_batch_size=4, buffer_size=16)
    capsys.readouterr()
    assert run_lmtune("plan", config, "--json") == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["total_steps"] == 18 and plan["stream"]["stops_after_passes"] == 1.5
    assert plan["stream"]["steps_estimate"] == 18
    assert run_lmtune("plan", config) == 0
    assert "about 18 optimizer steps (estimated): the stream stops after 1.5 passes" in capsys.readouterr().out
    assert run_lmtune("train", config) == 0
    rows = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    train = [r for r in rows if r["type"] == "train"]
    assert train[-1]["step"] == 15 and train[-1]["epoch"] == 1.5 and not train[-1]["epoch_estimated"]
    assert train[0]["epoch_estimated"]  # the hint, until the 40 rows were read to their end
    assert next(r for r in rows if r.get("event") == "stream_size")["rows"] == 40
    metrics = (tmp_path / "run" / "metrics.jsonl").read_text()
    assert run_lmtune("train", config) == 0  # the passes are trained: running it again trains nothing more
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == metrics
