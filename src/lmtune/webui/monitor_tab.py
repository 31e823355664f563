"""The Monitor tab: every run of the working folder with its state, and the chosen run's progress, plots
(loss, learning rate, gradient norm, throughput, memory, and each stage's own), events and checkpoints
(paged), and log, read from its folder every second."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import gradio as gr
import pandas as pd

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


PLOT_EVERY_S = 5.0  # plots are the page's heaviest part to draw: a running run's are redrawn this often


@dataclass
class MonitorTab:
    run_choice: gr.Dropdown
    runs_table: gr.HTML
    suggested: gr.Textbox  # the run the page opens with, as the server sees it


def build(root: Path, runner: Runner) -> MonitorTab:
    """The tab's components and handlers; call inside `gr.Tab`."""
    runs_table = gr.HTML(M.runs_html(root, runs_newest_first(root)), elem_id="runs")
    with gr.Row():
        run_choice = gr.Dropdown(runs_newest_first(root), label="run folder", allow_custom_value=True, scale=3,
                                 elem_id="run-folder")
        refresh = gr.Button("Refresh list", size="sm", scale=1, elem_id="refresh-runs")
        stop = gr.Button("Stop", variant="stop", scale=1, elem_id="stop-monitor")
    stop_status = gr.Markdown(elem_id="monitor-status")
    stop_sent = gr.State({})  # the run and pid the Stop above was sent to; its message goes with them
    progress = gr.Markdown("Choose a run folder.", elem_id="progress")
    plots = {}
    with gr.Row(elem_id="plots"):
        for spec in M.PLOTS:
            plots[spec.name] = gr.LinePlot(
                x="step", y="value", color="series", title=spec.title, y_title=spec.y_title, x_title="step",
                color_title="", color_map=M.series_colours(spec), height=240, min_width=380, visible=False,
                elem_id=f"plot-{spec.name}", elem_classes=["lmtune-plot"], buttons=[])
    plotted = gr.State({})  # the run and metrics.jsonl the plots show, and when they were drawn
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

    def watch(run: str | None, checkpoint_page, event_page, with_routine: bool, offered: list[str], shown: dict,
              sent: dict):
        runs = runs_newest_first(root)
        listed = (M.runs_html(root, runs), runs, gr.update() if set(runs) == set(offered) else gr.update(choices=runs))
        no_plots = [gr.update(visible=False) for _ in M.PLOTS]
        if not run:
            return ("Choose a run folder (or start a run on the Train tab).", "", "", "", *listed, {}, *no_plots, "")
        try:
            run_dir = F.inside(root, run, "run folder")
        except UserError as error:
            return f"**error**: {error}", "", "", "", *listed, {}, *no_plots, ""
        view, state = M.read_run(run_dir), runner.state(run_dir)
        now = {"run": str(run_dir), "metrics": M.metrics_stamp(run_dir), "at": time.time()}
        # redrawn when the run or its metrics change, a running run's at most every PLOT_EVERY_S seconds
        redraw = shown.get("run") != now["run"] or (shown.get("metrics") != now["metrics"]
                                                    and now["at"] - shown.get("at", 0) >= PLOT_EVERY_S)
        plot_updates = [plot_update(view, spec) for spec in M.PLOTS] if redraw else [gr.update() for _ in M.PLOTS]
        stamp = now if redraw else shown
        return (M.progress_markdown(view, state), M.checkpoints_html(run_dir, checkpoint_page),
                M.events_markdown(view, event_page, routine=with_routine), M.log_tail(run_dir, lines=20), *listed,
                stamp, *plot_updates, stop_message(sent, run, runner.pid(run_dir)))

    watch_io = ([run_choice, checkpoints_page, events_page, routine, known, plotted, stop_sent],
                [progress, checkpoints, events, log_view, runs_table, known, run_choice, plotted,
                 *plots.values(), stop_status])
    timer.tick(watch, *watch_io, show_progress="hidden", concurrency_id="watch", trigger_mode="always_last")
    for component in (run_choice, checkpoints_page, events_page, routine):
        component.change(watch, *watch_io, show_progress="hidden")

    def refresh_list(chosen: str | None):
        runs = runs_newest_first(root)
        return gr.update(choices=runs, value=chosen if chosen else opened_run(root, runs, chosen))

    refresh.click(refresh_list, run_choice, run_choice)

    def stop_watched(run: str | None):
        if not run:
            return "Choose a run folder.", {}
        try:
            run_dir = F.inside(root, run, "run folder")
        except UserError as error:
            return f"**error**: {error}", {}
        pid, text = runner.pid(run_dir), runner.stop(run_dir)
        return text, {"run": run, "pid": pid, "text": text}

    stop.click(stop_watched, run_choice, [stop_status, stop_sent])
    return MonitorTab(run_choice, runs_table, gr.Textbox(visible=False))


def plot_update(view: M.RunView, spec: M.PlotSpec):
    points = M.plot_points(view, spec)
    if points is None:
        return gr.update(visible=False)
    return gr.update(value=pd.DataFrame(points, columns=["step", "value", "series"]), visible=True)


def stop_message(sent: dict, run: str | None, running_pid: int | None):
    """A stop's confirmation stays while its run is shown and no later process writes to it."""
    if not sent or sent.get("run") != run or running_pid not in (None, sent.get("pid")):
        return ""
    return sent.get("text", "")


def on_page_load(page: gr.Blocks, root: Path, tab: MonitorTab) -> None:
    """Every run as the disk has it now, and the running one opened, unless a run was picked meanwhile: the
    choice is made in the browser once the server's answer is there, so an answer slower than the user's pick
    (a busy machine) never overwrites it."""
    def opening():
        runs = runs_newest_first(root)
        return gr.update(choices=runs), M.runs_html(root, runs), opened_run(root, runs, None) or ""

    page.load(opening, None, [tab.run_choice, tab.runs_table, tab.suggested], show_progress="hidden").then(
        None, [tab.suggested, tab.run_choice], tab.run_choice, js="(suggested, chosen) => chosen || suggested || null")


def show_started(root: Path, run: str):
    """After Start: the started run chosen in the list."""
    if not run:
        return gr.update()
    runs = runs_newest_first(root)
    return gr.update(choices=runs if run in runs else [run, *runs], value=run)
