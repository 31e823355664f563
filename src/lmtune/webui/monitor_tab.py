"""The Monitor tab: every run of the working folder with its state, and the chosen run's progress, loss
chart, events and checkpoints (paged), and log, read from its folder every second."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import gradio as gr

from lmtune.errors import UserError
from lmtune.webui import form as F
from lmtune.webui import monitor as M
from lmtune.webui.runner import Runner


def runs_newest_first(root: Path) -> list[str]:
    return sorted(F.run_choices(root), key=lambda run: M.run_updated(Path(root) / run), reverse=True)


def opened_run(root: Path, runs: list[str], chosen: str | None) -> str | None:
    """The run to show on opening: the one that is running (the newest, if several), else the one
    chosen before, else the newest."""
    running = [run for run in runs if M.run_state(Path(root) / run).kind == M.RUNNING]
    return running[0] if running else chosen if chosen in runs else runs[0] if runs else None


@dataclass
class MonitorTab:
    run_choice: gr.Dropdown
    runs_table: gr.HTML


def build(root: Path, runner: Runner) -> MonitorTab:
    """The tab's components and handlers; call inside `gr.Tab`."""
    runs_table = gr.HTML(M.runs_html(root, runs_newest_first(root)), elem_id="runs")
    with gr.Row():
        run_choice = gr.Dropdown(runs_newest_first(root), label="run folder", allow_custom_value=True, scale=3,
                                 elem_id="run-folder")
        refresh = gr.Button("Refresh list", size="sm", scale=1, elem_id="refresh-runs")
        stop = gr.Button("Stop", variant="stop", scale=1, elem_id="stop-monitor")
    stop_status = gr.Markdown(elem_id="monitor-status")
    progress = gr.Markdown("Choose a run folder.", elem_id="progress")
    chart = gr.HTML(elem_id="loss-chart")
    with gr.Row():
        with gr.Column(scale=3):
            gr.Markdown("#### Checkpoints (checkpoints.json)")
            checkpoints_page = gr.Number(1, precision=0, minimum=1, label="page (1: newest)",
                                         elem_id="checkpoints-page")
            checkpoints = gr.HTML(elem_id="checkpoints")
        with gr.Column(scale=2):
            gr.Markdown("#### Events")
            with gr.Row():
                events_page = gr.Number(1, precision=0, minimum=1, label="page (1: newest)", elem_id="events-page")
                routine = gr.Checkbox(False, label="saves and rotations too", elem_id="events-routine")
            events = gr.Markdown(elem_id="events")
    log_view = gr.Textbox(label="log (train.log)", lines=20, max_lines=20, interactive=False, autoscroll=True,
                          elem_id="log-tail")
    timer = gr.Timer(1.0)

    known = gr.State([])  # the runs the pick list offers

    def watch(run: str | None, checkpoint_page, event_page, with_routine: bool, offered: list[str]):
        runs = runs_newest_first(root)
        listed = (M.runs_html(root, runs), runs, gr.update() if set(runs) == set(offered) else gr.update(choices=runs))
        if not run:
            return ("Choose a run folder (or start a run on the Train tab).", M.chart_html(M.RunView(root, {})),
                    "", "", "", *listed)
        try:
            run_dir = F.inside(root, run, "run folder")
        except UserError as error:
            return f"**error**: {error}", "", "", "", "", *listed
        view = M.read_run(run_dir)
        return (M.progress_markdown(view, runner.state(run_dir)), M.chart_html(view),
                M.checkpoints_html(run_dir, checkpoint_page), M.events_markdown(view, event_page, routine=with_routine),
                M.log_tail(run_dir, lines=20), *listed)

    watch_io = ([run_choice, checkpoints_page, events_page, routine, known],
                [progress, chart, checkpoints, events, log_view, runs_table, known, run_choice])
    timer.tick(watch, *watch_io, show_progress="hidden", concurrency_id="watch", trigger_mode="always_last")
    for component in (run_choice, checkpoints_page, events_page, routine):
        component.change(watch, *watch_io, show_progress="hidden")

    def refresh_list(chosen: str | None):
        runs = runs_newest_first(root)
        return gr.update(choices=runs, value=chosen if chosen else opened_run(root, runs, chosen))

    refresh.click(refresh_list, run_choice, run_choice)

    def stop_watched(run: str | None) -> str:
        if not run:
            return "Choose a run folder."
        try:
            return runner.stop(F.inside(root, run, "run folder"))
        except UserError as error:
            return f"**error**: {error}"

    stop.click(stop_watched, run_choice, stop_status)
    return MonitorTab(run_choice, runs_table)


def on_page_load(page: gr.Blocks, root: Path, tab: MonitorTab) -> None:
    """Every run as the disk has it now, and the running one opened."""

    def opening(chosen: str | None):
        runs = runs_newest_first(root)
        return gr.update(choices=runs, value=opened_run(root, runs, chosen)), M.runs_html(root, runs)

    page.load(opening, tab.run_choice, [tab.run_choice, tab.runs_table], show_progress="hidden")


def show_started(root: Path, run: str):
    """After Start: the started run chosen in the list."""
    if not run:
        return gr.update()
    runs = runs_newest_first(root)
    return gr.update(choices=runs if run in runs else [run, *runs], value=run)
