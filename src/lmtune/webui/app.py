"""The gradio page: Train (form, live plan, YAML, Start / Stop, resume), Monitor, Chat."""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
from pathlib import Path
from typing import Any

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr  # noqa: E402

from lmtune.config import TrainConfig, keys_where  # noqa: E402
from lmtune.errors import UserError  # noqa: E402
from lmtune.webui import form as F  # noqa: E402
from lmtune.webui import monitor as M  # noqa: E402
from lmtune.webui.runner import Runner  # noqa: E402

log = logging.getLogger("lmtune")
LOOPBACK = ("127.0.0.1", "localhost", "::1")
CSS = """
.lmtune-checkpoints { border-collapse: collapse; width: 100%; font-size: 0.9em; }
.lmtune-checkpoints th, .lmtune-checkpoints td {
  border-bottom: 1px solid #e5e7eb; padding: 3px 8px; text-align: right;
}
.lmtune-checkpoints tr.ckpt-deleted td { color: #9ca3af; text-decoration: line-through; }
.lmtune-checkpoints tr.ckpt-incomplete td { color: #b45309; }
.lmtune-checkpoints tr.ckpt-hidden td { color: #6b7280; text-align: left; font-style: italic; }
#plan table { font-size: 0.9em; }
"""


class Planner:
    """`lmtune plan` for the form: the data set and checkpoint size are worked out once per data
    setting (as `plan_for_config` does), the schedule (`make_plan`) on every change."""

    def __init__(self) -> None:
        self._facts: dict[str, tuple[int | None, bool, dict[str, int | None]]] = {}
        self._lock = threading.Lock()

    def facts(self, config: TrainConfig) -> tuple[int | None, bool, dict[str, int | None]]:
        values = config.to_yaml_dict()  # the data set's size and a checkpoint's size depend on these alone
        settings = {k: values[k] for k in keys_where("data") + keys_where("checkpoint_size")}
        key = json.dumps([settings, _data_files_stamp(config)], sort_keys=True, default=str)
        with self._lock:
            if key not in self._facts:
                from lmtune.data import prepare_data
                from lmtune.models import load_tokenizer, resolve_model_path
                from lmtune.planning import estimate_sizes

                model_path = resolve_model_path(config.model_name_or_path)
                tokenizer = load_tokenizer(model_path, config.trust_remote_code)
                data = prepare_data(config, tokenizer)
                try:
                    rows = len(data.train)
                except TypeError:  # a stream without a known size
                    rows = None
                self._facts[key] = (rows, data.eval is not None, estimate_sizes(model_path, config))
            return self._facts[key]

    def plan(self, config: TrainConfig):
        from lmtune.schedule import make_plan

        rows, has_eval, sizes = self.facts(config)
        return make_plan(config, rows, 1, has_eval, **sizes), rows


def _data_files_stamp(config: TrainConfig, limit: int = 500) -> list:
    """Size and modification time of the data files, so that an edited data set is planned anew."""
    paths = [Path(name) for name in config.datasets if Path(name).is_file()]
    folder = Path(config.dataset_dir)
    if folder.is_dir():
        paths += [p for _, p in zip(range(limit), folder.rglob("*"), strict=False) if p.is_file()]
    stamp = []
    for path in paths:
        try:
            stat = path.stat()
        except OSError:
            continue
        stamp.append((str(path), stat.st_size, stat.st_mtime_ns))
    return stamp


def _steps_text(steps: list[int], head: int = 12, tail: int = 3) -> str:
    if len(steps) <= head + tail:
        return ", ".join(map(str, steps)) or "none"
    return ", ".join(map(str, steps[:head])) + ", ..., " + ", ".join(map(str, steps[-tail:]))


def plan_markdown(root: Path, planner: Planner, config: TrainConfig) -> str:
    from lmtune.planning import plan_summary_lines

    plan, rows = planner.plan(config)
    epochs = f"{plan.epochs:.2f} epochs" if plan.epochs is not None else "epochs unknown (stream)"
    lines = [f"**{plan.total_steps} optimizer steps**, {plan.steps_per_epoch or '?'} per epoch, {epochs}"
             + (f" ({rows} training rows)" if rows is not None else "")]
    saves = sorted(plan.save_steps)
    lines.append(f"**saves at steps** ({len(saves)}): {_steps_text(saves)}")
    evals = sorted(plan.eval_steps)
    lines.append(f"**evaluations at steps** ({len(evals)}): {_steps_text(evals)}" if evals else
                 "**no evaluation** (val_size is 0)")
    lines.append(f"**kept after rotation**: {_steps_text(plan.kept)}")
    lines += [f"- {line}" for line in plan_summary_lines(plan, config)]
    table = ["| step | epoch | save | eval | after rotation |", "|---:|---:|---|---|---|"]
    deleted = set(plan.deleted)
    shown = sorted(set(plan.save_steps) | set(plan.eval_steps))
    for step in shown[:10] + (shown[-4:] if len(shown) > 14 else shown[10:]):
        epoch = f"{step / plan.steps_per_epoch:.3f}" if plan.steps_per_epoch else "-"
        save = ",".join(plan.save_steps.get(step, []))
        fate = "" if not save else "deleted" if step in deleted else "kept"
        table.append(f"| {step} | {epoch} | {save} | {','.join(plan.eval_steps.get(step, []))} | {fate} |")
        if len(shown) > 14 and step == shown[9]:
            table.append("| ... | | | | |")
    lines.append("\n".join(table))
    lines.append(_output_dir_note(root, config))
    return "\n\n".join(line for line in lines if line)


def _output_dir_note(root: Path, config: TrainConfig) -> str:
    run_dir = root / config.output_dir
    holds_run = F.is_run_folder(run_dir) or any(run_dir.glob("checkpoint-*"))
    if not holds_run:
        return ""
    resume = config.resume_from_checkpoint
    if resume is False:
        if config.overwrite_output_dir:
            return f"**{config.output_dir} holds a run: overwrite_output_dir replaces it.**"
        return (f"**{config.output_dir} holds a run: starting fresh is refused.** Resume it, choose another "
                "output_dir, or tick overwrite_output_dir.")
    entries = F.checkpoint_entries(run_dir)
    if resume == F.RESUME_AUTO:
        return (f"resumes from {entries[0]['path']} (step {entries[0]['step']}), the newest complete checkpoint"
                if entries else "")
    return f"resumes from {resume}"


def resume_note(root: Path, form: dict[str, Any]) -> str:
    """What happens to the learning rate on resume: keep the checkpoint's, or apply the form's."""
    choice = form.get("resume_from_checkpoint")
    if choice == F.RESUME_FRESH:
        return "Starts at step 0 with the learning rate above."
    try:
        run_dir = F.inside(root, form.get("output_dir") or "", "output_dir")
    except UserError:
        return ""
    entries = F.checkpoint_entries(run_dir)
    entry = next((e for e in entries if e["path"] == choice), None) if choice != F.RESUME_AUTO else (
        entries[0] if entries else None)
    if entry is None:
        return "No checkpoint to resume from in this output_dir: the run starts at step 0."
    saved_lr = None
    state_file = run_dir / entry["path"] / "train_state.json"
    if state_file.is_file():
        saved_lr = (json.loads(state_file.read_text()).get("config") or {}).get("learning_rate")
    logged = [r for r in M.read_run(run_dir).train if r["step"] <= entry["step"] and "lr" in r]
    now = f" (last logged rate {M.lr_text(logged[-1]['lr'])})" if logged else ""
    new = form.get("learning_rate")
    return (
        f"Resuming from **{entry['path']}** (step {entry['step']}), trained with learning_rate "
        f"**{M.lr_text(saved_lr)}**{now}. The form's learning_rate is **{M.lr_text(new)}**.\n\n"
        f"- **keep**: the saved schedule goes on; the form's learning rate is not used.\n"
        f"- **config**: {M.lr_text(new)} (with the form's scheduler and warm-up) applies from step "
        f"{entry['step'] + 1} on; the optimizer's moments are kept."
    )


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


class ChatHolder:
    """One loaded model for the Chat tab."""

    def __init__(self) -> None:
        self.session = None
        self.name = ""
        self.lock = threading.Lock()

    def load(self, root: Path, value: str) -> str:
        from lmtune.chat import load_for_chat

        try:
            target = F.chat_target(root, value)
            with self.lock:
                self.session = load_for_chat(target)
                self.name = value
        except UserError as error:
            return f"**error**: {error}"
        return f"loaded **{value}**"

    def respond(self, message: str, history: list, max_new_tokens: float, temperature: float):
        from lmtune.chat import generate

        history = list(history or [])
        if not (message or "").strip():
            yield history, ""
            return
        if self.session is None:
            history += [{"role": "user", "content": message},
                        {"role": "assistant", "content": "Load a model, run or checkpoint first."}]
            yield history, ""
            return
        messages = [{"role": m["role"], "content": _text(m["content"])} for m in history]
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
            yield history, ""
        history[-1] = {"role": "assistant", "content": result.get("text", text).strip() or "(an empty answer)"}
        yield history, ""


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(part.get("text", "") if isinstance(part, dict) else str(part) for part in content)
    return str(content)


def _number(key: str, value: Any, **kwargs: Any) -> gr.Number | gr.Textbox:
    """A number field; one that may stay unset is a text box, empty when unset (gr.Number shows 0)."""
    info = TrainConfig.model_fields[key].description
    if TrainConfig.model_fields[key].default is None:
        return gr.Textbox("" if value is None else str(value), label=key, info=info, placeholder="unset", **kwargs)
    return gr.Number(value=value, label=key, info=info, **kwargs)


def _shown(key: str, value: Any) -> Any:
    """A config value as its form field shows it: optional numbers sit in text boxes."""
    if key in F.NUMBER_KEYS and TrainConfig.model_fields[key].default is None:
        return "" if value is None else str(value)
    return value


def _help(key: str) -> str:
    return TrainConfig.model_fields[key].description or ""


def build(root: Path) -> gr.Blocks:
    root = Path(root).resolve()
    runner, planner, chat = Runner(root), Planner(), ChatHolder()
    defaults = F.default_form()
    fields: dict[str, Any] = {}

    with gr.Blocks(title="lmtune") as page:
        gr.Markdown(f"## lmtune\nWorking folder `{root}`: models, data and runs are picked and written inside it.")
        with gr.Tabs() as tabs:
            with gr.Tab("Train", id="train"):
                with gr.Row():
                    with gr.Column(scale=3):
                        with gr.Accordion("Model and method", open=True):
                            with gr.Row():
                                fields["model_name_or_path"] = gr.Dropdown(
                                    F.model_choices(root), value=defaults["model_name_or_path"],
                                    label="model_name_or_path", info=_help("model_name_or_path"),
                                    allow_custom_value=True, scale=3, elem_id="model")
                                fields["template"] = gr.Textbox(label="template", info=_help("template"), scale=1)
                            with gr.Row():
                                fields["stage"] = gr.Radio(["sft", "pt"], value=defaults["stage"], label="stage",
                                                           info=_help("stage"))
                                fields["finetuning_type"] = gr.Radio(
                                    ["lora", "full", "freeze"], value=defaults["finetuning_type"],
                                    label="finetuning_type", info=_help("finetuning_type"), elem_id="finetuning-type")
                            with gr.Row():
                                fields["lora_rank"] = _number("lora_rank", defaults["lora_rank"])
                                fields["lora_alpha"] = _number("lora_alpha", defaults["lora_alpha"])
                                fields["lora_dropout"] = _number("lora_dropout", defaults["lora_dropout"])
                                fields["lora_target"] = gr.Textbox(defaults["lora_target"], label="lora_target",
                                                                   info=_help("lora_target"))
                                fields["freeze_trainable_layers"] = _number("freeze_trainable_layers",
                                                                            defaults["freeze_trainable_layers"])
                        with gr.Accordion("Data", open=True):
                            with gr.Row():
                                fields["dataset_dir"] = gr.Textbox(defaults["dataset_dir"], label="dataset_dir",
                                                                   info=_help("dataset_dir"), elem_id="dataset-dir")
                                fields["dataset"] = gr.Dropdown(
                                    F.dataset_choices(root, defaults["dataset_dir"]), value=[], multiselect=True,
                                    label="dataset", info=_help("dataset"), scale=2, elem_id="dataset")
                            with gr.Row():
                                fields["cutoff_len"] = _number("cutoff_len", defaults["cutoff_len"])
                                fields["max_samples"] = _number("max_samples", defaults["max_samples"])
                                fields["val_size"] = _number("val_size", defaults["val_size"], elem_id="val-size")
                                fields["packing"] = gr.Radio(list(F.PACKING_CHOICES), value="auto", label="packing",
                                                             info=_help("packing"))
                            preview_button = gr.Button("Preview processed examples", size="sm",
                                                       elem_id="preview-button")
                            preview = gr.Code(label="data preview (lmtune preview)", language=None, visible=False,
                              elem_id="preview")
                        with gr.Accordion("Optimisation", open=True):
                            with gr.Row():
                                fields["learning_rate"] = _number("learning_rate", defaults["learning_rate"],
                                                                  elem_id="learning-rate")
                                fields["num_train_epochs"] = _number("num_train_epochs", defaults["num_train_epochs"],
                                                                     elem_id="epochs")
                                fields["max_steps"] = _number("max_steps", defaults["max_steps"])
                                fields["per_device_train_batch_size"] = _number(
                                    "per_device_train_batch_size", defaults["per_device_train_batch_size"],
                                    elem_id="batch-size")
                                fields["gradient_accumulation_steps"] = _number(
                                    "gradient_accumulation_steps", defaults["gradient_accumulation_steps"])
                            with gr.Row():
                                fields["lr_scheduler_type"] = gr.Dropdown(
                                    list(TrainConfig.model_fields["lr_scheduler_type"].annotation.__args__),
                                    value=defaults["lr_scheduler_type"], label="lr_scheduler_type",
                                    info=_help("lr_scheduler_type"), elem_id="scheduler")
                                fields["warmup_steps"] = _number("warmup_steps", defaults["warmup_steps"])
                                fields["weight_decay"] = _number("weight_decay", defaults["weight_decay"])
                                fields["max_grad_norm"] = _number("max_grad_norm", defaults["max_grad_norm"])
                                fields["seed"] = _number("seed", defaults["seed"])
                                fields["bf16"] = gr.Checkbox(defaults["bf16"], label="bf16", info=_help("bf16"))
                        with gr.Accordion("Saving and evaluation", open=True):
                            gr.Markdown("Any number of save rules at once: a step named by several rules is saved "
                                        "once. Empty fields are unset. The plan beside the form updates as you type.")
                            with gr.Row():
                                fields["save_steps"] = _number("save_steps", None, elem_id="save-steps")
                                fields["save_epochs"] = _number("save_epochs", None, elem_id="save-epochs")
                                fields["saves_per_epoch"] = _number("saves_per_epoch", None,
                                                                    elem_id="saves-per-epoch")
                                fields["save_minutes"] = _number("save_minutes", None)
                            with gr.Row():
                                fields["save_total_limit"] = _number("save_total_limit", None,
                                                                     elem_id="save-total-limit")
                                fields["metric_for_best_model"] = gr.Dropdown(
                                    [("none", ""), ("eval_loss", "eval_loss"), ("loss", "loss")], value="",
                                    label="metric_for_best_model", info=_help("metric_for_best_model"))
                                fields["save_on_eval"] = gr.Checkbox(False, label="save_on_eval",
                                                                     info=_help("save_on_eval"))
                                fields["save_only_model"] = gr.Checkbox(False, label="save_only_model",
                                                                        info=_help("save_only_model"))
                            with gr.Row():
                                fields["eval_steps"] = _number("eval_steps", None)
                                fields["eval_epochs"] = _number("eval_epochs", None)
                                fields["evals_per_epoch"] = _number("evals_per_epoch", None,
                                                                    elem_id="evals-per-epoch")
                                fields["eval_minutes"] = _number("eval_minutes", None)
                                fields["per_device_eval_batch_size"] = _number(
                                    "per_device_eval_batch_size", defaults["per_device_eval_batch_size"])
                        with gr.Accordion("Output, logging and resume", open=True):
                            with gr.Row():
                                fields["output_dir"] = gr.Textbox(defaults["output_dir"], label="output_dir",
                                                                  info=_help("output_dir"), elem_id="output-dir")
                                fields["logging_steps"] = _number("logging_steps", defaults["logging_steps"],
                                                                  elem_id="logging-steps")
                                fields["report_to"] = gr.Radio(["tensorboard", "none"], value=defaults["report_to"],
                                                               label="report_to", elem_id="report-to")
                                fields["plot_loss"] = gr.Checkbox(defaults["plot_loss"], label="plot_loss",
                                                                  info=_help("plot_loss"))
                            with gr.Row():
                                fields["resume_from_checkpoint"] = gr.Dropdown(
                                    F.resume_choices(root, defaults["output_dir"]), value=F.RESUME_AUTO,
                                    label="resume_from_checkpoint", scale=3, elem_id="resume",
                                    info="the complete checkpoints of output_dir, from its checkpoints.json")
                                refresh_resume = gr.Button("Refresh checkpoints", size="sm", scale=1,
                                                           elem_id="refresh-resume")
                            fields["resume_lr"] = gr.Radio(
                                [("keep the checkpoint's learning rate schedule (resume_lr: keep)", "keep"),
                                 ("apply the learning rate set above from the resume step on (resume_lr: config)",
                                  "config")],
                                value=defaults["resume_lr"], label="learning rate on resume", elem_id="resume-lr")
                            resume_info = gr.Markdown(elem_id="resume-note")
                            fields["overwrite_output_dir"] = gr.Checkbox(
                                False, label="overwrite_output_dir", info=_help("overwrite_output_dir"))
                    with gr.Column(scale=2):
                        gr.Markdown("### Plan (`lmtune plan`)")
                        plan = gr.Markdown("Pick a model and a data set to see the plan.", elem_id="plan")
                        config_path = gr.Textbox("run.yaml", label="config file (in the working folder)",
                                                 elem_id="config-path")
                        with gr.Row():
                            load_button_yaml = gr.Button("Load YAML", elem_id="load-yaml")
                            save_button = gr.Button("Save YAML", elem_id="save-yaml")
                            start_button = gr.Button("Start", variant="primary", elem_id="start")
                            stop_button = gr.Button("Stop", variant="stop", elem_id="stop-train")
                        train_status = gr.Markdown(elem_id="train-status")
                        yaml_view = gr.Code(label="the YAML it will run", language="yaml", interactive=False,
                                            elem_id="yaml")
            with gr.Tab("Monitor", id="monitor"):
                with gr.Row():
                    run_choice = gr.Dropdown(F.run_choices(root), label="run folder", allow_custom_value=False,
                                             scale=3, elem_id="run-folder")
                    refresh_runs = gr.Button("Refresh list", size="sm", scale=1)
                    monitor_stop = gr.Button("Stop", variant="stop", scale=1, elem_id="stop-monitor")
                progress = gr.Markdown("Choose a run folder.", elem_id="progress")
                chart = gr.HTML(elem_id="loss-chart")
                with gr.Row():
                    with gr.Column(scale=3):
                        gr.Markdown("#### Checkpoints (checkpoints.json)")
                        checkpoints = gr.HTML(elem_id="checkpoints")
                    with gr.Column(scale=2):
                        gr.Markdown("#### Events")
                        events = gr.Markdown(elem_id="events")
                log_view = gr.Textbox(label="log (train.log)", lines=20, max_lines=20, interactive=False,
                                      autoscroll=True, elem_id="log-tail")
                timer = gr.Timer(1.0)
            with gr.Tab("Chat", id="chat"):
                with gr.Row():
                    chat_choice = gr.Dropdown(F.chat_choices(root), label="model, run or checkpoint", scale=3,
                                              elem_id="chat-target")
                    refresh_chat = gr.Button("Refresh list", size="sm", scale=1, elem_id="chat-refresh")
                    load_button = gr.Button("Load", variant="primary", scale=1, elem_id="chat-load")
                chat_status = gr.Markdown(elem_id="chat-status")
                with gr.Row():
                    max_new_tokens = gr.Slider(1, 1024, value=128, step=1, label="max_new_tokens")
                    temperature = gr.Slider(0, 2, value=0, step=0.05, label="temperature (0: greedy)")
                chatbot = gr.Chatbot(label="chat", height=380, elem_id="chatbot")
                with gr.Row():
                    message = gr.Textbox(placeholder="Ask something, then Enter", scale=5, show_label=False,
                                         elem_id="chat-input")
                    send = gr.Button("Send", scale=1, elem_id="chat-send")
                    clear = gr.Button("Clear", scale=1)

        inputs = [fields[key] for key in F.FORM_KEYS]

        def as_form(values: tuple) -> dict[str, Any]:
            return dict(zip(F.FORM_KEYS, values, strict=True))

        def refresh_plan(*values):
            form = as_form(values)
            note = resume_note(root, form)
            try:
                settings, config = F.form_to_config(root, form)
            except UserError as error:
                return f"**The form needs a fix**: {error}", "", note
            text = F.values_to_yaml(settings)
            try:
                return plan_markdown(root, planner, config), text, note
            except UserError as error:
                return f"**lmtune plan refuses this config**: {error}", text, note
            except Exception as error:  # a model or data set that cannot be read: say so in place of the plan
                log.warning("plan failed: %s", error)
                return f"**could not plan**: {type(error).__name__}: {error}", text, note

        for component in inputs:
            component.change(refresh_plan, inputs, [plan, yaml_view, resume_info], trigger_mode="always_last",
                             show_progress="hidden", concurrency_id="plan", concurrency_limit=1)

        def datasets_for(dataset_dir: str, chosen: list[str]):
            choices = F.dataset_choices(root, dataset_dir)
            values = {value for _, value in choices}
            return gr.update(choices=choices, value=[c for c in chosen or [] if c in values])

        fields["dataset_dir"].change(datasets_for, [fields["dataset_dir"], fields["dataset"]], fields["dataset"])

        def checkpoints_for(output_dir: str, chosen: str):
            choices = F.resume_choices(root, output_dir)
            values = {value for _, value in choices}
            return gr.update(choices=choices, value=chosen if chosen in values else F.RESUME_AUTO)

        resume_io = ([fields["output_dir"], fields["resume_from_checkpoint"]], fields["resume_from_checkpoint"])
        fields["output_dir"].change(checkpoints_for, *resume_io)
        refresh_resume.click(checkpoints_for, *resume_io)

        def write_config(path_text: str, values: tuple) -> tuple[Path, TrainConfig]:
            settings, config = F.form_to_config(root, as_form(values))
            path = F.config_file(root, path_text)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(F.values_to_yaml(settings))
            return path, config

        def save(path_text: str, *values):
            try:
                path, _ = write_config(path_text, values)
            except UserError as error:
                return f"**error**: {error}"
            name = F.relative(root, path)
            return f"saved `{name}`; run it from a terminal with `lmtune train {name}`"

        def start(path_text: str, *values):
            try:
                path, config = write_config(path_text, values)
                run_dir = root / config.output_dir
                process = runner.start(path, run_dir)
            except UserError as error:
                return f"**error**: {error}", gr.update(), gr.update()
            runs = F.run_choices(root)
            if config.output_dir not in runs:
                runs.append(config.output_dir)
            status = (f"started `lmtune train {F.relative(root, path)}` (pid {process.pid}); "
                      "watch it on the Monitor tab")
            return status, gr.update(choices=runs, value=config.output_dir), gr.Tabs(selected="monitor")

        save_button.click(save, [config_path, *inputs], train_status)

        def load_yaml(path_text: str):
            try:
                form, left_out = F.yaml_to_form(root, Path(path_text.strip() or "run.yaml"))
            except UserError as error:
                return [gr.update() for _ in inputs] + [f"**error**: {error}"]
            updates = [gr.update(value=_shown(key, form[key])) for key in F.FORM_KEYS]
            note = f"loaded `{path_text}`" + (
                f"; not shown in the form and not kept when saved from it: {', '.join(left_out)}" if left_out else "")
            return updates + [note]

        load_button_yaml.click(load_yaml, config_path, [*inputs, train_status])
        start_button.click(start, [config_path, *inputs], [train_status, run_choice, tabs])

        def stop_form_run(output_dir: str) -> str:
            try:
                return runner.stop(F.inside(root, output_dir, "output_dir"))
            except UserError as error:
                return f"**error**: {error}"

        stop_button.click(stop_form_run, fields["output_dir"], train_status)

        def show_preview(*values):
            try:
                _, config = F.form_to_config(root, as_form(values))
                return gr.update(value=preview_text(config), visible=True)
            except UserError as error:
                return gr.update(value=f"error: {error}", visible=True)

        preview_button.click(show_preview, inputs, preview)

        def watch(run: str | None):
            if not run:
                return "Choose a run folder (or start a run on the Train tab).", M.chart_html(
                    M.RunView(root, {})), "", "", ""
            try:
                run_dir = F.inside(root, run, "run folder")
            except UserError as error:
                return f"**error**: {error}", "", "", "", ""
            view = M.read_run(run_dir)
            return (M.progress_markdown(view, runner.status(run_dir)), M.chart_html(view),
                    M.checkpoints_html(run_dir), M.events_markdown(view), M.log_tail(run_dir, lines=20))

        monitor_outputs = [progress, chart, checkpoints, events, log_view]
        timer.tick(watch, run_choice, monitor_outputs, show_progress="hidden", concurrency_id="watch",
                   trigger_mode="always_last")
        run_choice.change(watch, run_choice, monitor_outputs, show_progress="hidden")
        refresh_runs.click(lambda chosen: gr.update(choices=F.run_choices(root), value=chosen), run_choice,
                           run_choice)

        def stop_watched(run: str | None) -> str:
            if not run:
                return "Choose a run folder."
            return runner.stop(F.inside(root, run, "run folder"))

        monitor_stop.click(stop_watched, run_choice, progress)

        refresh_chat.click(lambda: gr.update(choices=F.chat_choices(root)), None, chat_choice)
        load_button.click(lambda value: chat.load(root, value), chat_choice, chat_status)
        chat_inputs = [message, chatbot, max_new_tokens, temperature]
        message.submit(chat.respond, chat_inputs, [chatbot, message])
        send.click(chat.respond, chat_inputs, [chatbot, message])
        clear.click(lambda: [], None, chatbot)
        page.load(refresh_plan, inputs, [plan, yaml_view, resume_info])
    return page


def serve(root: Path, host: str, port: int, auth: tuple[str, str] | None) -> None:
    if host not in LOOPBACK and auth is None:
        log.warning("the web UI listens on %s without --auth: anyone who can reach this port can start runs", host)
    page = build(Path(root))
    theme = gr.themes.Default(font=["system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])
    page.queue(default_concurrency_limit=4).launch(
        server_name=host, server_port=port, auth=auth, ssr_mode=False, theme=theme, css=CSS, show_error=True,
        footer_links=[], inbrowser=False,
    )
