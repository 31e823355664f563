"""Streaming: resume cost at an early and a late position, memory on a large corpus, throughput.

    python bench/stream_resume.py [--gb 2.0] [--steps 30] [--corpus PATH] [--smoke]

1. Generates a JSONL corpus of about --gb gigabytes (kept for the next run).
2. Trains the tiny Llama on it as a stream for --steps steps (`lmtune train` in a child process) and
   prints the child's peak RSS: memory must not grow with the corpus.
3. Resumes that run from a checkpoint whose stream position was moved to sample 1,000 and to sample
   1,000,000, and times, for each, `lmtune train` from process start to the end of its first
   optimizer step, and the data part alone (restore the loader, first batch); prints both ratios.
4. Tokens per second of the data pipeline, streamed against the same rows loaded in memory.

The last line is `resume_ratio`: the whole resume time at the late position over that at the early one.
`--smoke`: a 2 MB corpus in a temporary folder, 1 step, positions 1,000 and 5,000, 500 rows for the
pipeline.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import model_dir, smoke_requested  # noqa: E402

from lmtune.checkpoint import file_sha256  # noqa: E402

WORDS = ("tide moon sea harbour light keeper storm wind rain ship rope sail north south gull wave rock "
         "salt fog bell chart compass anchor deck crew lamp beam night dawn shore cliff current").split()


def generate_corpus(path: Path, gigabytes: float) -> None:
    target = int(gigabytes * 1e9)
    rng = random.Random(0)
    written = 0
    with path.open("w") as handle:
        while written < target:
            lines = []
            for _ in range(10000):
                text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 45)))
                lines.append(json.dumps({"text": text}) + "\n")
            chunk = "".join(lines)
            handle.write(chunk)
            written += len(chunk)
    print(f"corpus: {path} ({path.stat().st_size / 1e9:.2f} GB)")


def line_offsets(path: Path, wanted: list[int]) -> dict[int, int]:
    """Byte offset of line n (0-based) for each n in wanted (bench set-up, not timed)."""
    wanted_set, found, last = set(wanted), {}, max(wanted)
    with path.open("rb") as handle:
        for number in range(last + 1):
            if number in wanted_set:
                found[number] = handle.tell()
            handle.readline()
    return found


def lmtune(config: Path, *overrides: str) -> float:
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "lmtune", "train", str(config), *overrides, "-q"],
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(result.stderr[-3000:])
    return time.perf_counter() - started


def moved_checkpoint(source: Path, target_run: Path, corpus: Path, sample: int, buffer: int) -> None:
    """A copy of `source` whose stream position is line `sample` of the corpus (its buffer full of the
    lines before it), as if the run had streamed that far."""
    offsets = line_offsets(corpus, [sample - buffer + i for i in range(buffer + 1)])
    shutil.rmtree(target_run, ignore_errors=True)
    target_run.mkdir(parents=True)
    checkpoint = target_run / source.name
    shutil.copytree(source, checkpoint)
    states = torch.load(checkpoint / "rng_state.pth", weights_only=True)
    source = states["data_loader"][0]["dataset_state"]["sources"][0]
    source["source"].update({"pass": 0, "file": 0, "offset": offsets[sample], "chunk": 0, "rows": sample,
                             "examples": sample, "size": None})
    source.update({"pass": 0, "draining": False, "trained_pass": 0, "trained": sample - buffer,
                   "buffer": [[0, offsets[sample - buffer + i], 0] for i in range(buffer)]})
    torch.save(states, checkpoint / "rng_state.pth")
    mark = json.loads((checkpoint / "checkpoint_complete.json").read_text())  # the sizes and hashes a resume verifies
    mark["files"]["rng_state.pth"] = (checkpoint / "rng_state.pth").stat().st_size
    mark.setdefault("sha256", {})["rng_state.pth"] = file_sha256(checkpoint / "rng_state.pth")
    (checkpoint / "checkpoint_complete.json").write_text(json.dumps(mark))


def data_restore_seconds(config_path: Path, checkpoint: Path) -> float:
    """Restore the stream position and produce the first batch, in this process."""
    from torchdata.stateful_dataloader import StatefulDataLoader

    from lmtune.batching import Collator
    from lmtune.config import load_config
    from lmtune.data.streaming import prepare_stream
    from lmtune.models import load_tokenizer

    config = load_config(config_path)
    tokenizer = load_tokenizer(config.model_name_or_path)
    started = time.perf_counter()
    stream, _ = prepare_stream(config, tokenizer, 0, 1)
    loader = StatefulDataLoader(stream, batch_size=config.per_device_train_batch_size,
                                collate_fn=Collator(tokenizer.pad_token_id, config.use_packing))
    loader.load_state_dict(torch.load(checkpoint / "rng_state.pth", weights_only=True)["data_loader"][0])
    next(iter(loader))
    return time.perf_counter() - started


def pipeline_tokens_per_second(config_path: Path, rows: int, work: Path) -> tuple[float, float, float]:
    """Tokens/s of the data pipeline alone over the same first `rows` rows: streamed (tokenised on the
    fly), in memory counting its tokenisation up front, and in memory reading tokenised rows only."""
    from torch.utils.data import DataLoader

    from lmtune.batching import Collator, epoch_batches
    from lmtune.config import load_config
    from lmtune.data import prepare_data
    from lmtune.data.streaming import StreamBatches, prepare_stream
    from lmtune.models import load_tokenizer

    config = load_config(config_path)
    head = work / "head.jsonl"
    with open(config.datasets[0], "rb") as source, head.open("wb") as out:
        for _ in range(rows):
            out.write(source.readline())
    config = config.model_copy(update={"dataset": str(head)})
    tokenizer = load_tokenizer(config.model_name_or_path)
    collator = Collator(tokenizer.pad_token_id, config.use_packing)
    stream, _ = prepare_stream(config, tokenizer, 0, 1)
    started, tokens = time.perf_counter(), 0
    for _, counts, progress in DataLoader(stream, batch_size=8, collate_fn=StreamBatches(collator)):
        tokens += counts.tokens
        if progress["done"] >= progress["per_pass"]:  # one pass over the rows
            break
    streamed = tokens / (time.perf_counter() - started)

    started = time.perf_counter()
    data = prepare_data(config.model_copy(update={"streaming": False}), tokenizer, use_cache=False)
    tokenised = time.perf_counter()
    tokens = 0
    for _, counts in DataLoader(data.train, batch_sampler=epoch_batches(len(data.train), 8, 0, 0),
                                collate_fn=collator):
        tokens += counts.tokens
    done = time.perf_counter()
    return streamed, tokens / (done - started), tokens / (done - tokenised)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gb", type=float, default=2.0)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--corpus", type=Path, default=Path(tempfile.gettempdir()) / "lmtune-bench-corpus.jsonl")
    parser.add_argument("--smoke", action="store_true", help="a 2 MB corpus, 1 step, near positions")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="lmtune-stream-bench-"))
    positions, pipeline_rows = (1_000, 1_000_000), 20_000
    if smoke_requested(args):
        args.gb, args.steps, args.corpus = 0.002, 1, work / "corpus.jsonl"
        positions, pipeline_rows = (1_000, 5_000), 500
    if not args.corpus.exists() or args.corpus.stat().st_size < args.gb * 0.95e9:
        generate_corpus(args.corpus, args.gb)
    model = model_dir("tiny", work)
    buffer = 256
    config = {"model_name_or_path": str(model), "dataset": str(args.corpus), "stage": "pt", "streaming": True,
              "max_steps": args.steps, "save_steps": args.steps, "buffer_size": buffer, "cutoff_len": 128,
              "per_device_train_batch_size": 4, "finetuning_type": "full", "report_to": "none",
              "plot_loss": False, "logging_steps": 1, "output_dir": str(work / "run"), "preview_samples": 0}
    config_path = work / "run.yaml"
    config_path.write_text(yaml.safe_dump(config))

    seconds = lmtune(config_path)
    rows = [json.loads(line) for line in (work / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["type"] == "train"]
    child_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(f"streamed training: {args.steps} steps in {seconds:.1f} s, {train[-1]['samples_seen']:,} samples, "
          f"{train[-1]['tokens_seen']:,} tokens, epoch shown: {train[-1]['epoch']}")
    print(f"peak RSS of the training process: {child_peak:.0f} MB (corpus {args.corpus.stat().st_size / 1e9:.2f} GB)")

    timings = {}
    for sample in positions:
        run = work / f"resume-{sample}"
        moved_checkpoint(work / "run" / f"checkpoint-{args.steps}", run, args.corpus, sample, buffer)
        resume_config = work / f"resume-{sample}.yaml"
        resume_config.write_text(yaml.safe_dump({**config, "output_dir": str(run), "max_steps": args.steps + 1,
                                                 "save_steps": None}))
        data_seconds = data_restore_seconds(resume_config, run / f"checkpoint-{args.steps}")
        whole = lmtune(resume_config)
        timings[sample] = (whole, data_seconds)
        print(f"resume at sample {sample:>9,}: start to first step {whole:.2f} s; data restore + first batch "
              f"{data_seconds:.3f} s")
    early, late = (timings[sample] for sample in positions)
    print(f"ratio {positions[1]:,} / {positions[0]:,}: whole {late[0] / early[0]:.2f}, "
          f"data part {late[1] / early[1]:.2f} (goal: under 1.5)")

    streamed, in_memory, pre_tokenised = pipeline_tokens_per_second(config_path, pipeline_rows, work)
    print(f"data pipeline, {pipeline_rows:,} rows: streamed {streamed:,.0f} tokens/s; in memory "
          f"{in_memory:,.0f} tokens/s "
          f"with its tokenisation counted (ratio {streamed / in_memory:.2f}), {pre_tokenised:,.0f} tokens/s "
          "reading rows tokenised beforehand")
    print(f"resume_ratio: {late[0] / early[0]:.2f}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
