"""The web UI: the form's YAML and its path sandbox (pure), and in Chromium (Playwright) the whole
round a user makes: fill in the form, read the plan, start, watch, stop, resume with a new
learning rate (the Chat, Eval and Export tabs: test_webui_after_training). A failed test's screenshot goes to
its tmp folder (webui-shots/); with LMTUNE_WEBUI_SHOTS set, each step of a round is shot there too."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import ALPACA_ROWS

from lmtune.config import load_config
from lmtune.errors import UserError
from lmtune.webui import form as F
from lmtune.webui import monitor as M

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
needs_chromium = pytest.mark.skipif(
    not CHROMIUM.exists(), reason="browser tests need Debian's Chromium at /usr/bin/chromium "
    "(apt-get install chromium; .ci/run installs it)")


def make_workdir(folder: Path, model_dir: Path) -> Path:
    """A working folder as a user has it: a model folder, a data folder with dataset_info.json."""
    shutil.copytree(model_dir, folder / "models" / "tiny")
    (folder / "data").mkdir(parents=True)
    (folder / "data" / "sums.json").write_text(json.dumps(ALPACA_ROWS))
    (folder / "data" / "dataset_info.json").write_text(json.dumps({"sums": {"file_name": "sums.json"}}))
    return folder


def tiny_form(**changes) -> dict:
    form = F.default_form()
    form.update(model_name_or_path="models/tiny", dataset=["sums"], finetuning_type="full", output_dir="runs/a")
    form.update(changes)
    return form


@pytest.fixture
def workdir(tmp_path, tiny_model_dir):
    """A working folder; runs still going at the end (runs outlive the web UI) are stopped."""
    folder = make_workdir(tmp_path / "work", tiny_model_dir)
    yield folder
    for pid_file in folder.rglob("train.pid"):
        stop_run(pid_file.parent)


def stop_run(run_dir: Path, timeout: float = 60) -> None:
    """SIGINT to the run writing to `run_dir`, as its Stop button sends; waits until it has exited."""
    from lmtune.runlock import running_pid

    pid = running_pid(run_dir)
    if pid is None:
        return
    os.kill(pid, signal.SIGINT)
    deadline = time.monotonic() + timeout
    while running_pid(run_dir) is not None and time.monotonic() < deadline:
        time.sleep(0.3)
    if running_pid(run_dir) is not None:
        os.kill(pid, signal.SIGKILL)


# --- the form, without a browser ------------------------------------------------------------------


def test_form_writes_the_yaml_that_lmtune_train_reads(workdir, monkeypatch):
    # the browser sends every number field as the text typed into it
    form = tiny_form(save_epochs="0.25", save_steps="10.0", saves_per_epoch="", save_total_limit="3",
                     learning_rate="2e-3", num_train_epochs="2", warmup_steps="0.1", packing="off",
                     metric_for_best_model="eval_loss", val_size="0.25", resume_lr="config")
    values = F.form_to_values(workdir, form)
    text = F.values_to_yaml(values)
    loaded = yaml.safe_load(text)
    # whole numbers are written as integers, a fraction of an epoch as a float, empty fields not at all
    assert loaded["save_steps"] == 10 and isinstance(loaded["save_steps"], int)
    assert loaded["save_epochs"] == 0.25 and loaded["save_total_limit"] == 3 and loaded["learning_rate"] == 0.002
    assert "saves_per_epoch" not in loaded and "max_steps" not in loaded
    assert loaded["packing"] is False and loaded["metric_for_best_model"] == "eval_loss"
    assert loaded["resume_from_checkpoint"] == "auto" and loaded["resume_lr"] == "config"
    assert loaded["model_name_or_path"] == "models/tiny" and loaded["dataset"] == "sums"
    # `lmtune train FILE`, run from the working folder, reads back exactly what the form showed
    path = workdir / "run.yaml"
    path.write_text(text)
    monkeypatch.chdir(workdir)
    config = load_config(path)
    for key, value in loaded.items():
        assert getattr(config, key) == value, key


def test_form_errors_name_the_key_and_the_fix(workdir):
    with pytest.raises(UserError, match="save_steps.*save_epochs: 2.5"):
        F.form_to_values(workdir, tiny_form(save_steps="2.5"))
    with pytest.raises(UserError, match="learning_rate.*'abc'") as error:
        F.form_to_values(workdir, tiny_form(learning_rate="abc", max_steps="-5x"))
    # each line of the error goes to the field it names
    assert set(F.field_errors(str(error.value))) == {"learning_rate", "max_steps"}
    with pytest.raises(UserError, match="not a checkpoint-<step> folder"):
        F.form_to_values(workdir, tiny_form(resume_from_checkpoint="../../etc"))


def test_the_form_drops_and_defaults_nothing_and_checks_as_the_cli_does(workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    # an emptied field whose key has a default is an error, not the default
    with pytest.raises(UserError, match="learning_rate is empty"):
        F.form_to_values(workdir, tiny_form(learning_rate=""))
    # the same config model as the CLI: val_size 1.5 is neither a fraction nor a number of examples
    with pytest.raises(UserError, match="val_size 1.5"):
        F.form_to_values(workdir, tiny_form(val_size="1.5"))
    (workdir / "run.yaml").write_text("model_name_or_path: models/tiny\ndataset: sums\nval_size: 1.5\n")
    with pytest.raises(UserError, match="val_size 1.5"):
        load_config(workdir / "run.yaml")
    # a missing dataset_dir is named, whether a data set is chosen or not
    for dataset in ([], ["sums"]):
        with pytest.raises(UserError, match="dataset_dir: there is no folder datasets in the working folder"):
            F.form_to_values(workdir, tiny_form(dataset_dir="datasets", dataset=dataset))
    with pytest.raises(UserError, match="pick at least one data set"):
        F.form_to_values(workdir, tiny_form(dataset=[]))
    # a typed file path is accepted wherever the CLI accepts one, with or without the data folder
    assert F.form_to_values(workdir, tiny_form(dataset=["data/sums.json"]))["dataset"] == "data/sums.json"
    assert F.form_to_values(workdir, tiny_form(dataset=["data/sums.json"], dataset_dir="nowhere"))["dataset"] \
        == "data/sums.json"


def test_fresh_start_and_a_chosen_checkpoint_map_to_resume_keys(workdir):
    assert F.form_to_values(workdir, tiny_form(resume_from_checkpoint=F.RESUME_FRESH))["resume_from_checkpoint"] \
        is False
    folder = workdir / "runs" / "a" / "checkpoint-6"
    folder.mkdir(parents=True)
    with pytest.raises(UserError, match="not a complete checkpoint"):
        F.form_to_values(workdir, tiny_form(resume_from_checkpoint="checkpoint-6"))
    (folder / "checkpoint_complete.json").write_text("{}")
    (folder / "train_state.json").write_text("{}")
    values = F.form_to_values(workdir, tiny_form(resume_from_checkpoint="checkpoint-6"))
    assert values["resume_from_checkpoint"] == "runs/a/checkpoint-6"
    # a typed path names that folder, even in another run, as resume_from_checkpoint does in a config file
    assert F.form_to_values(workdir, tiny_form(output_dir="runs/b", resume_from_checkpoint="runs/a/checkpoint-6"))[
        "resume_from_checkpoint"] == "runs/a/checkpoint-6"
    with pytest.raises(UserError, match="runs/b/checkpoint-6 is not a complete checkpoint"):
        F.form_to_values(workdir, tiny_form(output_dir="runs/b", resume_from_checkpoint="checkpoint-6"))


def test_a_chat_message_without_a_loaded_model_stays_in_the_box(tmp_path):
    from types import SimpleNamespace

    from lmtune.webui.chat_tab import ChatTab

    chat, page = ChatTab(tmp_path), SimpleNamespace(session_hash="page")
    sent = ("What is 2 plus 3?", "", 8, 0, 1, "", 1)
    box, _ = chat.send(*sent, page)
    shown = chat.conversation(page).status()  # the line under the box
    assert chat.conversation(page).turns == [] and box == "What is 2 plus 3?" and "load a model" in shown
    with chat.models["A"].lock:  # as while a model loads
        box, _ = chat.send(*sent, page)
    shown = chat.conversation(page).status()
    assert chat.conversation(page).turns == [] and box == "What is 2 plus 3?" and "still loading" in shown


def test_the_chat_queue_follows_the_order_of_the_page_not_of_arrival():
    from lmtune.webui.conversation import FAILED, SKIPPED, ChatModel, Conversation

    model, chat = ChatModel(), Conversation()
    models = {"A": model}

    def send(text: str, order: int) -> None:
        chat.send(text, {}, ["A"], models, order)

    with model.lock:  # nothing is written while the test holds the model: every other message waits
        send("one", 1)
        send("three", 3)
        send("two", 2)  # sent before "three", reached the server after it
        assert [turn.message for turn in chat.turns] == ["one", "two", "three"]
        send("six", 6)
        chat.clear(5)  # a Clear pressed before "six" and handled after it
        send("four", 4)  # sent before that Clear, handled after it: cleared with the rest
        assert [turn.message for turn in chat.turns] == ["six"]
        send("eight", 8)
        chat.stop(7)  # a Stop pressed before "eight" leaves it waiting
        assert [turn.answers["A"].state for turn in chat.turns] == [SKIPPED, "waiting"]
    deadline = time.monotonic() + 120  # the worker imports the generation code first
    while chat.worker is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    # the server answered what waited (no model is loaded: each answer says so), and then stopped
    assert chat.worker is None and chat.turns[-1].answers["A"].state == FAILED
    assert "unloaded" in chat.turns[-1].answers["A"].text


@pytest.mark.parametrize("key, value", [
    ("output_dir", "../elsewhere"), ("output_dir", "/tmp/lmtune-webui-outside"), ("dataset_dir", "/etc"),
    ("model_name_or_path", "/usr/lib"), ("dataset", ["/etc/passwd"]), ("dataset", ["../../etc/passwd"]),
])
def test_paths_outside_the_working_folder_are_refused(workdir, key, value):
    with pytest.raises(UserError, match="outside the working folder"):
        F.form_to_values(workdir, tiny_form(**{key: value}))


def test_a_symlink_out_of_the_working_folder_is_refused(workdir, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (workdir / "link").symlink_to(outside, target_is_directory=True)
    with pytest.raises(UserError, match="outside the working folder"):
        F.form_to_values(workdir, tiny_form(output_dir="link/run"))
    with pytest.raises(UserError, match="outside the working folder"):
        F.config_file(workdir, "link/run.yaml")
    with pytest.raises(UserError, match="outside the working folder"):
        F.chat_target(workdir, "link")
    assert F.form_to_values(workdir, tiny_form(output_dir="runs/b"))["output_dir"] == "runs/b"
    assert F.chat_target(workdir, "smollm2-135m-instruct") == "smollm2-135m-instruct"


def test_pickers_list_what_is_in_the_working_folder(workdir):
    assert ("models/tiny (folder)", "models/tiny") in F.model_choices(workdir)
    assert F.dataset_choices(workdir, "data") == [("sums (dataset_info.json)", "sums")]
    (workdir / "data" / "more.jsonl").write_text("")
    assert ("more.jsonl (file)", "more.jsonl") in F.dataset_choices(workdir, "data")
    assert F.dataset_choices(workdir, "../..") == []
    run = workdir / "runs" / "first"
    (run / "checkpoint-4").mkdir(parents=True)
    (run / "checkpoint-4" / "checkpoint_complete.json").write_text("{}")
    (run / "checkpoint-4" / "train_state.json").write_text("{}")
    (run / "checkpoints.json").write_text(json.dumps({"version": 1, "checkpoints": [
        {"step": 2, "path": "checkpoint-2", "status": "deleted"}, {"step": 4, "path": "checkpoint-4",
                                                                   "status": "kept", "reasons": ["signal"]}]}))
    assert F.run_choices(workdir) == ["runs/first"]
    assert [value for _, value in F.resume_choices(workdir, "runs/first")] == ["auto", "fresh", "checkpoint-4"]
    assert ("runs/first/checkpoint-4 (checkpoint, step 4)", "runs/first/checkpoint-4") in F.chat_choices(workdir)


def test_live_plan_is_lmtune_plan_and_follows_an_edited_data_file(workdir, monkeypatch):
    from lmtune.planning import plan_for_config
    from lmtune.webui.train_tab import plan_markdown

    monkeypatch.chdir(workdir)  # `lmtune webui` serves the folder it is started in
    _, config = F.form_to_config(workdir, tiny_form(num_train_epochs="2", saves_per_epoch="2", save_total_limit="1"))
    plan = plan_markdown(config, plan_for_config(config))
    assert "**16 optimizer steps**, 8 per epoch" in plan  # 32 rows, batch 4
    assert "**saves at steps** (4): 4, 8, 12, 16" in plan and "**kept after rotation**: 16" in plan
    assert "4 checkpoints will be written, save_total_limit 1 keeps the last 1: 3 will be deleted" in plan
    (workdir / "data" / "sums.json").write_text(json.dumps(ALPACA_ROWS[:20]))
    assert "**10 optimizer steps**, 5 per epoch" in plan_markdown(config, plan_for_config(config))


def test_resume_note_reads_the_saved_state_and_never_offers_a_deleted_checkpoint(workdir, monkeypatch):
    from lmtune.engine import train
    from lmtune.planning import plan_for_config
    from lmtune.webui.train_tab import plan_markdown, resume_note

    monkeypatch.chdir(workdir)
    run = dict(lr_scheduler_type="linear", learning_rate="0.01", max_steps="8", save_steps="2", save_total_limit="2",
               logging_steps="1", report_to="none", plot_loss=False)
    _, config = F.form_to_config(workdir, tiny_form(**run))
    train(config.model_copy(update={"preview_samples": 0}))
    # rotation deleted checkpoints 2 and 4: they are neither offered nor resumed from
    assert [v for _, v in F.resume_choices(workdir, "runs/a")] == ["auto", "fresh", "checkpoint-8", "checkpoint-6"]
    # checkpoint-6 of a linear decay from 0.01 over 8 steps: 0.0025 is in effect there, not the 0.01 it began with
    _, config = F.form_to_config(workdir, tiny_form(**{**run, "learning_rate": "0.002"},
                                                    resume_from_checkpoint="checkpoint-6"))
    plan = plan_for_config(config)
    note = resume_note(config, plan.total_steps)
    assert "Resuming from **runs/a/checkpoint-6** (step 6)" in note
    assert "the learning rate in effect there is **0.0025**" in note
    assert "- **keep** (chosen): learning rate (resume_lr: keep): the saved schedule continues" in note
    assert "0.0025 at step 6, 0 at step 8" in note
    # resume_lr config: the form's 0.002 decayed linearly to step 6 of 8
    assert "- **config**: learning rate (resume_lr: config): the config's schedule (linear, peak 0.002" in note
    assert "0.0025 -> 0.0005 at step 6" in note
    assert "resumes from runs/a/checkpoint-6 at step 6" in plan_markdown(config, plan)  # `lmtune plan`'s line
    # auto takes the newest kept checkpoint; once it is deleted, the next one
    _, config = F.form_to_config(workdir, tiny_form(**{**run, "max_steps": "12"}))
    assert "Resuming from **runs/a/checkpoint-8** (step 8)" in resume_note(config, 12)
    shutil.rmtree(workdir / "runs" / "a" / "checkpoint-8")
    assert "Resuming from **runs/a/checkpoint-6** (step 6)" in resume_note(config, 12)


def test_auth_takes_user_and_password():
    assert F.parse_auth("alice:s3:cret") == ("alice", "s3:cret")
    for bad in ("alice", ":pw", "alice:"):
        with pytest.raises(UserError, match="user:password"):
            F.parse_auth(bad)


def test_monitor_reads_progress_chart_and_checkpoints_from_the_run_folder(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "run_config.yaml").write_text(yaml.safe_dump({"num_train_epochs": 2, "max_steps": None}))
    rows = [{"type": "train", "step": s, "epoch": s / 6, "samples_seen": 4 * s, "tokens_seen": 100 * s,
             "loss": 3.0 - 0.1 * s, "lr": 0.005, "eta_s": 12.0, "elapsed_s": 2.0 * s} for s in range(1, 8)]
    rows.insert(6, {"type": "eval", "step": 6, "epoch": 1.0, "eval_loss": 2.5})
    rows.insert(7, {"type": "event", "event": "save", "step": 6, "path": "checkpoint-6",
                    "reasons": ["epoch", "signal"]})
    rows.append({"type": "event", "event": "resume", "step": 7, "lr_old": 0.005, "lr_new": 0.001, "changes": []})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"type": "tr')
    (run / "checkpoints.json").write_text(json.dumps({"version": 1, "save_total_limit": 1, "checkpoints": [
        {"step": 3, "epoch": 0.5, "path": "checkpoint-3", "reasons": ["epoch"], "metrics": {"loss": 2.7},
         "status": "deleted", "best": False},
        {"step": 6, "epoch": 1.0, "path": "checkpoint-6", "reasons": ["epoch", "signal"],
         "metrics": {"loss": 2.4, "eval_loss": 2.5}, "size_bytes": 2_500_000, "status": "kept", "best": True}]}))
    view = M.read_run(run)
    running = M.progress_markdown(view, M.RunState(M.RUNNING, "running (pid 1)"))
    assert "step **7** / 12 (58%)" in running and "samples 28" in running and "tokens 700" in running
    assert "eval loss 2.5000 (step 6)" in running and "learning rate **5.00e-03**" in running
    # the resume is the newest row: the resumed process has logged no step, the ETA of the one before is stale
    assert "ETA" not in running
    with (run / "metrics.jsonl").open("a") as handle:
        handle.write("\n" + json.dumps({**rows[5], "step": 8, "eta_s": 8.0}) + "\n")
    assert "ETA 0:08" in M.progress_markdown(M.read_run(run), M.RunState(M.RUNNING, "running (pid 1)"))
    # a run that is not running has no ETA
    state = M.run_state(run)
    assert (state.kind, state.text) == (M.STOPPED, "stopped at step 6: no checkpoint to resume from")
    assert "ETA" not in M.progress_markdown(view, state)
    loss = M.plot_points(view, M.PLOTS[0])
    assert {point[2] for point in loss} == {"train loss", "eval loss", "resumed", "stopped"}
    assert [p[:2] for p in loss if p[2] == "stopped"] == [(6, 2.3), (6, 2.9), (6, 2.3)]  # across the values
    events = M.events_markdown(view)
    assert "learning rate: 5.00e-03 -> 1.00e-03" in events and "changes" not in events  # no empty "changes:"
    assert "step 6: stopped (SIGINT or SIGTERM); saved checkpoint-6" in events
    table = M.checkpoints_html(run)
    assert "1 kept, 1 deleted, 0 incomplete; save_total_limit 1" in table
    assert "epoch,signal" in table and "kept best" in table and "2.5 MB" in table


def test_a_run_started_from_the_ui_is_starting_then_says_why_it_was_refused(workdir):
    from lmtune.webui.runner import Runner

    (workdir / "bad.yaml").write_text("model_name_or_path: models/tiny\ndataset: nowhere.json\noutput_dir: runs/bad\n")
    runner, run_dir = Runner(workdir), workdir / "runs" / "bad"
    process = runner.start(workdir / "bad.yaml", run_dir)
    assert runner.state(run_dir).text == f"starting (pid {process.pid}): loading the model and the data"
    assert process.wait(timeout=120) == 2
    state = runner.state(run_dir)
    assert (state.kind, state.text) == (M.FAILED, "refused to start (exit code 2): train.log says why")
    assert "dataset 'nowhere.json'" in (run_dir / "train.log").read_text()
    # the log keeps the exit code (a thread appends it): a web UI started later knows the start was refused
    deadline = time.monotonic() + 10
    while M.exit_code(run_dir) is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert M.run_state(run_dir).text == "refused to start (exit code 2): train.log says why"
    assert F.run_choices(workdir) == ["runs/bad"]  # and it is in the runs table


def test_run_states_and_history_pages_from_the_folders(workdir):
    def make_run(name: str, reasons: list[str], steps: int = 30) -> Path:
        run = workdir / "runs" / name
        run.mkdir(parents=True)
        (run / "checkpoints.json").write_text(json.dumps({"version": 1, "checkpoints": [
            {"step": s, "path": f"checkpoint-{s}", "status": "deleted", "reasons": ["steps"]} for s in range(1, steps)]
            + [{"step": steps, "path": f"checkpoint-{steps}", "status": "kept", "reasons": reasons}]}))
        (run / "metrics.jsonl").write_text("".join(json.dumps(
            {"type": "event", "event": "save", "step": s, "path": f"checkpoint-{s}", "reasons": ["steps"]}) + "\n"
            for s in range(1, steps + 1)))
        time.sleep(0.02)  # distinct modification times: the list is newest first
        return run

    make_run("done", ["final"])
    make_run("broken", ["steps"])
    stopped = make_run("halted", ["signal"])
    finished, crashed = M.run_state(workdir / "runs" / "done"), M.run_state(workdir / "runs" / "broken")
    assert (finished.kind, crashed.kind, M.run_state(stopped).kind) == (M.FINISHED, M.FAILED, M.STOPPED)
    from lmtune.webui.monitor_tab import opened_run, runs_newest_first

    runs = runs_newest_first(workdir)
    assert runs == ["runs/halted", "runs/broken", "runs/done"]
    assert opened_run(workdir, runs, None) == "runs/halted"  # nothing runs: the newest
    table = M.runs_html(workdir, runs)
    assert table.index("runs/halted") < table.index("runs/broken") < table.index("runs/done")
    # history in pages, newest first: 30 checkpoints at 12 a page, 30 events at 10 a page
    assert "page 1 of 3, newest first" in M.checkpoints_html(stopped) and ">30<" in M.checkpoints_html(stopped)
    last_page = M.checkpoints_html(stopped, page=3)
    assert "page 3 of 3" in last_page and "<td>1</td>" in last_page and ">30<" not in last_page
    assert M.events_markdown(M.read_run(stopped)).startswith("no events yet")  # saves only when asked for
    events = M.events_markdown(M.read_run(stopped), page=2, routine=True)
    assert "page 2 of 3 (30 events, newest first)" in events and "step 20: save" in events
    assert "step 21: save" not in events


# --- in the browser -------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(workdir: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "OMP_NUM_THREADS": "1"}
    log = (workdir.parent / f"webui-{port}.log").open("w")
    server = subprocess.Popen([sys.executable, "-m", "lmtune", "webui", "--port", str(port), *extra], cwd=workdir,
                              env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        assert server.poll() is None, (workdir.parent / f"webui-{port}.log").read_text()[-3000:]
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return server, f"http://127.0.0.1:{port}/"
        except OSError:
            time.sleep(0.5)
    server.kill()
    raise AssertionError("the web UI did not start in 90 s")


def stop_server(server: subprocess.Popen, signum: int = signal.SIGINT) -> None:
    """Ctrl-C (SIGINT) or SIGTERM: either ends the server alone (exit 0), the runs it started keep running."""
    if server.poll() is not None:
        return
    server.send_signal(signum)
    try:
        code = server.wait(timeout=60)  # generous: it exits in seconds, on a loaded machine too
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()
        raise AssertionError(f"the web UI did not exit within 60 s of signal {signum}") from None
    assert code == 0, f"the web UI ended with exit code {code} on signal {signum}"


@contextlib.contextmanager
def opened_page(url: str, browser, shots: Path, **page_args):
    """A browser page on the web UI at `url` (a screenshot if the test fails), closed at the end."""
    page = browser.new_page(**page_args)
    page.set_default_timeout(90_000)  # a click waits for a page that a loaded machine draws slowly
    ui = Page(page, shots)
    try:
        page.goto(url)
        yield ui
    except BaseException:
        ui.shot("failed", required=False)
        raise
    finally:
        page.close()


@contextlib.contextmanager
def opened_ui(workdir: Path, browser, shots: Path, *server_args: str, **page_args):
    """The web UI served from `workdir`, a browser page on it (a screenshot if the test fails); both closed
    at the end."""
    server, url = start_server(workdir, *server_args)
    try:
        with opened_page(url, browser, shots, **page_args) as ui:
            yield ui
    finally:
        stop_server(server)


class Served:
    """The module's web UI server on its working folder: started once (a start is 10-20 s of imports), for
    the tests that need no server of their own. A test may end it; the next one to ask starts another."""

    def __init__(self, workdir: Path):
        self.workdir, self.server, self.address = workdir, None, ""

    def url(self) -> str:
        if self.server is None or self.server.poll() is not None:
            self.server, self.address = start_server(self.workdir)
        return self.address

    def end(self, signum: int = signal.SIGINT) -> None:
        if self.server is not None:
            stop_server(self.server, signum)
            self.server = None


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_model_dir):
    """One working folder and its web UI for the module; runs still going at the end are stopped."""
    served = Served(make_workdir(tmp_path_factory.mktemp("webui") / "work", tiny_model_dir))
    yield served
    served.end()
    for pid_file in served.workdir.rglob("train.pid"):
        stop_run(pid_file.parent)


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


class Page:
    """The few gestures the tests make on gradio's widgets, and screenshots."""

    def __init__(self, page, shots: Path):
        self.page, self.shots = page, shots
        shots.mkdir(parents=True, exist_ok=True)

    def fill(self, elem_id: str, text: str) -> None:
        box = self.page.locator(f"#{elem_id}").locator("input, textarea").first
        box.fill(text)
        box.blur()

    def pick(self, elem_id: str, option: str, search: str = "") -> None:
        """Choose a dropdown option; `search` is typed first to narrow a long list."""
        box = self.page.locator(f"#{elem_id} input").first
        box.click()
        if search:
            box.fill(search)
        self.page.get_by_role("option", name=option).first.click()
        self.page.locator("body").click(position={"x": 5, "y": 5})

    def radio(self, elem_id: str, label: str) -> None:
        self.page.locator(f"#{elem_id}").get_by_text(label, exact=True).click()

    def text(self, elem_id: str) -> str:
        """What the element shows; a text box's value included."""
        element = self.page.locator(f"#{elem_id}")
        boxes = element.locator("textarea")
        if boxes.count():
            return element.inner_text() + "\n" + "\n".join(box.input_value() for box in boxes.all())
        return element.inner_text()

    def wait_text(self, elem_id: str, *needles: str, timeout: float = 60) -> str:
        deadline = time.monotonic() + timeout
        while True:
            text = self.text(elem_id)
            if all(n in text for n in needles):
                return text
            if time.monotonic() > deadline:
                self.shot("timeout", required=False)
                raise AssertionError(f"#{elem_id} never showed {needles}; it shows:\n{text}")
            time.sleep(0.3)

    def wait_for(self, check, what: str, timeout: float = 60):
        deadline = time.monotonic() + timeout
        while not (value := check()):
            if time.monotonic() > deadline:
                self.shot("timeout", required=False)
                raise AssertionError(f"never happened: {what}")
            time.sleep(0.3)
        return value

    def step_shot(self, name: str) -> None:
        """A screenshot of a step of the round, only with LMTUNE_WEBUI_SHOTS set: a full-page shot of a live
        page takes tens of seconds on a busy machine, and a passing test's tmp folder is deleted."""
        if os.environ.get("LMTUNE_WEBUI_SHOTS"):
            self.shot(name, required=False)

    def shot(self, name: str, required: bool = True) -> Path:
        """A full-page screenshot; one taken because a test failed never hides why it failed."""
        path = self.shots / f"{name}.png"
        try:
            self.page.screenshot(path=str(path), full_page=True, timeout=None if required else 15_000)
        except Exception:
            if required:
                raise
        return path


def plot_drawn(ui: Page, name: str) -> set[str]:
    """The series a plot of the Monitor draws: a line of the series' colour."""
    strokes = ui.page.locator(f"#plot-{name} g.mark-line path").evaluate_all(
        "paths => paths.filter(p => (p.getAttribute('d') || '').length > 8).map(p => p.getAttribute('stroke'))")
    colours = M.series_colours(next(spec for spec in M.PLOTS if spec.name == name))
    return {series for series, colour in colours.items() if colour in strokes}


def checkpoint_rows(ui: Page) -> list[list[str]]:
    return [[cell.strip() for cell in row.split("\t")]
            for row in ui.page.locator("#checkpoints tbody tr").all_inner_texts()]


@needs_chromium
def test_train_watch_stop_resume_with_a_new_learning_rate(served, browser, tmp_path):
    workdir = served.workdir
    with opened_page(served.url(), browser, tmp_path / "webui-shots", viewport={"width": 1440, "height": 1000}) as ui:
        page = ui.page
        ui.wait_text("plan", "pick at least one data set")

        # -- the form: the tiny model, the sums data, a dense save schedule with rotation
        ui.pick("model", "models/tiny (folder)")
        ui.radio("finetuning-type", "full")
        ui.pick("dataset", "sums (dataset_info.json)")
        ui.fill("val-size", "0.25")
        # text in a number field is an error that names the key, not a silent default
        ui.fill("learning-rate", "abc")
        ui.wait_text("plan", "The form needs a fix", "learning_rate", "'abc'")
        ui.wait_text("learning-rate", "learning_rate ⚠ Input should be a valid number")  # at the field too
        ui.fill("learning-rate", "0.005")
        ui.pick("scheduler", "constant")
        ui.fill("epochs", "1000")
        ui.fill("logging-steps", "1")
        ui.radio("report-to", "none")
        ui.fill("save-epochs", "0.5")
        ui.fill("save-total-limit", "2")
        ui.fill("evals-per-epoch", "1")

        # a folder outside the working folder is refused, and nothing is written there
        ui.fill("output-dir", "../outside")
        page.locator("#start").click()
        ui.wait_text("train-status", "outside the working folder")
        assert not (workdir.parent / "outside").exists()
        ui.fill("output-dir", "runs/sums")

        # -- the plan, before anything runs: 24 training rows / batch 4 = 6 steps an epoch, a save
        # every half epoch (3 steps) for 1000 epochs, of which save_total_limit 2 keeps the last two
        plan = ui.wait_text("plan", "6000 optimizer steps", "6 per epoch", "saves at steps (2000)", "limit 2")
        assert "saves at steps (2000): 3, 6, 9, 12, 15" in plan
        assert "2000 checkpoints will be written, save_total_limit 2 keeps the last 2" in plan
        assert "1998 will be deleted" in plan
        assert "kept after rotation: 5997, 6000" in plan
        # the YAML follows the last edit (output_dir) once its refresh lands; wait for it, not for the first one
        ui.wait_text("yaml", "save_epochs: 0.5", "save_total_limit: 2", "output_dir: runs/sums")
        ui.step_shot("1-form-and-plan")

        # the data preview: processed examples with the masked prompt and the trained answer
        page.locator("#preview-button").click()
        preview = ui.wait_text("preview", "labels:", "train row 0 of 24")
        assert "[-100 x" in preview and "plus" in preview

        # -- start: the Monitor fills while it runs
        page.locator("#start").click()
        ui.wait_text("progress", "running (pid")
        assert (workdir / "runs" / "sums" / "webui_config.yaml").is_file()
        ui.wait_for(lambda: {"train loss", "eval loss"} <= plot_drawn(ui, "loss"), "train and eval loss plotted")
        rows = ui.wait_for(lambda: (r := checkpoint_rows(ui)) and any("deleted" in row for row in r) and r,
                           "a checkpoint deleted by rotation", timeout=90)
        # newest first; a save in flight is listed as incomplete
        written = [row for row in rows if len(row) == 7 and row[-1].startswith(("kept", "deleted"))]
        steps = [int(row[0]) for row in written]
        assert steps == sorted(steps, reverse=True) and all(step % 3 == 0 for step in steps)  # every half epoch
        assert all(row[2] == "epoch" for row in written), rows
        progress = ui.text("progress")
        assert "/ 6000" in progress and "samples" in progress and "tokens" in progress and "ETA" in progress
        # the tail is the last 20 lines: whichever steps the run has reached by now
        ui.wait_for(lambda: re.search(r"step \d+/6000 epoch", ui.text("log-tail")), "a step line in the log tail")
        ui.step_shot("2-monitor-running")

        # -- stop: SIGINT, a resumable checkpoint, exit 130; the confirmation stays, the ETA goes
        page.locator("#stop-monitor").click()
        ui.wait_text("monitor-status", "stop requested (SIGINT to pid")
        progress = ui.wait_text("progress", "stopped at step", "resumable from checkpoint-", "exit code 130")
        assert "ETA" not in progress
        rows = checkpoint_rows(ui)
        newest = rows[0]
        assert "signal" in newest[2] and newest[-1].startswith("kept"), rows
        stopped_at = int(newest[0])
        assert f"step {stopped_at} / 6000" in progress  # the step it stopped at, as the state says
        index = json.loads((workdir / "runs" / "sums" / "checkpoints.json").read_text())
        assert [e["step"] for e in index["checkpoints"] if e["status"] == "kept"][-1] == stopped_at
        ui.wait_text("events", f"step {stopped_at}: stopped (SIGINT or SIGTERM); saved checkpoint-{stopped_at}")
        assert "stop requested" in ui.text("monitor-status")  # not overwritten by the monitor's refresh
        ui.step_shot("3-monitor-stopped")

        # -- the Train tab has re-read the run folder: the note names the stop's checkpoint, the rate in effect
        page.get_by_role("tab", name="Train").click()
        ui.wait_text("resume-note", f"Resuming from runs/sums/checkpoint-{stopped_at} (step {stopped_at})",
                     "the learning rate in effect there is 0.005", "keep (chosen)")
        # resume from that checkpoint with a new learning rate, applied on purpose
        ui.pick("resume", f"checkpoint-{stopped_at} (step {stopped_at}")
        ui.fill("learning-rate", "0.001")
        ui.radio("resume-lr", "apply the learning rate set above from the resume step on (resume_lr: config)")
        # the note is rewritten after each edit: wait for the one that reflects them all
        ui.wait_text("resume-note", f"checkpoint-{stopped_at}", "config (chosen)",
                     f"0.005 -> 0.001 at step {stopped_at}")
        ui.wait_text("plan", f"resumes from runs/sums/checkpoint-{stopped_at} at step {stopped_at}")
        ui.wait_text("yaml", "resume_lr: config", "learning_rate: 0.001")
        ui.step_shot("4-resume-form")
        page.locator("#start").click()
        # while the resumed run loads, no ETA of the process that stopped; its stop message goes with it
        deadline = time.monotonic() + 90
        while "running (pid" not in (progress := ui.text("progress")) and time.monotonic() < deadline:
            assert "ETA" not in progress, progress
            time.sleep(0.2)
        ui.wait_for(lambda: "stop requested" not in ui.text("monitor-status"), "the old stop message gone")
        events = ui.wait_text("events", "resume", "learning rate: 5.00e-03 -> 1.00e-03", timeout=90)
        assert "processes: saved 1, now 1" in events and "{" not in events
        assert f"step {stopped_at}" in events
        ui.wait_text("progress", "learning rate 1.00e-03")
        train_rows = [r for r in M.read_rows(workdir / "runs" / "sums") if r["type"] == "train"]
        assert [r["step"] for r in train_rows] == list(range(1, len(train_rows) + 1))  # step numbers go on
        ui.wait_for(lambda: {"stopped", "resumed"} <= plot_drawn(ui, "loss"), "the stop and the resume on the plot")
        ui.step_shot("5-monitor-resumed")
        page.locator("#stop-monitor").click()
        ui.wait_text("progress", "stopped at step", "exit code 130")


def test_an_existing_yaml_loads_into_the_form_and_writes_back_the_same(workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    form = tiny_form(save_epochs="0.25", save_total_limit="3", learning_rate="0.002", packing="on",
                     metric_for_best_model="eval_loss", val_size="0.25", resume_lr="config",
                     lora_target="q_proj,v_proj")
    written = F.form_to_values(workdir, form)
    (workdir / "mine.yaml").write_text(F.values_to_yaml(written) + "save_schedule: [{until_step: 4, save_steps: 1}]\n"
                                       "callbacks: [mine:Callback]\n")
    loaded, extra, not_kept = F.yaml_to_form(workdir, Path("mine.yaml"))
    # a key the form does not show is kept as it is in the file; one that runs code is named and not kept
    assert extra == {"save_schedule": [{"until_step": 4, "save_steps": 1}]} and not_kept == ["callbacks"]
    assert F.form_to_values(workdir, loaded, extra) == {**written, **extra}
    with pytest.raises(UserError):
        F.yaml_to_form(workdir, Path("../outside.yaml"))


MINE = """# my run: comments and the order of keys are mine
model_name_or_path: models/tiny
finetuning_type: full
dataset: data/sums.json   # a file path, as lmtune plan accepts
learning_rate: 0.002
save_steps: 50
save_total_limit: 3
num_train_epochs: 1000
logging_steps: 1
report_to: none
output_dir: runs/mine
preview_samples: 0        # not a field of the form
"""


@needs_chromium
def test_a_loaded_yaml_is_never_rewritten_a_run_outlives_the_web_ui_and_auth_asks_for_a_login(
        served, browser, tmp_path):
    from lmtune.runlock import running_pid

    workdir = served.workdir
    (workdir / "mine.yaml").write_text(MINE)
    shots, viewport = tmp_path / "webui-shots", {"width": 1440, "height": 1000}
    url = served.url()
    page = browser.new_page(viewport=viewport)
    ui = Page(page, shots)
    try:
        page.goto(url)
        ui.wait_text("plan", "pick at least one data set")
        # data copied in after the server started is listed once the page is reloaded
        (workdir / "data" / "later.json").write_text(json.dumps(ALPACA_ROWS[:8]))
        page.reload()
        page.locator("#dataset input").first.click()
        page.get_by_role("option", name="later.json (file)").wait_for(timeout=30_000)
        page.locator("body").click(position={"x": 5, "y": 5})

        # a config whose dataset is a file path loads and plans; a key the form lacks is kept
        ui.fill("config-path", "mine.yaml")
        page.locator("#load-yaml").click()
        ui.wait_text("train-status", "loaded mine.yaml", "not shown in the form: preview_samples")
        ui.wait_text("dataset", "data/sums.json")
        ui.wait_text("plan", "8000 optimizer steps", "save_total_limit 3")
        ui.wait_text("yaml", "dataset: data/sums.json", "preview_samples: 0", "learning_rate: 0.002")
        ui.step_shot("loaded-yaml")

        # Start runs the form's own file in the run folder; the loaded file keeps every byte
        page.locator("#start").click()
        ui.wait_text("train-status", "started lmtune train runs/mine/webui_config.yaml")
        assert (workdir / "mine.yaml").read_text() == MINE
        written = yaml.safe_load((workdir / "runs" / "mine" / "webui_config.yaml").read_text())
        assert written["dataset"] == "data/sums.json" and written["preview_samples"] == 0
        ui.wait_text("progress", "running (pid")
        run_dir = workdir / "runs" / "mine"
        ui.wait_for(lambda: running_pid(run_dir), "train.pid of the run")
        # a start while it runs is refused, and still leaves the loaded file alone
        page.get_by_role("tab", name="Train").click()
        page.locator("#start").click()
        ui.wait_text("train-status", "is already writing to")
        assert (workdir / "mine.yaml").read_text() == MINE
    except BaseException:
        ui.shot("failed", required=False)
        raise
    finally:
        page.close()

    # SIGTERM ends the server and not the run; a new server (with --auth) and a new page find the run running
    served.end(signal.SIGTERM)
    pid = running_pid(run_dir)
    assert pid is not None
    with opened_ui(workdir, browser, shots, "--auth", "alice:s3cret", viewport=viewport) as ui:
        # --auth: a login first; a wrong password shows no part of the page
        page = ui.page
        page.get_by_label("username").fill("alice")
        page.get_by_label("password").fill("wrong")
        page.get_by_role("button", name="Login").click()
        page.get_by_text("Incorrect Credentials").wait_for(timeout=30_000)
        assert page.locator("#plan").count() == 0
        page.get_by_label("username").fill("alice")  # the login page clears it after a failed try
        page.get_by_label("password").fill("s3cret")
        page.get_by_role("button", name="Login").click()
        page.locator("#plan").wait_for(timeout=60_000)
        # the Train tab shows the running run's config, read only, and its Stop stops it
        ui.wait_text("lock-note", f"runs/mine is running (pid {pid})")
        assert ui.page.locator("#output-dir textarea, #output-dir input").first.input_value() == "runs/mine"
        learning_rate = ui.page.locator("#learning-rate textarea, #learning-rate input").first
        assert learning_rate.input_value() == "0.002" and learning_rate.is_disabled()
        ui.wait_text("yaml", "dataset: data/sums.json", "learning_rate: 0.002")
        ui.page.get_by_role("tab", name="Monitor").click()
        ui.wait_text("progress", f"runs/mine: running (pid {pid})")
        ui.wait_text("runs", "runs/mine", "running")
        ui.step_shot("reopened-monitor")
        # the first server ended with SIGTERM: the run is still the same process
        assert running_pid(run_dir) == pid
        ui.page.get_by_role("tab", name="Train").click()
        ui.page.locator("#stop-train").click()
        ui.wait_text("train-status", f"stop requested (SIGINT to pid {pid})")
        ui.wait_for(lambda: running_pid(run_dir) is None, "the run stopped", timeout=90)
        ui.wait_for(lambda: not learning_rate.is_disabled(), "the form editable again once it stopped")
    assert M.run_state(run_dir).kind == M.STOPPED
