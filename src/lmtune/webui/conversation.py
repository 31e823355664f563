"""The Chat tab's conversations, without gradio: messages wait in a queue and are answered in order.

A conversation is the list of what the user sent, each with one answer per model it was sent to (two when
comparing). The page never holds the history: it shows what the conversation says, so a message sent while
an answer streams waits its turn instead of being lost, and Clear cannot be undone by an answer still
streaming. One worker at a time answers a conversation (`answer_waiting`); Stop and Clear end the answer
being written through the generation's `cancelled` check.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from lmtune.errors import UserError

WAITING, WRITING, DONE, STOPPED, SKIPPED, FAILED = "waiting", "writing", "done", "stopped", "not answered", "failed"
SIDES = ("A", "B")


@dataclass
class Answer:
    text: str = ""
    state: str = WAITING


@dataclass
class Turn:
    """A message, the settings it was sent with, and its answers by side."""

    message: str
    settings: dict[str, Any]
    answers: dict[str, Answer] = field(default_factory=dict)


class ChatModel:
    """One loaded model (a side of the Chat tab), shared by every page of the server."""

    def __init__(self) -> None:
        self.session = None
        self.name = ""
        self.lock = threading.Lock()  # held while the model loads or answers

    def load(self, target: str) -> None:
        from lmtune.chat import load_for_chat

        with self.lock:
            self.session = None
            self.name = ""
            self.session = load_for_chat(target)
            self.name = target

    def unload(self) -> None:
        with self.lock:
            self.session, self.name = None, ""

    @property
    def loading(self) -> bool:
        return self.session is None and self.lock.locked()


class Conversation:
    def __init__(self) -> None:
        self.turns: list[Turn] = []
        self.lock = threading.Lock()
        self.answering = False  # a worker is answering the waiting messages
        self.cancel = threading.Event()  # ends the answer being written
        self.note = ""

    def send(self, message: str, settings: dict[str, Any], sides: list[str]) -> None:
        with self.lock:
            self.turns.append(Turn(message, settings, {side: Answer() for side in sides}))
            self.note = ""

    def clear(self) -> None:
        """Everything goes, the answer being written and the waiting messages included."""
        with self.lock:
            self.turns = []
            self.cancel.set()
            self.note = ""

    def stop(self) -> None:
        """The answer being written ends where it is; the waiting messages are not answered."""
        with self.lock:
            skipped = 0
            for answer in self._answers():
                if answer.state == WAITING:
                    answer.state, skipped = SKIPPED, skipped + 1
            self.cancel.set()
            self.note = "stopped" + (f"; {skipped} waiting answer(s) not written" if skipped else "")

    def _answers(self) -> Iterator[Answer]:
        for turn in self.turns:
            yield from turn.answers.values()

    def context(self, side: str, upto: Turn) -> list[dict[str, str]]:
        """The messages side's model answers `upto` with: the earlier turns it answered, with its answers."""
        messages = []
        for turn in self.turns:
            if turn is upto:
                break
            answer = turn.answers.get(side)
            if answer is not None and answer.state in (DONE, STOPPED):
                messages += [{"role": "user", "content": turn.message}, {"role": "assistant", "content": answer.text}]
        return messages + [{"role": "user", "content": upto.message}]

    def _next(self) -> tuple[Turn, str] | None:
        for turn in self.turns:
            for side, answer in turn.answers.items():
                if answer.state == WAITING:
                    return turn, side
        return None

    def answer_waiting(self, models: dict[str, ChatModel], tick: float = 0.1) -> Iterator[None]:
        """Answer every waiting message, in order, yielding while an answer grows. A second call while one
        is answering returns at once: the first answers what it sent."""
        with self.lock:
            if self.answering:
                return
            self.answering = True
        try:
            while True:
                with self.lock:
                    job = self._next()
                    if job is None:
                        self.answering = False
                        return
                    turn, side = job
                    turn.answers[side].state = WRITING
                    self.cancel.clear()
                    messages = self.context(side, turn)
                worker = threading.Thread(target=self._write, args=(models[side], turn, side, messages), daemon=True)
                worker.start()
                while worker.is_alive():
                    worker.join(tick)
                    yield
        finally:
            self.cancel.set()  # the page went away: the answer being written ends
            with self.lock:
                self.answering = False

    def _write(self, model: ChatModel, turn: Turn, side: str, messages: list[dict[str, str]]) -> None:
        from lmtune.chat import generate, sampling_of, with_system

        answer = turn.answers[side]
        settings = dict(turn.settings)
        system = settings.pop("system", "")

        def grow(piece: str) -> None:
            answer.text += piece

        try:
            with model.lock:
                if model.session is None:
                    raise UserError(f"model {side} was unloaded")
                done = generate(model.session, with_system(system, messages), sampling_of(**settings), grow,
                                self.cancel.is_set)
            answer.text = done.text or "(an empty answer)"
            answer.state = STOPPED if done.finish_reason == "cancelled" else DONE
        except Exception as error:  # shown in the chat: the page has no other place for it
            answer.text, answer.state = f"(no answer: {error})", FAILED

    def status(self) -> str:
        with self.lock:
            answers = list(self._answers())
        writing = sum(a.state == WRITING for a in answers)
        waiting = sum(a.state == WAITING for a in answers)
        if writing or waiting:
            return f"writing an answer; {waiting} waiting" if writing else f"{waiting} waiting"
        return self.note

    def history(self, side: str) -> list[dict[str, str]]:
        """The messages side's chat shows: each sent message, and its answer as far as it is written."""
        shown = []
        with self.lock:
            turns = list(self.turns)
        for turn in turns:
            answer = turn.answers.get(side)
            if answer is None:
                continue
            shown.append({"role": "user", "content": turn.message})
            text = answer.text
            if answer.state == STOPPED:
                text += " [stopped]"
            elif answer.state == SKIPPED:
                text = "[not answered: stopped]"
            elif answer.state == WAITING:
                continue
            shown.append({"role": "assistant", "content": text})
        return shown
