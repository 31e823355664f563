"""From files to training rows: convert, tokenise with label masks, truncate, split, pack, cache.

A processed row holds `input_ids`, `labels` and `position_ids`. Position ids restart at 0 where a
packed example starts, which is how the model keeps packed examples from attending to each other.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import datasets

from lmtune.config import TrainConfig, keys_where
from lmtune.data.encoding import RowEncoder, row_of
from lmtune.data.registry import DatasetSpec, left_placeholders, load_rows, resolve_datasets, unused_columns
from lmtune.data.templates import IGNORE_INDEX, chat_template_for
from lmtune.errors import UserError
from lmtune.paths import building, cache_home

log = logging.getLogger("lmtune")
CACHE_VERSION = 4  # 4: tool calls, reasoning; each prompt as its generation prompt tokenises


@dataclass
class DataStats:
    """What happened to the data on its way to the model; saved as stats.json next to the cached data."""

    examples_read: int = 0  # rows in the files
    examples_after_max_samples: int = 0
    examples_encoded: int = 0  # examples after conversion (stage pt: one per cutoff_len chunk of a text)
    truncated: int = 0  # examples longer than cutoff_len, cut to it (the dropped ones included)
    dropped_no_response: int = 0  # examples with no trained token left after truncation: dropped
    shortest_prompt: int | None = None  # of the dropped ones: tokens before the first trained token
    examples_kept: int = 0  # after dropping and mixing
    train_examples: int = 0
    eval_examples: int = 0
    train_rows: int = 0  # rows the model sees (fewer than examples when packed)
    eval_rows: int = 0
    train_tokens: int = 0
    trained_tokens: int = 0  # train tokens whose label is a target
    eval_tokens: int = 0
    cutoff_len: int = 0
    packing: bool = False
    lengths: list[int] = field(default_factory=list)  # kept examples, as trained (after truncation)
    raw_lengths: list[int] = field(default_factory=list)  # every encoded example, before truncation
    train_row_lengths: list[int] = field(default_factory=list)


@dataclass
class ProcessedData:
    train: datasets.Dataset
    eval: datasets.Dataset | None
    stats: DataStats
    cache_dir: Path | None = None
    from_cache: bool = False
    stream_info: Any = None  # for a streamed data set: what is known of its size


def prepare_data(config: TrainConfig, tokenizer: Any, use_cache: bool = True) -> ProcessedData:
    specs = resolve_datasets(config.datasets, config.dataset_dir, config.stage, config.placeholders)
    eval_specs = resolve_datasets(config.eval_datasets, config.dataset_dir, config.stage, config.placeholders) \
        if config.eval_datasets else []
    template = chat_template_for(tokenizer, config.template) if config.stage != "pt" else None
    if template is not None:
        log.info("chat template: %s", f"'{config.template}', LLaMA-Factory's by that name" if config.template
                 else "the tokenizer's own (template: null)")
    cache_dir = cache_home() / "data" / _cache_key(config, specs + eval_specs, tokenizer, template)
    if not use_cache:
        return _process(config, specs, eval_specs, tokenizer, template)
    if not config.overwrite_cache and (cache_dir / "done").exists():
        log.info("using processed data from the cache: %s", cache_dir)
        return _load_cached(cache_dir)
    with building(cache_dir, "processed data") as waited:
        # overwrite_cache: the process that waited takes what the one before it has just processed again
        if (waited or not config.overwrite_cache) and (cache_dir / "done").exists():
            log.info("using processed data from the cache: %s", cache_dir)
            return _load_cached(cache_dir)
        data = _process(config, specs, eval_specs, tokenizer, template)
        if config.overwrite_cache:  # the entry is replaced only once the data has been processed again
            shutil.rmtree(cache_dir, ignore_errors=True)
        _save_cached(data, cache_dir)
    data = _load_cached(cache_dir)  # memory-mapped from the cache, as every later run reads it
    data.from_cache = False
    return data


def _process(config: TrainConfig, specs: list[DatasetSpec], eval_specs: list[DatasetSpec], tokenizer: Any,
             template: str | None) -> ProcessedData:
    stats = DataStats()
    parts = []
    for spec in specs:
        part = _tokenize_dataset(config, spec, tokenizer, template, stats)
        parts.append(part)
    examples = _mix(parts, config)
    if len(examples) == 0:
        raise UserError(_empty_message(config, stats))
    stats.examples_kept = len(examples)
    stats.cutoff_len, stats.packing = config.cutoff_len, config.use_packing
    stats.lengths = [len(ids) for ids in examples["input_ids"]]
    if eval_specs:  # eval_dataset: its own data sets, processed as the training data is
        train = examples
        evaluation = datasets.concatenate_datasets(
            [_tokenize_dataset(config, spec, tokenizer, template, DataStats()) for spec in eval_specs])
    else:
        train, evaluation = _split(examples, config)
    stats.train_examples, stats.eval_examples = len(train), len(evaluation) if evaluation else 0
    train = _finish(train, config)
    evaluation = _finish(evaluation, config) if evaluation is not None else None
    stats.train_rows, stats.eval_rows = len(train), len(evaluation) if evaluation else 0
    stats.train_row_lengths = [len(ids) for ids in train["input_ids"]]
    stats.train_tokens = sum(stats.train_row_lengths)
    # labels[0] of a row is never a target: the model predicts token i+1 from tokens 0..i.
    stats.trained_tokens = sum(sum(1 for x in labels[1:] if x != IGNORE_INDEX) for labels in train["labels"])
    stats.eval_tokens = sum(len(ids) for ids in evaluation["input_ids"]) if evaluation is not None else 0
    return ProcessedData(train, evaluation, stats)


def _tokenize_dataset(
    config: TrainConfig, spec: DatasetSpec, tokenizer: Any, template: str | None, stats: DataStats
) -> datasets.Dataset:
    tokenized = []
    remaining = config.max_samples
    for file in spec.files:
        rows = load_rows(file)
        stats.examples_read += len(rows)
        if remaining is not None:
            rows = rows.select(range(min(remaining, len(rows))))
            remaining -= len(rows)
        stats.examples_after_max_samples += len(rows)
        if len(rows) == 0:
            continue
        if file == spec.files[0]:
            for line in unused_columns(spec, rows, config.stage):
                log.info("%s: %s", spec.name, line)
        left = left_placeholders(spec, rows)
        if left:
            shown = ", ".join("{{" + name + "}}" for name in sorted(left))
            log.warning("%s: the placeholders %s are left as they are; give their values with placeholders: "
                        "{%s}", file, shown, ", ".join(f"{name}: ..." for name in sorted(left)))
        encode = _encoder(config, spec, file, tokenizer, template)
        workers = _num_proc(config, len(rows))
        if workers:
            log.info("tokenising %s with %d processes", file, workers)
        tokenized.append(
            rows.map(
                encode,
                with_indices=True,
                batched=True,
                batch_size=256,
                remove_columns=rows.column_names,
                num_proc=workers,
                desc=f"tokenising {file.name}",
                load_from_cache_file=False,
            )
        )
    if not tokenized:
        raise UserError(f"data set '{spec.name}' has no rows ({', '.join(map(str, spec.files))})")
    part = datasets.concatenate_datasets(tokenized) if len(tokenized) > 1 else tokenized[0]
    stats.examples_encoded += len(part)
    stats.raw_lengths += part["raw_length"]
    stats.truncated += int(sum(part["truncated"]))
    has_labels = part["has_labels"]
    dropped_prompts = [n for n, keep in zip(part["prompt_length"], has_labels, strict=True) if not keep]
    if dropped_prompts:
        stats.dropped_no_response += len(dropped_prompts)
        shortest = min(dropped_prompts)
        stats.shortest_prompt = shortest if stats.shortest_prompt is None else min(stats.shortest_prompt, shortest)
        part = part.select([i for i, keep in enumerate(has_labels) if keep])
    return part.remove_columns(["truncated", "has_labels", "raw_length", "prompt_length"])


def _num_proc(config: TrainConfig, num_rows: int) -> int | None:
    """`preprocessing_num_workers` processes for tokenising, never more than there are rows; None: this one."""
    workers = min(config.preprocessing_num_workers or 1, num_rows)
    return workers if workers > 1 else None


def _encoder(config: TrainConfig, spec: DatasetSpec, file: Path, tokenizer: Any, template: str | None):
    """A batched map function: rows of the file to token ids and labels, and what happened to each."""
    encoder = RowEncoder(config, tokenizer, template)
    if config.stage == "grpo":
        return _prompt_encoder(config, spec, file, encoder)

    def encode(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        out: dict[str, list] = {"input_ids": [], "labels": [], "position_ids": [], "truncated": [], "has_labels": [],
                                "raw_length": [], "prompt_length": []}
        if spec.feedback:
            out["kto_tag"] = []
        rows = [{key: values[offset] for key, values in batch.items()} for offset in range(len(indices))]
        wheres = [f"{file}, row {index + 1}" for index in indices]
        for examples in encoder.batch_examples(spec, rows, wheres):
            for example in examples:
                out["input_ids"].append(example.input_ids)
                out["labels"].append(example.labels)
                out["position_ids"].append(example.position_ids)
                out["truncated"].append(example.truncated)
                out["has_labels"].append(example.has_labels)
                out["raw_length"].append(example.raw_length)
                out["prompt_length"].append(example.prompt_length)
                if spec.feedback:
                    out["kto_tag"].append(example.kto_tag)
        return out

    return encode


def _prompt_encoder(config: TrainConfig, spec: DatasetSpec, file: Path, encoder: RowEncoder):
    """Stage grpo: a row is its prompt's token ids (nothing trained: the completions are generated in the
    run), and its messages and other columns as JSON, for the reward functions."""

    def encode(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        out: dict[str, list] = {key: [] for key in ("input_ids", "labels", "position_ids", "truncated", "has_labels",
                                                    "raw_length", "prompt_length", "reward_inputs")}
        for offset, index in enumerate(indices):
            row = {key: values[offset] for key, values in batch.items()}
            ids, reward_inputs = encoder.prompt(spec, row, f"{file}, row {index + 1}", config.max_prompt_length)
            for key, value in (("input_ids", ids), ("labels", [IGNORE_INDEX] * len(ids)),
                               ("position_ids", list(range(len(ids)))), ("truncated", False), ("has_labels", True),
                               ("raw_length", len(ids)), ("prompt_length", len(ids)),
                               ("reward_inputs", json.dumps(reward_inputs, default=str))):
                out[key].append(value)
        return out

    return encode


def _mix(parts: list[datasets.Dataset], config: TrainConfig) -> datasets.Dataset:
    if len(parts) == 1:
        return parts[0]
    if config.mix_strategy == "concat":
        return datasets.concatenate_datasets(parts)
    probs = config.interleave_probs
    stopping = "first_exhausted" if config.mix_strategy == "interleave_under" else "all_exhausted"
    return datasets.interleave_datasets(parts, probabilities=probs, seed=config.seed, stopping_strategy=stopping)


def _split(examples: datasets.Dataset, config: TrainConfig) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    if config.val_size <= 0:
        return examples, None
    size = int(config.val_size) if config.val_size >= 1 else config.val_size
    if (isinstance(size, int) and size >= len(examples)) or (isinstance(size, float) and size * len(examples) < 1):
        raise UserError(f"val_size {config.val_size} leaves no train or no eval data out of {len(examples)} "
                        "examples")
    split = examples.train_test_split(test_size=size, seed=config.seed, shuffle=True)
    return split["train"], split["test"]


def rows_of_examples(examples: list[tuple[list[int], list[int]]], config: TrainConfig) -> datasets.Dataset:
    """Tokenised (input_ids, labels) pairs as rows, packed or not as the config says (a stream's eval data)."""
    data = datasets.Dataset.from_dict({"input_ids": [ids for ids, _ in examples],
                                       "labels": [labels for _, labels in examples],
                                       "position_ids": [list(range(len(ids))) for ids, _ in examples]})
    return _finish(data, config)


def _finish(examples: datasets.Dataset, config: TrainConfig) -> datasets.Dataset:
    """Examples as training rows: packed, or each its own row (its position ids are the example's)."""
    return pack(examples, config.cutoff_len) if config.use_packing else examples


def pack(examples: datasets.Dataset, cutoff_len: int) -> datasets.Dataset:
    """Best-fit decreasing: whole examples into rows of at most cutoff_len tokens, each example into the
    fullest row that still has room for it."""
    lengths = [len(ids) for ids in examples["input_ids"]]
    bins: list[list[int]] = []
    room: list[tuple[int, int]] = []  # (free tokens, bin index), kept sorted
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        slot = bisect.bisect_left(room, (lengths[index], -1))
        if slot == len(room):
            bins.append([index])
            bisect.insort(room, (cutoff_len - lengths[index], len(bins) - 1))
        else:
            free, bin_index = room.pop(slot)
            bins[bin_index].append(index)
            bisect.insort(room, (free - lengths[index], bin_index))
    input_ids, labels = examples["input_ids"], examples["labels"]
    rows: dict[str, list] = {"input_ids": [], "labels": [], "position_ids": []}
    for members in bins:
        row = row_of([(input_ids[i], labels[i]) for i in sorted(members)])
        for key in rows:
            rows[key].append(row[key])
    return datasets.Dataset.from_dict(rows)


def _empty_message(config: TrainConfig, stats: DataStats) -> str:
    if stats.examples_encoded and stats.dropped_no_response == stats.examples_encoded:
        return (f"no example is left to train on: all {stats.dropped_no_response} lose their whole response "
                f"to cutoff_len {config.cutoff_len} (the shortest prompt is {stats.shortest_prompt} tokens); "
                "raise cutoff_len")
    return (f"the data set {', '.join(config.datasets)} is empty after filtering ({stats.examples_read} rows "
            f"read, {stats.examples_encoded} examples made of them)")


# --- cache ------------------------------------------------------------------------------------


def _cache_key(config: TrainConfig, specs: list[DatasetSpec], tokenizer: Any, template: str | None) -> str:
    files = [
        {"path": str(f.resolve()), "size": f.stat().st_size, "mtime": f.stat().st_mtime_ns}
        for spec in specs for f in spec.files
    ]
    description = {
        "version": CACHE_VERSION,
        "files": files,
        "specs": [(s.name, s.formatting, s.columns, s.tags) for s in specs],
        "config": {k: getattr(config, k) for k in keys_where("data")},
        "packing": config.use_packing,
        "template": template,
        "tokenizer": [tokenizer.name_or_path, len(tokenizer), tokenizer.eos_token, tokenizer.bos_token],
    }
    return hashlib.sha256(json.dumps(description, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _save_cached(data: ProcessedData, cache_dir: Path) -> None:
    """Written to a temporary folder and renamed: a stopped run never leaves a half-written cache entry."""
    cache_dir.parent.mkdir(parents=True, exist_ok=True)
    partial = cache_dir.with_name(f"{cache_dir.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    data.train.save_to_disk(str(partial / "train"))
    if data.eval is not None:
        data.eval.save_to_disk(str(partial / "eval"))
    (partial / "stats.json").write_text(json.dumps(asdict(data.stats)))
    (partial / "done").touch()
    if (cache_dir / "done").exists():  # another process finished the same entry meanwhile
        shutil.rmtree(partial, ignore_errors=True)
        return
    shutil.rmtree(cache_dir, ignore_errors=True)  # an entry without its `done` marker: left by a crash
    try:
        partial.rename(cache_dir)
    except OSError:  # another process finished the same entry first
        shutil.rmtree(partial, ignore_errors=True)


def _load_cached(cache_dir: Path) -> ProcessedData:
    train = datasets.load_from_disk(str(cache_dir / "train"))
    evaluation = datasets.load_from_disk(str(cache_dir / "eval")) if (cache_dir / "eval").exists() else None
    saved = json.loads((cache_dir / "stats.json").read_text())
    stats = DataStats(**{k: v for k, v in saved.items() if k in DataStats.__dataclass_fields__})
    return ProcessedData(train, evaluation, stats, cache_dir, from_cache=True)
