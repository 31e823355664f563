"""What the model will be trained on: processed examples with their labels, and statistics of the data.

One rendering serves `lmtune preview`, `lmtune preview --json` and the sample that `lmtune train`
logs when it starts. Masked tokens (label -100) are shown as `[-100 xN]` runs, trained tokens as their
text; on a colour terminal the trained text is also green and the masked text dim. Packed rows are
shown example by example, cut where the position ids restart at 0; a preference pair (stages dpo, rm) as
its prompt, then its chosen and its rejected sequence; a kto example as its prompt, its answer marked
desirable or undesirable, then its KL sequence (the prompt with another row's answer).
"""

from __future__ import annotations

import logging
import math
import os
import random
import re
import sys
from dataclasses import asdict
from typing import Any

from lmtune.batching import padding_share
from lmtune.data.processing import DataStats, ProcessedData
from lmtune.data.templates import IGNORE_INDEX, chat_template_for, render
from lmtune.errors import UserError

log = logging.getLogger("lmtune")
PERCENTILES = (50, 90, 95, 99)
HISTOGRAM_BINS = 10
MASKED_STYLE, TRAINED_STYLE = "dim", "bold green"


# --- one row ------------------------------------------------------------------------------------


def segments(position_ids: list[int]) -> list[tuple[int, int]]:
    """(start, end) of every example in a row: a new one starts where the position id is 0."""
    starts = [i for i, p in enumerate(position_ids) if p == 0] or [0]
    if starts[0] != 0:
        starts.insert(0, 0)
    return list(zip(starts, starts[1:] + [len(position_ids)], strict=True))


def label_runs(labels: list[int]) -> list[tuple[bool, int, int]]:
    """(trained, start, end) runs of consecutive masked or trained labels."""
    runs: list[tuple[bool, int, int]] = []
    for index, label in enumerate(labels):
        trained = label != IGNORE_INDEX
        if runs and runs[-1][0] == trained:
            runs[-1] = (trained, runs[-1][1], index + 1)
        else:
            runs.append((trained, index, index + 1))
    return runs


def _decode(tokenizer: Any, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def sequence_names(stage: str, row: dict[str, Any]) -> tuple[str, str] | None:
    """What the two sequences of a row of `stage` are: a preference pair's, or a kto example's."""
    if stage in ("dpo", "rm"):
        return ("chosen", "rejected")
    if stage == "kto":
        mark = "desirable" if row.get("kto_tag") else "undesirable"
        return (f"completion ({mark})", "KL completion (another row's answer, for the KL estimate)")
    return None


def describe_row(row: dict[str, list[int]], index: int, tokenizer: Any, stage: str = "sft") -> dict[str, Any]:
    """A processed row as data: its ids, labels and position ids, and each packed example (or, for a
    preference pair or kto example, its two sequences, named) decoded."""
    input_ids, labels = list(row["input_ids"]), list(row["labels"])
    position_ids = list(row.get("position_ids") or range(len(input_ids)))
    examples = []
    for start, end in segments(position_ids):
        ids, labs = input_ids[start:end], labels[start:end]
        runs = [
            {"trained": trained, "tokens": b - a, "text": _decode(tokenizer, ids[a:b])}
            for trained, a, b in label_runs(labs)
        ]
        examples.append({
            "start": start, "end": end, "tokens": end - start,
            "trained_tokens": sum(1 for x in labs if x != IGNORE_INDEX),
            "text": _decode(tokenizer, ids), "labels_text": _runs_text(runs), "runs": runs,
        })
    described = {
        "row": index, "tokens": len(input_ids), "trained_tokens": sum(1 for x in labels if x != IGNORE_INDEX),
        "input_ids": input_ids, "labels": labels, "position_ids": position_ids,
        "text": _decode(tokenizer, input_ids), "examples": examples,
    }
    names = sequence_names(stage, row)
    if names is not None and len(examples) == 2:
        for example, name in zip(examples, names, strict=True):
            example["name"] = name
        first = examples[0]["runs"][0]
        described["prompt"] = first["text"] if not first["trained"] else ""
        described["sequences"] = "a preference pair" if stage != "kto" else "a kto example"
        if stage == "kto":
            described["kto_tag"] = bool(row["kto_tag"])
    return described


def _runs_text(runs: list[dict[str, Any]]) -> str:
    return "".join(run["text"] if run["trained"] else f"[-100 x{run['tokens']}]" for run in runs)


def render_row(described: dict[str, Any], split: str, total_rows: int, color: bool = False) -> Any:
    """The row as text: plain markers, or a rich Text with the trained part coloured when `color`."""
    from rich.text import Text

    examples = described["examples"]
    out = Text()
    packed = f" · {len(examples)} examples packed" if len(examples) > 1 else ""
    if "prompt" in described:
        packed = f" · {described['sequences']}: prompt, {', '.join(example['name'] for example in examples)}"
    out.append(f"── {split} row {described['row']} of {total_rows}{packed} · {described['tokens']} tokens · "
               f"{described['trained_tokens']} trained ──\n", style="bold" if color else "")
    out.append(f"input_ids: {described['input_ids']}\n")
    if "prompt" in described:
        out.append(f"prompt (masked in both):\n{described['prompt']}\n", style=MASKED_STYLE if color else "")
    for number, example in enumerate(examples, start=1):
        if "name" in example:
            out.append(f"{example['name']}: tokens {example['start']}-{example['end'] - 1}, "
                       f"{example['trained_tokens']} trained\n", style="bold cyan" if color else "")
        elif len(examples) > 1:
            out.append(f"example {number} of {len(examples)} in this row: tokens {example['start']}-"
                       f"{example['end'] - 1} (position ids restart at 0), {example['trained_tokens']} trained\n",
                       style="bold cyan" if color else "")
        out.append("input:\n")
        if color:
            for run in example["runs"]:
                out.append(run["text"], style=TRAINED_STYLE if run["trained"] else MASKED_STYLE)
        else:
            out.append(example["text"])
        out.append("\nlabels:\n")
        for run in example["runs"]:
            if run["trained"]:
                out.append(run["text"], style=TRAINED_STYLE if color else "")
            else:
                out.append(f"[-100 x{run['tokens']}]", style=MASKED_STYLE if color else "")
        out.append("\n")
    return out


# --- statistics ---------------------------------------------------------------------------------


def percentile(values: list[int], q: float) -> int:
    """Nearest-rank percentile (a length that occurs in the data)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def histogram(values: list[int], bins: int = HISTOGRAM_BINS) -> list[dict[str, int]]:
    """Equal-width bins from the shortest to the longest value: [{"low", "high", "count"}] (inclusive)."""
    low, high = min(values), max(values)
    width = max(1, math.ceil((high - low + 1) / bins))
    counts = [0] * math.ceil((high - low + 1) / width)
    for value in values:
        counts[(value - low) // width] += 1
    return [{"low": low + i * width, "high": low + (i + 1) * width - 1, "count": c} for i, c in enumerate(counts)]


def stats_summary(stats: DataStats, batch_size: int, seed: int) -> dict[str, Any]:
    """The statistics as data: counts, percentiles, histogram and padding (the long length lists left out)."""
    summary = {k: v for k, v in asdict(stats).items() if k not in ("lengths", "raw_lengths", "train_row_lengths")}
    summary["kept_share"] = stats.examples_kept / stats.examples_encoded if stats.examples_encoded else 0.0
    summary["trained_share"] = stats.trained_tokens / stats.train_tokens if stats.train_tokens else 0.0
    lengths = stats.raw_lengths or stats.lengths
    if lengths:
        summary["length_percentiles"] = {
            "min": min(lengths), **{f"p{q}": percentile(lengths, q) for q in PERCENTILES}, "max": max(lengths)
        }
        summary["length_histogram"] = histogram(lengths)
    summary["batch_size"] = batch_size
    summary["padding_share"] = padding_share(stats.train_row_lengths, batch_size, seed)
    if stats.packing and stats.train_rows:
        summary["row_fill"] = stats.train_tokens / (stats.train_rows * stats.cutoff_len)
    return summary


def stats_lines(summary: dict[str, Any], fancy: bool = False) -> list[str]:
    """The statistics for a terminal, one line each."""
    s = summary
    cutoff = s["cutoff_len"]
    lines = [
        f"rows read: {s['examples_read']:,}; after max_samples: {s['examples_after_max_samples']:,}; "
        f"examples made of them: {s['examples_encoded']:,}; kept: {s['examples_kept']:,} "
        f"({s['kept_share']:.1%}) -> {s['train_examples']:,} train, {s['eval_examples']:,} eval",
        f"cutoff_len {cutoff}: {s['truncated']:,} examples truncated; {s['dropped_no_response']:,} lost their whole "
        "response and were dropped",
        f"train tokens: {s['train_tokens']:,}, of which trained (label not -100): {s['trained_tokens']:,} "
        f"({s['trained_share']:.1%}); eval tokens: {s['eval_tokens']:,}",
    ]
    if "length_percentiles" in s:
        p = s["length_percentiles"]
        lines.append("example length in tokens, before truncation: "
                     + ", ".join(f"{name} {value:,}" for name, value in p.items()))
        bars = s["length_histogram"]
        most = max(b["count"] for b in bars)
        width = len(f"{bars[-1]['high']:,}")
        span = max(b["high"] - b["low"] for b in bars) > 0
        for b in bars:
            bar = ("█" if fancy else "#") * (math.ceil(30 * b["count"] / most) if b["count"] else 0)
            note = "  > cutoff_len" if b["low"] > cutoff else "  partly > cutoff_len" if b["high"] > cutoff else ""
            label = f"{b['low']:>{width},}-{b['high']:<{width},}" if span else f"{b['low']:>{width},}"
            lines.append(f"  {label} {bar:<30} {b['count']:>6,}{note}")
    rows = f"{s['train_rows']:,} train rows"
    if s["packing"]:
        fill = s.get("row_fill", 0.0)
        lines.append(f"packing: on; {s['train_examples']:,} examples in {rows} of at most {cutoff} tokens, "
                     f"filled to {fill:.1%}")
    else:
        lines.append(f"packing: off; {rows}")
    lines.append(f"padding at per_device_train_batch_size {s['batch_size']}: {s['padding_share']:.1%} of the "
                 "tokens in a micro-batch")
    return lines


def template_warnings(config: Any, tokenizer: Any) -> list[str]:
    """A chat template whose markers (`<|eot_id|>`, `<start_of_turn>`...) are not tokens of this tokenizer
    was written for another model family: the model would see them as plain text."""
    if config.stage == "pt":
        return []
    template = chat_template_for(tokenizer, config.template)
    sample = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    text = render(tokenizer, template, sample, generation_prompt=False)
    warnings = []
    for marker in sorted(set(re.findall(r"<\|?[A-Za-z_]+\|?>", text))):
        pieces = len(tokenizer(marker, add_special_tokens=False)["input_ids"])
        if pieces > 1:
            name = f"template '{config.template}'" if config.template else "the tokenizer's chat template"
            warnings.append(f"{name} writes {marker}, which this tokenizer splits into {pieces} tokens: the "
                            "template does not fit this model (leave `template` unset to use the tokenizer's own)")
    return warnings


# --- the command and the training log ---------------------------------------------------------


def _split_data(data: ProcessedData, split: str):
    if split == "eval":
        if data.eval is None:
            raise UserError("there is no eval split: set val_size (e.g. val_size=0.1) to hold out eval data")
        return data.eval
    return data.train


def preview_data(config: Any, data: ProcessedData, tokenizer: Any, n: int, split: str) -> dict[str, Any]:
    """`lmtune preview --json`: the first N rows of the split and the statistics."""
    rows = _split_data(data, split)
    shown = [describe_row(rows[i], i, tokenizer, config.stage) for i in range(min(n, len(rows)))]
    return {
        "split": split, "rows": len(rows), "packing": data.stats.packing, "cache_dir": str(data.cache_dir),
        "from_cache": data.from_cache, "examples": shown, "warnings": template_warnings(config, tokenizer),
        "stats": stats_summary(data.stats, config.per_device_train_batch_size, config.seed),
    }


def run_preview(config: Any, n: int, split: str, as_json: bool) -> None:
    """`lmtune preview CONFIG`: process (or reuse) the data and print examples and statistics."""
    import json

    from rich.console import Console

    from lmtune.data.processing import prepare_data
    from lmtune.models import load_tokenizer, resolve_model_path

    if split not in ("train", "eval"):
        raise UserError(f"--split {split}: valid values are train and eval")
    if n < 0:
        raise UserError(f"-n {n}: the number of examples to show must be 0 or more")
    tokenizer = load_tokenizer(resolve_model_path(config.model_name_or_path), config.trust_remote_code)
    if config.streaming:
        _preview_stream(config, tokenizer, n, split, as_json)
        return
    data = prepare_data(config, tokenizer)
    result = preview_data(config, data, tokenizer, n, split)
    if as_json:
        print(json.dumps(result, indent=1, ensure_ascii=False), flush=True)
        return
    color = use_color()
    console = Console(highlight=False, soft_wrap=True, force_terminal=color, no_color=not color)
    for described in result["examples"]:
        _print(console, render_row(described, split, result["rows"], color), color)
    if color:
        console.print(f"legend: [{TRAINED_STYLE}]trained[/] · [{MASKED_STYLE}]masked (label -100)[/]")
    where = "reused from" if data.from_cache else "saved to"
    _print(console, f"statistics (processed data {where} {data.cache_dir}):", color)
    for line in stats_lines(result["stats"], fancy=color):
        _print(console, line, color)
    for warning in result["warnings"]:
        _print(console, f"warning: {warning}", color)


def _preview_stream(config: Any, tokenizer: Any, n: int, split: str, as_json: bool) -> None:
    """A streamed data set: its first N training rows, in the order training reads them, without
    processing the whole files (statistics of all the data would mean reading it all)."""
    import itertools
    import json

    from rich.console import Console

    from lmtune.data.streaming import open_stream

    if split == "eval" and not config.val_size:
        raise UserError("there is no eval split: with streaming: true, set val_size to a number of rows "
                        "(e.g. val_size=200) to hold out the first rows of the data")
    stream, info = open_stream(config, tokenizer)
    if split == "eval":
        from lmtune.data.processing import rows_of_examples

        rows = rows_of_examples(info.held_out, config)
        shown = [describe_row(rows[index], index, tokenizer) for index in range(min(n, len(rows)))]
    else:
        shown = [describe_row(row, index, tokenizer) for index, row in enumerate(itertools.islice(iter(stream), n))]
    size = {"total_bytes": info.total_bytes, "estimated_rows": info.estimated_rows, "num_samples": info.num_samples}
    if as_json:
        print(json.dumps({"split": split, "streamed": True, "examples": shown, "size": size,
                          "warnings": template_warnings(config, tokenizer)}, indent=1, ensure_ascii=False), flush=True)
        return
    color = use_color()
    console = Console(highlight=False, soft_wrap=True, force_terminal=color, no_color=not color)
    for described in shown:
        _print(console, render_row(described, split, "the stream", color), color)
    size_text = f"{info.num_samples:,} rows (num_samples)" if info.num_samples else (
        f"about {info.estimated_rows:,} rows (estimated from the first MB)" if info.estimated_rows else "rows unknown")
    which = (f"these are held out for evaluation: the first {int(config.val_size)} rows of the data (val_size)"
             if split == "eval" else "these are the first rows training reads (after the shuffle buffer)")
    _print(console, f"streamed data: {info.total_bytes / 1e6:,.1f} MB, {size_text}; {which}; statistics of the "
                    "whole data are not computed for a stream", color)
    for warning in template_warnings(config, tokenizer):
        _print(console, f"warning: {warning}", color)


def _log_stream_sample(config: Any, stream: Any, tokenizer: Any) -> None:
    rows = stream.first_rows(config.preview_samples)
    log.info("preview: the first %d training rows of the stream, in file order (training draws them through "
             "a shuffle buffer of %d; `lmtune preview` shows more)", len(rows), config.buffer_size)
    for index, row in enumerate(rows):
        log.info("%s", render_row(describe_row(row, index, tokenizer), "train", "the stream").plain)


def use_color() -> bool:
    """Colour on a terminal; never with NO_COLOR set; FORCE_COLOR forces it (read from os.environ here,
    since datasets' multi-process map replaces os.environ with a copy that rich no longer sees)."""
    if os.environ.get("NO_COLOR"):
        return False
    force = os.environ.get("FORCE_COLOR")
    if force is not None:
        return force != ""
    return sys.stdout.isatty()


def _print(console: Any, text: Any, color: bool) -> None:
    if color:
        console.print(text)
    else:  # no escape codes at all: piped output and NO_COLOR read the same
        print(text if isinstance(text, str) else text.plain, flush=True)


def log_sample(config: Any, data: ProcessedData, tokenizer: Any) -> None:
    """At train start: `preview_samples` training rows chosen with the run's seed, through the logger."""
    for warning in template_warnings(config, tokenizer):
        log.warning("%s", warning)
    if config.preview_samples == 0:
        return
    if data.stream_info is not None:
        _log_stream_sample(config, data.train, tokenizer)
        return
    total = len(data.train)
    count = min(config.preview_samples, total)
    chosen = sorted(random.Random(config.seed).sample(range(total), count))
    what = "rows" if data.stats.packing else config.sample_name
    log.info("preview: %d of %d training %s, chosen at random with seed %d (preview_samples; `lmtune preview` "
             "shows more and the statistics)", count, total, what, config.seed)
    for index in chosen:
        described = describe_row(data.train[index], index, tokenizer, config.stage)
        log.info("%s", render_row(described, "train", total).plain)
    s = data.stats
    log.info("data: %d of %d examples kept; cutoff_len %d truncated %d and dropped %d (no response left); "
             "%d of %d train tokens trained", s.examples_kept, s.examples_encoded, s.cutoff_len, s.truncated,
             s.dropped_no_response, s.trained_tokens, s.train_tokens)
