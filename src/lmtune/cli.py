"""The `lmtune` command: a thin layer over config, data, schedule, engine and checkpoint store."""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Annotated

import typer

from lmtune.errors import RunFailed, Stopped, UserError
from lmtune.phases import log_moment, pause_garbage_collection

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Fine-tune causal language models from one YAML file.")
model_app = typer.Typer(no_args_is_help=True, help="Models: import a GGUF file or the built-in model.")
app.add_typer(model_app, name="model")
log = logging.getLogger("lmtune")

Overrides = Annotated[list[str] | None, typer.Argument(help="key=value overrides of the config file")]
Quiet = Annotated[bool, typer.Option("-q", "--quiet", help="only warnings and errors")]
Verbose = Annotated[bool, typer.Option("-v", "--verbose", help="debug output")]


def setup_logging(level: str = "info", quiet: bool = False, verbose: bool = False) -> None:
    from rich.console import Console
    from rich.logging import RichHandler

    chosen = "warning" if quiet else "debug" if verbose else level
    rank = int(os.environ.get("RANK", "0"))
    if rank != 0 and chosen in ("info", "debug"):
        chosen = "warning"  # one process talks; the others only warn
    handler = RichHandler(console=Console(stderr=True), show_path=False, rich_tracebacks=False,
                          log_time_format="[%X]")
    logger = logging.getLogger("lmtune")
    logger.handlers[:] = [handler]
    logger.setLevel(chosen.upper())
    logger.propagate = False


def _load(config_path: Path | None, overrides: list[str] | None):
    from lmtune.config import load_config

    return load_config(config_path, overrides or [])


@app.command()
def train(
    config: Annotated[Path | None, typer.Argument(help="the run's YAML file")] = None,
    overrides: Overrides = None,
    help_config: Annotated[bool, typer.Option("--help-config", help="list every config key and exit")] = False,
    quiet: Quiet = False,
    verbose: Verbose = False,
) -> None:
    """Run (or auto-resume) a training run."""
    if help_config:
        _print_config_help()
        return
    if config is None:
        raise UserError("lmtune train needs a config file: lmtune train CONFIG.yaml [key=value ...]")
    _stop_on_signals()
    run_config = _load(config, overrides)
    setup_logging(run_config.log_level, quiet, verbose)
    for note in run_config.brought_key_notes:
        log.info("config: %s", note)
    from lmtune.engine import train as run_training

    out = run_training(run_config)
    log.info("done: %s", out)
    log_moment("done")
    _trained.append(out)


_trained: list[Path] = []  # the run this command finished, once it is done


def _exit_now() -> None:
    """The process's end once a run is done and everything it wrote is closed: without the interpreter's
    teardown (freeing every module and tensor, seconds for a model) that nothing needs. A command line's
    single process only: under torchrun the processes end as they always did."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _print_config_help() -> None:
    from rich.table import Table

    from lmtune.config import config_help_rows

    table = Table(title="lmtune config keys", show_lines=False)
    table.add_column("key", no_wrap=True)  # a key is typed as it is: never broken over two lines
    for column in ("type", "default", "help"):
        table.add_column(column, overflow="fold")
    for row in config_help_rows():
        table.add_row(*row)
    _table_console().print(table)


@app.command()
def plan(
    config: Annotated[Path, typer.Argument(help="the run's YAML file")],
    overrides: Overrides = None,
    as_json: Annotated[bool, typer.Option("--json", help="the plan as JSON")] = False,
    processes: Annotated[int, typer.Option("--processes", min=1,
                                           help="processes the run will have (torchrun --nproc_per_node x nodes)")] = 1,
) -> None:
    """Print the schedule of a run without training: steps, saves, evals, rotation, disk, memory."""
    from lmtune.planning import plan_for_config, render_plan

    run_config = _load(config, overrides)
    setup_logging("warning")
    if not as_json:
        for note in run_config.brought_key_notes:
            typer.echo(f"config: {note}")
    the_plan = plan_for_config(run_config, processes)
    if as_json:
        typer.echo(json.dumps({**the_plan.to_json(), "brought_keys": run_config.brought_key_notes}, indent=1))
    else:
        render_plan(the_plan, run_config)


@app.command()
def preview(
    config: Annotated[Path, typer.Argument(help="the run's YAML file")],
    overrides: Overrides = None,
    n: Annotated[int, typer.Option("-n", help="how many processed examples (rows) to show")] = 3,
    split: Annotated[str, typer.Option("--split", help="train or eval")] = "train",
    as_json: Annotated[bool, typer.Option("--json", help="the examples and statistics as JSON")] = False,
) -> None:
    """Print N processed examples (token ids, decoded input, labels with the masked part marked) and statistics."""
    from lmtune.data.preview import run_preview

    run_config = _load(config, overrides)
    setup_logging("warning")
    run_preview(run_config, n=n, split=split, as_json=as_json)


@app.command()
def checkpoints(
    run_dir: Annotated[Path, typer.Argument(help="the run's output_dir")],
    as_json: Annotated[bool, typer.Option("--json", help="the index as JSON")] = False,
    verify: Annotated[bool, typer.Option("--verify", help="open every file of every kept checkpoint")] = False,
) -> None:
    """The checkpoint index of a run (kept, deleted, best, incomplete); --verify says which can be resumed."""
    from lmtune.checkpoint import CheckpointIndex, has_content_hashes, verify_checkpoint

    if not run_dir.is_dir():
        raise UserError(f"{run_dir} is not a folder")
    index = CheckpointIndex.load(run_dir)
    if not index.entries and not (run_dir / "checkpoints.json").exists():
        raise UserError(f"{run_dir} holds no checkpoints.json and no checkpoint folders: not a run folder?")
    entries = sorted(index.entries, key=lambda e: e["step"])
    if verify:
        for entry in entries:
            if entry["status"] == "kept":
                entry["problems"] = verify_checkpoint(run_dir / entry["path"])
                entry["content_checked"] = has_content_hashes(run_dir / entry["path"])
    if as_json:
        typer.echo(json.dumps({"save_total_limit": index.save_total_limit, "best_metric": index.best_metric,
                               "checkpoints": entries}, indent=1))
    else:
        _print_checkpoints(index, entries, verify)
        for entry in entries:
            if entry.get("content_checked") is False and not entry["problems"]:
                typer.echo(f"{entry['path']}: no content hashes (written before lmtune recorded them): checked by "
                           "the size of each file and by opening every file")
    if verify and any(entry.get("problems") for entry in entries):
        raise typer.Exit(1)


def _table_console():
    """A console as wide as the live environment says (COLUMNS): rich reads a copy of os.environ taken at
    import, which datasets' multi-process map replaces."""
    from rich.console import Console

    return Console(width=shutil.get_terminal_size().columns)


def _print_checkpoints(index, entries, verified: bool) -> None:
    from rich.table import Table

    table = Table(title=f"checkpoints of {index.run_dir} (save_total_limit {index.save_total_limit})")
    for column in ("step", "epoch", "reasons", "loss", "eval loss", "size", "status") + (("verified",) * verified):
        table.add_column(column, overflow="fold")
    for e in entries:
        metrics = e.get("metrics", {})
        status = e["status"] + (" best" if e.get("best") else "")
        row = [str(e["step"]), _fmt(e.get("epoch")), ",".join(e.get("reasons", [])), _fmt(metrics.get("loss")),
               _fmt(metrics.get("eval_loss")), _size(e.get("size_bytes")), status]
        if verified:
            row.append("-" if "problems" not in e else "; ".join(e["problems"]) or "ok: resumable")
        table.add_row(*row)
    _table_console().print(table)


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)


def _size(value) -> str:
    if value is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if value < 1024 or unit == "TB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return str(value)


@app.command()
def chat(
    target: Annotated[str, typer.Argument(help="a base model, a run folder, a checkpoint folder, an adapter folder "
                                            "or a LLaMA-Factory inference config (.yaml)")],
    prompt: Annotated[str | None, typer.Option("--prompt", help="answer this once and exit")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="longest answer")] = 256,
    temperature: Annotated[float, typer.Option(help="0 answers greedily")] = 0.0,
    top_p: Annotated[float, typer.Option(help="nucleus sampling")] = 1.0,
    stop: Annotated[list[str] | None, typer.Option("--stop", help="end the answer at this text (repeatable)")] = None,
    system: Annotated[str | None, typer.Option("--system", help="a system prompt")] = None,
    tools: Annotated[Path | None, typer.Option(help="a JSON file of tool definitions (OpenAI's shape) the "
                                                    "template shows the model")] = None,
) -> None:
    """Talk to a base model, a run's final model or any checkpoint (adapter applied)."""
    from lmtune.chat import chat_loop, load_for_chat, quiet_transformers, read_tools, sampling_of

    setup_logging("warning")
    sampling = sampling_of(max_new_tokens, temperature, top_p, stop or ())
    definitions = read_tools(tools) if tools else None
    quiet_transformers()
    session = load_for_chat(target, definitions)
    chat_loop(session, prompt, sampling, system)


@app.command("eval")
def eval_command(
    config_or_run: Annotated[Path, typer.Argument(help="a config YAML, a run folder or a checkpoint folder")],
    checkpoint: Annotated[str | None, typer.Option(
        "--checkpoint", help="the model to measure: a checkpoint, run or model folder (default: the run's)")] = None,
    dataset: Annotated[str | None, typer.Option(
        "--dataset", help="a data set name or file to measure on instead of the run's eval split")] = None,
    out: Annotated[Path | None, typer.Option("--out", help="write the JSON report here too")] = None,
) -> None:
    """Loss and perplexity on the run's eval split or a given data set, as a JSON report."""
    from lmtune.chat import quiet_transformers
    from lmtune.evaluate import evaluate, write_report

    setup_logging("warning")
    quiet_transformers()
    report = evaluate(config_or_run, checkpoint, dataset)
    typer.echo(write_report(report, out))


@app.command()
def export(
    target: Annotated[str, typer.Argument(help="a run folder, a checkpoint folder or a model folder")],
    out: Annotated[Path, typer.Option("--out", help="the new (empty) folder to write")],
    dtype: Annotated[str, typer.Option(help="auto (the base model's), bf16, fp16 or fp32")] = "auto",
    max_shard_size: Annotated[str, typer.Option(help="largest safetensors file, e.g. 5GB or 500MB")] = "5GB",
    gguf: Annotated[bool, typer.Option("--gguf", help="also write a GGUF file")] = False,
) -> None:
    """A standalone Hugging Face model folder (LoRA merged), loadable by transformers alone."""
    from lmtune.chat import quiet_transformers
    from lmtune.export import export_model

    setup_logging("info")
    quiet_transformers()
    path = export_model(target, out, dtype=dtype, max_shard_size=max_shard_size, gguf=gguf)
    typer.echo(f"model written to {path}")


@model_app.command("import")
def model_import(
    source: Annotated[str, typer.Argument(help="a .gguf file or the built-in name smollm2-135m-instruct")],
    out: Annotated[Path, typer.Option("--out", help="the HF folder to write")],
) -> None:
    """Convert a GGUF file (or the built-in model) into a Hugging Face folder."""
    from lmtune.config import BUILTIN_MODEL
    from lmtune.models import import_builtin, import_gguf

    setup_logging("info")
    if out.exists() and any(out.iterdir()):
        raise UserError(f"--out {out} is not empty; choose a new folder")
    if source == BUILTIN_MODEL:
        path = import_builtin(out)
    elif source.endswith(".gguf") and Path(source).is_file():
        path = import_gguf(Path(source), out)
    else:
        raise UserError(f"'{source}' is neither a .gguf file nor the built-in name '{BUILTIN_MODEL}'")
    typer.echo(f"model written to {path}")


@app.command()
def webui(
    host: Annotated[str, typer.Option(help="address to listen on; 0.0.0.0 opens it to the network")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port to listen on")] = 7860,
    auth: Annotated[str | None, typer.Option(help="require a login, as user:password")] = None,
) -> None:
    """The browser UI: set up, start, watch, stop and resume runs in the current folder; chat with them."""
    from lmtune.webui.form import parse_auth

    credentials = parse_auth(auth) if auth is not None else None
    setup_logging("info")
    try:
        from lmtune.webui.app import serve
    except ImportError as error:
        raise UserError(f"the web UI needs gradio ({error}): pip install 'lmtune[webui]'") from None
    serve(Path.cwd(), host, port, credentials)


@app.command()
def serve(
    roots: Annotated[list[str] | None, typer.Argument(
        help="runs, model or adapter folders, folders holding them, or the built-in name (default: here)")] = None,
    host: Annotated[str, typer.Option(help="address to listen on; any but 127.0.0.1 needs --api-key")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port to listen on")] = 8000,
    api_key: Annotated[str | None, typer.Option(envvar="LMTUNE_API_KEY",
                                                help="answer only requests with 'Authorization: Bearer KEY'")] = None,
    max_tokens: Annotated[int, typer.Option(help="the longest answer, whatever a request asks for")] = 1024,
    max_pending: Annotated[int, typer.Option(help="requests queued or generating; more are answered 429")] = 64,
    max_batch: Annotated[int, typer.Option(help="answers decoded together in one batch")] = 32,
    batch_window_ms: Annotated[float, typer.Option(
        help="how long a request waits for others to batch with (0: none)")] = 50,
    max_models: Annotated[int, typer.Option(help="models (adapters' bases) kept loaded")] = 2,
    max_adapters: Annotated[int, typer.Option(help="LoRA adapters kept loaded per base model")] = 8,
) -> None:
    """An OpenAI-compatible API (/v1/chat/completions, /v1/completions, /v1/models) over runs, checkpoints,
    model folders and adapters, chosen per request by name."""
    from lmtune.chat import quiet_transformers

    setup_logging("info")
    quiet_transformers()
    try:
        from lmtune.serving.server import Limits
        from lmtune.serving.server import serve as run_server
    except ImportError as error:
        raise UserError(f"lmtune serve needs fastapi and uvicorn ({error}): pip install 'lmtune[serve]'") from None
    limits = Limits(max_tokens=max_tokens, max_pending=max_pending, max_batch=max_batch,
                    batch_window_s=batch_window_ms / 1000, max_models=max_models, max_adapters=max_adapters)
    run_server(roots or ["."], host, port, api_key, limits)


def _stop_on_signals() -> None:
    """SIGINT or SIGTERM outside the training loop (loading the model, tokenising: nothing is written yet;
    or once the run is over) exits at once with exit code 130 and a message; inside it, the loop's own
    handler stops after the step, with a checkpoint. At once, not by raising: an exception raised into
    whatever was running (an import half done) can fail on its way out (a RecursionError was seen)."""
    import signal
    import threading

    def stop(signum, frame):
        os.write(2, f"stopped: {signal.Signals(signum).name} before training began or after it ended; the "
                    "checkpoints already written are as they were\n".encode())
        os._exit(Stopped.exit_code)

    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, stop)


def main(argv: list[str] | None = None) -> None:
    if (argv if argv is not None else sys.argv[1:])[:1] == ["train"]:
        _stop_on_signals()  # from the first moment: a signal while the heavy libraries load
        if argv is None:  # the process's own command (not a caller's process, whose objects it would freeze)
            pause_garbage_collection()
    try:
        app(args=argv)
    except SystemExit as end:
        if argv is None and end.code in (0, None) and _trained:
            _exit_now()
        raise
    except UserError as error:
        typer.secho(f"error: {error}", fg="red", err=True)
        sys.exit(error.exit_code)
    except RunFailed as error:
        typer.secho(f"failed: {error}", fg="red", err=True)
        sys.exit(error.exit_code)
    except Stopped as error:
        typer.secho(f"stopped: {error}", fg="yellow", err=True)
        sys.exit(error.exit_code)


if __name__ == "__main__":
    main()
