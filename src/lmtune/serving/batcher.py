"""Dynamic batching: requests for the same model, arriving within a short window of each other (or while the
previous batch was generating), are decoded together in one `generate` call on one serving thread.

The web server's event loop only queues jobs and reads their events, so it keeps answering (the health
check included) while a batch generates. The queue is bounded: a job counts from submission until it is
finished, failed or cancelled; a cancelled job's rows leave the batch at its next token.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from lmtune.chat import Target
from lmtune.generation import Completion, Sampling, TokenLogprob, generate
from lmtune.serving.pool import ModelPool, Ready

log = logging.getLogger("lmtune")


class QueueFull(Exception):
    pass


@dataclass
class Job:
    """One request: `prepare` turns the loaded model into its prompts' token ids (or raises ValueError,
    which the request gets back); its events go to `events` on the server's loop."""

    target: Target
    prepare: Callable[[Ready], list[list[int]]]
    sampling: list[Sampling]
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    prompts: list[list[int]] = field(default_factory=list)
    streams: bool = True  # False: only the finished completions are posted, not every piece

    def post(self, *event: Any) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)


class Batcher:
    def __init__(self, pool: ModelPool, max_pending: int = 64, max_batch: int = 32, window_s: float = 0.05) -> None:
        self.pool, self.max_pending, self.max_batch, self.window_s = pool, max_pending, max_batch, window_s
        self.waiting: list[Job] = []
        self.running: list[Job] = []  # the jobs of the batch being generated
        self.lock = threading.Condition()
        self.closed = False
        self.cancelled_rows = 0  # rows dropped from a batch because their client went away
        self.largest_batch = 0  # the most rows decoded together so far
        self.thread = threading.Thread(target=self._serve, name="lmtune-generation", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> None:
        with self.lock:
            if len(self.waiting) + self._busy() >= self.max_pending:
                raise QueueFull(f"{self.max_pending} requests are already queued or running")
            self.waiting.append(job)
            self.lock.notify()

    def load(self) -> dict[str, int]:
        with self.lock:
            return {"queued": len(self.waiting), "running": self._busy(), "max_pending": self.max_pending,
                    "cancelled_rows": self.cancelled_rows, "largest_batch": self.largest_batch}

    def _busy(self) -> int:
        """Running jobs still wanted: a finished job leaves at once, a cancelled job's rows at the next token."""
        return sum(not job.cancelled.is_set() for job in self.running)

    def close(self) -> None:
        with self.lock:
            self.closed = True
            self.lock.notify()
        self.thread.join(timeout=10)

    def _serve(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            try:
                self._run(batch)
            finally:
                with self.lock:
                    self.running = []

    def _next_batch(self) -> list[Job] | None:
        """The oldest job and the others for its model that arrive within the window, up to max_batch rows."""
        with self.lock:
            while not self.waiting and not self.closed:
                self.lock.wait()
            if self.closed:
                return None
        time.sleep(self.window_s)
        with self.lock:
            self.waiting = [job for job in self.waiting if not job.cancelled.is_set()]
            if not self.waiting:
                return []
            model = self.waiting[0].target.model_path
            batch, rows = [], 0
            for job in self.waiting:
                if job.target.model_path == model and rows + len(job.sampling) <= max(self.max_batch, rows + 1):
                    batch.append(job)
                    rows += len(job.sampling)
            self.waiting = [job for job in self.waiting if job not in batch]
            self.running = batch
            return batch

    def _run(self, batch: list[Job]) -> None:
        if not batch:
            return
        try:
            ready = self.pool.activate(batch[0].target)
        except Exception as error:  # the model would not load: every job for it hears why
            log.warning("could not load %s: %s", batch[0].target.given, error)
            for job in batch:
                job.post("error", error)
            return
        prepared = []
        for job in batch:
            try:
                job.prompts = job.prepare(ready)
            except ValueError as error:
                job.post("error", error)
                continue
            job.post("start", ready.tokenizer)
            prepared.append(job)
        if not prepared:
            return
        rows = [(job, i) for job in prepared for i in range(len(job.prompts))]
        self.largest_batch = max(self.largest_batch, len(rows))

        finished: dict[int, list[Completion | None]] = {id(job): [None] * len(job.prompts) for job in prepared}

        def on_text(row: int, piece: str, logprobs: list[TokenLogprob]) -> None:
            job, choice = rows[row]
            if job.streams:
                job.post("text", choice, piece, logprobs)

        def on_finish(row: int, completion: Completion) -> None:
            """A job whose rows have all ended is answered, and leaves the queue, while the batch goes on."""
            job, choice = rows[row]
            results = finished[id(job)]
            results[choice] = completion
            if all(result is not None for result in results):
                with self.lock:
                    self.running.remove(job)
                    self.cancelled_rows += sum(r.finish_reason == "cancelled" for r in results)
                job.post("done", results)

        try:
            generate(ready.model, ready.tokenizer, [job.prompts[i] for job, i in rows],
                     [job.sampling[i] for job, i in rows], on_text=on_text,
                     cancelled=lambda row: rows[row][0].cancelled.is_set(), on_finish=on_finish)
        except Exception as error:
            log.exception("generation failed")
            for job in prepared:
                if not all(finished[id(job)]):
                    job.post("error", error)

