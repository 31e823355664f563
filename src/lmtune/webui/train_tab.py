"""The Train tab: the form (a view of one config), its live plan and resume note, Load / Save YAML,
Start and Stop.

The plan is `lmtune plan`'s (`plan_for_config`), the resume note is read from the checkpoint's saved
state as `lmtune train` reads it, and both are worked out again whenever the run folder changes.
The web UI serves the folder it is started in, so the config's relative paths mean what they mean
to `lmtune plan` and `lmtune train` run there.
"""

from __future__ import annotations

import itertools
import json
import logging
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr

from lmtune.config import TrainConfig
from lmtune.errors import UserError
from lmtune.webui import form as F
from lmtune.webui import monitor as M
from lmtune.webui.runner import Runner

log = logging.getLogger("lmtune")
UI_CONFIG = "webui_config.yaml"  # what Start writes into the run folder and runs
FOLDER_POLL_S = 2.0
PLANNING = "*planning the config just put in the form...*"  # the plan of the form before it is gone


# --- plan and resume note (no gradio) -------------------------------------------------------------


def steps_text(steps: list[int], head: int = 12, tail: int = 3) -> str:
    if len(steps) <= head + tail:
        return ", ".join(map(str, steps)) or "none"
    return ", ".join(map(str, steps[:head])) + ", ..., " + ", ".join(map(str, steps[-tail:]))


def plan_markdown(config: TrainConfig, plan) -> str:
    """`lmtune plan`'s figures, lines and table, as Markdown."""
    from lmtune.planning import plan_summary_lines

    epochs = f"{plan.epochs:.2f} epochs" if plan.epochs is not None else "epochs unknown (stream)"
    lines = [f"**{plan.total_steps} optimizer steps**, {plan.steps_per_epoch or '?'} per epoch, {epochs}"]
    saves = sorted(plan.save_steps)
    lines.append(f"**saves at steps** ({len(saves)}): {steps_text(saves)}")
    evals = sorted(plan.eval_steps)
    lines.append(f"**evaluations at steps** ({len(evals)}): {steps_text(evals)}" if evals else
                 "**no evaluation** (val_size is 0)")
    lines.append(f"**kept after rotation**: {steps_text(plan.kept)}")
    lines += [f"- {line}" for line in plan_summary_lines(plan, config)]
    lines.append(plan_table(plan))
    lines.append(fresh_start_note(config))
    return "\n\n".join(line for line in lines if line)


def plan_table(plan, head: int = 10, tail: int = 4) -> str:
    table = ["| step | epoch | save | eval | after rotation |", "|---:|---:|---|---|---|"]
    deleted = set(plan.deleted)
    shown = sorted(set(plan.save_steps) | set(plan.eval_steps))
    cut = len(shown) > head + tail
    for step in (shown[:head] + shown[-tail:]) if cut else shown:
        epoch = f"{step / plan.steps_per_epoch:.3f}" if plan.steps_per_epoch else "-"
        save = ",".join(plan.save_steps.get(step, []))
        fate = "" if not save else "deleted" if step in deleted else "kept"
        table.append(f"| {step} | {epoch} | {save} | {','.join(plan.eval_steps.get(step, []))} | {fate} |")
        if cut and step == shown[head - 1]:
            table.append("| ... | | | | |")
    return "\n".join(table)


def fresh_start_note(config: TrainConfig) -> str:
    """What a fresh start (resume_from_checkpoint: false) does to a folder that holds a run."""
    from lmtune.engine import RUN_FILES

    run_dir = Path(config.output_dir)
    holds_run = any((run_dir / name).exists() for name in RUN_FILES) or any(run_dir.glob("checkpoint-*"))
    if config.resume_from_checkpoint is not False or not holds_run:
        return ""
    if config.overwrite_output_dir:
        return f"**{config.output_dir} holds a run: overwrite_output_dir replaces it.**"
    return (f"**{config.output_dir} holds a run: starting fresh is refused.** Resume it, choose another output_dir, "
            "or tick overwrite_output_dir.")


def resume_note(config: TrainConfig, total_steps: int | None) -> str:
    """Where a start resumes (the checkpoint `lmtune train` would take), the learning rate in effect there,
    and the one that applies from there on with resume_lr keep and with config."""
    from lmtune.lr_schedule import describe, lr_at, resume_lr_lines
    from lmtune.resume import find_resume_point

    if config.resume_from_checkpoint is False:
        return f"Starts at step 0 (resume_from_checkpoint: false) with learning_rate {config.learning_rate:g}."
    try:
        point = find_resume_point(config, Path(config.output_dir))
    except UserError as error:
        return f"**cannot resume**: {error}"
    if point is None:
        return (f"No checkpoint to resume from in {config.output_dir}: the run starts at step 0 with learning_rate "
                f"{config.learning_rate:g}.")
    saved = point.state.schedule
    lines = [f"Resuming from **{point.path}** (step {point.step}): the learning rate in effect there is "
             f"**{lr_at(saved, point.step):.3g}** (the saved schedule: {describe(saved)})."]
    if total_steps is None:
        return lines[0]
    if point.step >= total_steps:
        return lines[0] + f"\n\nThe run is complete at step {point.step}: raise max_steps or num_train_epochs to go on."
    for choice in ("keep", "config"):
        chosen = " (chosen)" if config.resume_lr == choice else ""
        option = config.model_copy(update={"resume_lr": choice})
        lines.append(f"- **{choice}**{chosen}: " + "; ".join(resume_lr_lines(saved, option, point.step, total_steps)))
    return "\n\n".join(lines[:1]) + "\n\n" + "\n".join(lines[1:])


def folder_stamp(root: Path, output_dir: str) -> str:
    """What changes in a run folder when it saves, rotates, starts or stops."""
    try:
        run_dir = F.inside(root, output_dir, "output_dir")
    except UserError:
        return ""
    files = [run_dir / name for name in ("checkpoints.json", "train.pid", "run_config.yaml")]
    files += sorted(run_dir.glob("checkpoint-*"))
    return json.dumps([(p.name, p.stat().st_mtime_ns) for p in files if p.exists()])


def start_file(run_dir: Path, text: str, loaded: Path | None) -> Path:
    """The file Start runs: <run_dir>/webui_config.yaml, written with `text`, unless that file is the one loaded
    into the form or is not the web UI's own (edited, or written by hand): then webui_config-2.yaml, -3, ...
    A file that already holds `text` is run as it is. A file Start did not write is never rewritten."""
    for number in itertools.count(1):
        path = run_dir / (UI_CONFIG if number == 1 else UI_CONFIG.replace(".yaml", f"-{number}.yaml"))
        if path.is_file() and path.read_text() == text:
            return path
        if not path.exists() or (path.read_text().startswith(F.HEADER) and path != loaded):
            path.write_text(text)
            return path
    raise AssertionError("unreachable")


def attached_config(root: Path, run_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The form and the kept keys of the config a running run was started with: the file its newest start
    from the web UI ran, else its run_config.yaml (keys at their defaults left out)."""
    path = M.launched_config(run_dir)
    form, extra, _ = F.yaml_to_form(root, path if path is not None and (root / path).is_file()
                                    else run_dir / "run_config.yaml")
    defaults = TrainConfig().model_dump()
    return form, {key: value for key, value in extra.items() if value != defaults.get(key)}


def markdown_text(text: Any) -> str:
    """Text shown as Markdown as it is: `checkpoint-<step>` is not an HTML tag to drop."""
    return str(text).replace("&", "&amp;").replace("<", "&lt;")


def preview_text(config: TrainConfig, n: int = 3) -> str:
    """The first processed training examples and the data statistics, rendered as `lmtune preview` does."""
    from lmtune.data import prepare_data
    from lmtune.data.preview import preview_data, render_row, stats_lines
    from lmtune.models import load_tokenizer, resolve_model_path

    tokenizer = load_tokenizer(resolve_model_path(config.model_name_or_path), config.trust_remote_code)
    data = prepare_data(config, tokenizer)
    result = preview_data(config, data, tokenizer, n, "train")
    parts = [render_row(described, "train", result["rows"]).plain for described in result["examples"]]
    parts.append("statistics:\n" + "\n".join(stats_lines(result["stats"])))
    parts += [f"warning: {warning}" for warning in result["warnings"]]
    return "\n".join(parts)


# --- the tab --------------------------------------------------------------------------------------


def _help(key: str) -> str:
    return TrainConfig.model_fields[key].description or ""


def _text(key: str, value: Any, **kwargs: Any) -> gr.Textbox:
    """A number field is a text box: what is typed reaches the config model as typed (gr.Number would
    drop 'abc' in the browser and send nothing); empty means unset."""
    placeholder = "unset" if TrainConfig.model_fields[key].default is None else ""
    return gr.Textbox(F.shown(key, value), label=key, info=_help(key), placeholder=placeholder, **kwargs)


def _field(key: str, value: Any, **kwargs: Any):
    """The field a key's type asks for: a check box, a choice among its values, or a text box."""
    from lmtune.config import GRPO_LOSS_TYPES
    from lmtune.rewards import BUILT_INS

    annotation = TrainConfig.model_fields[key].annotation
    if key == "reward_funcs":  # the built-ins; a file's function is code, which the web UI does not run
        return gr.Dropdown(list(BUILT_INS), value=value, multiselect=True, allow_custom_value=True, label=key,
                           info=_help(key) + "; the web UI offers the built-ins", **kwargs)
    if key == "loss_type":
        return gr.Dropdown(list(GRPO_LOSS_TYPES), value=value, label=key, info=_help(key), **kwargs)
    if annotation is bool:
        return gr.Checkbox(value, label=key, info=_help(key), **kwargs)
    if typing.get_origin(annotation) is typing.Literal:
        return gr.Dropdown(list(typing.get_args(annotation)), value=value, label=key, info=_help(key), **kwargs)
    if key in F.NUMBER_KEYS or key in F.LIST_KEYS:
        return _text(key, value, **kwargs)
    return gr.Textbox(value, label=key, info=_help(key), **kwargs)


# The rows of keys that only some stages read (F.STAGE_KEYS): a row shows while its stage is chosen.
STAGE_ROWS = (
    ("pref_loss", "pref_beta", "pref_ftx", "simpo_gamma"),
    ("kto_chosen_weight", "kto_rejected_weight", "precompute_ref_log_probs"),
    ("reward_funcs", "reward_weights", "num_generations", "num_iterations"),
    ("max_prompt_length", "max_completion_length", "temperature", "top_p", "top_k"),
    ("loss_type", "scale_rewards", "beta", "epsilon", "epsilon_high"),
    ("mask_truncated_completions", "reward_answer_column", "reward_format_regex", "reward_max_words"),
)


def stage_visibility(stage: str) -> tuple[list[bool], dict[str, bool]]:
    """Which STAGE_ROWS show, and which of their keys, for `stage`."""
    keys = set(F.STAGE_KEYS.get(stage, ()))
    return [bool(keys & set(row)) for row in STAGE_ROWS], {key: key in keys for key in F.STAGE_ONLY_KEYS}


@dataclass
class TrainTab:
    fields: dict[str, Any]
    extra: gr.State  # keys of a loaded config file that the form does not show
    started: gr.State  # the output_dir of the run Start started (the Monitor opens it); "" when it did not
    start_event: Any
    components: dict[str, Any]


def build_form(root: Path) -> tuple[dict[str, Any], list[gr.Row]]:
    defaults = F.default_form()
    fields: dict[str, Any] = {}
    with gr.Accordion("Model and method", open=True):
        with gr.Row():
            fields["model_name_or_path"] = gr.Dropdown(
                F.model_choices(root), value=defaults["model_name_or_path"], label="model_name_or_path",
                info=_help("model_name_or_path"), allow_custom_value=True, scale=3, elem_id="model")
            fields["template"] = gr.Textbox(label="template", info=_help("template"), scale=1)
        with gr.Row():
            fields["stage"] = gr.Radio(list(F.STAGES), value=defaults["stage"], label="stage", info=_help("stage"),
                                       elem_id="stage")
            fields["finetuning_type"] = gr.Radio(["lora", "full", "freeze"], value=defaults["finetuning_type"],
                                                 label="finetuning_type", info=_help("finetuning_type"),
                                                 elem_id="finetuning-type")
        with gr.Row():
            for key in ("lora_rank", "lora_alpha", "lora_dropout"):
                fields[key] = _text(key, defaults[key])
            fields["lora_target"] = gr.Textbox(defaults["lora_target"], label="lora_target", info=_help("lora_target"),
                                               elem_id="lora-target")
            fields["freeze_trainable_layers"] = _text("freeze_trainable_layers", defaults["freeze_trainable_layers"])
        rows = []
        shown_rows, shown_keys = stage_visibility(defaults["stage"])
        for keys, visible in zip(STAGE_ROWS, shown_rows, strict=True):
            with gr.Row(visible=visible, elem_classes=["stage-keys"]) as row:
                for key in keys:
                    fields[key] = _field(key, defaults[key], visible=shown_keys[key], min_width=200,
                                         elem_id=key.replace("_", "-"))
            rows.append(row)
    with gr.Accordion("Data", open=True):
        with gr.Row():
            fields["dataset_dir"] = gr.Textbox(defaults["dataset_dir"], label="dataset_dir", info=_help("dataset_dir"),
                                               elem_id="dataset-dir")
            fields["dataset"] = gr.Dropdown(
                F.dataset_choices(root, defaults["dataset_dir"]), value=[], multiselect=True, allow_custom_value=True,
                label="dataset", info=_help("dataset") + " (type a name or a path and press Enter)", scale=2,
                elem_id="dataset")
        with gr.Row():
            fields["cutoff_len"] = _text("cutoff_len", defaults["cutoff_len"])
            fields["max_samples"] = _text("max_samples", defaults["max_samples"])
            fields["val_size"] = _text("val_size", defaults["val_size"], elem_id="val-size")
            fields["packing"] = gr.Radio(list(F.PACKING_CHOICES), value="auto", label="packing", info=_help("packing"))
    with gr.Accordion("Optimisation", open=True):
        with gr.Row():
            ids = {"learning_rate": "learning-rate", "num_train_epochs": "epochs", "per_device_train_batch_size":
                   "batch-size"}
            for key in ("learning_rate", "num_train_epochs", "max_steps", "per_device_train_batch_size",
                        "gradient_accumulation_steps"):
                fields[key] = _text(key, defaults[key], elem_id=ids.get(key, key.replace("_", "-")))
        with gr.Row():
            fields["lr_scheduler_type"] = gr.Dropdown(
                list(TrainConfig.model_fields["lr_scheduler_type"].annotation.__args__),
                value=defaults["lr_scheduler_type"], label="lr_scheduler_type", info=_help("lr_scheduler_type"),
                elem_id="scheduler")
            for key in ("warmup_steps", "weight_decay", "max_grad_norm", "seed"):
                fields[key] = _text(key, defaults[key])
            fields["bf16"] = gr.Checkbox(defaults["bf16"], label="bf16", info=_help("bf16"))
    with gr.Accordion("Saving and evaluation", open=True):
        gr.Markdown("Any number of save rules at once: a step named by several rules is saved once. Empty fields "
                    "are unset. The plan beside the form updates as you type.")
        with gr.Row():
            for key in ("save_steps", "save_epochs", "saves_per_epoch", "save_minutes"):
                fields[key] = _text(key, None, elem_id=key.replace("_", "-"))
        with gr.Row():
            fields["save_total_limit"] = _text("save_total_limit", None, elem_id="save-total-limit")
            fields["metric_for_best_model"] = gr.Dropdown(
                [("none", ""), ("eval_loss", "eval_loss"), ("loss", "loss"),
                 ("eval_rewards/accuracies (dpo)", "eval_rewards/accuracies"),
                 ("eval_rewards/margins (dpo, kto)", "eval_rewards/margins"),
                 ("eval_accuracy (rm)", "eval_accuracy"), ("reward (grpo)", "reward")], value="",
                label="metric_for_best_model", info=_help("metric_for_best_model"), elem_id="metric-for-best-model")
            fields["save_on_eval"] = gr.Checkbox(False, label="save_on_eval", info=_help("save_on_eval"))
            fields["save_only_model"] = gr.Checkbox(False, label="save_only_model", info=_help("save_only_model"))
        with gr.Row():
            for key in ("eval_steps", "eval_epochs", "evals_per_epoch", "eval_minutes"):
                fields[key] = _text(key, None, elem_id=key.replace("_", "-"))
            fields["per_device_eval_batch_size"] = _text("per_device_eval_batch_size",
                                                         defaults["per_device_eval_batch_size"])
    with gr.Accordion("Output, logging and resume", open=True):
        with gr.Row():
            fields["output_dir"] = gr.Textbox(defaults["output_dir"], label="output_dir", info=_help("output_dir"),
                                              elem_id="output-dir")
            fields["logging_steps"] = _text("logging_steps", defaults["logging_steps"], elem_id="logging-steps")
            fields["report_to"] = gr.Radio(["tensorboard", "none"], value=defaults["report_to"], label="report_to",
                                           elem_id="report-to")
            fields["plot_loss"] = gr.Checkbox(defaults["plot_loss"], label="plot_loss", info=_help("plot_loss"))
        fields["resume_from_checkpoint"] = gr.Dropdown(
            F.resume_choices(root, defaults["output_dir"]), value=F.RESUME_AUTO, label="resume_from_checkpoint",
            allow_custom_value=True, elem_id="resume",
            info="the complete, kept checkpoints of output_dir (re-read when the folder changes)")
        fields["resume_lr"] = gr.Radio(
            [("keep the checkpoint's learning rate schedule (resume_lr: keep)", "keep"),
             ("apply the learning rate set above from the resume step on (resume_lr: config)", "config")],
            value=defaults["resume_lr"], label="learning rate on resume", elem_id="resume-lr")
        fields["overwrite_output_dir"] = gr.Checkbox(False, label="overwrite_output_dir",
                                                     info=_help("overwrite_output_dir"))
    return fields, rows


def build(root: Path, runner: Runner) -> TrainTab:
    """The tab's components and handlers; call inside `gr.Tab`."""
    c: dict[str, Any] = {}
    with gr.Row(elem_id="train-actions", equal_height=True):  # first on the tab: Start needs no scrolling
        c["config_path"] = gr.Textbox("run.yaml", label="config file for Load YAML and Save YAML (in the working "
                                      f"folder); Start writes <output_dir>/{UI_CONFIG} instead", scale=3,
                                      elem_id="config-path")
        c["load"] = gr.Button("Load YAML", elem_id="load-yaml", scale=1, min_width=100)
        c["save"] = gr.Button("Save YAML", elem_id="save-yaml", scale=1, min_width=100)
        c["start"] = gr.Button("Start", variant="primary", elem_id="start", scale=1, min_width=100)
        c["stop"] = gr.Button("Stop", variant="stop", elem_id="stop-train", scale=1, min_width=100)
    c["status"] = gr.Markdown(elem_id="train-status")
    c["lock_note"] = gr.Markdown(elem_id="lock-note")
    with gr.Row():
        with gr.Column(scale=3):
            fields, stage_rows = build_form(root)
            c["resume_note"] = gr.Markdown(elem_id="resume-note")
            c["preview_button"] = gr.Button("Preview processed examples", size="sm", elem_id="preview-button")
            c["preview"] = gr.Code(label="data preview (lmtune preview)", language=None, visible=False,
                                   elem_id="preview")
        with gr.Column(scale=2):
            gr.Markdown("### Plan (`lmtune plan`)")
            c["plan"] = gr.Markdown("Pick a model and a data set to see the plan.", elem_id="plan")
            c["yaml"] = gr.Code(label="the YAML it will run", language="yaml", interactive=False, elem_id="yaml")
    extra, started, stamp = gr.State({}), gr.State(""), gr.State("")
    loaded = gr.State("")  # the file Load YAML read (Start never rewrites it)
    pending_save = gr.State("")  # a Save YAML over an existing file, waiting for its second click
    locked = gr.State(False)  # the form is read only: the run in its output_dir is running
    timer = gr.Timer(FOLDER_POLL_S)
    inputs = [fields[key] for key in F.FORM_KEYS]

    def as_form(values: tuple) -> dict[str, Any]:
        return dict(zip(F.FORM_KEYS, values, strict=True))

    labels = {key: fields[key].label for key in F.FORM_KEYS}

    def at_fields(message: str = "") -> list:
        """Each field's label, with the error about it (if any) after it."""
        errors = {key: text.removeprefix(key).lstrip(": ") for key, text in F.field_errors(message).items()}
        return [gr.update(label=f"{labels[key]} ⚠ {errors[key]}" if key in errors else labels[key])
                for key in F.FORM_KEYS]

    def refresh_plan(extra_keys: dict, *values):
        form = as_form(values)
        try:
            settings, config = F.form_to_config(root, form, extra_keys)
        except UserError as error:
            return [f"**The form needs a fix**: {markdown_text(error)}", "", "", *at_fields(str(error))]
        text = F.values_to_yaml(settings)
        from lmtune.planning import plan_for_config

        try:
            plan = plan_for_config(config)
        except UserError as error:
            return [f"**lmtune plan refuses this config**: {markdown_text(error)}", text, resume_note(config, None),
                    *at_fields(str(error))]
        except Exception as error:  # a model or data set that cannot be read: say so in place of the plan
            log.warning("plan failed: %s", error)
            return [f"**could not plan**: {type(error).__name__}: {markdown_text(error)}", text,
                    resume_note(config, None), *at_fields()]
        return [plan_markdown(config, plan), text, resume_note(config, plan.total_steps), *at_fields()]

    plan_outputs = [c["plan"], c["yaml"], c["resume_note"], *inputs]
    plan_io = dict(fn=refresh_plan, inputs=[extra, *inputs], outputs=plan_outputs, trigger_mode="always_last",
                   show_progress="hidden", concurrency_id="plan", concurrency_limit=1)
    # one listener for every field: a form filled at once (Load YAML, a reload during a run) plans once or twice,
    # with the values of the moment, rather than once a field with the values as they were when it changed
    gr.on([component.change for component in inputs], **plan_io)

    stage_outputs = [*stage_rows, *(fields[key] for key in F.STAGE_ONLY_KEYS)]

    def show_stage_keys(stage: str):
        shown_rows, shown_keys = stage_visibility(stage)
        return [gr.update(visible=v) for v in shown_rows] + [gr.update(visible=shown_keys[key])
                                                             for key in F.STAGE_ONLY_KEYS]

    fields["stage"].change(show_stage_keys, fields["stage"], stage_outputs, show_progress="hidden")

    def choices_for(dataset_dir: str, chosen: list[str] | None, output_dir: str):
        """The pick lists as the disk has them now. Their values are left alone: a value read when this was
        asked for may be older than one Load YAML has set since."""
        datasets = F.dataset_choices(root, dataset_dir)
        datasets += [(name, name) for name in chosen or [] if name not in {v for _, v in datasets}]
        return (gr.update(choices=F.model_choices(root)), gr.update(choices=datasets),
                gr.update(choices=F.resume_choices(root, output_dir)))

    choice_io = ([fields["dataset_dir"], fields["dataset"], fields["output_dir"]],
                 [fields["model_name_or_path"], fields["dataset"], fields["resume_from_checkpoint"]])
    lockable = [fields[key] for key in F.FORM_KEYS if key != "output_dir"] + [c["load"]]

    def lock_form(output_dir: str, was_locked: bool):
        """The form is read only while the run in its output_dir runs (another output_dir sets up a new run)."""
        try:
            pid = runner.pid(F.inside(root, output_dir, "output_dir"))
        except UserError:
            pid = None
        note = (f"**{markdown_text(output_dir)} is running (pid {pid})**: the form shows its config, read only while "
                "it runs. Stop stops it; type another output_dir to set up another run.") if pid else ""
        if (pid is not None) == was_locked:
            return [note, was_locked] + [gr.update() for _ in lockable]
        return [note, pid is not None] + [gr.update(interactive=pid is None) for _ in lockable]

    lock_io = dict(fn=lock_form, inputs=[fields["output_dir"], locked], outputs=[c["lock_note"], locked, *lockable],
                   show_progress="hidden")
    fields["dataset_dir"].change(choices_for, *choice_io, show_progress="hidden")
    fields["output_dir"].change(choices_for, *choice_io, show_progress="hidden").then(**lock_io)

    def watch_folder(output_dir: str, last: str):
        now = folder_stamp(root, output_dir)
        return gr.update() if now == last else now

    timer.tick(watch_folder, [fields["output_dir"], stamp], stamp, show_progress="hidden")
    stamp.change(choices_for, *choice_io, show_progress="hidden").then(**lock_io).then(**plan_io)

    def load_yaml(path_text: str):
        try:
            full = F.inside(root, path_text.strip() or "run.yaml", "config file")
            form, extra_keys, not_kept = F.yaml_to_form(root, full)
        except UserError as error:
            return [gr.update() for _ in inputs] + [gr.update(), gr.update(), f"**error**: {markdown_text(error)}",
                                                    gr.update()]
        note = f"loaded `{path_text}`" + (
            f"; kept as in the file, not shown in the form: {', '.join(extra_keys)}" if extra_keys else "") + (
            f"; **not kept**: {', '.join(not_kept)} (the web UI runs no code a config names; run the file with "
            "`lmtune train` to use them)" if not_kept else "")
        return form_updates(form) + [extra_keys, str(full), note, PLANNING]

    def form_updates(form: dict[str, Any]) -> list:
        updates = {key: gr.update(value=form[key]) for key in F.FORM_KEYS}
        names = F.dataset_choices(root, form["dataset_dir"])
        names += [(name, name) for name in form["dataset"] if name not in {v for _, v in names}]
        updates["dataset"] = gr.update(choices=names, value=form["dataset"])
        return [updates[key] for key in F.FORM_KEYS]

    c["load"].click(load_yaml, c["config_path"], [*inputs, extra, loaded, c["status"], c["plan"]]).then(**plan_io)

    def save(path_text: str, pending: str, extra_keys: dict, *values):
        try:
            settings, _ = F.form_to_config(root, as_form(values), extra_keys)
            path = F.config_file(root, path_text)
        except UserError as error:
            return f"**error**: {markdown_text(error)}", ""
        text, name = F.values_to_yaml(settings), F.relative(root, path)
        asked = f"{path}\n{text}"
        if path.is_file() and path.read_text() != text and pending != asked:
            return (f"**`{name}` exists**: Save YAML again to replace it with the form's config (its comments and "
                    "layout are not kept), or give another file name", asked)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return f"saved `{name}`; run it from a terminal with `lmtune train {name}`", ""

    c["save"].click(save, [c["config_path"], pending_save, extra, *inputs], [c["status"], pending_save])

    def start(extra_keys: dict, loaded_file: str, *values):
        """Write the form's config into the run folder (never over a file Start did not write) and run it."""
        try:
            settings, config = F.form_to_config(root, as_form(values), extra_keys)
            run_dir = root / config.output_dir
            runner.check_free(run_dir)
            run_dir.mkdir(parents=True, exist_ok=True)
            path = start_file(run_dir, F.values_to_yaml(settings), Path(loaded_file) if loaded_file else None)
            process = runner.start(path, run_dir)
        except UserError as error:
            return f"**error**: {markdown_text(error)}", ""
        status = (f"started `lmtune train {F.relative(root, path)}` (pid {process.pid}); watch it on the Monitor tab; "
                  "it keeps running if the browser or the web UI closes")
        return status, config.output_dir

    start_event = c["start"].click(start, [extra, loaded, *inputs], [c["status"], started])

    def stop(output_dir: str) -> str:
        try:
            return runner.stop(F.inside(root, output_dir, "output_dir"))
        except UserError as error:
            return f"**error**: {markdown_text(error)}"

    c["stop"].click(stop, fields["output_dir"], c["status"])

    def show_preview(extra_keys: dict, *values):
        try:
            _, config = F.form_to_config(root, as_form(values), extra_keys)
            return gr.update(value=preview_text(config), visible=True)
        except UserError as error:
            return gr.update(value=f"error: {error}", visible=True)

    c["preview_button"].click(show_preview, [extra, *inputs], c["preview"])

    def attach():
        """After a reload: the running run (the newest, if several), its config in the form."""
        for run in sorted(F.run_choices(root), key=lambda r: M.run_updated(root / r), reverse=True):
            if runner.pid(root / run) is None:
                continue
            try:
                form, extra_keys = attached_config(root, root / run)
            except UserError as error:
                log.warning("could not show the config of the running run %s: %s", run, error)
                continue
            return form_updates(form) + [extra_keys, PLANNING]
        return [gr.update() for _ in inputs] + [gr.update(), gr.update()]

    c["attach_io"] = dict(fn=attach, outputs=[*inputs, extra, c["plan"]], show_progress="hidden")
    c["plan_io"], c["choice_io"], c["choices_for"], c["lock_io"] = plan_io, choice_io, choices_for, lock_io
    return TrainTab(fields, extra, started, start_event, c)


def on_page_load(page: gr.Blocks, tab: TrainTab) -> None:
    """Pick lists from the disk as it is now; the running run's config, read only; then the plan."""
    c = tab.components
    page.load(c["choices_for"], *c["choice_io"], show_progress="hidden").then(**c["attach_io"]) \
        .then(**c["lock_io"]).then(**c["plan_io"])
