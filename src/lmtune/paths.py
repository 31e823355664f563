"""Where lmtune keeps what it can rebuild (converted models and processed data), and how one process
builds an entry while the others wait for it."""

import contextlib
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger("lmtune")


def cache_home() -> Path:
    """`LMTUNE_HOME`, or `~/.cache/lmtune`."""
    root = os.environ.get("LMTUNE_HOME") or Path.home() / ".cache" / "lmtune"
    return Path(root)


@contextlib.contextmanager
def building(entry: Path, what: str) -> Iterator[bool]:
    """Held by one process at a time for `entry` (a file lock beside it: processes on this machine, or on any
    machine that shares the folder): the others wait here, outside any collective, saying so now and then.
    Yields whether this process had to wait (another built the entry meanwhile)."""
    from filelock import FileLock, Timeout

    entry.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(f"{entry}.lock")
    started = time.monotonic()
    try:
        lock.acquire(timeout=0)
        waited = False
    except Timeout:
        waited = True
        log.info("another process is preparing the %s (%s): waiting for it", what, entry)
        while True:
            try:
                lock.acquire(timeout=60)
                break
            except Timeout:
                log.info("still waiting for the %s another process is preparing (%.0f s)", what,
                         time.monotonic() - started)
    try:
        yield waited
    except BaseException:
        lock.release()
        Path(lock.lock_file).unlink(missing_ok=True)  # a build that failed leaves nothing behind
        raise
    lock.release()
