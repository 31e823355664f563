"""The Export tab: `lmtune export` of a run, checkpoint or model folder into a standalone Hugging Face
folder (a LoRA adapter merged into its base model's weights), in a chosen dtype, with a GGUF file if asked."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path

import gradio as gr

from lmtune.errors import UserError
from lmtune.export import DTYPES
from lmtune.webui import commands as C
from lmtune.webui import form as F


def export(root: Path, source: str, out: str, dtype: str, gguf: bool, max_shard_size: str):
    """(status, the files written), the status counting the seconds while `lmtune export` runs."""
    try:
        args = C.export_args(root, source, out, dtype, gguf, max_shard_size)
    except UserError as error:
        yield f"**error**: {error}", ""
        return
    command = "lmtune " + " ".join(args)
    for step in C.run_lmtune(root, args):
        if isinstance(step, float):
            yield f"running `{command}` ({step:.0f} s)", gr.update()
        elif step.code != 0:
            yield f"**failed** `{command}`: {C.failure(step)}", ""
        else:
            yield f"done: `{command}`", C.files_markdown(root, out)


def build(root: Path) -> list[tuple[gr.Dropdown, Callable[[], list]]]:
    """The tab's components and handlers; call inside `gr.Tab`. Returns the source list with what it offers (read
    again by `app.keep_fresh`)."""
    gr.Markdown("A standalone Hugging Face model folder that transformers loads alone: a LoRA adapter is merged into "
                "its base model's weights, a full model is copied; this runs `lmtune export`.")
    with gr.Row():
        source = gr.Dropdown(F.chat_choices(root), label="run, checkpoint or model", scale=3,
                             allow_custom_value=True, elem_id="export-source")
        out = gr.Textbox(label="new folder (inside the working folder)", scale=3, elem_id="export-out")
    with gr.Row():
        dtype = gr.Radio(["auto", *DTYPES], value="auto", label="dtype (auto: the base model's)",
                         elem_id="export-dtype")
        max_shard_size = gr.Textbox("5GB", label="max_shard_size (largest safetensors file)", elem_id="export-shard")
        gguf = gr.Checkbox(label="also write model.gguf (Llama-family models, for llama.cpp)", elem_id="export-gguf")
        button = gr.Button("Export", variant="primary", elem_id="export-button")
    status = gr.Markdown(elem_id="export-status")
    files = gr.Markdown(elem_id="export-files")

    source.change(lambda chosen: C.export_folder_for(chosen), source, out, show_progress="hidden")
    button.click(partial(export, root), [source, out, dtype, gguf, max_shard_size],
                 [status, files])
    return [(source, partial(F.chat_choices, root))]
