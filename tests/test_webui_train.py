"""The Train and Monitor tabs in Chromium, on one shared server and one 1280x800 page: the layout at laptop
sizes, each stage's keys, the plan's checks, Load / Save YAML and Start without losing a value or a file,
and the Monitor's plots (a real plotting component), events and runs table, read from run folders written
here. The screenshots of the README's web UI section are taken here (`LMTUNE_WEBUI_SHOTS=docs/webui`)."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
import yaml
from test_webui import CHROMIUM, CHROMIUM_ARGS, Page, make_workdir, needs_chromium, start_server, stop_server

from lmtune.webui import monitor as M

pytestmark = needs_chromium

README_SHOTS = os.environ.get("LMTUNE_WEBUI_SHOTS")  # a folder: the README's screenshots are copied there


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_model_dir):
    """One working folder with run folders to watch, its web UI, and one page at 1280x800 for the module."""
    from playwright.sync_api import sync_playwright

    workdir = make_workdir(tmp_path_factory.mktemp("webui") / "work", tiny_model_dir)
    write_runs(workdir)
    server, url = start_server(workdir)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        ui = Page(page, workdir.parent / "webui-shots")
        ui.url, ui.workdir = url, workdir
        page.goto(url)
        try:
            yield ui
        finally:
            browser.close()
            stop_server(server)


@pytest.fixture
def ui(served):
    """The shared page, opened afresh on the Train tab once its first refreshes are done (a wait that times out
    takes a screenshot)."""
    served.page.goto(served.url)
    served.wait_text("plan", "pick at least one data set")
    return served


def readme_shot(ui: Page, name: str) -> None:
    path = ui.shot(name)
    if README_SHOTS:
        Path(README_SHOTS).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(README_SHOTS) / f"webui-{name}.png")


def rows_file(rows: list[dict]) -> str:
    return "".join(json.dumps(row) + "\n" for row in rows)


def write_runs(workdir: Path) -> None:
    """Three runs as lmtune writes them: sft whose loss moves by 0.05 (stopped and resumed at step 12), dpo
    keeping its best checkpoint by eval_rewards/accuracies, grpo."""
    flat = workdir / "runs" / "flat"
    flat.mkdir(parents=True)
    (flat / "run_config.yaml").write_text(yaml.safe_dump({"stage": "sft", "max_steps": 30}))
    train = [{"type": "train", "step": s, "epoch": s / 10, "samples_seen": 4 * s, "tokens_seen": 90 * s,
              "loss": 10.85 - 0.002 * s + 0.001 * (s % 3), "lr": 1e-4 * (1 - s / 40), "grad_norm": 0.5 + 0.01 * s,
              "tokens_per_s": 900.0 + s, "mem_peak_mb": 1500.0 + s, "elapsed_s": 1.0 * s, "eta_s": 30.0 - s}
             for s in range(1, 25)]
    rows = train[:11] + [
        {"type": "event", "event": "save", "step": 12, "path": "checkpoint-12", "reasons": ["signal"]},
        {"type": "event", "event": "resume", "step": 12, "lr_old": 7e-5, "lr_new": 7e-5, "changes": [],
         "processes": {"saved": 1, "now": 1}},
    ] + train[11:] + [{"type": "eval", "step": 20, "epoch": 2.0, "eval_loss": 10.83}]
    (flat / "metrics.jsonl").write_text(rows_file(rows))
    (flat / "checkpoints.json").write_text(json.dumps({"version": 1, "checkpoints": [
        {"step": 12, "path": "checkpoint-12", "reasons": ["signal"], "status": "kept", "metrics": {"loss": 10.83}}]}))

    pref = workdir / "runs" / "pref"
    pref.mkdir(parents=True)
    (pref / "run_config.yaml").write_text(yaml.safe_dump({"stage": "dpo", "max_steps": 8,
                                                          "metric_for_best_model": "eval_rewards/accuracies"}))
    rows = [{"type": "train", "step": s, "loss": 0.69 - 0.02 * s, "lr": 1e-3, "rewards/chosen": 0.01 * s,
             "rewards/rejected": -0.01 * s, "rewards/margins": 0.02 * s, "rewards/accuracies": 0.5 + 0.05 * s}
            for s in range(1, 9)]
    rows += [{"type": "eval", "step": s, "eval_loss": 0.7 - 0.03 * s, "eval_rewards/accuracies": s / 8,
              "eval_rewards/margins": 0.01 * s} for s in (4, 8)]
    (pref / "metrics.jsonl").write_text(rows_file(rows))
    (pref / "checkpoints.json").write_text(json.dumps({"version": 1, "checkpoints": [
        {"step": s, "path": f"checkpoint-{s}", "reasons": ["steps"], "status": "kept", "best": s == 8,
         "metrics": {"loss": 0.6, "eval_loss": 0.5, "eval_rewards/accuracies": s / 8}} for s in (4, 8)]}))

    rl = workdir / "runs" / "rl"
    rl.mkdir(parents=True)
    (rl / "run_config.yaml").write_text(yaml.safe_dump({"stage": "grpo", "max_steps": 6}))
    (rl / "metrics.jsonl").write_text(rows_file([
        {"type": "train", "step": s, "loss": 0.0, "lr": 1e-5, "reward": 0.2 + 0.1 * s, "reward_std": 0.3,
         "frac_reward_zero_std": 0.25, "completions/mean_length": 40.0 - s, "generated_tokens_per_s": 50.0}
        for s in range(1, 7)]))


def plot(ui: Page, name: str) -> dict:
    """What a plot of the Monitor draws, read from its SVG: the y axis's labels, the legend, and the series
    drawn (a line of their colour)."""
    found = ui.page.locator(f"#plot-{name}").evaluate("""element => {
        const texts = selector => [...element.querySelectorAll(selector)].map(t => t.textContent);
        const axis = [...element.querySelectorAll('g.role-axis')].find(
            g => (g.getAttribute('aria-label') || '').startsWith('Y-axis'));
        return {y: axis ? [...axis.querySelectorAll('.role-axis-label text')].map(t => t.textContent) : [],
                legend: texts('.role-legend-label text'),
                strokes: [...element.querySelectorAll('g.mark-line path')].filter(
                    path => (path.getAttribute('d') || '').length > 8).map(path => path.getAttribute('stroke'))};
    }""")
    colours = M.series_colours(next(spec for spec in M.PLOTS if spec.name == name))
    strokes = found.pop("strokes")
    found["drawn"] = {series for series, colour in colours.items() if colour in strokes}
    return found


def visible_plots(ui: Page) -> set[str]:
    return {element.get_attribute("id").removeprefix("plot-") for element in ui.page.locator(".lmtune-plot").all()
            if element.is_visible()}


def test_train_tab_fits_a_laptop_and_shows_each_stage_its_own_keys(ui):
    page = ui.page
    # Start is on screen at 1280x800 without scrolling, the plan beside the form
    ui.wait_text("plan", "pick at least one data set")
    box = page.locator("#start").bounding_box()
    assert box["y"] + box["height"] <= 800, box
    # every stage lmtune has; the preference and grpo keys only for their stages
    stages = page.locator("#stage label").all_inner_texts()
    assert [s.strip() for s in stages] == ["pt", "sft", "dpo", "kto", "rm", "grpo"]
    for stage in ("sft", "rm"):
        ui.radio("stage", stage)
        ui.wait_for(lambda: not page.locator("#pref-beta").is_visible(), f"no preference keys for {stage}")
        assert not page.locator("#num-generations").is_visible()
    ui.radio("stage", "dpo")
    precompute = page.locator("#precompute-ref-log-probs")
    precompute.wait_for(state="visible")
    assert not page.locator("#kto-chosen-weight").is_visible() and page.locator("#simpo-gamma").is_visible()
    # the check box's label is whole and its help reads as lines of words, not a word a line
    label = precompute.get_by_text("precompute_ref_log_probs", exact=True)
    assert label.bounding_box()["width"] > 150
    words = precompute.get_by_text("reference log-probabilities computed once", exact=False)
    assert words.bounding_box()["width"] > 180
    ui.radio("stage", "grpo")
    page.locator("#num-generations").wait_for(state="visible")
    for key in ("reward-funcs", "max-completion-length", "temperature", "beta", "loss-type", "scale-rewards"):
        assert page.locator(f"#{key}").is_visible(), key
    assert not precompute.is_visible()

    # the plan: grpo with a built-in reward, on the tiny model
    ui.pick("model", "models/tiny (folder)")
    ui.radio("finetuning-type", "lora")
    ui.pick("dataset", "sums (dataset_info.json)")
    ui.pick("reward-funcs", "length")
    ui.fill("max-steps", "4")
    ui.fill("num-generations", "2")
    ui.wait_text("plan", "4 optimizer steps", "generat")
    # a checkpoint name the plan refuses is shown whole, <step> and all
    ui.fill("resume", "bogus")
    ui.wait_text("plan", "is not a checkpoint-<step> folder of the run")
    ui.fill("resume", "auto")
    # lora_target is checked against the model's modules, as Start checks it
    ui.fill("lora-target", "q_proj,no_such_proj")
    plan = ui.wait_text("plan", "lmtune plan refuses this config", "lora_target")
    assert "no_such_proj" in plan
    ui.fill("lora-target", "q_proj,v_proj")
    ui.wait_text("plan", "4 optimizer steps")
    readme_shot(ui, "train")
    # at 1024 px the plan table's headers keep their words whole
    page.set_viewport_size({"width": 1024, "height": 800})
    try:
        headers = page.locator("#plan th")
        headers.first.wait_for()
        lines = headers.evaluate_all("""cells => cells.map(cell => {
            const range = document.createRange(); range.selectNodeContents(cell);
            return new Set([...range.getClientRects()].map(r => Math.round(r.top))).size; })""")
        assert lines and max(lines) == 1, lines
    finally:
        page.set_viewport_size({"width": 1280, "height": 800})


MINE = """# my config: comments and key order are mine
model_name_or_path: models/tiny
finetuning_type: full
dataset: data/sums.json   # a file path
max_steps: 3
output_dir: runs/mine
"""


@pytest.mark.xfail(strict=False, reason=(
    "issue 28, defect 13 not fully fixed: run alone (the page and its server just started), the plan pane shows "
    "'pick at least one data set' for a moment after 'loaded mine.yaml', while the dataset box already holds the "
    "loaded file; it fails so on the code of 74d3456 too"))
def test_load_yaml_at_once_keeps_every_value_and_save_asks_before_replacing_a_file(ui):
    page = ui.page
    mine = ui.workdir / "mine.yaml"
    mine.write_text(MINE)
    # Load YAML as soon as the page shows, while its own refreshes are under way: once the form is loaded, the
    # plan never shows the empty form's error again, and the data set stays, past the page's refreshes and
    # the folder poll (every 2 s)
    ui.fill("config-path", "mine.yaml")
    page.locator("#load-yaml").click()
    loaded_at, deadline, plan = None, time.monotonic() + 120, ""
    while loaded_at is None or time.monotonic() < loaded_at + 6 or "3 optimizer steps" not in plan:
        status, plan, dataset = ui.text("train-status"), ui.text("plan"), ui.text("dataset")
        if "loaded mine.yaml" in status:
            assert "pick at least one data set" not in plan and "data/sums.json" in dataset, (plan, dataset)
            loaded_at = loaded_at or time.monotonic()
        assert time.monotonic() < deadline, (status, plan)
        time.sleep(0.2)
    # Save YAML over the loaded file asks first; the file keeps every byte until asked again
    page.locator("#save-yaml").click()
    ui.wait_text("train-status", "mine.yaml exists", "Save YAML again")
    assert mine.read_text() == MINE
    page.locator("#save-yaml").click()
    ui.wait_text("train-status", "saved mine.yaml")
    assert yaml.safe_load(mine.read_text())["dataset"] == "data/sums.json" and "comments" not in mine.read_text()


BAD_RUN = """# written by hand: Start must not rewrite it
model_name_or_path: models/tiny
finetuning_type: full
dataset: data/broken.json
max_steps: 2
output_dir: runs/broken
"""


def test_a_refused_start_stays_on_the_train_tab_and_is_listed_as_refused(ui):
    page, workdir = ui.page, ui.workdir
    (workdir / "data" / "broken.json").write_text(json.dumps([{"question": "no instruction column"}]))
    hand_written = workdir / "runs" / "broken" / "webui_config.yaml"
    hand_written.parent.mkdir(parents=True)
    hand_written.write_text(BAD_RUN)
    ui.fill("config-path", "runs/broken/webui_config.yaml")
    page.locator("#load-yaml").click()
    ui.wait_text("train-status", "loaded runs/broken/webui_config.yaml")
    # a bad value: the error shows where Start was pressed, and the tab stays
    ui.fill("learning-rate", "abc")
    page.locator("#start").click()
    ui.wait_text("train-status", "error", "learning_rate")
    time.sleep(1)
    assert page.locator("#start").is_visible() and not page.locator("#progress").is_visible()
    # a start that lmtune train refuses (exit 2): the loaded file is not rewritten, and the runs table lists it
    ui.fill("learning-rate", "0.001")
    page.locator("#start").click()
    ui.wait_text("train-status", "started lmtune train runs/broken/webui_config-2.yaml")
    assert hand_written.read_text() == BAD_RUN
    ui.wait_text("progress", "refused to start (exit code 2)", timeout=120)
    ui.wait_text("runs", "runs/broken", "refused to start (exit code 2)")
    # a folder that holds no run is said to be none, not a failed run
    ui.fill("run-folder", "data")
    ui.wait_text("progress", "not a run folder")
    # the Train tab again: a second start while nothing runs goes to the Monitor only when it starts
    page.get_by_role("tab", name="Train").click()
    ui.fill("output-dir", "../outside")
    page.locator("#start").click()
    ui.wait_text("train-status", "outside the working folder")
    time.sleep(1)
    assert page.locator("#start").is_visible()


def test_monitor_plots_every_metric_on_readable_axes_with_stops_and_resumes(ui):
    page = ui.page
    page.get_by_role("tab", name="Monitor").click()
    ui.wait_text("progress", "runs/")  # the run it opens with
    ui.pick("run-folder", "runs/flat")
    ui.wait_text("progress", "runs/flat")
    sft = {"loss", "lr", "grad-norm", "speed", "memory"}
    ui.wait_for(lambda: visible_plots(ui) == sft, "the sft plots alone")
    # the loss moves by 0.05: each y label is its own value; the stop and the resume are lines across it
    loss = ui.wait_for(lambda: (p := plot(ui, "loss"))["drawn"] == {"train loss", "eval loss", "stopped", "resumed"}
                       and p, "train and eval loss, the stop and the resume drawn")
    assert len(loss["y"]) >= 3 and len(set(loss["y"])) == len(loss["y"]), loss
    assert {"train loss", "eval loss", "stopped", "resumed"} <= set(loss["legend"]), loss
    learning_rate = plot(ui, "lr")
    assert len(set(learning_rate["y"])) == len(learning_rate["y"]) >= 3, learning_rate
    # the stop's step is the step shown; events read as words
    ui.wait_text("progress", "step 24 / 30")
    events = ui.wait_text("events", "resume", "processes: saved 1, now 1")
    assert "{" not in events
    readme_shot(ui, "monitor")

    ui.pick("run-folder", "runs/pref")
    ui.wait_for(lambda: {"rewards", "accuracy"} <= visible_plots(ui), "the dpo plots")
    ui.wait_for(lambda: plot(ui, "rewards")["drawn"] == {"chosen", "rejected", "margin", "eval margin"}, "rewards")
    ui.wait_for(lambda: plot(ui, "accuracy")["drawn"] == {"accuracy", "eval accuracy"}, "accuracies")
    # runs/flat's lines are gone: the loss plot has this run's, with no stop
    ui.wait_for(lambda: plot(ui, "loss")["drawn"] == {"train loss", "eval loss"}, "this run's loss alone")
    # the metric that picks the best checkpoint is a column of the checkpoints table
    header = ui.wait_text("checkpoints", "eval_rewards/accuracies")
    best = [row for row in page.locator("#checkpoints tbody tr").all_inner_texts() if "best" in row]
    assert len(best) == 1 and "1.0000" in best[0], best

    ui.pick("run-folder", "runs/rl")
    ui.wait_for(lambda: {"reward", "completion-length", "generation"} <= visible_plots(ui), "the grpo plots")
    ui.wait_for(lambda: plot(ui, "reward")["drawn"] == {"reward", "reward std", "groups with no reward spread"},
                "the grpo reward")
    assert not {"rewards", "accuracy"} & visible_plots(ui), header


def test_a_run_picked_before_the_page_has_loaded_stays_picked(served):
    """The Monitor's opening choice (the running or newest run) never overwrites a run the user picked first."""
    page = served.page
    config = page.request.get(served.url + "config").json()
    ids = {c.get("props", {}).get("elem_id"): c["id"] for c in config["components"]}
    opening = {d["id"] for d in config["dependencies"]
               if any(event == "load" for _, event in d["targets"]) and ids["runs"] in d["outputs"]}
    assert len(opening) == 1
    held = []

    def hold_opening(route):  # the server's answer comes after the user's pick, as on a busy machine
        if (route.request.post_data_json or {}).get("fn_index") in opening:
            held.append(route)
        else:
            route.continue_()

    page.route("**/queue/join*", hold_opening)
    try:
        page.goto(served.url)
        page.get_by_role("tab", name="Monitor").click()
        served.wait_for(lambda: held, "the page's opening asked for")
        served.pick("run-folder", "runs/flat")
        served.wait_text("progress", "runs/flat")
    finally:
        for route in held:
            route.continue_()
        page.unroute("**/queue/join*")
    served.wait_text("runs", "runs/pref", "runs/rl")
    time.sleep(3)  # the opening's answer lands and the Monitor polls (every second) what it shows
    assert "runs/flat" in served.text("progress") and page.locator("#run-folder input").input_value() == "runs/flat"
