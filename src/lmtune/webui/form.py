"""The Train form as plain data: form values -> the YAML config it runs, and the files it may pick.

No gradio here. Every path typed or picked in the browser is resolved inside the working folder
(symlinks followed) and written relative to it; anything outside is refused. The form offers no
key that runs code (`callbacks`, `trust_remote_code`), and the only command it starts is
`lmtune train` on the YAML written here.
"""

from __future__ import annotations

import json
import re
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from lmtune.checkpoint import PREFIX, CheckpointIndex, is_complete_checkpoint
from lmtune.config import BUILTIN_MODEL, TrainConfig, build_config, load_config, parse_override, read_yaml
from lmtune.data.registry import FILE_LOADERS
from lmtune.errors import UserError

# The config keys the form shows, in the order of SPEC section 2.
FORM_KEYS = [
    "model_name_or_path", "template",
    "stage", "finetuning_type", "lora_rank", "lora_alpha", "lora_dropout", "lora_target", "freeze_trainable_layers",
    "pref_beta", "pref_loss", "pref_ftx", "simpo_gamma", "precompute_ref_log_probs", "kto_chosen_weight",
    "kto_rejected_weight",
    "reward_funcs", "reward_weights", "num_generations", "max_prompt_length", "max_completion_length", "temperature",
    "top_p", "top_k", "beta", "loss_type", "epsilon", "epsilon_high", "scale_rewards", "num_iterations",
    "mask_truncated_completions", "reward_answer_column", "reward_format_regex", "reward_max_words",
    "dataset", "dataset_dir", "cutoff_len", "max_samples", "val_size", "packing",
    "learning_rate", "num_train_epochs", "max_steps", "per_device_train_batch_size", "gradient_accumulation_steps",
    "lr_scheduler_type", "warmup_steps", "weight_decay", "max_grad_norm", "seed", "bf16",
    "save_steps", "save_epochs", "saves_per_epoch", "save_minutes", "save_total_limit", "metric_for_best_model",
    "save_on_eval", "save_only_model",
    "eval_steps", "eval_epochs", "evals_per_epoch", "eval_minutes", "per_device_eval_batch_size",
    "output_dir", "resume_from_checkpoint", "resume_lr", "overwrite_output_dir",
    "logging_steps", "report_to", "plot_loss",
]
STAGES = typing.get_args(TrainConfig.model_fields["stage"].annotation)
# Keys that only some stages read: each shown, and written to the YAML, only for those stages.
STAGE_KEYS = {"dpo": ("pref_beta", "pref_loss", "pref_ftx", "simpo_gamma", "precompute_ref_log_probs"),
              "kto": ("pref_beta", "pref_ftx", "precompute_ref_log_probs", "kto_chosen_weight", "kto_rejected_weight"),
              "grpo": ("reward_funcs", "reward_weights", "num_generations", "max_prompt_length",
                       "max_completion_length", "temperature", "top_p", "top_k", "beta", "loss_type", "epsilon",
                       "epsilon_high", "scale_rewards", "num_iterations", "mask_truncated_completions",
                       "reward_answer_column", "reward_format_regex", "reward_max_words")}
STAGE_ONLY_KEYS = tuple(dict.fromkeys(key for keys in STAGE_KEYS.values() for key in keys))
# Keys whose field is a comma separated list of numbers.
LIST_KEYS = ("reward_weights",)
# Keys whose values are paths or names checked against the working folder, not read as YAML.
PATH_KEYS = ("model_name_or_path", "dataset", "dataset_dir", "output_dir", "resume_from_checkpoint")
# Keys that run code: the web UI neither offers them nor keeps them from a loaded file (of reward_funcs it
# offers the built-ins alone).
CODE_KEYS = ("callbacks", "trust_remote_code")
RESUME_AUTO = "auto"
RESUME_FRESH = "fresh"
PACKING_CHOICES = {"auto": None, "on": True, "off": False}
SKIPPED_DIRS = {".git", ".venv", "venv", "node_modules", "__pycache__", ".cache"}
CHECKPOINT_NAME = re.compile(rf"^{PREFIX}\d+$")


def _keys_typed(accept) -> set[str]:
    keys = set()
    for name, field in TrainConfig.model_fields.items():
        annotation = field.annotation
        parts = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else (annotation,)
        if accept(set(parts)):
            keys.add(name)
    return keys


NUMBER_KEYS = _keys_typed(lambda parts: bool(parts & {int, float}) and str not in parts)


def default_form() -> dict[str, Any]:
    """The form as it first appears: the config's defaults, packing and resume as the form shows them."""
    defaults = TrainConfig().model_dump()
    form = {key: defaults[key] for key in FORM_KEYS}
    form = {key: shown(key, value) for key, value in form.items()}
    form.update(dataset=[], output_dir="out/run", resume_from_checkpoint=RESUME_AUTO, packing="auto",
                metric_for_best_model="", reward_funcs=[])
    return form


# --- paths --------------------------------------------------------------------------------------


def inside(root: Path, text: str | Path, what: str) -> Path:
    """`text` as an absolute path inside `root`, or a UserError that names the form field."""
    if text is None or not str(text).strip():
        raise UserError(f"{what} is empty")
    root = Path(root).resolve()
    path = Path(str(text).strip())
    full = (path if path.is_absolute() else root / path).resolve()
    if full != root and root not in full.parents:
        raise UserError(f"{what} '{text}' is outside the working folder {root}; the web UI only uses files inside it")
    return full


def relative(root: Path, full: Path) -> str:
    return full.relative_to(Path(root).resolve()).as_posix() or "."


def _sandboxed_model(root: Path, value: str) -> str:
    value = (value or "").strip()
    if value == BUILTIN_MODEL:
        return value
    full = inside(root, value, "model_name_or_path")
    if not full.exists():
        raise UserError(f"model_name_or_path '{value}' does not exist in the working folder")
    return relative(root, full)


def _sandboxed_datasets(root: Path, names: list[str] | str | None, dataset_dir: Path) -> str | list[str]:
    if isinstance(names, str):
        names = [part.strip() for part in names.split(",")]
    names = [name.strip() for name in names or [] if name and name.strip()]
    if not dataset_dir.is_dir() and not all(inside(root, name, "dataset").is_file() for name in names or ["?"]):
        raise UserError(f"dataset_dir: there is no folder {relative(root, dataset_dir)} in the working folder "
                        f"{root} (it holds dataset_info.json and the data files); create it or name another")
    if not names:
        raise UserError("dataset: pick at least one data set (a name from dataset_info.json or a data file)")
    registry = dataset_registry(dataset_dir)
    chosen = []
    for name in names:
        if name in registry:
            chosen.append(name)
            continue
        as_given = inside(root, name, "dataset")
        if as_given.exists():
            chosen.append(relative(root, as_given))
            continue
        in_dir = inside(root, dataset_dir / name, "dataset")
        if not in_dir.exists():
            raise UserError(f"dataset '{name}' is neither a name in {relative(root, dataset_dir)}/dataset_info.json "
                            "nor a file in the working folder")
        chosen.append(name)
    return chosen[0] if len(chosen) == 1 else chosen


def _sandboxed_resume(root: Path, choice: Any, output_dir: Path) -> str | bool:
    if choice in (None, "", RESUME_AUTO, True):
        return RESUME_AUTO
    if choice in (RESUME_FRESH, False, "false"):
        return False
    name = Path(str(choice)).name
    if not CHECKPOINT_NAME.match(name):
        raise UserError(f"resume_from_checkpoint: '{choice}' is not a checkpoint-<step> folder of the run")
    # a picked name is one of output_dir's checkpoints; a typed path is taken as the CLI takes it
    folder = inside(root, choice if "/" in str(choice) else output_dir / name, "resume_from_checkpoint")
    if not is_complete_checkpoint(folder):
        raise UserError(f"resume_from_checkpoint: {relative(root, folder)} is not a complete checkpoint")
    return relative(root, folder)


# --- form -> config -----------------------------------------------------------------------------


def _parsed(key: str, value: Any) -> Any:
    """A field's text read as `lmtune train ... key=value` reads it (YAML: numbers, true/false, null);
    an empty field is unset, which only a key whose default is null may be."""
    if isinstance(value, str):
        value = value.strip()
        if value == "":
            value = None
        elif key in NUMBER_KEYS:
            value = parse_override(f"{key}={value}")[1]
        elif key in LIST_KEYS:
            value = parse_override(f"{key}=[{value.strip('[]')}]")[1]
    if value is None and TrainConfig.model_fields[key].default is not None:
        raise UserError(f"{key} is empty: give a value (the default is "
                        f"{TrainConfig.model_fields[key].default!r})")
    return value


def form_to_values(root: Path, form: dict[str, Any], extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The YAML mapping for the form: paths made relative to (and kept inside) the working folder, unset
    fields left out, every value checked by the config model as `lmtune train` checks it, and written as
    that model reads it. `extra`: keys of a loaded config file that the form does not show, kept as they
    were."""
    root = Path(root).resolve()
    unknown = set(form) - set(FORM_KEYS)
    if unknown:
        raise UserError(f"the form has no field {', '.join(sorted(unknown))}")
    values: dict[str, Any] = dict(extra or {})
    for key in FORM_KEYS:
        if key not in form or key in PATH_KEYS or (key in STAGE_ONLY_KEYS
                                                   and key not in STAGE_KEYS.get(form.get("stage"), ())):
            continue
        value = PACKING_CHOICES.get(form[key], form[key]) if key == "packing" else form[key]
        value = _parsed(key, value)
        if value is not None:
            values[key] = value
    values["model_name_or_path"] = _sandboxed_model(root, form.get("model_name_or_path", BUILTIN_MODEL))
    dataset_dir = inside(root, form.get("dataset_dir") or "data", "dataset_dir")
    values["dataset_dir"] = relative(root, dataset_dir)
    values["dataset"] = _sandboxed_datasets(root, form.get("dataset"), dataset_dir)
    output_dir = inside(root, form.get("output_dir") or "", "output_dir")
    if output_dir == root:
        raise UserError("output_dir: choose a folder inside the working folder, not the working folder itself")
    values["output_dir"] = relative(root, output_dir)
    values["resume_from_checkpoint"] = _sandboxed_resume(root, form.get("resume_from_checkpoint"), output_dir)
    _refuse_reward_files(values.get("reward_funcs", []))
    checked = build_config(values, "web form").to_yaml_dict()
    shown = {key: _as_read(values[key], checked[key]) for key in FORM_KEYS if key in values}
    return {**shown, **(extra or {})}


def _refuse_reward_files(names: list[str]) -> None:
    from lmtune.rewards import BUILT_INS

    for name in names:
        if name not in BUILT_INS:
            raise UserError(f"reward_funcs: '{name}' is code from a file, which the web UI does not run; pick the "
                            f"built-ins ({', '.join(BUILT_INS)}) or run the config with `lmtune train FILE`")


def _as_read(given: Any, checked: Any) -> Any:
    """The value as the config model reads it (10.0 steps is 10), but a number the user wrote as a whole
    number stays one (warmup_steps 10, not 10.0)."""
    if isinstance(given, int) and not isinstance(given, bool) and checked == given:
        return given
    return checked


def field_errors(message: str) -> dict[str, str]:
    """The form fields an error message is about (each line of it that starts with a key), so that the
    form can show each line at its field."""
    found: dict[str, str] = {}
    for line in message.splitlines():
        text = line.removeprefix("web form: ").strip()
        key = re.match(r"\w+", text)
        if key and key.group() in FORM_KEYS:
            found.setdefault(key.group(), text)
    return found


def form_to_config(root: Path, form: dict[str, Any],
                   extra: dict[str, Any] | None = None) -> tuple[dict[str, Any], TrainConfig]:
    values = form_to_values(root, form, extra)
    return values, build_config(values, "web form")


def yaml_to_form(root: Path, path: Path) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
    """A config file (inside the working folder), read as `lmtune plan FILE` reads it, as form values;
    its keys that the form does not show (kept as they are when the form writes its config); and those
    of them that run code, which the web UI does not keep (`lmtune train FILE` runs them)."""
    full = inside(root, path, "config file")
    values = read_yaml(full)
    config = load_config(full)
    form = default_form()
    for key in FORM_KEYS:
        if key in values:
            form[key] = shown(key, getattr(config, key))
    form["dataset"] = config.datasets
    form["dataset_dir"] = _relative_if_inside(root, config.dataset_dir)
    form["packing"] = next(name for name, value in PACKING_CHOICES.items() if value == config.packing)
    form["metric_for_best_model"] = config.metric_for_best_model or ""
    if isinstance(config.lora_target, list):
        form["lora_target"] = ",".join(config.lora_target)
    if config.reward_weights is not None:
        form["reward_weights"] = ", ".join(f"{weight:g}" for weight in config.reward_weights)
    resume = config.resume_from_checkpoint
    form["resume_from_checkpoint"] = RESUME_FRESH if resume is False else resume
    extra = {key: value for key, value in values.items() if key not in FORM_KEYS}
    return form, {k: v for k, v in extra.items() if k not in CODE_KEYS}, [k for k in extra if k in CODE_KEYS]


def _relative_if_inside(root: Path, text: str) -> str:
    try:
        return relative(root, inside(root, text, "dataset_dir"))
    except UserError:
        return text  # shown as written: the form then says why it is refused


def shown(key: str, value: Any) -> Any:
    """A config value as its form field shows it: numbers are text (empty when unset)."""
    if key in NUMBER_KEYS:
        return "" if value is None else str(value)
    return value


HEADER = "# lmtune config written by the web UI; run it from the working folder with: lmtune train FILE\n"


def values_to_yaml(values: dict[str, Any]) -> str:
    return HEADER + yaml.safe_dump(values, sort_keys=False)


def config_file(root: Path, text: str) -> Path:
    path = inside(root, text, "config file")
    if path.suffix not in (".yaml", ".yml"):
        raise UserError(f"config file '{text}' should end in .yaml")
    return path


# --- what the pickers list ----------------------------------------------------------------------


def _walk(root: Path, depth: int = 4):
    """Folders under root, breadth first, skipping hidden ones, environments and checkpoints."""
    root = Path(root).resolve()
    level = [root]
    for _ in range(depth + 1):
        following = []
        for folder in level:
            yield folder
            try:
                children = sorted(p for p in folder.iterdir() if p.is_dir() and not p.is_symlink())
            except OSError:
                continue
            following += [c for c in children if not c.name.startswith(".") and c.name not in SKIPPED_DIRS
                          and not c.name.startswith(PREFIX)]
        level = following


RUN_FILES = ("run_config.yaml", "metrics.jsonl", "checkpoints.json", "train.log")


def is_run_folder(folder: Path) -> bool:
    """A folder a run wrote to, or that a start from the web UI logged to (one refused at once too)."""
    return any((Path(folder) / name).is_file() for name in RUN_FILES)


def model_choices(root: Path) -> list[tuple[str, str]]:
    """(label, value): the built-in model, HF model folders and .gguf files in the working folder."""
    root = Path(root).resolve()
    choices = [(f"{BUILTIN_MODEL} (built-in)", BUILTIN_MODEL)]
    for folder in _walk(root):
        if folder == root:
            continue
        if (folder / "config.json").is_file() and not is_run_folder(folder):
            choices.append((f"{relative(root, folder)} (folder)", relative(root, folder)))
        for gguf in sorted(folder.glob("*.gguf")):
            choices.append((f"{relative(root, gguf)} (GGUF)", relative(root, gguf)))
    for gguf in sorted(root.glob("*.gguf")):
        choices.append((f"{relative(root, gguf)} (GGUF)", relative(root, gguf)))
    return choices


def dataset_registry(dataset_dir: Path) -> dict[str, Any]:
    info = Path(dataset_dir) / "dataset_info.json"
    if not info.is_file():
        return {}
    try:
        data = json.loads(info.read_text())
    except (json.JSONDecodeError, OSError):
        return {}
    return data if isinstance(data, dict) else {}


def dataset_choices(root: Path, dataset_dir_text: str) -> list[tuple[str, str]]:
    """Names from dataset_info.json, then the data files of the data folder."""
    try:
        dataset_dir = inside(root, dataset_dir_text or "data", "dataset_dir")
    except UserError:
        return []
    registry = dataset_registry(dataset_dir)
    choices = [(f"{name} (dataset_info.json)", name) for name in registry]
    named_files = {entry.get("file_name") for entry in registry.values() if isinstance(entry, dict)}
    if dataset_dir.is_dir():
        for path in sorted(dataset_dir.rglob("*")):
            if (path.is_file() and path.suffix in FILE_LOADERS and not path.name.startswith(".")
                    and path.name != "dataset_info.json"):
                name = path.relative_to(dataset_dir).as_posix()
                if name not in named_files:
                    choices.append((f"{name} (file)", name))
    return choices


def run_choices(root: Path) -> list[str]:
    """Run folders (a run_config.yaml, metrics.jsonl, checkpoints.json or train.log) in the working folder."""
    root = Path(root).resolve()
    return [relative(root, folder) for folder in _walk(root) if folder != root and is_run_folder(folder)]


def checkpoint_entries(run_dir: Path) -> list[dict[str, Any]]:
    """The run's complete, kept checkpoints from checkpoints.json, newest first (as auto-resume sees them)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    index = CheckpointIndex.load(run_dir)
    by_path = {entry["path"]: entry for entry in index.entries}
    return [by_path[folder.name] for folder in index.complete_newest_first()]


def resume_choices(root: Path, output_dir_text: str) -> list[tuple[str, str]]:
    choices = [("newest complete checkpoint, if any (auto)", RESUME_AUTO),
               ("start fresh (resume_from_checkpoint: false)", RESUME_FRESH)]
    try:
        run_dir = inside(root, output_dir_text, "output_dir")
    except UserError:
        return choices
    for entry in checkpoint_entries(run_dir):
        metrics = entry.get("metrics") or {}
        loss = f", loss {metrics['loss']:.4f}" if isinstance(metrics.get("loss"), float) else ""
        epoch = f", epoch {entry['epoch']:g}" if entry.get("epoch") is not None else ""
        reasons = ",".join(entry.get("reasons", []))
        choices.append((f"{entry['path']} (step {entry['step']}{epoch}{loss}; {reasons})", entry["path"]))
    return choices


def chat_choices(root: Path) -> list[tuple[str, str]]:
    """What the Chat tab can load: runs' final models, their kept checkpoints, model folders, the built-in."""
    root = Path(root).resolve()
    choices = []
    for run in run_choices(root):
        folder = root / run
        if (folder / "adapter_config.json").is_file() or (folder / "config.json").is_file():
            choices.append((f"{run} (final model)", run))
        for entry in checkpoint_entries(folder):
            path = f"{run}/{entry['path']}"
            choices.append((f"{path} (checkpoint, step {entry['step']})", path))
    choices += [c for c in model_choices(root) if not c[1].endswith(".gguf")]
    return choices


def chat_target(root: Path, value: str) -> str:
    """A model, run or checkpoint to chat with: the built-in name or a folder inside the working folder."""
    if (value or "").strip() == BUILTIN_MODEL:
        return BUILTIN_MODEL
    folder = inside(root, value, "model")
    if not folder.is_dir():
        raise UserError(f"model '{value}' is not a folder in the working folder")
    return str(folder)


def parse_auth(text: str) -> tuple[str, str]:
    user, colon, password = (text or "").partition(":")
    if not colon or not user or not password:
        raise UserError("--auth takes user:password (for example --auth alice:s3cret)")
    return user, password
