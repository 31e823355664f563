"""The Chat tab: load a base model, a run's final model or a checkpoint (and a second one to compare
answers side by side), and talk to them.

Generation is `lmtune chat`'s (lmtune.chat over lmtune.generation, as `lmtune serve`); the queue, Stop and
Clear are lmtune.webui.conversation's. The page sends messages and shows the conversation; it never
writes the history back, so nothing it shows can undo a Clear or drop a waiting message.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from functools import partial
from pathlib import Path

import gradio as gr

from lmtune.errors import UserError
from lmtune.webui import form as F
from lmtune.webui.conversation import SIDES, ChatModel, Conversation

NONE = ""
# The box's text is taken in the moment Enter is pressed or Send clicked, and the box emptied: the send event that
# follows is handled later (much later on a busy page), when the box may already hold the next message. Each
# send, Stop and Clear is numbered in the order the user made them: the server follows that order, whichever
# of their events reaches it first.
TAKE_JS = """() => {
    let count = 0;
    window.lmtuneNext = () => ++count;
    window.lmtuneOutbox = [];
    const take = () => {
        const box = document.querySelector('#chat-input textarea');
        window.lmtuneOutbox.push({text: box ? box.value : '', order: window.lmtuneNext()});
        if (box) {
            box.value = '';
            box.dispatchEvent(new Event('input', {bubbles: true}));
        }
    };
    document.addEventListener('keydown', (event) => {
        if (event.key === 'Enter' && !event.shiftKey && !event.isComposing && event.target.closest('#chat-input')) {
            take();
        }
    }, true);
    document.addEventListener('click', (event) => {
        if (event.target.closest('#chat-send')) take();
    }, true);
}"""
# each send event takes the oldest message taken from the box
SEND_JS = """(message, ...settings) => {
    const taken = window.lmtuneOutbox?.shift() ?? {text: message, order: window.lmtuneNext?.() ?? 0};
    return [taken.text, ...settings.slice(0, -1), taken.order];
}"""
NUMBERED_JS = "(order) => [window.lmtuneNext?.() ?? 0]"


class ChatTab:
    """The models (one per side, shared by the server's pages) and each page's conversation."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.models = {side: ChatModel() for side in SIDES}
        self.conversations: dict[str, Conversation] = {}
        self.ticks = itertools.count(1)

    def conversation(self, request: gr.Request) -> Conversation:
        return self.conversations.setdefault(request.session_hash, Conversation())

    def forget(self, request: gr.Request) -> None:
        """The page closed: its answer being written ends, its waiting messages go."""
        conversation = self.conversations.pop(request.session_hash, None)
        if conversation is not None:
            conversation.clear()

    def load(self, side: str, value: str) -> str:
        model = self.models[side]
        if side != "A" and not (value or "").strip():
            model.unload()
            return "comparison off"
        try:
            model.load(F.chat_target(self.root, value))
        except UserError as error:
            return f"**error**: {error}"
        return f"loaded **{value}**" + (" (model B: answers side by side)" if side != "A" else "")

    def send(self, message: str, system: str, max_new_tokens: float, temperature: float, top_p: float,
             stop: str, order: float, request: gr.Request):
        """Queue the message or, without a model, put it back in the box and say why. Returns the box and a
        new `changed` tick."""
        conversation = self.conversation(request)
        if not (message or "").strip():
            return gr.update(), self.tick()
        if self.models["A"].session is None:
            busy = "a model is still loading: send again once it is loaded" if self.models["A"].loading else (
                "load a model, run or checkpoint first")
            conversation.note = f"**not sent**: {busy}"
            return message, self.tick()
        settings = dict(system=(system or "").strip(), max_new_tokens=int(max_new_tokens),
                        temperature=float(temperature), top_p=float(top_p),
                        stop=tuple(line for line in (stop or "").splitlines() if line))
        sides = [side for side, model in self.models.items() if model.session is not None]
        conversation.send(message, settings, sides, self.models, int(order or 0))
        return gr.update(), self.tick()

    def stop(self, order: float, request: gr.Request) -> int:
        self.conversation(request).stop(int(order or 0))
        return self.tick()

    def clear(self, order: float, request: gr.Request) -> int:
        self.conversation(request).clear(int(order or 0))
        return self.tick()

    def tick(self) -> int:
        """A value the page's `changed` state never had: setting it starts the page's `follow`."""
        return next(self.ticks)

    def follow(self, request: gr.Request):
        conversation = self.conversation(request)
        for _ in conversation.follow():
            yield self.view(conversation)

    def view(self, conversation: Conversation):
        comparing = self.models["B"].session is not None or any("B" in turn.answers for turn in conversation.turns)
        names = {side: model.name and Path(model.name).name for side, model in self.models.items()}
        return [gr.update(value=conversation.history("A"), label=f"A: {names['A']}" if comparing else "chat"),
                gr.update(value=conversation.history("B"), visible=comparing, label=f"B: {names['B']}"),
                conversation.status()]


def build(root: Path, page: gr.Blocks) -> list[tuple[gr.Dropdown, Callable[[], list]]]:
    """The tab's components and handlers; call inside `gr.Tab` of `page`. Returns the pick lists, each with
    what it offers (read again by `app.keep_fresh`)."""
    chat = ChatTab(root)
    with gr.Row():
        choice = gr.Dropdown(chat_picks(root, False), label="model, run or checkpoint", allow_custom_value=True,
                             scale=3, elem_id="chat-target")
        load = gr.Button("Load", variant="primary", scale=1, elem_id="chat-load")
        compare = gr.Dropdown(chat_picks(root, True), value=NONE, label="compare with (answers side by side)",
                              allow_custom_value=True, scale=3, elem_id="chat-compare")
        load_compare = gr.Button("Load B", scale=1, elem_id="chat-load-compare")
    status = gr.Markdown(elem_id="chat-status")
    with gr.Accordion("settings: system prompt, sampling, stop sequences", open=False, elem_id="chat-settings"):
        system = gr.Textbox(label="system prompt", lines=2, elem_id="chat-system")
        with gr.Row():
            max_new_tokens = gr.Slider(1, 4096, value=128, step=1, label="max_new_tokens", elem_id="chat-max-tokens")
            temperature = gr.Slider(0, 2, value=0, step=0.05, label="temperature (0: greedy)",
                                    elem_id="chat-temperature")
            top_p = gr.Slider(0.01, 1, value=1, step=0.01, label="top_p", elem_id="chat-top-p")
        stop = gr.Textbox(label="stop sequences (one a line: the answer ends before the first)", lines=2,
                          elem_id="chat-stop")
    with gr.Row():
        chatbot = gr.Chatbot(label="chat", height=380, elem_id="chatbot")
        chatbot_b = gr.Chatbot(label="B", height=380, elem_id="chatbot-b", visible=False)
    with gr.Row():
        message = gr.Textbox(placeholder="Ask something, then Enter (send more while an answer is written: "
                             "they wait their turn)", scale=5, show_label=False, elem_id="chat-input")
        send = gr.Button("Send", scale=1, elem_id="chat-send")
        stop_button = gr.Button("Stop", scale=1, elem_id="chat-stop-button")
        clear = gr.Button("Clear", scale=1, elem_id="chat-clear")
    queue_status = gr.Markdown(elem_id="chat-queue")

    # The conversation is shown by one stream per page, `follow`, and by nothing else: what the page draws last
    # is what the server holds last, however late a busy page draws. Each send, Stop, Clear and Load sets
    # `changed`, which starts `follow`, or runs it once more after the one running (trigger_mode always_last).
    changed = gr.State(0)
    quick = dict(concurrency_limit=None, show_progress="hidden", trigger_mode="multiple")
    changed.change(chat.follow, None, [chatbot, chatbot_b, queue_status], concurrency_limit=None,
                   show_progress="hidden", trigger_mode="always_last")
    for side, picker, button in (("A", choice, load), ("B", compare, load_compare)):
        button.click(lambda: "loading ...", None, status).then(
            lambda value, side=side: chat.load(side, value), picker, status).then(chat.tick, None, changed, **quick)
    # each message goes as the box showed it at Enter (see TAKE_JS) straight to the server's queue, in the order
    # sent; the box is emptied in the browser at once, so no reply from the server wipes what is typed next
    page.load(None, None, None, js=TAKE_JS)
    order = gr.Number(visible=False, precision=0)  # its value is never used: the page's number of each action
    inputs = [message, system, max_new_tokens, temperature, top_p, stop, order]
    for trigger in (message.submit, send.click):
        trigger(chat.send, inputs, [message, changed], js=SEND_JS, concurrency_id="chat-send", concurrency_limit=1,
                show_progress="hidden", trigger_mode="multiple")
    for button, handler in ((stop_button, chat.stop), (clear, chat.clear)):
        button.click(handler, order, changed, js=NUMBERED_JS, **quick)
    page.unload(chat.forget)
    return [(choice, partial(chat_picks, root, False)), (compare, partial(chat_picks, root, True))]


def chat_picks(root: Path, optional: bool) -> list[tuple[str, str]]:
    return ([("(no comparison)", NONE)] if optional else []) + F.chat_choices(root)
