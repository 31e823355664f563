"""Where a run's start-up time goes: each set-up phase and its duration in the debug log (`-v`)."""

from __future__ import annotations

import gc
import logging
import os
import time

log = logging.getLogger("lmtune")


def since_process_start() -> float | None:
    """Seconds since this process started (Linux: from /proc), None where that is not known."""
    try:
        with open("/proc/self/stat") as handle:
            fields = handle.read().rpartition(")")[2].split()
        started = int(fields[19]) / os.sysconf("SC_CLK_TCK")
        return time.clock_gettime(time.CLOCK_BOOTTIME) - started
    except (OSError, ValueError, IndexError, AttributeError):
        return None


_collector_paused = False


def pause_garbage_collection() -> None:
    """For the start-up of `lmtune train`. Importing torch, transformers, datasets and peft and loading a
    model make about half a million long-lived objects and few reference cycles, and Python's cyclic
    collector scanned them all again and again as they grew: 1.4 to 1.9 s of CPU time before the first step
    of a SmolLM2 LoRA run (bench/README.md, "Start-up")."""
    global _collector_paused
    if gc.isenabled():
        gc.disable()
        _collector_paused = True


def resume_garbage_collection() -> None:
    """At the end of the start-up: what it made is frozen (never scanned again), and the collector works as
    before on what the run makes from then on. The start-up's own garbage cycles stay (about 12,000 small
    objects, 8 MB, no tensor's memory): collecting them first would cost 0.5 s of CPU time."""
    global _collector_paused
    if _collector_paused:
        gc.freeze()
        gc.enable()
        _collector_paused = False


def log_moment(event: str) -> None:
    """`event` with the time since the process started, and the CPU time it has used (what the wall time
    would be on an idle machine, for this mostly single-threaded work)."""
    started = since_process_start()
    if started is not None:
        log.debug("%s %.2f s after the process started (%.2f s of CPU time)", event, started, time.process_time())


class PhaseClock:
    """`lap(name)` at the end of each phase logs how long it took since the previous lap."""

    def __init__(self, what: str):
        self.what = what
        self.last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        if log.isEnabledFor(logging.DEBUG):
            started = since_process_start()
            at = f"{started:.2f} s since the process started, " if started is not None else ""
            log.debug("%s: %s %.2f s (%s%.2f s of CPU time)", self.what, name, now - self.last, at,
                      time.process_time())
        self.last = now
