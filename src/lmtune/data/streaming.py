"""Streaming data sets: read, tokenise, shuffle and pack on the fly, with an exact, cheap position.

Why not `datasets`' IterableDataset: its resume skips examples by reading the shard again from the
start, which for one large JSONL file means re-reading everything before the position. Here each
reader owns a byte range of every file (or a set of Parquet row groups), and its position is a byte
offset, so a resume seeks straight to it. The shuffle buffer is saved as row positions and the packer's
pending tokens as they are, so a resumed stream yields exactly the rows the unstopped one would have.

Readers: every process x every data loader worker is one reader with its own share of each file.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lmtune.config import TrainConfig
from lmtune.data.encoding import RowEncoder, row_of
from lmtune.data.registry import DatasetSpec, resolve_datasets
from lmtune.data.templates import chat_template_for
from lmtune.errors import UserError

log = logging.getLogger("lmtune")
LINE_FORMATS = {".jsonl", ".txt", ".text", ".csv", ".json"}


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

    def parse(self, line: bytes, offset: int) -> dict[str, Any]:
        text = line.decode("utf-8").rstrip("\r\n")
        if self.suffix in (".txt", ".text"):
            return {"text": text}
        if self.header is not None:
            return dict(zip(self.header, next(csv.reader(io.StringIO(text))), strict=False))
        try:
            return json.loads(text)
        except json.JSONDecodeError as error:
            raise UserError(f"{self.path}, byte {offset}: not a JSON line ({error.msg})") from None


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
    many of its examples (a long text makes several) were already handed out."""

    def __init__(self, members: list[tuple[DatasetSpec, Path]], encode: Any, reader: int, readers: int, seed: int,
                 train_starts: dict[Path, int] | None = None):
        self.members = members
        self.encode = encode
        self.reader, self.readers, self.seed = reader, readers, seed
        self.train_starts = train_starts or {}  # per file, where rows not held out for evaluation begin
        self.files = [open_file(path) for _, path in members]
        self.state: dict[str, Any] = {"pass": 0, "file": 0, "offset": None, "chunk": 0}
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

    def progress(self) -> float:
        """Passes over this reader's share so far, as a float: 1.5 is half way through the second pass."""
        order, total = self._file_order(self.state["pass"]), sum(self._share_sizes)
        done = sum(self._share_sizes[index] for index in order[: self.state["file"]])
        if self.state["file"] < len(order) and self.state["offset"] is not None:
            part, offset = self._parts[order[self.state["file"]]], self.state["offset"]
            if isinstance(part, FileShare):
                done += max(0, offset - part.start)
            else:
                done += sum(min(max(offset - first, 0), end - first) for first, end in part)
        return self.state["pass"] + (min(done / total, 1.0) if total else 0.0)

    def examples(self):
        """Endless (position, input_ids, labels)."""
        empty_passes = 0
        while True:
            produced = False
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
                        produced = True
                        yield (file_index, offset, chunk), ids, labels
                    self.state.update(offset=next_offset, chunk=0)
                self.state.update(file=self.state["file"] + 1, offset=None, chunk=0)
            self.state.update({"pass": self.state["pass"] + 1, "file": 0, "offset": None, "chunk": 0})
            log.debug("reader %d starts pass %d over its share of the data", self.reader, self.state["pass"])
            empty_passes = 0 if produced else empty_passes + 1
            if empty_passes >= 2:
                return  # this reader owns no rows at all

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


class TokenStream(torch.utils.data.IterableDataset):
    """Training rows from streamed data sets; `state_dict()` / `load_state_dict()` make it resumable
    (torchdata's StatefulDataLoader calls them in every worker, between batches)."""

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
        self._live: tuple | None = None
        self._loaded: dict[str, Any] | None = None

    def _groups(self) -> list[list[tuple[DatasetSpec, Path]]]:
        """concat: one source over every file; interleave: one source per data set."""
        members = [[(spec, path) for path in spec.files] for spec in self.specs]
        return members if self.interleave else [[m for group in members for m in group]]

    def state_dict(self) -> dict[str, Any]:
        if self._live is None:
            return self._loaded or {}
        sources, picker, shuffler, buffer, pending = self._live
        return {
            "sources": [dict(source.state) for source in sources],
            "picker": _rng_to_json(picker), "shuffler": _rng_to_json(shuffler),
            "buffer": [[index, list(position)] for index, position, _, _ in buffer],
            "pending": [[list(ids), list(labels)] for ids, labels in pending],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._loaded = state or None

    def __iter__(self):
        worker = torch.utils.data.get_worker_info()
        workers, worker_id = (worker.num_workers, worker.id) if worker else (1, 0)
        reader, readers = self.rank * workers + worker_id, self.world_size * workers
        seed = self.config.seed + 7919 * reader
        sources = [Source(group, self._encode, reader, readers, seed + i, self.train_starts)
                   for i, group in enumerate(self._groups())]
        picker, shuffler = random.Random(seed), random.Random(seed + 1)
        buffer: list[tuple[int, tuple, list[int], list[int]]] = []
        pending: list[tuple[list[int], list[int]]] = []
        if self._loaded:
            buffer, pending = self._restore(self._loaded, sources, picker, shuffler)
            self._loaded = None
        self._live = (sources, picker, shuffler, buffer, pending)
        streams = [source.examples() for source in sources]
        size = max(1, self.config.buffer_size // readers)
        while True:
            current = picker.choices(range(len(sources)), weights=self.probabilities)[0] if self.interleave else 0
            item = next(streams[current], None)
            if item is None:
                return
            buffer.append((current, *item))
            if len(buffer) < size:
                continue
            _, _, ids, labels = buffer.pop(shuffler.randrange(len(buffer)))
            row = self._pack(pending, ids, labels)
            if row is not None:
                yield {**row, "stream_position": self._mix_position(source.progress() for source in sources)}

    def first_rows(self, count: int) -> list[dict[str, Any]]:
        """The first training rows in file order, read apart from the run: no shuffle buffer to fill,
        and the held-out rows skipped as training skips them."""
        reader = TokenStream(self.specs, self.config.model_copy(update={"buffer_size": 1}), self.tokenizer, 0, 1)
        reader.train_starts = self.train_starts
        return list(itertools.islice(iter(reader), count))

    def _pack(self, pending: list, ids: list[int], labels: list[int]) -> dict[str, list[int]] | None:
        """A row of at most cutoff_len tokens when one is full; with packing, whole examples side by side.
        The state is brought up to date before the row is handed out."""
        if not self.config.use_packing:
            return row_of([(ids, labels)])
        row = None
        if pending and sum(len(p[0]) for p in pending) + len(ids) > self.config.cutoff_len:
            row = row_of(list(pending))
            pending.clear()
        pending.append((ids, labels))
        return row

    def _restore(self, state, sources, picker, shuffler):
        for source, saved in zip(sources, state["sources"], strict=True):
            source.state = dict(saved)
        picker.setstate(_rng_from_json(state["picker"]))
        shuffler.setstate(_rng_from_json(state["shuffler"]))
        buffer = [(index, tuple(position), *sources[index].example_at(tuple(position)))
                  for index, position in state["buffer"]]
        return buffer, [(ids, labels) for ids, labels in state["pending"]]

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


def prepare_stream(config: TrainConfig, tokenizer: Any, rank: int, world_size: int) -> tuple[TokenStream, StreamInfo]:
    """The stream of a training run: as open_stream, with the checks a run needs."""
    stream, info = open_stream(config, tokenizer, rank, world_size)
    if config.max_steps is None:
        raise UserError(max_steps_message(config, info, world_size))
    return stream, info


def max_steps_message(config: TrainConfig, info: StreamInfo, world_size: int = 1) -> str:
    message = ("streaming: true needs max_steps: the length of a stream is unknown, so num_train_epochs cannot "
               "say when to stop")
    size = stream_size(config, info, world_size)
    if size["rows"]:
        message += (f"; the files ({info.total_bytes / 1e6:.1f} MB) hold about {size['rows']:,} rows, so one pass "
                    f"is about max_steps: {size['steps_per_pass_estimate']} at this batch size")
    return message


def stream_size(config: TrainConfig, info: StreamInfo, world_size: int = 1) -> dict[str, Any]:
    """What the plan can say of a stream's size: the bytes are known, the rows and passes only estimated
    (from num_samples hints or the first MB; packing puts several rows in a step, so fewer steps a pass)."""
    rows = info.num_samples or info.estimated_rows
    per_step = config.per_device_train_batch_size * config.gradient_accumulation_steps * world_size
    steps_per_pass = max(1, rows // per_step) if rows else None
    return {
        "total_bytes": info.total_bytes, "rows": rows,
        "rows_from": "num_samples" if info.num_samples else "the first MB" if rows else None,
        "held_out_rows": int(config.val_size) if info.held_out else 0,
        "steps_per_pass_estimate": steps_per_pass,
        "passes_estimate": round(config.max_steps / steps_per_pass, 2) if steps_per_pass and config.max_steps else None,
    }
