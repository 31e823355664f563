"""Streaming data sets: read, tokenise, shuffle and pack on the fly, with an exact, cheap position.

Why not `datasets`' IterableDataset: its resume skips examples by reading the shard again from the
start, which for one large JSONL file means re-reading everything before the position. Here each
reader owns a byte range of every file (or a set of Parquet row groups), and its position is a byte
offset, so a resume seeks straight to it. The shuffle buffer is saved as row positions and the packer's
pending tokens as they are, so a resumed stream yields exactly the rows the unstopped one would have.

Passes: a pass yields every row of a reader's share once; the shuffle buffer holds one pass at a time
and drains at its end (ShuffledPasses). Each row handed out says how much its reader has trained, so
the engine's epoch counts rows trained, never rows read ahead (StreamProgress).

Readers: every process x every data loader worker is one reader with its own share of each file.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import logging
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lmtune.config import TrainConfig
from lmtune.data.encoding import RowEncoder, row_of
from lmtune.data.registry import DatasetSpec, resolve_datasets, standard_row
from lmtune.data.templates import chat_template_for
from lmtune.errors import UserError

log = logging.getLogger("lmtune")
LINE_FORMATS = {".jsonl", ".txt", ".text", ".csv", ".json"}
PASS_END = "end of a pass"  # what Source.examples() yields between two passes


# --- reading rows at byte offsets -------------------------------------------------------------


@dataclass
class FileShare:
    """The part of one file that a reader owns: lines whose first byte is in [start, end)."""

    path: Path
    start: int
    end: int


def share_of(path: Path, reader: int, readers: int) -> FileShare:
    size = path.stat().st_size
    return FileShare(path, size * reader // readers, size * (reader + 1) // readers)


def _first_line_at_or_after(handle: Any, start: int) -> int:
    if start == 0:
        return 0
    handle.seek(start - 1)
    handle.readline()  # the line holding byte start-1 belongs to the reader before
    return handle.tell()


class LineFile:
    """JSONL, text and CSV rows, one a line, addressed by the byte offset of the line."""

    def __init__(self, path: Path):
        self.path = path
        self.suffix = path.suffix
        self.header: list[str] | None = None
        if self.suffix == ".csv":
            with path.open("rb") as handle:
                self.header = next(csv.reader([handle.readline().decode()]))
        if self.suffix == ".json":
            with path.open("rb") as handle:
                if handle.read(64).lstrip().startswith(b"["):
                    raise UserError(f"{path}: a JSON array cannot be streamed; write it as JSON lines (.jsonl)")

    def rows(self, share: FileShare, offset: int | None):
        """(offset, row) from `offset` (or the share's first line) to the end of the share."""
        with self.path.open("rb") as handle:
            position = offset if offset is not None else _first_line_at_or_after(handle, share.start)
            if self.header is not None and position == 0:
                handle.readline()
                position = handle.tell()
            handle.seek(position)
            while position < share.end:
                line = handle.readline()
                if not line:
                    return
                next_position = handle.tell()
                if line.strip():
                    yield position, next_position, self.parse(line, position)
                position = next_position

    def row_at(self, offset: int) -> dict[str, Any]:
        with self.path.open("rb") as handle:
            handle.seek(offset)
            return self.parse(handle.readline(), offset)

    def numbered_rows(self):
        """(line number from 1, row) over the whole file, each line's faults named by its number."""
        with self.path.open("rb") as handle:
            for number, line in enumerate(handle, start=1):
                if line.strip() and not (number == 1 and self.header is not None):
                    yield number, self.parse(line, f"line {number}")

    def parse(self, line: bytes, where: int | str) -> dict[str, Any]:
        """The row of `line`; `where`: its byte offset, or the words that name it."""
        where = f"byte {where}" if isinstance(where, int) else where
        try:
            text = line.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError as error:
            raise UserError(f"{self.path}, {where}: not UTF-8 text ({error.reason} at byte {error.start} of the "
                            "line); save the file as UTF-8") from None
        if self.suffix in (".txt", ".text"):
            return {"text": text}
        if self.header is not None:
            return dict(zip(self.header, next(csv.reader(io.StringIO(text))), strict=False))
        try:
            row = json.loads(text)
        except json.JSONDecodeError as error:
            raise UserError(f"{self.path}, {where}: not a JSON line ({error.msg})") from None
        if not isinstance(row, dict):
            raise UserError(f"{self.path}, {where}: a JSON {type(row).__name__}, not an object of columns")
        return row


class ParquetFile:
    """Parquet rows addressed by their row number; a reader owns every readers-th row group."""

    def __init__(self, path: Path):
        import pyarrow.parquet as pq

        self.path = path
        self.file = pq.ParquetFile(path)
        sizes = [self.file.metadata.row_group(i).num_rows for i in range(self.file.num_row_groups)]
        self.group_starts = [sum(sizes[:i]) for i in range(len(sizes))]
        self.sizes = sizes

    def rows(self, reader: int, readers: int, offset: int | None):
        for group in range(reader, len(self.sizes), readers):
            first = self.group_starts[group]
            if offset is not None and offset >= first + self.sizes[group]:
                continue
            table = self.file.read_row_group(group).to_pylist()
            for index, row in enumerate(table):
                number = first + index
                if offset is None or number >= offset:
                    yield number, number + 1, row

    def row_at(self, offset: int) -> dict[str, Any]:
        group = max(i for i, start in enumerate(self.group_starts) if start <= offset)
        return self.file.read_row_group(group).to_pylist()[offset - self.group_starts[group]]


def open_file(path: Path) -> LineFile | ParquetFile:
    if path.suffix == ".parquet":
        return ParquetFile(path)
    if path.suffix in LINE_FORMATS:
        return LineFile(path)
    raise UserError(f"{path}: streaming reads .jsonl, .txt, .csv and .parquet files")


# --- one data set as a cycling source of tokenised examples ------------------------------------


class Source:
    """The rows of some files that one reader owns, pass after pass, as tokenised examples.

    `state` always says where to go on: the file (in this pass's order), the row being read and how
    many of its examples (a long text makes several) were already handed out; and what this pass has
    read so far (rows, examples), which becomes the exact `size` of a pass once one was read to its end."""

    def __init__(self, members: list[tuple[DatasetSpec, Path]], encode: Any, reader: int, readers: int, seed: int,
                 train_starts: dict[Path, int] | None = None):
        self.members = members
        self.encode = encode
        self.reader, self.readers, self.seed = reader, readers, seed
        self.train_starts = train_starts or {}  # per file, where rows not held out for evaluation begin
        self.files = [open_file(path) for _, path in members]
        self.state: dict[str, Any] = {"pass": 0, "file": 0, "offset": None, "chunk": 0, "rows": 0, "examples": 0,
                                      "size": None}
        # what this reader trains on in each file, fixed for the run: worked out once, read at every row
        self._parts = [self._trained_part(file) for file in self.files]
        self._share_sizes = [self._part_size(part) for part in self._parts]
        self._order_cache: tuple[int, list[int]] = (-1, [])

    def _file_order(self, pass_index: int) -> list[int]:
        if self._order_cache[0] != pass_index:
            order = list(range(len(self.files)))
            random.Random(self.seed * 1000003 + pass_index).shuffle(order)
            self._order_cache = (pass_index, order)
        return self._order_cache[1]

    def _trained_part(self, file: LineFile | ParquetFile) -> FileShare | list[tuple[int, int]]:
        """A line file: the byte range this reader owns, after any held-out rows. Parquet: the row numbers
        [first, end) it owns, one range a row group, after any held-out rows."""
        start = self.train_starts.get(file.path, 0)
        if isinstance(file, ParquetFile):
            ranges = [(max(file.group_starts[group], start), file.group_starts[group] + file.sizes[group])
                      for group in range(self.reader, len(file.sizes), self.readers)]
            return [(first, end) for first, end in ranges if first < end]
        share = share_of(file.path, self.reader, self.readers)
        return FileShare(file.path, max(share.start, start), share.end)

    @staticmethod
    def _part_size(part: FileShare | list[tuple[int, int]]) -> int:
        """Bytes (rows for Parquet) that this reader trains on in one file."""
        if isinstance(part, FileShare):
            return max(0, part.end - part.start)
        return sum(end - first for first, end in part)

    def read_fraction(self) -> float:
        """How much of this pass over the reader's share has been read, by bytes (rows for Parquet)."""
        order, total = self._file_order(self.state["pass"]), sum(self._share_sizes)
        done = sum(self._share_sizes[index] for index in order[: self.state["file"]])
        if self.state["file"] < len(order) and self.state["offset"] is not None:
            part, offset = self._parts[order[self.state["file"]]], self.state["offset"]
            if isinstance(part, FileShare):
                done += max(0, offset - part.start)
            else:
                done += sum(min(max(offset - first, 0), end - first) for first, end in part)
        return min(done / total, 1.0) if total else 0.0

    def examples(self):
        """(position, input_ids, labels) pass after pass, with PASS_END after each pass; it ends only
        when a whole pass gave no example (this reader owns no rows)."""
        while True:
            order = self._file_order(self.state["pass"])
            while self.state["file"] < len(order):
                file_index = order[self.state["file"]]
                for offset, next_offset, row in self._rows(file_index, self.state["offset"]):
                    skip = self.state["chunk"] if offset == self.state["offset"] else 0
                    self.state["offset"] = offset
                    for chunk, (ids, labels) in enumerate(self._encode(file_index, row, offset)):
                        if chunk < skip:
                            continue
                        self.state["chunk"] = chunk + 1
                        self.state["examples"] += 1
                        yield (file_index, offset, chunk), ids, labels
                    self.state.update(offset=next_offset, chunk=0, rows=self.state["rows"] + 1)
                self.state.update(file=self.state["file"] + 1, offset=None, chunk=0)
            if not self.state["examples"]:
                return
            if self.state["size"] is None:  # the first pass read to its end: a pass's size is now known
                self.state["size"] = [self.state["rows"], self.state["examples"]]
            self.state.update({"pass": self.state["pass"] + 1, "file": 0, "offset": None, "chunk": 0, "rows": 0,
                               "examples": 0})
            log.debug("reader %d has read pass %d over its share of the data", self.reader, self.state["pass"])
            yield PASS_END

    def _encode(self, file_index: int, row: dict[str, Any], offset: int):
        spec, path = self.members[file_index]
        return self.encode(spec, path, row, offset)

    def _rows(self, file_index: int, offset: int | None):
        file, part = self.files[file_index], self._parts[file_index]
        if isinstance(file, ParquetFile):
            start = self.train_starts.get(file.path, 0)
            return file.rows(self.reader, self.readers, offset if offset is not None else (start or None))
        return file.rows(part, offset)

    def example_at(self, position: tuple[int, int, int]) -> tuple[list[int], list[int]]:
        file_index, offset, chunk = position
        row = self.files[file_index].row_at(offset)
        return list(self._encode(file_index, row, offset))[chunk]


# --- the stream -------------------------------------------------------------------------------


class ShuffledPasses:
    """One source's examples pass after pass, each pass in a shuffled order of its own: the shuffle
    buffer is filled from one pass only and drains at its end, so a pass yields each example exactly
    once, and a source smaller than the buffer is simply a shuffled pass.

    It also counts what was trained (examples in rows handed out), which is where the epoch comes from."""

    def __init__(self, source: Source, buffer_size: int, size_hint: float | None):
        self.source, self.buffer_size, self.size_hint = source, buffer_size, size_hint
        self.buffer: list[tuple[tuple, list[int], list[int]]] = []
        # pass: the pass the buffer holds; draining: its rows are all read; trained: examples of pass
        # trained_pass in rows handed out
        self.state: dict[str, Any] = {"pass": 0, "draining": False, "trained_pass": 0, "trained": 0}
        self.shuffler = self._shuffler(0)
        self._examples = source.examples()

    def _shuffler(self, pass_index: int) -> random.Random:
        return random.Random(self.source.seed * 1000003 + 7 * pass_index + 1)

    def next(self) -> tuple[int, tuple, list[int], list[int]] | None:
        """(pass, position, input_ids, labels) of a random example of the pass; None if there are none."""
        while True:
            while not self.state["draining"] and len(self.buffer) < self.buffer_size:
                item = next(self._examples, None)
                if item is None:
                    break  # the reader owns no rows
                if item is PASS_END:
                    self.state["draining"] = True
                else:
                    self.buffer.append(item)
            if self.buffer:
                index = self.shuffler.randrange(len(self.buffer))
                self.buffer[index], self.buffer[-1] = self.buffer[-1], self.buffer[index]
                return (self.state["pass"], *self.buffer.pop())
            if not self.state["draining"]:
                return None
            self.state.update({"pass": self.state["pass"] + 1, "draining": False})
            self.shuffler = self._shuffler(self.state["pass"])

    def count_trained(self, pass_index: int) -> None:
        if pass_index > self.state["trained_pass"]:
            self.state.update(trained_pass=pass_index, trained=0)
        self.state["trained"] += 1

    def examples_per_pass(self) -> tuple[float, bool]:
        """Examples in a pass over this reader's share, and whether that is exact (a pass was read to its
        end) or an estimate (the size hint, else the examples read so far against the bytes read)."""
        source = self.source.state
        if source["size"] is not None:
            return source["size"][1], True
        fraction = self.source.read_fraction()
        estimate = self.size_hint or (source["examples"] / fraction if fraction > 0 else 0)
        return max(estimate, source["examples"] + 1), False  # more than read: the pass is not over yet

    def passes_trained(self) -> tuple[float, float, bool]:
        """(passes trained, examples a pass, exact): 1.5 is half way through the second pass."""
        per_pass, exact = self.examples_per_pass()
        return self.state["trained_pass"] + min(self.state["trained"] / per_pass, 1.0), per_pass, exact

    def state_dict(self) -> dict[str, Any]:
        return {**self.state, "source": dict(self.source.state), "shuffler": _rng_to_json(self.shuffler),
                "buffer": [list(position) for position, _, _ in self.buffer]}

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        self.load_counts(saved)
        self.shuffler.setstate(_rng_from_json(saved["shuffler"]))
        self.buffer = [(tuple(position), *self.source.example_at(tuple(position))) for position in saved["buffer"]]
        self._examples = self.source.examples()

    def load_counts(self, saved: dict[str, Any]) -> None:
        """The pass, the position and what was trained, without the buffer: enough for passes_trained()."""
        self.state = {key: saved[key] for key in self.state}
        self.source.state = dict(saved["source"])


class TokenStream(torch.utils.data.IterableDataset):
    """Training rows from streamed data sets; `state_dict()` / `load_state_dict()` make it resumable
    (torchdata's StatefulDataLoader calls them in every worker, between batches).

    Each row carries, under "stream", where its reader stands once the row is trained (see
    StreamProgress): the engine's epoch counts what was trained, not what was read ahead."""

    def __init__(self, specs: list[DatasetSpec], config: TrainConfig, tokenizer: Any, rank: int, world_size: int):
        self.specs, self.config, self.tokenizer = specs, config, tokenizer
        self.rank, self.world_size = rank, world_size
        template = chat_template_for(tokenizer, config.template) if config.stage == "sft" else None
        self.encoder = RowEncoder(config, tokenizer, template)
        self.interleave = len(specs) > 1 and config.mix_strategy != "concat"
        self.probabilities = (config.interleave_probs or [1.0] * len(specs)) if self.interleave else [1.0]
        # a pass over the mix ends when the first data set ends (under) or when all of them have (over)
        self._mix_position = min if config.mix_strategy == "interleave_over" else max
        self.train_starts: dict[Path, int] = {}  # set by hold_out()
        self.size_hint: int | None = None  # examples a pass over all the data (num_samples), set by open_stream
        self._live: tuple | None = None
        self._loaded: dict[str, Any] | None = None

    def _groups(self) -> list[list[tuple[DatasetSpec, Path]]]:
        """concat: one source over every file; interleave: one source per data set."""
        members = [[(spec, path) for path in spec.files] for spec in self.specs]
        return members if self.interleave else [[m for group in members for m in group]]

    def state_dict(self) -> dict[str, Any]:
        if self._live is None:
            return self._loaded or {}
        passes, picker, pending = self._live
        return {"sources": [source.state_dict() for source in passes], "picker": _rng_to_json(picker),
                "pending": [[index, pass_index, list(ids), list(labels)]
                            for index, pass_index, ids, labels in pending]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._loaded = state or None

    def _reader(self, worker_id: int, workers: int) -> tuple[int, int]:
        """(this reader's number, all readers): every process x every data loader worker is one reader."""
        return self.rank * workers + worker_id, self.world_size * workers

    def _passes(self, reader: int, readers: int) -> list[ShuffledPasses]:
        groups = self._groups()
        buffer_size = max(1, self.config.buffer_size // readers // len(groups))
        hint = self.size_hint / readers if self.size_hint and not self.interleave else None
        seed = self.config.seed + 7919 * reader
        return [ShuffledPasses(Source(group, self._encode, reader, readers, seed + i, self.train_starts),
                               buffer_size, hint) for i, group in enumerate(groups)]

    def progress_in(self, loader_state: dict[str, Any], workers: int) -> list[dict[str, Any]]:
        """Where each reader of this process stood in a state that torchdata's StatefulDataLoader saved
        (its dataset state, or each worker's), as the rows' "stream" entries say it."""
        if workers == 0:
            states = [loader_state.get("dataset_state")]
        else:
            snapshots = loader_state["_snapshot"]["_worker_snapshots"]
            states = [snapshots.get(f"worker_{index}", {}).get("dataset_state") for index in range(workers)]
        progress = []
        for worker_id, state in enumerate(states):
            if state:
                reader, readers = self._reader(worker_id, max(1, workers))
                passes = self._passes(reader, readers)
                for source, saved in zip(passes, state["sources"], strict=True):
                    source.load_counts(saved)
                progress.append(self._progress(passes, reader))
        return progress

    def __iter__(self):
        worker = torch.utils.data.get_worker_info()
        workers, worker_id = (worker.num_workers, worker.id) if worker else (1, 0)
        reader, readers = self._reader(worker_id, workers)
        passes = self._passes(reader, readers)
        picker = random.Random(self.config.seed + 7919 * reader)
        pending: list[tuple[int, int, list[int], list[int]]] = []  # (source, pass, ids, labels) not yet in a row
        if self._loaded:
            for source, saved in zip(passes, self._loaded["sources"], strict=True):
                source.load_state_dict(saved)
            picker.setstate(_rng_from_json(self._loaded["picker"]))
            pending = [(index, pass_index, ids, labels) for index, pass_index, ids, labels in self._loaded["pending"]]
            self._loaded = None
        self._live = (passes, picker, pending)
        while True:
            current = picker.choices(range(len(passes)), weights=self.probabilities)[0] if self.interleave else 0
            item = passes[current].next()
            if item is None:
                return
            pass_index, _, ids, labels = item
            for examples in self._pack(pending, (current, pass_index, ids, labels)):
                yield self._trained_row(examples, passes, reader)

    def _trained_row(self, examples: list, passes: list[ShuffledPasses], reader: int) -> dict[str, Any]:
        """The row of `examples`, counted as trained first: the state is up to date before it is handed out."""
        for index, pass_index, _, _ in examples:
            passes[index].count_trained(pass_index)
        row = row_of([(ids, labels) for _, _, ids, labels in examples])
        row["stream"] = self._progress(passes, reader)
        return row

    def _progress(self, passes: list[ShuffledPasses], reader: int) -> dict[str, Any]:
        """Where this reader stands: `done` examples trained against `per_pass` examples a pass."""
        per_source = [source.passes_trained() for source in passes]
        per_pass = sum(size for _, size, _ in per_source)
        exact = all(known for _, _, known in per_source)
        if exact and not self.interleave:  # whole numbers: a pass's end is exactly a whole epoch
            source = passes[0]
            done = source.state["trained_pass"] * per_pass + source.state["trained"]
        else:
            done = self._mix_position(trained for trained, _, _ in per_source) * per_pass
        rows = sum(source.source.state["size"][0] for source in passes) if exact else None
        return {"reader": reader, "done": done, "per_pass": per_pass, "exact": exact, "rows": rows}

    def first_rows(self, count: int) -> list[dict[str, Any]]:
        """The first training rows in file order, read apart from the run: no shuffle buffer to fill,
        and the held-out rows skipped as training skips them."""
        reader = TokenStream(self.specs, self.config.model_copy(update={"buffer_size": 1}), self.tokenizer, 0, 1)
        reader.train_starts = self.train_starts
        return list(itertools.islice(iter(reader), count))

    def _pack(self, pending: list, example: tuple) -> list[list]:
        """The rows that `example` completes: itself without packing; with packing, the examples waiting
        side by side once this one would not fit, or once its source has moved on to another pass (a row
        never holds two passes of one source)."""
        if not self.config.use_packing:
            return [[example]]
        index, pass_index, ids, _ = example
        rows = []
        if pending and (sum(len(p[2]) for p in pending) + len(ids) > self.config.cutoff_len
                        or any(p[0] == index and p[1] != pass_index for p in pending)):
            rows.append(list(pending))
            pending.clear()
        pending.append(example)
        return rows

    def _encode(self, spec: DatasetSpec, path: Path, row: dict[str, Any], offset: int):
        for example in self.encoder.examples(spec, row, f"{path}, byte {offset}"):
            if example.has_labels:
                yield example.input_ids, example.labels


def _rng_to_json(rng: random.Random) -> list:
    version, internal, gauss = rng.getstate()
    return [version, list(internal), gauss]


def _rng_from_json(state: list) -> tuple:
    return state[0], tuple(state[1]), state[2]


# --- what is known about the size -------------------------------------------------------------


@dataclass
class StreamInfo:
    total_bytes: int
    num_samples: int | None  # from dataset_info.json hints, when every data set has one
    estimated_rows: int | None  # from the average line length of the first rows
    held_out: list[tuple[list[int], list[int]]] | None = None  # eval examples: the first val_size rows


def stream_info(specs: list[DatasetSpec]) -> StreamInfo:
    total = sum(f.stat().st_size for spec in specs for f in spec.files)
    hints = [spec.num_samples for spec in specs]
    num_samples = sum(hints) if all(h is not None for h in hints) else None
    return StreamInfo(total, num_samples, _estimate_rows(specs))


def _estimate_rows(specs: list[DatasetSpec]) -> int | None:
    rows = 0
    for spec in specs:
        for path in spec.files:
            if path.suffix == ".parquet":
                rows += ParquetFile(path).file.metadata.num_rows
                continue
            with path.open("rb") as handle:
                sample = handle.read(1 << 20)
            lines = sample.count(b"\n")
            if lines == 0:
                return None
            rows += int(path.stat().st_size / (len(sample) / lines))
    return rows


def open_stream(
    config: TrainConfig, tokenizer: Any, rank: int = 0, world_size: int = 1
) -> tuple[TokenStream, StreamInfo]:
    """The stream and what is known of its size; format errors now, before anything is written."""
    specs = resolve_datasets(config.datasets, config.dataset_dir, config.stage, config.placeholders)
    for spec in specs:
        for path in spec.files:
            open_file(path)
    stream, info = TokenStream(specs, config, tokenizer, rank, world_size), stream_info(specs)
    if config.val_size:
        info.held_out = hold_out(stream, _held_out_rows(config.val_size))
        if info.num_samples:  # the size hints count what training reads
            info.num_samples = max(1, info.num_samples - int(config.val_size))
        if info.estimated_rows:
            info.estimated_rows = max(1, info.estimated_rows - int(config.val_size))
    stream.size_hint = info.num_samples
    return stream, info


def _held_out_rows(val_size: float) -> int:
    if val_size < 1 or val_size != int(val_size):
        raise UserError(f"val_size {val_size:g}: a stream's length is unknown, so a fraction of it cannot be held "
                        "out; give a number of rows (e.g. val_size: 200): the first rows of the data are then "
                        "kept for evaluation and never trained on")
    return int(val_size)


def _rows_in_order(specs: list[DatasetSpec]):
    """(spec, path, offset, next offset, row) over every file from its start, data sets as listed."""
    for spec in specs:
        for path in spec.files:
            file = open_file(path)
            rows = file.rows(0, 1, None) if isinstance(file, ParquetFile) else file.rows(
                FileShare(path, 0, path.stat().st_size), None)
            for offset, next_offset, row in rows:
                yield spec, path, offset, next_offset, row


def hold_out(stream: TokenStream, count: int) -> list[tuple[list[int], list[int]]]:
    """The examples of the data's first `count` rows, for evaluation; training starts after them."""
    examples: list[tuple[list[int], list[int]]] = []
    rows = _rows_in_order(stream.specs)
    for spec, path, offset, next_offset, row in itertools.islice(rows, count):
        examples += stream._encode(spec, path, row, offset)
        stream.train_starts[path] = next_offset
    following = next(rows, None)
    if following is None:
        raise UserError(f"val_size {count} holds out every row of the streamed data; hold out fewer rows")
    if stream.interleave and following[0] is not stream.specs[0]:
        raise UserError(f"val_size {count} holds out every row of data set '{stream.specs[0].name}', which "
                        f"mix_strategy {stream.config.mix_strategy} still samples from; hold out fewer rows")
    if not examples:
        raise UserError(f"val_size {count}: the first {count} rows give no example to evaluate on "
                        f"(is cutoff_len {stream.config.cutoff_len} shorter than the prompts?)")
    return examples


def check_every_row(specs: list[DatasetSpec]) -> None:
    """Every row of every file read once, without tokenising: one that is not UTF-8, not JSON or lacks a
    column is refused now, naming its file and line, before a run changes anything in its folder (not
    at the step that reaches it, after an earlier run was cleared)."""
    for spec in specs:
        for path in spec.files:
            file = open_file(path)
            if isinstance(file, ParquetFile):
                numbered = ((f"row {number + 1}", row) for number, _, row in file.rows(0, 1, None))
            else:
                numbered = ((f"line {number}", row) for number, row in file.numbered_rows())
            for where, row in numbered:
                try:
                    standard_row(spec, row)
                except ValueError as error:
                    raise UserError(f"{path}, {where}: {error} (data set '{spec.name}')") from None


def prepare_stream(config: TrainConfig, tokenizer: Any, rank: int, world_size: int) -> tuple[TokenStream, StreamInfo]:
    """The stream of a training run: as open_stream, with the checks a run needs (every row, on the
    first process; each process reads the same files)."""
    if rank == 0:
        check_every_row(resolve_datasets(config.datasets, config.dataset_dir, config.stage, config.placeholders))
    stream, info = open_stream(config, tokenizer, rank, world_size)
    if config.max_steps is None and not info.num_samples:
        raise UserError(max_steps_message(config, info, world_size))
    return stream, info


def max_steps_message(config: TrainConfig, info: StreamInfo, world_size: int = 1) -> str:
    message = ("streaming: true needs max_steps: the length of a stream is unknown, so num_train_epochs cannot "
               "say when to stop (unless dataset_info.json gives each data set's num_samples)")
    size = stream_size(config, info, world_size)
    if size["rows"]:
        message += (f"; the files ({info.total_bytes / 1e6:.1f} MB) hold about {size['rows']:,} rows, so one pass "
                    f"is about max_steps: {size['steps_per_pass_estimate']} at this batch size")
    return message


def planned_steps(config: TrainConfig, info: StreamInfo, world_size: int = 1) -> int:
    """max_steps; without it (a stream with num_samples hints), the steps num_train_epochs passes are
    estimated to take. The run itself stops after num_train_epochs passes as trained."""
    if config.max_steps is not None:
        return config.max_steps
    per_step = config.per_device_train_batch_size * config.gradient_accumulation_steps * world_size
    return max(1, math.ceil(config.num_train_epochs * info.num_samples / per_step))


def with_planned_steps(config: TrainConfig, info: StreamInfo, world_size: int = 1) -> TrainConfig:
    """The config a stream's plan is made from: max_steps as planned_steps() gives it."""
    return config.model_copy(update={"max_steps": planned_steps(config, info, world_size)})


def stream_size(config: TrainConfig, info: StreamInfo, world_size: int = 1) -> dict[str, Any]:
    """What the plan can say of a stream's size: the bytes are known, the rows and passes only estimated
    (from num_samples hints or the first MB; packing puts several rows in a step, so fewer steps a pass)."""
    rows = info.num_samples or info.estimated_rows
    per_step = config.per_device_train_batch_size * config.gradient_accumulation_steps * world_size
    steps_per_pass = max(1, rows // per_step) if rows else None
    steps = planned_steps(config, info, world_size) if config.max_steps or info.num_samples else None
    return {
        "total_bytes": info.total_bytes, "rows": rows,
        "rows_from": "num_samples" if info.num_samples else "the first MB" if rows else None,
        "held_out_rows": int(config.val_size) if info.held_out else 0,
        "steps_per_pass_estimate": steps_per_pass,
        "passes_estimate": round(steps / steps_per_pass, 2) if steps_per_pass and steps else None,
        "stops_after_passes": config.num_train_epochs if config.max_steps is None else None,
        "steps_estimate": steps if config.max_steps is None else None,
    }


# --- what the engine reads of the stream ------------------------------------------------------


class StreamBatches:
    """The collator of a stream's batches: (tensors, counts, progress), where progress is where the
    batch's reader stands once the batch is trained (the rows of a batch come from one reader)."""

    def __init__(self, collator: Any):
        self.collator = collator

    def __call__(self, rows: list[dict[str, Any]]) -> tuple[dict, Any, dict[str, Any]]:
        batch, counts = self.collator(rows)
        return batch, counts, rows[-1]["stream"]


class StreamProgress:
    """Passes trained over this process's share of a stream, from where each of its readers (one per
    data loader worker) stood after the batches trained: rows read ahead into a shuffle buffer or a
    worker are not counted. The epoch never goes back (an estimate may be corrected upward only)."""

    def __init__(self, readers: int, epoch: float = 0.0):
        self.readers = readers
        self.epoch = epoch
        self._latest: dict[int, dict[str, Any]] = {}

    def update(self, progress: list[dict[str, Any]]) -> None:
        for reader in progress:
            self._latest[reader["reader"]] = reader
        per_pass = sum(reader["per_pass"] for reader in self._latest.values())
        if per_pass:
            self.epoch = max(self.epoch, sum(reader["done"] for reader in self._latest.values()) / per_pass)

    @property
    def exact(self) -> bool:
        """Every reader has read its share to the end once: the size of a pass is known, not estimated."""
        return len(self._latest) == self.readers and all(r["exact"] for r in self._latest.values())

    def size(self) -> tuple[int, int]:
        """(rows, examples) in a pass over this process's share, once exact."""
        readers = self._latest.values()
        return sum(r["rows"] for r in readers), sum(int(r["per_pass"]) for r in readers)

    @property
    def passes_begun(self) -> int:
        """1 in the first pass, 2 once a row of the second is trained; a pass's last step is still in it."""
        return max(1, math.ceil(round(self.epoch, 9)))
