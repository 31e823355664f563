"""The web UI after a run, in Chromium: the Chat tab (a queue of messages, Stop, Clear, fresh pick lists, two
models side by side), the Eval tab (`lmtune eval`) and the Export tab (`lmtune export`).

One server and one page serve every test here, in file order, over one tiny LoRA run trained after the page
opened. Screenshots go to the test's tmp folder; with LMTUNE_WEBUI_SHOTS=docs the tabs' screenshots also
replace docs/webui-*.png, which the README shows.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from test_webui import Page, browser, make_workdir, needs_chromium, start_server, stop_server

from lmtune.config import load_config

PROMPTS = ["What is 2 plus 3?", "And 4 plus 4?", "Now 1 plus 7?"]
pytestmark = needs_chromium
__all__ = ["browser"]  # the module's Chromium, shared with test_webui


def train_lora(workdir: Path, max_steps: int) -> Path:
    """The tiny model with LoRA on the sums, a checkpoint every step, two kept; resumed when run again."""
    from lmtune.engine import train

    config = workdir / "lora.yaml"
    config.write_text(yaml.safe_dump(dict(
        model_name_or_path="models/tiny", dataset="sums", finetuning_type="lora", lora_rank=4, learning_rate=3e-2,
        per_device_train_batch_size=4, max_steps=max_steps, val_size=8, save_steps=1, save_total_limit=2,
        logging_steps=1, report_to="none", plot_loss=False, preview_samples=0, cutoff_len=64,
        lr_scheduler_type="constant", output_dir="runs/lora")))
    cwd = Path.cwd()
    os.chdir(workdir)
    try:
        train(load_config(config))
    finally:
        os.chdir(cwd)
    return workdir / "runs" / "lora"


@pytest.fixture(scope="module")
def opened(tmp_path_factory, tiny_model_dir, browser):
    """(page, working folder): the server started and the page opened before any run exists."""
    workdir = make_workdir(tmp_path_factory.mktemp("after-training") / "work", tiny_model_dir)
    # the tiny model with a longer context: answers long enough to stop or clear while they are written
    shutil.copytree(tiny_model_dir, workdir / "models" / "long")
    config = json.loads((workdir / "models" / "long" / "config.json").read_text())
    (workdir / "models" / "long" / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 4096}))
    server, url = start_server(workdir)
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.set_default_timeout(90_000)  # a click waits for a page that a loaded machine draws slowly
    ui = Page(page, workdir.parent / "webui-shots")
    ui.server = server
    try:
        page.goto(url)
        page.locator("#plan").wait_for(timeout=60_000)
        yield ui, workdir
    finally:
        page.close()
        stop_server(server)


@pytest.fixture
def ui(opened):
    return opened[0]


def doc_shot(ui: Page, name: str) -> None:
    """A screenshot of the page as it is (1280 px wide), kept with the test's, and in docs/ when asked."""
    path = ui.shot(name)
    if folder := os.environ.get("LMTUNE_WEBUI_SHOTS"):  # the README's screenshots are copied there
        Path(folder).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(folder) / f"{name}.png")


def options(ui: Page, elem_id: str) -> list[str]:
    """The options a pick list offers when the user opens it."""
    box = ui.page.locator(f"#{elem_id} input").first
    box.click()
    ui.page.get_by_role("option").first.wait_for(timeout=10_000)
    ui.page.wait_for_timeout(500)  # the list is read again as it opens
    found = ui.page.get_by_role("option").all_inner_texts()
    ui.page.locator("body").click(position={"x": 5, "y": 5})
    return [text.replace("✓", "").strip() for text in found]  # ✓ marks the chosen one


def answers(ui: Page, elem_id: str = "chatbot") -> list[str]:
    return [text.strip() for text in ui.page.locator(f"#{elem_id} .bot").all_inner_texts()]


def questions(ui: Page, elem_id: str = "chatbot") -> list[str]:
    return [text.strip() for text in ui.page.locator(f"#{elem_id} .user").all_inner_texts()]


def send(ui: Page, text: str) -> None:
    box = ui.page.locator("#chat-input textarea")
    box.fill(text)
    box.press("Enter")


def settle(ui: Page, asked: int, timeout: float = 90) -> None:
    """Wait until the page shows `asked` messages, and nothing is written or waiting."""
    ui.wait_for(lambda: len(questions(ui)) == asked and not re.search(r"writing|waiting", ui.text("chat-queue")),
                "every answer written", timeout)


def letters(text: str) -> str:
    """Text without what markdown rendering may change (marks, spacing)."""
    return re.sub(r"\W", "", text)


# --- Chat ---------------------------------------------------------------------------------------------


def test_chat_lists_follow_the_runs_without_a_refresh(opened, ui):
    _, workdir = opened
    ui.page.get_by_role("tab", name="Chat").click()
    assert not [o for o in options(ui, "chat-target") if o.startswith("runs/")]  # no run yet
    run = train_lora(workdir, max_steps=4)
    index = json.loads((run / "checkpoints.json").read_text())["checkpoints"]
    assert [(e["step"], e["status"]) for e in index] == [(1, "deleted"), (2, "deleted"), (3, "kept"), (4, "kept")]
    offered = options(ui, "chat-target")
    assert "runs/lora (final model)" in offered
    assert [o for o in offered if "checkpoint" in o] == ["runs/lora/checkpoint-4 (checkpoint, step 4)",
                                                          "runs/lora/checkpoint-3 (checkpoint, step 3)"]
    # two more steps: rotation deletes checkpoints 3 and 4, which the list stops offering
    train_lora(workdir, max_steps=6)
    offered = options(ui, "chat-compare")
    assert [o for o in offered if "checkpoint" in o] == ["runs/lora/checkpoint-6 (checkpoint, step 6)",
                                                          "runs/lora/checkpoint-5 (checkpoint, step 5)"]
    assert "(no comparison)" in offered and "runs/lora (final model)" in offered


def replay(target: str, prompts: list[str], max_new_tokens: int) -> list[str]:
    """The answers `lmtune chat` gives to these messages, one after the other in one conversation."""
    from lmtune.chat import generate, load_for_chat, sampling_of

    session, messages, said = load_for_chat(target), [], []
    for prompt in prompts:
        messages.append({"role": "user", "content": prompt})
        said.append(generate(session, messages, sampling_of(max_new_tokens)).text)
        messages.append({"role": "assistant", "content": said[-1]})
    return said


def set_max_tokens(ui: Page, count: int) -> None:
    if not ui.page.locator("#chat-max-tokens").is_visible():
        ui.page.locator("#chat-settings").get_by_text("settings: system prompt").click()
    box = ui.page.locator("#chat-max-tokens input[type=number]")
    slider = ui.page.locator("#chat-max-tokens input[type=range]")

    def typed() -> bool:  # a busy page may drop a keystroke: type again until the slider follows
        if slider.input_value() != str(count):
            box.fill(str(count))
            box.blur()
            ui.page.wait_for_timeout(500)
        return slider.input_value() == str(count)

    ui.wait_for(typed, f"max_new_tokens {count}", timeout=60)


def load(ui: Page, option: str, loaded: str) -> None:
    ui.page.get_by_role("tab", name="Chat").click()
    ui.pick("chat-target", option)
    ui.page.locator("#chat-load").click()
    ui.wait_text("chat-status", f"loaded {loaded}")


@contextlib.contextmanager
def busy(ui: Page, slower: float = 4):
    """The page's CPU `slower` times slower, as in a browser on a loaded machine: late drawing and late events."""
    cdp = ui.page.context.new_cdp_session(ui.page)
    cdp.send("Emulation.setCPUThrottlingRate", {"rate": slower})
    try:
        yield
    finally:
        cdp.send("Emulation.setCPUThrottlingRate", {"rate": 1})
        cdp.detach()


def test_three_messages_sent_in_quick_succession_are_answered_in_order(opened, ui, monkeypatch):
    monkeypatch.chdir(opened[1])  # the working folder, as `lmtune webui` runs in it
    load(ui, "models/long (folder)", "models/long")
    ui.page.locator("#chat-clear").click()
    ui.wait_for(lambda: not questions(ui), "an empty chat")
    set_max_tokens(ui, 300)  # seconds of writing for the first answer
    # three Enters in quick succession on a busy page: the first answer starts streaming while they are sent
    with busy(ui):
        for prompt in PROMPTS:
            send(ui, prompt)
        box = ui.page.locator("#chat-input textarea")
        ui.wait_for(lambda: box.input_value() == "", "the box emptied as the message went", timeout=10)
        ui.wait_for(lambda: questions(ui) == PROMPTS, "the messages shown, in the order sent")
    settle(ui, 3, timeout=300)  # three answers of 300 tokens each, on a loaded machine
    expected = replay("models/long", PROMPTS, 300)
    assert questions(ui) == PROMPTS
    assert [letters(a) for a in answers(ui)] == [letters(a or "(an empty answer)") for a in expected]


def test_stop_ends_the_answer_and_clear_stays_cleared(opened, ui):
    load(ui, "models/long (folder)", "models/long")
    ui.page.locator("#chat-clear").click()
    ui.wait_for(lambda: not questions(ui), "an empty chat")
    set_max_tokens(ui, 4096)  # a minute of writing
    # three at once, which the tiny model answers without an end of sequence: Stop comes while one is written
    # and at least one waits
    for prompt in PROMPTS:
        send(ui, prompt)
    ui.wait_for(lambda: answers(ui) and answers(ui)[0], "the answer streaming")
    ui.wait_for(lambda: re.search(r"writing an answer; [12] waiting", ui.text("chat-queue")), "messages waiting")
    ui.page.locator("#chat-stop-button").click()
    skipped = int(ui.wait_for(lambda: re.search(r"stopped; (\d) waiting answer\(s\) not written",
                                                ui.text("chat-queue")), "the stop").group(1))
    # the answer being written ends where it was; the messages still waiting are not answered
    stopped = ui.wait_for(lambda: len(a := answers(ui)) == 3 and a, "every answer shown")
    assert skipped >= 1 and stopped[-skipped:] == ["[not answered: stopped]"] * skipped, stopped
    assert stopped[-skipped - 1].endswith("[stopped]"), stopped
    ui.page.wait_for_timeout(1000)
    assert answers(ui) == stopped  # nothing is written after Stop

    # Clear while an answer streams to a busy page, which draws what it was sent late: the chat empties, and
    # nothing the page had been sent before brings the exchange back, nor shows an error
    send(ui, PROMPTS[1])
    ui.wait_for(lambda: len(answers(ui)) == 4 and answers(ui)[-1], "a new answer streaming")
    with busy(ui, slower=6):  # at 4 times slower, a Clear that cancelled the page's stream failed 1 time in 5
        ui.page.wait_for_timeout(3000)  # the page falls behind the answer
        ui.page.locator("#chat-clear").click()
        ui.wait_for(lambda: not questions(ui) and not answers(ui), "the chat cleared")
        ui.page.wait_for_timeout(3000)
        assert not questions(ui) and not answers(ui)
        assert not re.search(r"writing|waiting|Error", ui.text("chat-queue")), ui.text("chat-queue")
    set_max_tokens(ui, 20)
    send(ui, PROMPTS[0])
    settle(ui, 1)
    assert questions(ui) == [PROMPTS[0]] and len(answers(ui)) == 1  # only the new exchange


def test_two_checkpoints_answer_the_same_prompt_side_by_side(opened, ui, monkeypatch):
    monkeypatch.chdir(opened[1])
    load(ui, "runs/lora/checkpoint-5 (checkpoint, step 5)", "runs/lora/checkpoint-5")
    ui.page.locator("#chat-clear").click()
    ui.wait_for(lambda: not questions(ui), "an empty chat")
    ui.pick("chat-compare", "runs/lora/checkpoint-6 (checkpoint, step 6)")
    ui.page.locator("#chat-load-compare").click()
    ui.wait_text("chat-status", "loaded runs/lora/checkpoint-6", "side by side")
    settings = ui.page.locator("#chat-settings")
    settings.locator("#chat-system textarea").fill("You add numbers.")
    settings.locator("#chat-stop textarea").fill("ou")
    set_max_tokens(ui, 24)
    send(ui, PROMPTS[0])
    settle(ui, 1)
    assert questions(ui, "chatbot") == questions(ui, "chatbot-b") == [PROMPTS[0]]
    for side, target in (("chatbot", "checkpoint-5"), ("chatbot-b", "checkpoint-6")):
        [shown] = answers(ui, side)
        expected = offline_answer(f"runs/lora/{target}", PROMPTS[0])
        assert letters(shown) == letters(expected), side
    ui.wait_text("chatbot", "A: checkpoint-5")
    ui.wait_text("chatbot-b", "B: checkpoint-6")
    doc_shot(ui, "webui-chat")


def offline_answer(folder: str, prompt: str) -> str:
    from lmtune.chat import generate, load_for_chat, sampling_of, with_system

    session = load_for_chat(folder)
    messages = with_system("You add numbers.", [{"role": "user", "content": prompt}])
    return generate(session, messages, sampling_of(24, stop=["ou"])).text


# --- Eval and Export ----------------------------------------------------------------------------------


def test_eval_tab_measures_a_checkpoint_as_lmtune_eval_does(opened, ui):
    _, workdir = opened
    ui.page.get_by_role("tab", name="Eval").click()
    ui.page.locator("#eval-button").click()
    ui.wait_text("eval-status", "pick the run")
    ui.pick("eval-run", "runs/lora")
    ui.pick("eval-model", "runs/lora/checkpoint-5 (checkpoint, step 5)")
    ui.page.locator("#eval-button").click()
    ui.wait_text("eval-status", "done: lmtune eval runs/lora --checkpoint runs/lora/checkpoint-5", timeout=120)
    report = json.loads(ui.page.locator("#eval-report .cm-content").inner_text())
    assert report["model"]["step"] == 5 and report["data"]["split"].startswith("eval (val_size 8")
    assert report["examples"] == 8 and math.isclose(report["perplexity"], math.exp(report["loss"]), rel_tol=1e-6)
    table = ui.text("eval-table")
    assert "checkpoint" in table and f"{report['loss']:.4f}" in table
    doc_shot(ui, "webui-eval")
    # a data file outside the working folder is refused before anything runs
    ui.fill("eval-dataset", "../../outside.json")
    ui.page.locator("#eval-button").click()
    ui.wait_text("eval-status", "outside the working folder")


def test_export_tab_merges_casts_and_writes_gguf(opened, ui):
    from transformers import AutoModelForCausalLM

    _, workdir = opened
    ui.page.get_by_role("tab", name="Export").click()
    ui.pick("export-source", "runs/lora (final model)")
    ui.wait_text("export-out", "exports/runs-lora")
    ui.radio("export-dtype", "fp16")
    ui.page.locator("#export-gguf input").check()
    ui.page.locator("#export-button").click()
    ui.wait_text("export-status", "done: lmtune export", timeout=120)
    ui.wait_text("export-files", "model.safetensors", "model.gguf", "config.json")
    doc_shot(ui, "webui-export")
    folder = workdir / "exports" / "runs-lora"
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert model.dtype == torch.float16 and not (folder / "adapter_config.json").exists()  # merged, cast
    # the same folder again: the command's own refusal is shown, and the export is left as it was
    written = {p.name: p.stat().st_mtime for p in folder.iterdir()}
    ui.page.locator("#export-button").click()
    ui.wait_text("export-status", "failed", "is not empty", timeout=120)
    assert {p.name: p.stat().st_mtime for p in folder.iterdir()} == written


# --- the server's end -----------------------------------------------------------------------------------


def test_ctrl_c_ends_the_server_while_an_answer_is_written(opened, ui):
    load(ui, "models/long (folder)", "models/long")
    ui.page.locator("#chat-clear").click()
    ui.wait_for(lambda: not questions(ui), "an empty chat")
    set_max_tokens(ui, 4096)  # a minute of writing
    send(ui, PROMPTS[0])
    ui.wait_for(lambda: answers(ui) and answers(ui)[0], "an answer streaming")
    stop_server(ui.server)  # exit 0 within the bound, the page still open and the answer still written
