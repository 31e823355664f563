"""The Chat tab: load a base model, a run's final model or a checkpoint, and talk to it."""

from __future__ import annotations

import queue
import threading
from pathlib import Path
from typing import Any

import gradio as gr

from lmtune.errors import UserError
from lmtune.webui import form as F


class ChatHolder:
    """One loaded model for the Chat tab."""

    def __init__(self) -> None:
        self.session = None
        self.name = ""
        self.lock = threading.Lock()  # held while a model loads or answers

    def load(self, root: Path, value: str) -> str:
        from lmtune.chat import load_for_chat

        try:
            target = F.chat_target(root, value)
            with self.lock:
                self.session = None
                self.session = load_for_chat(target)
                self.name = value
        except UserError as error:
            return f"**error**: {error}"
        return f"loaded **{value}**"

    def respond(self, message: str, history: list, max_new_tokens: float, temperature: float):
        """Stream the answer into the history. Without a model (none chosen, or one still loading) the
        history is left as it was and the message stays in the box."""
        from lmtune.chat import generate
        from lmtune.generation import text_of

        history = list(history or [])
        if not (message or "").strip():
            yield history, "", gr.update()
            return
        if self.session is None:
            busy = "a model is still loading: send again once it is loaded" if self.lock.locked() else (
                "load a model, run or checkpoint first")
            yield history, message, f"**not sent**: {busy}"
            return
        messages = [{"role": m["role"], "content": text_of(m["content"])} for m in history]
        messages.append({"role": "user", "content": message})
        history += [{"role": "user", "content": message}, {"role": "assistant", "content": ""}]
        pieces: queue.Queue = queue.Queue()
        result: dict[str, Any] = {}

        def work() -> None:
            try:
                with self.lock:
                    result["text"] = generate(self.session, messages, max_new_tokens=int(max_new_tokens),
                                              temperature=float(temperature), on_text=pieces.put)
            finally:
                pieces.put(None)

        threading.Thread(target=work, daemon=True).start()
        text = ""
        while (piece := pieces.get()) is not None:
            text += piece
            history[-1] = {"role": "assistant", "content": text}
            yield history, "", gr.update()
        history[-1] = {"role": "assistant", "content": result.get("text", text).strip() or "(an empty answer)"}
        yield history, "", gr.update()


def build(root: Path) -> gr.Dropdown:
    """The tab's components and handlers; call inside `gr.Tab`. Returns the pick list (re-read on page load)."""
    chat = ChatHolder()
    with gr.Row():
        choice = gr.Dropdown(F.chat_choices(root), label="model, run or checkpoint", allow_custom_value=True, scale=3,
                             elem_id="chat-target")
        refresh = gr.Button("Refresh list", size="sm", scale=1, elem_id="chat-refresh")
        load = gr.Button("Load", variant="primary", scale=1, elem_id="chat-load")
    status = gr.Markdown(elem_id="chat-status")
    with gr.Row():
        max_new_tokens = gr.Slider(1, 1024, value=128, step=1, label="max_new_tokens")
        temperature = gr.Slider(0, 2, value=0, step=0.05, label="temperature (0: greedy)")
    chatbot = gr.Chatbot(label="chat", height=380, elem_id="chatbot")
    with gr.Row():
        message = gr.Textbox(placeholder="Ask something, then Enter", scale=5, show_label=False, elem_id="chat-input")
        send = gr.Button("Send", scale=1, elem_id="chat-send")
        clear = gr.Button("Clear", scale=1)

    refresh.click(lambda: gr.update(choices=F.chat_choices(root)), None, choice)
    load.click(lambda: "loading ...", None, status).then(lambda value: chat.load(root, value), choice, status)
    chat_inputs = [message, chatbot, max_new_tokens, temperature]
    message.submit(chat.respond, chat_inputs, [chatbot, message, status])
    send.click(chat.respond, chat_inputs, [chatbot, message, status])
    clear.click(lambda: [], None, chatbot)
    return choice


def on_page_load(page: gr.Blocks, root: Path, choice: gr.Dropdown) -> None:
    page.load(lambda: gr.update(choices=F.chat_choices(root)), None, choice, show_progress="hidden")
