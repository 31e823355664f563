"""The other processes of a run, on this machine and on others: how they find each other in torchrun's store
(a namespace of each start's own), how long a collective may wait for them (`ddp_timeout`), which of them
stopped answering when one waits too long, whether they all see the same `output_dir`, and whether torchrun
restarted them (an elastic restart).

Each process publishes a heartbeat (a counter) in torchrun's store from a thread of its own, with the
operation its main thread is in. A process that waited longer than `ddp_timeout` in an operation while a
peer's heartbeat stood still for as long exits with a message naming both: the peer is frozen or gone.
The process group's own timeout is a little longer, as a backstop for a hang among live processes."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import socket
import sys
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import torch.distributed as dist
from torch.distributed.rendezvous import register_rendezvous_handler

from lmtune.errors import RunFailed, UserError

log = logging.getLogger("lmtune")

DAY_S = 24 * 3600


def heartbeat_interval(ddp_timeout: float) -> float:
    return min(max(ddp_timeout / 10, 0.5), 5.0)


def process_group_timeout(ddp_timeout: float) -> timedelta:
    """The process group's timeout: ddp_timeout and three heartbeats, so that a frozen peer is named first."""
    return timedelta(seconds=ddp_timeout + 3 * heartbeat_interval(ddp_timeout))


# --- one store namespace for each start ----------------------------------------------------------


def init_method() -> str | None:
    """How the processes find each other: `lmtune://` under torchrun's agent store (the default of its c10d
    rendezvous), torch's own `env://` (None) otherwise. The agent store outlives a restart and holds the keys of
    the processes before it, so a process group built on it after torchrun restarted the processes can reach for
    one that is gone (pytorch/pytorch#135712): `lmtune://` gives each start a namespace of its own in it."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or int(os.environ.get("WORLD_SIZE", "1")) < 2:
        return None
    return f"{START_SCHEME}://"


def _this_start_store(url: str, timeout: timedelta = timedelta(minutes=30), **kwargs: object) -> Iterator[tuple]:
    """A rendezvous handler (torch.distributed.rendezvous): torchrun's agent store, under this start's name."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                          timeout=timeout)
    name = name_this_start(store, rank, world, time.monotonic() + timeout.total_seconds())
    yield dist.PrefixStore(f"lmtune/start-{name}", store), rank, world
    raise RuntimeError("lmtune:// does not rendezvous again: torchrun restarts the processes instead")


def name_this_start(store: dist.Store, rank: int, world: int, deadline: float) -> str:
    """Process 0 names this start, every other process answers the name with a nonce of its own, and process 0
    confirms with their nonces: a name or an answer an earlier start left in the store is never taken for this
    start's. Returns the name."""
    nonce = secrets.token_hex(8)
    if rank == 0:
        store.set("lmtune/start", nonce)
        answers: dict[str, str] = {}
        while len(answers) < world - 1:
            for other in map(str, range(1, world)):
                if other not in answers and store.check([f"lmtune/answer/{other}"]):
                    named, theirs = json.loads(store.get(f"lmtune/answer/{other}"))
                    if named == nonce:
                        answers[other] = theirs
            _pause_before(deadline, len(answers) + 1, world)
        store.set("lmtune/started", json.dumps({"name": nonce, "nonces": answers}))
        return nonce
    answered = None
    while True:
        named = store.get("lmtune/start").decode() if store.check(["lmtune/start"]) else None
        if named is not None and named != answered:
            store.set(f"lmtune/answer/{rank}", json.dumps([named, nonce]))
            answered = named
        started = json.loads(store.get("lmtune/started")) if store.check(["lmtune/started"]) else {}
        if started.get("nonces", {}).get(str(rank)) == nonce:
            return started["name"]
        _pause_before(deadline, None, world)


def _pause_before(deadline: float, arrived: int | None, world: int) -> None:
    if time.monotonic() > deadline:
        count = f"{arrived} of {world}" if arrived is not None else f"not all {world}"
        raise RunFailed(f"the processes did not all start: {count} met within the process group's timeout "
                        "(ddp_timeout); torchrun restarts them where --max-restarts allows")
    time.sleep(0.05)


START_SCHEME = "lmtune"
with contextlib.suppress(RuntimeError):  # registered once a process
    register_rendezvous_handler(START_SCHEME, _this_start_store)


def restart_count() -> int:
    """How often torchrun restarted this node's workers (0: the first start, or no torchrun)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT") or 0)


def restarts(peers: Peers | None) -> int:
    """The most restarts any node's torchrun made (a node that joins afresh counts 0): > 0 in an elastic restart."""
    return peers.restarted if peers is not None else restart_count()


class Peers:
    """The processes of a run with more than one; `Peers.start` after the process group exists."""

    def __init__(self, store: dist.Store, rank: int, world: int, ddp_timeout: float, token: str,
                 restarted: int) -> None:
        self.store, self.rank, self.world, self.timeout = store, rank, world, float(ddp_timeout)
        self.token = token  # this start's own: keys and marker files of an earlier start never count
        self.restarted = restarted  # the most restarts any node's torchrun made: > 0 after an elastic restart
        self.interval = heartbeat_interval(ddp_timeout)
        self.current = ("set-up", time.monotonic())  # the operation and when it began, set as one
        self._beats = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="lmtune-heartbeat", daemon=True)

    @classmethod
    def start(cls, ddp_timeout: float) -> Peers | None:
        """None with one process, or without a store to publish in (no MASTER_ADDR / MASTER_PORT)."""
        if not dist.is_initialized() or dist.get_world_size() == 1:
            return None
        started = [secrets.token_hex(8), restart_count()]
        every: list = [None] * dist.get_world_size()
        dist.all_gather_object(every, started)
        address, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
        if not address or not port:
            return None
        store = dist.TCPStore(address, int(port), is_master=False, timeout=timedelta(seconds=max(ddp_timeout, 30)))
        peers = cls(dist.PrefixStore(f"lmtune/{every[0][0]}", store), dist.get_rank(), dist.get_world_size(),
                    ddp_timeout, every[0][0], max(count for _, count in every))
        if ddp_timeout > DAY_S:
            log.warning("ddp_timeout %d s (%.1f days): a frozen or lost process stops the run only after that "
                        "long; lmtune prepares the data outside any collective, so it needs no long timeout",
                        ddp_timeout, ddp_timeout / DAY_S)
        peers._thread.start()
        return peers

    # --- what the main thread is doing --------------------------------------------------------------

    def doing(self, operation: str) -> None:
        """The main thread begins `operation` (one that may wait for the other processes)."""
        self.current = (operation, time.monotonic())

    def stop(self) -> None:
        self._stop.set()

    # --- the heartbeat ------------------------------------------------------------------------------

    def _beat(self) -> None:
        seen: dict[int, tuple[int, float]] = {}
        while not self._stop.wait(self.interval):
            with contextlib.suppress(Exception):  # the store's host may be gone: the launcher handles that
                self._beats += 1
                operation, since = self.current
                self.store.set(f"alive/{self.rank}", json.dumps({"beats": self._beats, "operation": operation}))
                waited = time.monotonic() - since
                if waited <= self.timeout / 2:  # the others are looked at only in a long wait
                    seen.clear()
                    continue
                silent = self.silent_peers(seen, self.timeout / 2)
                if silent and waited > self.timeout:
                    self._give_up(silent)

    def silent_peers(self, seen: dict[int, tuple[int, float]], longer_than: float) -> dict[int, tuple[float, str]]:
        """Ranks whose heartbeat has stood still for `longer_than` seconds since `seen` began to watch them
        (on this process's clock: the nodes' clocks may differ): rank -> (seconds silent, its last operation)."""
        now, silent = time.monotonic(), {}
        for rank in range(self.world):
            if rank == self.rank:
                continue
            try:
                beat = json.loads(self.store.get(f"alive/{rank}")) if self.store.check([f"alive/{rank}"]) else {}
            except Exception:
                beat = {}
            count = beat.get("beats", 0)
            last, changed = seen.get(rank, (None, now))
            if count != last:
                seen[rank] = (count, changed if last is None else now)
            if now - seen[rank][1] > longer_than:
                silent[rank] = (now - seen[rank][1], beat.get("operation", "not started"))
        return silent

    def _give_up(self, silent: dict[int, tuple[float, str]]) -> None:
        """From the heartbeat thread: the main thread is stuck in a collective, so the process ends here."""
        sys.stderr.write(f"failed: {self.hang_message(silent)}\n")
        sys.stderr.flush()
        logging.shutdown()
        os._exit(RunFailed.exit_code)

    def hang_message(self, silent: dict[int, tuple[float, str]]) -> str:
        operation, since = self.current
        waited = time.monotonic() - since
        names = "; ".join(f"process {rank} gave no sign of life in the last {seconds:.0f} s (its last operation: "
                          f"{theirs})" for rank, (seconds, theirs) in sorted(silent.items()))
        return (f"process {self.rank} waited {waited:.0f} s (ddp_timeout {self.timeout:g} s) in {operation}: "
                f"{names}; it is frozen or gone (a lost node, a stopped process); the newest checkpoint is intact "
                "and the same command resumes from it (torchrun --max-restarts does that by itself)")

    def explain(self, error: BaseException) -> str:
        """A collective that failed in the main thread: the operation, and the peers that went silent."""
        deadline, seen = time.monotonic() + 3 * self.interval, {}
        silent = self.silent_peers(seen, 2 * self.interval)
        while time.monotonic() < deadline and not silent:  # a dead peer's heartbeat stops: watch it a moment
            time.sleep(self.interval / 2)
            silent = self.silent_peers(seen, 2 * self.interval)
        first_line = str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__
        who = "; ".join(f"process {rank} stopped answering (its last operation: {operation})"
                        for rank, (_, operation) in sorted(silent.items())) or "every process still answers"
        return (f"process {self.rank}: a collective failed in {self.current[0]} ({first_line}): {who}; the newest "
                "checkpoint is intact and the same command resumes from it (torchrun --max-restarts does that by "
                "itself)")

    # --- one output_dir for all ---------------------------------------------------------------------

    def check_shared_folder(self, output_dir: Path) -> None:
        """Every process sees the files every other wrote in output_dir (or in the nearest folder above it
        that exists): a marker each, named by this start's token, removed once all have looked."""
        folder = _nearest_existing(Path(output_dir).absolute())
        mine = folder / f".lmtune-shared-{self.token}-{self.rank}"
        try:
            mine.write_text(socket.gethostname())
        except OSError as error:
            raise UserError(f"output_dir {output_dir}: cannot write in {folder} ({error})") from None
        try:
            dist.barrier()
            missing = self._markers_missing(folder)
            every: list = [None] * self.world
            dist.all_gather_object(every, (socket.gethostname(), missing))
        finally:
            mine.unlink(missing_ok=True)
        blind = [(rank, host, missing) for rank, (host, missing) in enumerate(every) if missing]
        if blind:
            lines = "; ".join(f"process {rank} on {host} does not see those of processes {missing}"
                              for rank, host, missing in blind)
            raise UserError(f"output_dir {output_dir} is not one folder for all processes: each wrote a file in "
                            f"{folder}, and {lines}. Every node must see the same output_dir (shared storage: NFS, "
                            "Lustre, a mounted bucket), or each would write its own part of a checkpoint; set "
                            "output_dir to a path on shared storage, the same on every node")

    def _markers_missing(self, folder: Path) -> list[int]:
        deadline = time.monotonic() + 3.0  # a network file system may show another node's file a moment late
        while True:
            missing = [r for r in range(self.world) if not (folder / f".lmtune-shared-{self.token}-{r}").exists()]
            if not missing or time.monotonic() > deadline:
                return missing
            time.sleep(0.25)

    # --- waiting without a collective ---------------------------------------------------------------

    def wait_for_all(self, what: str) -> None:
        """Every process reached `what`, waited for in the store rather than in a collective: as long as the
        others keep their heartbeat (preparing data may take hours), with a line now and then."""
        self.doing(f"waiting for every process to finish {what}")
        if self.store.add(f"reached/{what}", 1) == self.world:  # the last to arrive lets every process go
            self.store.set(f"all/{what}", "1")
        told = started = time.monotonic()
        seen: dict[int, tuple[int, float]] = {}
        while True:
            try:
                self.store.wait([f"all/{what}"], timedelta(seconds=self.interval))
                return
            except dist.DistError:
                pass
            silent = self.silent_peers(seen, self.timeout)
            if silent:
                raise RunFailed(self.hang_message(silent))
            if time.monotonic() - told > 60:
                told = time.monotonic()
                arrived = self.store.add(f"reached/{what}", 0)
                log.info("waiting for %d of %d processes to finish %s (%.0f s)", self.world - arrived, self.world,
                         what, told - started)


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


@contextlib.contextmanager
def named_failures(peers: Peers | None) -> Iterator[None]:
    """A collective that raises in the main thread (gloo: a timeout, a peer's connection closed) becomes a
    failure that names the operation and the processes that stopped answering."""
    try:
        yield
    except (RuntimeError, dist.DistError) as error:
        if peers is None or not _is_collective_error(error):
            raise
        raise RunFailed(peers.explain(error)) from error
    finally:
        if peers is not None:
            peers.stop()


def _is_collective_error(error: BaseException) -> bool:
    text = str(error)
    return isinstance(error, dist.DistError) or any(word in text for word in ("gloo", "NCCL", "Connection closed",
                                                                               "Connection reset", "Timed out"))
