"""Checkpoints that are never half-written, an index that can be trusted, rotation by step.

A checkpoint is written into `.checkpoint-<step>.tmp/`, every file fsynced, a completion mark
written last, and only then renamed to `checkpoint-<step>/`. `checkpoints.json` is replaced
atomically after each save and each deletion. Writing happens on a background thread, one save in
flight at a time. That thread also copies the tensors to the CPU: the training thread hands over
references and goes on with the next forward and backward passes, which only read the weights; the
next `optimizer.step()` waits (a step pre-hook) until the copy is done, as it is what changes them.

A sharded checkpoint (`fsdp`) holds the weights and optimizer state in `shards/`, written with
`torch.distributed.checkpoint` (DCP): every process writes its own shard into the same temporary
folder, in the background (DCP's asynchronous save, copying on a thread as the writer does); the
main process's writer waits until every shard and DCP's `.metadata` are written, and only then writes
the completion mark and renames the folder. DCP reshards on load, so any number of processes reads it.

This module alone writes and reads the files of a checkpoint. Nothing in them can run code: tensors
are safetensors or `torch.load(weights_only=True)` pickles of plain data, DCP's metadata is unpickled
with DCP's own classes alone, the rest JSON. A checkpoint is used only after `verify_checkpoint` has
opened every one of its files.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import pickle
import shutil
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from lmtune.errors import RunFailed
from lmtune.schedule import rotation
from lmtune.state import BINARY_FIELDS, TrainState, state_from_json, state_to_json

log = logging.getLogger("lmtune")

INDEX_NAME = "checkpoints.json"
COMPLETE_MARK = "checkpoint_complete.json"
TRAIN_STATE = "train_state.json"
OPTIMIZER = "optimizer.pt"
RNG_STATE = "rng_state.pth"
RNG_KINDS = {"python", "numpy", "torch"}  # what each process's RNG state holds (and "cuda" on a GPU)
WEIGHT_FILES = ("adapter_model.safetensors", "model.safetensors")
SHARDS = "shards"  # a sharded checkpoint's weights and optimizer state (DCP)
PREFIX = "checkpoint-"


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def file_sha256(path: Path) -> str:
    with Path(path).open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with path.open("rb") as handle:
                os.fsync(handle.fileno())
    _fsync_dir(folder)


# --- the index --------------------------------------------------------------------------------


@dataclass
class CheckpointIndex:
    run_dir: Path
    save_total_limit: int | None = None
    best_metric: str | None = None
    entries: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def load(cls, run_dir: Path) -> CheckpointIndex:
        path = Path(run_dir) / INDEX_NAME
        index = cls(Path(run_dir))
        if path.is_file():
            try:
                data = json.loads(path.read_text())
                entries = [e for e in data["checkpoints"] if isinstance(e.get("step"), int) and "path" in e]
                index.save_total_limit, index.best_metric = data.get("save_total_limit"), data.get("best_metric")
                # What is incomplete is decided by the folders on disk now, not by an older listing.
                index.entries = [e for e in entries if e.get("status") != "incomplete"]
            except (ValueError, KeyError, TypeError, AttributeError) as error:
                log.warning("%s is damaged (%s): the index is rebuilt from the checkpoint folders", path,
                            error.__class__.__name__)
        index._note_incomplete_folders()
        return index

    def _note_incomplete_folders(self) -> None:
        """Folders on disk that the index does not list: complete ones (a crash between the rename and
        the index update, or a checkpoint copied in) are taken in; the others are listed, never used."""
        known = {entry["path"] for entry in self.entries}
        for folder in sorted(self.run_dir.glob(f"{PREFIX}*")) + sorted(self.run_dir.glob(f".{PREFIX}*.tmp")):
            step = _step_of(folder.name)
            if not folder.is_dir() or folder.name in known or step is None:
                continue
            entry = _entry_from_folder(folder, step) if folder.name.startswith(PREFIX) else None  # never a .tmp
            if entry is not None:
                self.entries.append(entry)
            else:
                self.entries.append({"step": step, "path": folder.name, "status": "incomplete",
                                     "reasons": [], "metrics": {}, "best": False})

    def write(self) -> None:
        data = {"version": 1, "save_total_limit": self.save_total_limit, "best_metric": self.best_metric,
                "checkpoints": sorted(self.entries, key=lambda e: (e["step"], e["path"]))}
        atomic_write_text(self.run_dir / INDEX_NAME, json.dumps(data, indent=1))

    def kept(self) -> list[dict[str, Any]]:
        return [e for e in self.entries if e["status"] == "kept"]

    def newest_complete(self) -> Path | None:
        complete = self.complete_newest_first()
        return complete[0] if complete else None

    def complete_newest_first(self) -> list[Path]:
        """Kept checkpoints that were completed, newest first (not yet verified: see verify_checkpoint)."""
        kept = sorted(self.kept(), key=lambda e: e["step"], reverse=True)
        return [self.run_dir / e["path"] for e in kept if is_complete_checkpoint(self.run_dir / e["path"])]


def _step_of(name: str) -> int | None:
    digits = name.removeprefix(".").removeprefix(PREFIX).removesuffix(".tmp")
    return int(digits) if digits.isdigit() else None


def _entry_from_folder(folder: Path, step: int) -> dict[str, Any] | None:
    """The index entry of a completed folder the index does not list, from its completion mark."""
    try:
        mark = json.loads((folder / COMPLETE_MARK).read_text())
        entry = dict(mark["entry"])
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return None  # never completed, or its mark is damaged: listed as incomplete
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    return {**entry, "path": folder.name, "status": "kept", "best": False, "size_bytes": size}


def is_complete_checkpoint(folder: Path) -> bool:
    return (Path(folder) / COMPLETE_MARK).is_file() and (Path(folder) / TRAIN_STATE).is_file()


# --- writing ----------------------------------------------------------------------------------


@dataclass
class Snapshot:
    """A copy of everything a checkpoint holds, taken on the training thread."""

    step: int
    weights: dict[str, torch.Tensor] | None  # None: a sharded checkpoint, weights and optimizer in `shards`
    weights_name: str  # adapter_model.safetensors or model.safetensors
    write_model_files: Any  # callable(folder): configs and tokenizer
    optimizer: dict | None
    state: TrainState
    entry: dict[str, Any]
    shards: Any = None  # the Future of this process's shard (CheckpointStore.start_shards)


def cpu_copy(value: Any) -> Any:
    """A CPU copy of every tensor in a nested dict / list, sharing nothing with the original."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True).contiguous()
    if isinstance(value, dict):
        return {k: cpu_copy(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(cpu_copy(v) for v in value)
    return value


def temporary_folder(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / f".{PREFIX}{step}.tmp"


def _settle(future: Future, done: Future) -> None:
    error = done.exception()
    future.set_exception(error) if error is not None else future.set_result(done.result())


class CheckpointStore:
    def __init__(self, run_dir: Path, save_total_limit: int | None, best_metric: str | None,
                 greater_is_better: bool = False):
        """`greater_is_better`: a higher `best_metric` marks the best checkpoint (the config's rule)."""
        self.run_dir = Path(run_dir)
        self.index = CheckpointIndex.load(self.run_dir)
        self.index.save_total_limit = save_total_limit
        self.index.best_metric = best_metric
        self.greater_is_better = greater_is_better
        self._thread: threading.Thread | None = None
        self._shards: Any = None  # a process other than the main one: its shard of the save in flight
        self._error: tuple[int, BaseException] | None = None
        self.guard_wait_s = 0.0  # time optimizer steps spent waiting for a snapshot copy

    def save(self, snapshot: Snapshot, on_saved: Any = None, guard: Any = None) -> None:
        """Start writing `snapshot`; waits first for the save before it to finish. Once it is written,
        `on_saved(path, steps deleted by rotation)` is called, on the writer thread.

        With `guard` (the optimizer), the snapshot's weights and optimizer state may be the live
        tensors: they are copied on the writer thread, and the guard's next step waits for the copy."""
        self.wait()
        copied = threading.Event()
        if guard is not None:
            self._hold_steps_until(copied, guard)
        else:
            copied.set()
        self._thread = threading.Thread(target=self._write_guarded, args=(snapshot, on_saved, copied), daemon=True)
        self._thread.start()

    def _hold_steps_until(self, copied: threading.Event, optimizer: Any) -> None:
        inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the torch optimizer

        def wait_for_copy(*_: Any) -> None:
            if not copied.is_set():
                start = time.perf_counter()
                copied.wait()
                self.guard_wait_s += time.perf_counter() - start
            handle.remove()

        handle = inner.register_step_pre_hook(wait_for_copy)

    def start_shards(self, step: int, state: dict[str, Any], process_group: Any, is_main: bool,
                     guard: Any) -> Future:
        """On every process: its shard of `state` into the checkpoint's temporary folder, with DCP's
        asynchronous save started on a thread of its own: its copy of the tensors to CPU memory runs
        during the next forward and backward passes, and the guard's (the optimizer's) next step waits
        for it. The Future goes to `Snapshot.shards` on the main process (its writer completes the
        checkpoint once every shard is written) and to `hold` on the others."""
        import torch.distributed as dist
        import torch.distributed.checkpoint as dcp

        tmp = temporary_folder(self.run_dir, step)
        if is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            (tmp / SHARDS).mkdir(parents=True)
        dist.barrier(group=process_group)
        copied, written = threading.Event(), Future()
        self._hold_steps_until(copied, guard)

        def stage_and_write() -> None:
            try:
                upload = dcp.async_save(state, storage_writer=dcp.FileSystemWriter(str(tmp / SHARDS)),
                                        process_group=process_group)
            except BaseException as error:
                written.set_exception(error)
                return
            finally:
                copied.set()
            upload.add_done_callback(lambda done: _settle(written, done))

        threading.Thread(target=stage_and_write, daemon=True).start()
        return written

    def hold(self, shards: Any) -> None:
        """On a process other than the main one: its shard of a sharded save, waited for by `wait`."""
        self._shards = shards

    def wait(self) -> None:
        """Wait for the save in flight; a failed save stops the run with the reason (RunFailed)."""
        if self._shards is not None:
            shards, self._shards = self._shards, None
            try:
                shards.result()
            except BaseException as error:
                raise RunFailed(f"writing this process's shard of a checkpoint failed: {type(error).__name__}: "
                                f"{error}; the checkpoints written before are intact") from error
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            (step, error), self._error = self._error, None
            newest = self.index.newest_complete()
            raise RunFailed(
                f"writing {PREFIX}{step} failed: {type(error).__name__}: {error}; "
                f"the checkpoints written before are intact (newest: {newest.name if newest else 'none'})"
            ) from error

    def _write_guarded(self, snapshot: Snapshot, on_saved: Any, copied: threading.Event) -> None:
        try:
            if not copied.is_set():
                try:
                    snapshot.weights = cpu_copy(snapshot.weights)
                    snapshot.optimizer = cpu_copy(snapshot.optimizer)
                finally:
                    copied.set()
            deleted_before = self._deleted_steps()
            path = self.write(snapshot)
            if on_saved is not None:
                on_saved(path, sorted(self._deleted_steps() - deleted_before))
        except BaseException as error:  # reported on the training thread by wait()
            self._error = (snapshot.step, error)

    def _deleted_steps(self) -> set[int]:
        return {e["step"] for e in self.index.entries if e["status"] == "deleted"}

    def write(self, snapshot: Snapshot) -> Path:
        final = self.run_dir / f"{PREFIX}{snapshot.step}"
        tmp = temporary_folder(self.run_dir, snapshot.step)
        if snapshot.shards is None:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        try:
            if snapshot.shards is not None:
                snapshot.shards.result()  # DCP gathers every process's write before this returns
            self._write_files(tmp, snapshot)
            _fsync_tree(tmp)
            written = [p for p in sorted(tmp.rglob("*")) if p.is_file()]
            files = {str(p.relative_to(tmp)): p.stat().st_size for p in written}
            hashes = {str(p.relative_to(tmp)): file_sha256(p) for p in written}  # here, on the writer thread
            atomic_write_text(tmp / COMPLETE_MARK, json.dumps({"step": snapshot.step, "entry": snapshot.entry,
                                                               "files": files, "sha256": hashes}))
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)  # a failed save (a full disk) leaves nothing behind
            raise
        if final.exists():  # an older checkpoint of the same step (a rerun after a crash): moved aside first
            old = self.run_dir / f".{PREFIX}{snapshot.step}.old"
            shutil.rmtree(old, ignore_errors=True)
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
        _fsync_dir(self.run_dir)
        self._record(final, snapshot)
        return final

    def _write_files(self, folder: Path, snapshot: Snapshot) -> None:
        if snapshot.weights is not None:
            save_file(snapshot.weights, str(folder / snapshot.weights_name), metadata={"format": "pt"})
        snapshot.write_model_files(folder)
        if snapshot.optimizer is not None:
            torch.save(snapshot.optimizer, folder / OPTIMIZER)
        torch.save({name: getattr(snapshot.state, name) for name in BINARY_FIELDS}, folder / RNG_STATE)
        (folder / TRAIN_STATE).write_text(json.dumps(state_to_json(snapshot.state), indent=1))

    def _record(self, folder: Path, snapshot: Snapshot) -> None:
        entry = dict(snapshot.entry)
        entry.update(path=folder.name, status="kept", best=False,
                     size_bytes=sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()),
                     created=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"))
        tmp_name = f".{folder.name}.tmp"
        self.index.entries = [e for e in self.index.entries if e["path"] not in (folder.name, tmp_name)] + [entry]
        self._mark_best()
        self.index.write()
        self._rotate()

    def _mark_best(self) -> None:
        metric = self.index.best_metric
        scored = [e for e in self.index.kept() if metric and e.get("metrics", {}).get(metric) is not None]
        for entry in self.index.entries:
            entry["best"] = False
        if scored:
            pick = max if self.greater_is_better else min
            pick(scored, key=lambda e: (e["metrics"][metric], -e["step"]))["best"] = True

    def best_step(self) -> int | None:
        return next((e["step"] for e in self.index.entries if e.get("best")), None)

    def _rotate(self) -> None:
        kept_steps = sorted(e["step"] for e in self.index.kept())
        _, doomed = rotation(kept_steps, self.index.save_total_limit, self.best_step())
        if not doomed:
            return
        for entry in self.index.kept():
            if entry["step"] in doomed:
                entry["status"] = "deleted"
        self.index.write()  # the index says deleted before the folder goes
        for step in doomed:
            shutil.rmtree(self.run_dir / f"{PREFIX}{step}", ignore_errors=True)
            log.info("rotation (save_total_limit %s): deleted %s%d", self.index.save_total_limit, PREFIX, step)


# --- reading ----------------------------------------------------------------------------------


class DamagedCheckpoint(Exception):
    """A file of a checkpoint that cannot be used; the message names the file and why."""


def load_plain(path: Path, mmap: bool = False) -> Any:
    """A torch pickle of tensors and plain data; anything else is refused and runs no code."""
    try:
        return torch.load(path, weights_only=True, map_location="cpu", mmap=mmap)
    except pickle.UnpicklingError as error:
        reason = str(error).strip().splitlines()[-1][:200]
        raise DamagedCheckpoint(f"{path}: refused to load: it holds objects that are not tensors or plain data, "
                                f"which could run code ({reason})") from None
    except (OSError, EOFError, RuntimeError, ValueError) as error:
        detail = str(error) or "empty or cut short"
        raise DamagedCheckpoint(f"{path}: unreadable ({type(error).__name__}: {detail})") from None


def read_state(folder: Path) -> TrainState:
    """The saved state of a checkpoint: train_state.json and the RNG / stream positions."""
    path = Path(folder) / TRAIN_STATE
    try:
        values = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise DamagedCheckpoint(f"{path}: not readable JSON ({error})") from None
    binary = load_plain(Path(folder) / RNG_STATE)
    if not isinstance(binary, dict) or not isinstance(binary.get("rng"), list) or not binary["rng"]:
        raise DamagedCheckpoint(f"{Path(folder) / RNG_STATE}: holds no RNG state per process")
    if not all(isinstance(rng, dict) and RNG_KINDS <= rng.keys() for rng in binary["rng"]):
        raise DamagedCheckpoint(f"{Path(folder) / RNG_STATE}: an RNG state lacks one of {', '.join(sorted(RNG_KINDS))}")
    try:
        return state_from_json(values, binary)
    except (KeyError, TypeError) as error:
        raise DamagedCheckpoint(f"{path}: {error}") from None


def read_optimizer_state(folder: Path) -> dict[str, Any]:
    return load_plain(Path(folder) / OPTIMIZER)


def weights_file(folder: Path) -> Path:
    for name in WEIGHT_FILES:
        if (Path(folder) / name).is_file():
            return Path(folder) / name
    raise DamagedCheckpoint(f"{folder}: no weights ({' or '.join(WEIGHT_FILES)})")


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    path = weights_file(folder)
    try:
        return load_file(path)
    except (SafetensorError, OSError) as error:
        raise DamagedCheckpoint(f"{path}: unreadable safetensors ({error})") from None


def is_sharded(folder: Path) -> bool:
    return (Path(folder) / SHARDS).is_dir()


# What DCP's .metadata pickle may hold: its own record classes, tensor shapes, dtypes and layouts.
DCP_METADATA_CLASSES = {
    ("torch", "Size"), ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    *(("torch.distributed.checkpoint.metadata", name) for name in (
        "BytesStorageMetadata", "ChunkStorageMetadata", "Metadata", "MetadataIndex", "StorageMeta",
        "TensorProperties", "TensorStorageMetadata", "_MEM_FORMAT_ENCODING")),
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in DCP_METADATA_CLASSES or (module == "torch" and isinstance(getattr(torch, name, None),
                                                                                       torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a checkpoint's metadata")


def _shard_reader(folder: Path) -> Any:
    """DCP's reader of `folder/shards`, reading its metadata with `_MetadataUnpickler` alone."""
    from torch.distributed.checkpoint import FileSystemReader

    class Reader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            return read_shard_metadata(folder, self.load_id)

    return Reader(str(Path(folder) / SHARDS))


def read_shard_metadata(folder: Path, load_id: Any = None) -> Any:
    """The DCP metadata of a sharded checkpoint: which tensors and objects it holds, and where."""
    from torch.distributed.checkpoint.metadata import StorageMeta

    path = Path(folder) / SHARDS / ".metadata"
    try:
        with path.open("rb") as handle:
            metadata = _MetadataUnpickler(handle).load()
    except pickle.UnpicklingError as error:
        raise DamagedCheckpoint(f"{path}: refused to load: {error}, which could run code") from None
    except (OSError, EOFError, ValueError, AttributeError, TypeError) as error:
        raise DamagedCheckpoint(f"{path}: unreadable ({type(error).__name__}: {error or 'cut short'})") from None
    if getattr(metadata, "storage_meta", None) is None:
        metadata.storage_meta = StorageMeta()
    metadata.storage_meta.load_id = load_id
    return metadata


def _shard_planner() -> Any:
    """DCP's load planner, with the objects of a checkpoint (AdamW's settings) read as plain data only."""
    import io

    from torch.distributed.checkpoint import DefaultLoadPlanner
    from torch.distributed.checkpoint._traverse import set_element

    class Planner(DefaultLoadPlanner):
        def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
            fqn = read_item.dest_index.fqn
            try:
                loaded = torch.load(value, weights_only=True)
            except pickle.UnpicklingError as error:
                raise DamagedCheckpoint(f"{fqn} in a sharded checkpoint holds objects that are not plain data, "
                                        f"which could run code ({str(error).strip().splitlines()[-1][:200]})") from None
            if self.flatten_state_dict:
                set_element(self.original_state_dict, self.mappings[fqn], loaded)
            else:
                self.state_dict[fqn] = loaded

    return Planner()


def read_sharded(folder: Path, state: dict[str, Any]) -> None:
    """Fill `state` (this run's own, shaped as it saves it) from a sharded checkpoint: DCP reads from each
    saved shard what this process holds, whatever the number of processes that wrote it."""
    import torch.distributed.checkpoint as dcp

    try:
        dcp.load(state, storage_reader=_shard_reader(folder), planner=_shard_planner())
    except DamagedCheckpoint:
        raise
    except (RuntimeError, ValueError, KeyError, OSError) as error:
        raise DamagedCheckpoint(f"{Path(folder) / SHARDS}: does not fit this run ({type(error).__name__}: "
                                f"{str(error).strip().splitlines()[-1][:300]})") from None


def verify_checkpoint(folder: Path) -> list[str]:
    """What stops `folder` from being resumed, by opening every file; empty when it is resumable."""
    folder = Path(folder)
    mark_path = folder / COMPLETE_MARK
    if not folder.is_dir():
        return [f"{folder}: the folder is gone (deleted since it was written)"]
    try:
        mark = json.loads(mark_path.read_text())
    except FileNotFoundError:
        return [f"{folder.name} was never completed (no {COMPLETE_MARK}: a crash or a stop during the save)"]
    except (OSError, ValueError) as error:
        return [f"{mark_path}: not readable JSON ({error})"]
    if not isinstance(mark, dict) or not isinstance(mark.get("files", {}), dict) \
            or not isinstance(mark.get("sha256", {}), dict):
        return [f"{mark_path}: not the completion mark lmtune writes (a JSON object of step, entry, files)"]
    problems = [f"{folder / name}: {problem}" for name, problem in _listed_file_problems(folder, mark)]
    problems += _open_problems(folder, mark.get("step"))
    return list(dict.fromkeys(problems))  # a missing shard is named by the mark and by DCP's metadata


def _listed_file_problems(folder: Path, mark: dict[str, Any]) -> list[tuple[str, str]]:
    """Each file the mark lists: there, of its size, and (a mark with hashes) of its content."""
    problems = []
    hashes = mark.get("sha256") or {}
    for name, size in (mark.get("files") or {}).items():
        path = folder / name
        if not path.is_file():
            problems.append((name, "missing"))
        elif path.stat().st_size != size:
            problems.append((name, f"{path.stat().st_size} bytes, {size} when it was written"))
        elif name in hashes and file_sha256(path) != hashes[name]:
            problems.append((name, "its content changed since it was written (another sha256 than the one in "
                                   f"{COMPLETE_MARK})"))
    return problems


def has_content_hashes(folder: Path) -> bool:
    """Whether `folder`'s completion mark holds the sha256 of its files (written since lmtune records them;
    an older checkpoint is checked by the size of each file and by opening it)."""
    try:
        mark = json.loads((Path(folder) / COMPLETE_MARK).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(mark, dict) and bool(mark.get("sha256"))


def _open_problems(folder: Path, marked_step: Any) -> list[str]:
    problems = []
    step = _step_of(folder.name)
    if marked_step != step:
        problems.append(f"{folder / COMPLETE_MARK}: says step {marked_step}, the folder is step {step}")
    try:
        state = read_state(folder)
        if state.step != step:
            problems.append(f"{folder / TRAIN_STATE}: says step {state.step}, the folder is step {step}")
    except DamagedCheckpoint as error:
        problems.append(str(error))
    if is_sharded(folder):
        return problems + _shard_problems(folder) + _config_problems(folder)
    try:
        with safe_open(str(weights_file(folder)), framework="pt"):
            pass
    except DamagedCheckpoint as error:
        problems.append(str(error))
    except (SafetensorError, OSError) as error:
        problems.append(f"{weights_file(folder)}: unreadable safetensors ({error})")
    if not (folder / OPTIMIZER).is_file():
        problems.append(f"{folder.name} holds no optimizer state (saved with save_only_model: true): its weights "
                        "can start a new run (model_name_or_path), it cannot be resumed")
    else:
        try:
            load_plain(folder / OPTIMIZER, mmap=True)  # mapped, not read: a cut-off file still fails here
        except DamagedCheckpoint as error:
            problems.append(str(error))
    return problems + _config_problems(folder)


def _config_problems(folder: Path) -> list[str]:
    problems = []
    for name in ("config.json", "adapter_config.json"):
        if (folder / name).is_file():
            try:
                json.loads((folder / name).read_text())
            except ValueError as error:
                problems.append(f"{folder / name}: not readable JSON ({error})")
    return problems


def _shard_problems(folder: Path) -> list[str]:
    """A sharded checkpoint: its metadata opens, and every shard file it names is there."""
    try:
        metadata = read_shard_metadata(folder)
    except DamagedCheckpoint as error:
        return [str(error)]
    files = {info.relative_path for info in (metadata.storage_data or {}).values()}
    problems = [f"{folder / SHARDS / name}: missing" for name in sorted(files)
                if not (folder / SHARDS / name).is_file()]
    if not any(key.startswith("optimizer.") for key in metadata.state_dict_metadata):
        problems.append(f"{folder.name} holds no optimizer state (saved with save_only_model: true): it cannot be "
                        "resumed")
    return problems


# --- the final model -----------------------------------------------------------------------------


FINAL_MARK = "final_model.json"  # the final model's files, their sizes and sha256, written after them
FINAL_TMP = ".final-model.tmp"


def write_final_model(run_dir: Path, step: int, write_files: Any) -> None:
    """The final model into `run_dir`: `write_files(folder)` writes it into a temporary folder, its files
    are fsynced, hashed and moved into place, and FINAL_MARK written last. The old mark goes first, so a
    failure (a full disk) or a crash at any point leaves a final model that the next run sees is not whole."""
    run_dir = Path(run_dir)
    tmp = run_dir / FINAL_TMP
    (run_dir / FINAL_MARK).unlink(missing_ok=True)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        write_files(tmp)
        _fsync_tree(tmp)
        written = [p for p in sorted(tmp.rglob("*")) if p.is_file()]
        names = [str(p.relative_to(tmp)) for p in written]
        files = {name: p.stat().st_size for name, p in zip(names, written, strict=True)}
        hashes = {name: file_sha256(p) for name, p in zip(names, written, strict=True)}
        for name, path in zip(names, written, strict=True):
            (run_dir / name).parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, run_dir / name)
        _fsync_dir(run_dir)
        atomic_write_text(run_dir / FINAL_MARK, json.dumps({"step": step, "files": files, "sha256": hashes}))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def final_model_problems(run_dir: Path, marked: bool) -> list[str]:
    """What keeps a run's final model from being whole: with its FINAL_MARK, every file it lists checked by
    size and content; `marked` False (a run of an lmtune that wrote no mark), its configs, tokenizer and
    weights opened."""
    run_dir = Path(run_dir)
    try:
        mark = json.loads((run_dir / FINAL_MARK).read_text())
    except FileNotFoundError:
        if marked:
            return [f"no {FINAL_MARK} (its writing failed or was stopped)"]
        return model_folder_problems(run_dir)
    except (OSError, ValueError) as error:
        return [f"{FINAL_MARK}: not readable JSON ({error})"]
    if not isinstance(mark, dict) or not isinstance(mark.get("files"), dict) \
            or not isinstance(mark.get("sha256"), dict):
        return [f"{FINAL_MARK}: not the mark lmtune writes (a JSON object of files and sha256)"]
    problems = [f"{name}: {problem}" for name, problem in _listed_file_problems(run_dir, mark)]
    return problems or model_folder_problems(run_dir)


def model_folder_problems(folder: Path) -> list[str]:
    """What keeps a final model folder from loading: its weights (every shard), configs and tokenizer."""
    folder = Path(folder)
    adapter = (folder / "adapter_config.json").exists() or (folder / "adapter_model.safetensors").exists()
    config = "adapter_config.json" if adapter else "config.json"
    problems = []
    for name in (config, "tokenizer_config.json"):
        try:
            json.loads((folder / name).read_text())
        except (OSError, ValueError) as error:
            problems.append(f"{name}: {'missing' if isinstance(error, FileNotFoundError) else 'not readable JSON'}")
    shard_index = folder / "model.safetensors.index.json"
    if adapter:
        weights = ["adapter_model.safetensors"]
    elif shard_index.is_file():
        try:
            weights = sorted(set(json.loads(shard_index.read_text())["weight_map"].values()))
        except (ValueError, KeyError) as error:
            return problems + [f"{shard_index.name}: damaged ({error})"]
    else:
        weights = ["model.safetensors"]
    for name in weights:
        try:
            with safe_open(str(folder / name), framework="pt"):
                pass
        except (SafetensorError, OSError) as error:
            problems.append(f"{name}: {'missing' if not (folder / name).exists() else f'unreadable ({error})'}")
    return problems
