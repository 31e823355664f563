"""The Chat tab's conversations, without gradio: messages wait in a queue and are answered in order.

A conversation is the list of what the user sent, each with one answer per model it was sent to (two when
comparing). The page never holds the history: it shows what the conversation says, so a message sent while
an answer streams waits its turn instead of being lost, and Clear cannot be undone by an answer still
streaming. One server thread at a time answers a conversation, started by the message that finds none
writing; pages only follow it (`follow`), so a page stream that ends or is cancelled loses nothing. Stop and
Clear end the answer being written through the generation's `cancelled` check.
"""

from __future__ import annotations

import threading
import time
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
    order: int = 0  # where the page put it among its sends, Stops and Clears


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
    """A page's conversation. The server answers it: `send` starts a worker thread when none is writing, and
    that thread answers every waiting message in order, whether or not a page is watching."""

    def __init__(self) -> None:
        self.turns: list[Turn] = []
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)  # notified at each change the page shows
        self.version = 0
        self.worker: threading.Thread | None = None
        self.cancel = threading.Event()  # ends the answer being written
        self.note = ""
        self.cleared = 0  # the order of the last Clear

    def _touch(self) -> None:
        """Call with the lock held."""
        self.version += 1
        self.changed.notify_all()

    def send(self, message: str, settings: dict[str, Any], sides: list[str], models: dict[str, ChatModel],
             order: int = 0) -> None:
        """Queue a message. `order` is the page's count of its actions: a message that reaches the server after
        a later one (or after a later Clear) takes its place as the page had it."""
        with self.lock:
            if order and order < self.cleared:
                return  # sent before a Clear that is already done
            turn = Turn(message, settings, {side: Answer() for side in sides}, order)
            at = len(self.turns)
            while at > 0 and self.turns[at - 1].order > order and self._waiting(self.turns[at - 1]):
                at -= 1
            self.turns.insert(at, turn)
            self.note = ""
            self._touch()
            if self.worker is None:
                self.worker = threading.Thread(target=self._answer_waiting, args=(models,), daemon=True)
                self.worker.start()

    @staticmethod
    def _waiting(turn: Turn) -> bool:
        return all(answer.state == WAITING for answer in turn.answers.values())

    def clear(self, order: int = 0) -> None:
        """Everything the page sent before the Clear goes, the answer being written and the waiting messages
        included."""
        with self.lock:
            self.cleared = max(self.cleared, order)
            gone = [turn for turn in self.turns if not order or turn.order < order]
            if any(answer.state == WRITING for turn in gone for answer in turn.answers.values()):
                self.cancel.set()
            self.turns = [turn for turn in self.turns if all(turn is not other for other in gone)]
            self.note = ""
            self._touch()

    def stop(self, order: int = 0) -> None:
        """The answer being written ends where it is; the messages sent before the Stop and still waiting are
        not answered."""
        with self.lock:
            skipped = 0
            for turn in self.turns:
                if order and turn.order > order:
                    continue
                for answer in turn.answers.values():
                    if answer.state == WAITING:
                        answer.state, skipped = SKIPPED, skipped + 1
                    elif answer.state == WRITING:
                        self.cancel.set()
            self.note = "stopped" + (f"; {skipped} waiting answer(s) not written" if skipped else "")
            self._touch()

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

    def _answer_waiting(self, models: dict[str, ChatModel]) -> None:
        """The worker: every waiting message, in order, until none waits."""
        while True:
            with self.lock:
                job = self._next()
                if job is None:
                    self.worker = None
                    self._touch()
                    return
                turn, side = job
                turn.answers[side].state = WRITING
                self.cancel.clear()
                messages = self.context(side, turn)
                self._touch()
            self._write(models[side], turn, side, messages)

    def _write(self, model: ChatModel, turn: Turn, side: str, messages: list[dict[str, str]]) -> None:
        from lmtune.chat import generate, sampling_of, with_system

        answer = turn.answers[side]
        settings = dict(turn.settings)
        system = settings.pop("system", "")

        def grow(piece: str) -> None:
            with self.lock:
                answer.text += piece
                self._touch()

        try:
            with model.lock:
                if model.session is None:
                    raise UserError(f"model {side} was unloaded")
                done = generate(model.session, with_system(system, messages), sampling_of(**settings), grow,
                                self.cancel.is_set)
            text, state = done.text or "(an empty answer)", STOPPED if done.finish_reason == "cancelled" else DONE
        except Exception as error:  # shown in the chat: the page has no other place for it
            text, state = f"(no answer: {error})", FAILED
        with self.lock:
            answer.text, answer.state = text, state
            self._touch()

    def follow(self, every_s: float = 0.5) -> Iterator[None]:
        """Yield now and at each change while messages are answered, at most once every `every_s` seconds so
        that a slow page is never sent more than it can draw; ends once nothing is written or waiting."""
        seen = -1
        while True:
            with self.lock:
                self.changed.wait_for(lambda shown=seen: self.version != shown, timeout=5)
                seen, busy = self.version, self.worker is not None
            yield
            if not busy:
                return
            time.sleep(every_s)

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
