"""The gradio page: the Train, Monitor, Chat, Eval and Export tabs (one module each), and `lmtune webui`'s server.

Runs do not belong to the page or the server: Start launches `lmtune train` in a session of its own,
and everything shown is read from the run folders, so a run keeps going when the browser or the
server goes, and a reopened page finds it again.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr  # noqa: E402

from lmtune.webui import chat_tab, eval_tab, export_tab, monitor_tab, train_tab  # noqa: E402
from lmtune.webui.runner import Runner  # noqa: E402

log = logging.getLogger("lmtune")
LOOPBACK = ("127.0.0.1", "localhost", "::1")
CSS = """
.lmtune-checkpoints, .lmtune-runs { border-collapse: collapse; width: 100%; font-size: 0.9em; }
.lmtune-checkpoints th, .lmtune-checkpoints td, .lmtune-runs th, .lmtune-runs td {
  border-bottom: 1px solid #e5e7eb; padding: 3px 8px; text-align: right;
}
.lmtune-runs td, .lmtune-runs th { text-align: left; }
.lmtune-runs tr.run-running td { font-weight: 600; }
.lmtune-checkpoints tr.ckpt-deleted td { color: #9ca3af; text-decoration: line-through; }
.lmtune-checkpoints tr.ckpt-incomplete td { color: #b45309; }
#plan table { font-size: 0.9em; }
#plan th { white-space: nowrap; word-break: keep-all; overflow-wrap: normal; }
"""


def build(root: Path) -> gr.Blocks:
    """The page for the working folder `root` (the folder the server runs in: config paths are relative
    to it, as for `lmtune plan` and `lmtune train` run there)."""
    root = Path(root).resolve()
    runner = Runner(root)
    with gr.Blocks(title="lmtune") as page:
        gr.Markdown(f"## lmtune\nWorking folder `{root}`: models, data and runs are picked and written inside it. "
                    "Runs keep going when this page or the server closes; the Monitor finds them again.")
        with gr.Tabs() as tabs:
            with gr.Tab("Train", id="train"):
                train = train_tab.build(root, runner)
            with gr.Tab("Monitor", id="monitor"):
                monitor = monitor_tab.build(root, runner)
            after_training = []  # (tab, its pick lists of runs, checkpoints and models)
            with gr.Tab("Chat", id="chat") as tab:
                after_training.append((tab, chat_tab.build(root, page)))
            for module, name in ((eval_tab, "Eval"), (export_tab, "Export")):
                with gr.Tab(name, id=name.lower()) as tab:
                    after_training.append((tab, module.build(root)))
        train.start_event.then(lambda run: monitor_tab.show_started(root, run), train.started, monitor.run_choice) \
            .then(lambda run: gr.Tabs(selected="monitor") if run else gr.Tabs(), train.started, tabs)
        train_tab.on_page_load(page, train)
        monitor_tab.on_page_load(page, root, monitor)
        for tab, pickers in after_training:
            keep_fresh(page, tab, pickers)
    return page


def keep_fresh(page: gr.Blocks, tab: gr.Tab, pickers: list[tuple[gr.Dropdown, Callable[[], list]]]) -> None:
    """Each pick list is read again when the page loads, its tab is opened and the list is opened: a checkpoint
    deleted since is not offered, a run finished since is."""
    for picker, choices in pickers:
        def fresh(choices=choices):
            return gr.update(choices=choices())

        for event in (page.load, tab.select, picker.focus):
            event(fresh, None, picker, show_progress="hidden")


def patiently_probe_own_page() -> None:
    """gradio asks for its own page once before serving, with a 3 s timeout, and gives up ("localhost is not
    accessible") when the first page takes longer, as it does on a busy machine: wait up to 60 s instead."""
    import httpx
    from gradio import networking

    def page_answers(url: str) -> bool:
        try:
            return httpx.head(url, timeout=60).status_code in (200, 401, 301, 302, 303, 307, 308)
        except httpx.HTTPError:
            return False

    networking.url_ok = page_answers


def serve(root: Path, host: str, port: int, auth: tuple[str, str] | None) -> None:
    """Serve until Ctrl-C or SIGTERM: both end the server alone, at once; the runs it started keep running."""
    if host not in LOOPBACK and auth is None:
        log.warning("the web UI listens on %s without --auth: anyone who can reach this port can start runs", host)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM ends the server as Ctrl-C does
    page = build(Path(root))
    patiently_probe_own_page()
    theme = gr.themes.Default(font=["system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])
    page.queue(default_concurrency_limit=4).launch(
        server_name=host, server_port=port, auth=auth, ssr_mode=False, theme=theme, css=CSS, show_error=True,
        footer_links=[], inbrowser=False, prevent_thread_lock=True,
        # gradio's own check that the page answers (one request, 3 s timeout) fails on a busy machine,
        # where the first page takes longer to render; the server is up either way
        _frontend=False,
    )
    try:
        while page.is_running:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    page.close(verbose=False)  # the queue, the pages' streams and the port
    log.info("web UI stopped; runs it started keep running (lmtune webui finds them again; stop one with its "
             "Stop button or kill -INT PID)")
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    # Nothing of the server's is left to save (runs are processes of their own). What may still run is not
    # ours to wait for: a chat answer being generated, gradio's worker threads (not daemons) serving a page;
    # waiting for them held the exit for a minute, and torch's threads torn down mid-answer abort it.
    os._exit(0)
