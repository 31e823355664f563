"""The Eval tab: `lmtune eval` on a run, with its final model or any checkpoint, on its eval split or
another data set; the report is shown as `lmtune eval` prints it and as a table."""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import partial
from pathlib import Path

import gradio as gr

from lmtune.errors import UserError
from lmtune.webui import commands as C
from lmtune.webui import form as F


def evaluate(root: Path, run: str, model: str, dataset: str):
    """(status, table, JSON report), the status counting the seconds while `lmtune eval` runs."""
    try:
        args = C.eval_args(root, run, model, dataset)
    except UserError as error:
        yield f"**error**: {error}", "", ""
        return
    command = "lmtune " + " ".join(args)
    for step in C.run_lmtune(root, args):
        if isinstance(step, float):
            yield f"running `{command}` ({step:.0f} s)", gr.update(), gr.update()
            continue
        if step.code != 0:
            yield f"**failed** `{command}`: {C.failure(step)}", "", ""
            return
        report = C.eval_report(step)
        yield f"done: `{command}`", C.report_markdown(report), json.dumps(report, indent=1)


def build(root: Path) -> list[tuple[gr.Dropdown, Callable[[], list]]]:
    """The tab's components and handlers; call inside `gr.Tab`. Returns the run list with what it offers (read
    again by `app.keep_fresh`)."""
    gr.Markdown("Loss and perplexity (preference runs: their reward metrics) of a run's model or any checkpoint, "
                "on the run's eval split or another data set, measured as in training: this runs `lmtune eval`.")
    with gr.Row():
        run = gr.Dropdown(F.run_choices(root), label="run (its config: data, template, stage)", scale=2,
                          allow_custom_value=True, elem_id="eval-run")
        model = gr.Dropdown(C.eval_model_choices(root, ""), value=C.RUN_MODEL, label="model", scale=2,
                            allow_custom_value=True, elem_id="eval-model")
        dataset = gr.Dropdown(C.eval_dataset_choices(root, ""), value=C.EVAL_SPLIT, label="data", scale=2,
                              allow_custom_value=True, elem_id="eval-dataset")
        button = gr.Button("Evaluate", variant="primary", scale=1, elem_id="eval-button")
    status = gr.Markdown(elem_id="eval-status")
    table = gr.Markdown(elem_id="eval-table")
    report = gr.Code(language="json", label="report (lmtune eval)", elem_id="eval-report")

    def follow_run(chosen: str):
        return (gr.update(choices=C.eval_model_choices(root, chosen), value=C.RUN_MODEL),
                gr.update(choices=C.eval_dataset_choices(root, chosen), value=C.EVAL_SPLIT))

    run.change(follow_run, run, [model, dataset], show_progress="hidden")
    button.click(partial(evaluate, root), [run, model, dataset],
                 [status, table, report])
    return [(run, partial(F.run_choices, root))]
