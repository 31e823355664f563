"""`lmtune serve` through the real `openai` client: a tiny run, its checkpoints and two adapters."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import torch
from conftest import ALPACA_ROWS, free_port, run_lmtune, write_config

KEY = "test-key"
HELLO = [{"role": "user", "content": "What is 2 plus 3?"}]
TOOLS_TEMPLATE = ("{% if tools %}Tools: {{ tools | tojson }}\n{% endif %}{% for m in messages %}{{ m.role }}: "
                  "{{ m.content }}\n{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")


class Server:
    """`lmtune serve ROOTS` in this process, on a free loopback port."""

    def __init__(self, roots: list[str], api_key: str | None = KEY, **limits) -> None:
        import uvicorn

        from lmtune.serving.server import Limits, create

        self.app, self.batcher = create(roots, api_key, Limits(**limits))
        self.url = f"http://127.0.0.1:{free_port()}"
        port = int(self.url.rsplit(":", 1)[1])
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.02)
        self.client = openai.OpenAI(base_url=f"{self.url}/v1", api_key=api_key or "none", max_retries=0, timeout=120)

    def health(self) -> dict:
        return httpx.get(f"{self.url}/health").json()

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.batcher.close()


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_model_dir, tokenizer):
    """A folder with a full run of the tiny model (checkpoints 2 and 4, template default), two LoRA adapters
    of it that answer differently and a reward model, served with an API key."""
    root = tmp_path_factory.mktemp("served")
    data = root / "sums.json"
    data.write_text(json.dumps(ALPACA_ROWS[:16]))
    config = write_config(
        root, model_name_or_path=str(tiny_model_dir), dataset=str(data), finetuning_type="full",
        template="default", output_dir=str(root / "run"), learning_rate=5e-3, per_device_train_batch_size=4,
        num_train_epochs=1, save_steps=2, logging_steps=1, report_to="none", plot_loss=False, preview_samples=0,
        cutoff_len=64, lr_scheduler_type="constant",
    )
    assert run_lmtune("train", config) == 0
    for name, seed in (("a", 1), ("b", 2)):
        save_random_adapter(tiny_model_dir, tokenizer, root / "adapters" / name, seed)
    tooled = shutil.copytree(tiny_model_dir, root / "tooled")  # a model whose own template shows tools
    own = load_tokenizer(str(tooled))
    own.chat_template = TOOLS_TEMPLATE
    own.save_pretrained(tooled)
    scorer = root / "scorer"  # a reward model (stage rm) scores and does not write: never served
    scorer.mkdir()
    config = json.loads((tiny_model_dir / "config.json").read_text())
    (scorer / "config.json").write_text(json.dumps({**config, "architectures": ["LlamaForSequenceClassification"]}))
    server = Server([str(root)], max_tokens=32)
    yield server, root
    server.close()


def load_tokenizer(folder: str):
    from lmtune.models import load_tokenizer as load

    return load(folder)


def save_random_adapter(base_dir: Path, tokenizer, folder: Path, seed: int) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    lora = LoraConfig(r=4, lora_alpha=64, target_modules=["q_proj", "v_proj", "o_proj"], init_lora_weights=False)
    get_peft_model(base, lora).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def greedy_with_transformers(model_dir: Path, tokenizer, prompt_text: str, max_new_tokens: int) -> str:
    """The reference: transformers' own generate on the rendered prompt."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    inputs = tokenizer(prompt_text, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def run_prompt(tokenizer, messages) -> str:
    from lmtune.data.templates import chat_template_for, render

    return render(tokenizer, chat_template_for(tokenizer, "default"), messages, generation_prompt=True)


def test_models_lists_the_run_its_checkpoints_and_the_adapters(served):
    server, root = served
    listed = [model.id for model in server.client.models.list()]
    assert sorted(listed) == ["adapters/a", "adapters/b", "run", "run/checkpoint-2", "run/checkpoint-4",
                              "tooled"]
    assert server.client.models.retrieve("run/checkpoint-2").id == "run/checkpoint-2"

    # a checkpoint that appears while a run trains is listed (and served) at once
    shutil.copytree(root / "run" / "checkpoint-2", root / "run" / "checkpoint-6")
    try:
        assert "run/checkpoint-6" in [model.id for model in server.client.models.list()]
    finally:
        shutil.rmtree(root / "run" / "checkpoint-6")


def test_chat_completion_renders_the_runs_template(served, tokenizer):
    server, root = served
    answer = server.client.chat.completions.create(model="run", messages=HELLO, max_tokens=6, temperature=0)
    prompt = run_prompt(tokenizer, HELLO)
    assert answer.usage.prompt_tokens == len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    own = tokenizer.apply_chat_template(HELLO, tokenize=False, add_generation_prompt=True)
    assert len(tokenizer(own, add_special_tokens=False)["input_ids"]) != answer.usage.prompt_tokens
    expected = greedy_with_transformers(root / "run", tokenizer, prompt, 6)
    choice = answer.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == expected
    assert choice.finish_reason == "length" and answer.usage.completion_tokens == 6


def test_tools_reach_a_template_that_shows_them(served, tokenizer):
    server, _ = served
    tools = [{"type": "function", "function": {"name": "add", "description": "Add two numbers",
                                               "parameters": {"type": "object", "properties": {}}}}]
    ask = dict(model="tooled", messages=HELLO, max_tokens=1, temperature=0)
    plain = server.client.chat.completions.create(**ask)
    with_tools = server.client.chat.completions.create(**ask, tools=tools)
    from jinja2 import Template

    shown = Template(TOOLS_TEMPLATE).render(messages=HELLO, tools=tools, add_generation_prompt=True)
    assert with_tools.usage.prompt_tokens == len(tokenizer(shown, add_special_tokens=False)["input_ids"])
    assert with_tools.usage.prompt_tokens > plain.usage.prompt_tokens


def test_streaming_chat_gives_the_same_answer_piece_by_piece(served):
    server, _ = served
    whole = server.client.chat.completions.create(model="run", messages=HELLO, max_tokens=8, temperature=0)
    chunks = list(server.client.chat.completions.create(model="run", messages=HELLO, max_tokens=8, temperature=0,
                                                        stream=True, stream_options={"include_usage": True}))
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert len([p for p in pieces if p]) > 1  # streamed, not sent in one go
    assert "".join(pieces) == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 8


def test_completion_of_a_checkpoint_with_stop_and_logprobs(served, tokenizer):
    server, root = served
    prompt = "The tide comes in"
    done = server.client.completions.create(model="run/checkpoint-2", prompt=prompt, max_tokens=6, temperature=0,
                                            logprobs=2)
    expected = greedy_with_transformers(root / "run" / "checkpoint-2", tokenizer, prompt, 6)
    assert done.choices[0].text == expected and done.object == "text_completion"
    assert len(done.choices[0].logprobs.token_logprobs) == 6
    assert all(lp <= 0 for lp in done.choices[0].logprobs.token_logprobs)
    cut = expected[2:4]  # a stop string inside the answer ends it just before
    stopped = server.client.completions.create(model="run/checkpoint-2", prompt=prompt, max_tokens=6,
                                               temperature=0, stop=[cut])
    assert stopped.choices[0].text == expected[:expected.index(cut)]
    assert stopped.choices[0].finish_reason == "stop"


def test_sampling_with_a_seed_repeats_and_n_gives_several(served):
    server, _ = served
    ask = dict(model="run", messages=HELLO, max_tokens=8, temperature=1.0, top_p=0.9, seed=7, n=3)
    first, again = server.client.chat.completions.create(**ask), server.client.chat.completions.create(**ask)
    texts = [c.message.content for c in first.choices]
    assert len(texts) == 3 and texts == [c.message.content for c in again.choices]
    assert len(set(texts)) > 1


def test_two_adapters_answer_differently_in_interleaved_requests(served):
    server, _ = served

    def ask(name: str) -> str:
        answer = server.client.chat.completions.create(model=f"adapters/{name}", messages=HELLO, max_tokens=6,
                                                       temperature=0)
        return answer.choices[0].message.content

    alone = {name: ask(name) for name in "ab"}
    assert alone["a"] != alone["b"]
    with ThreadPoolExecutor(6) as pool:
        together = list(pool.map(ask, "ababab"))
    assert together == [alone[name] for name in "ababab"]


def test_errors_follow_openais_schema(served, tiny_model_dir):
    server, root = served
    for name in ("nope", "scorer", "../run", str(Path("/etc").resolve()), "run/../run"):
        with pytest.raises(openai.NotFoundError) as found:
            server.client.chat.completions.create(model=name, messages=HELLO, max_tokens=2)
        assert found.value.body["code"] == "model_not_found" and found.value.body["param"] == "model"

    (root / "outside").symlink_to(tiny_model_dir, target_is_directory=True)  # a link out of the served folder
    try:
        assert "outside" not in [model.id for model in server.client.models.list()]
        with pytest.raises(openai.NotFoundError):
            server.client.chat.completions.create(model="outside", messages=HELLO, max_tokens=2)
    finally:
        (root / "outside").unlink()

    long = [{"role": "user", "content": "tide " * 600}]  # longer than the tiny model's 512 positions
    with pytest.raises(openai.BadRequestError) as too_long:
        server.client.chat.completions.create(model="run", messages=long, max_tokens=2)
    assert too_long.value.body["code"] == "context_length_exceeded" and "512" in too_long.value.body["message"]

    wrong_key = openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as refused:
        wrong_key.models.list()
    assert refused.value.body["code"] == "invalid_api_key"

    headers = {"Authorization": f"Bearer {KEY}"}
    for body in ({"model": "run"}, {"model": "run", "messages": HELLO, "temperature": "hot"}):
        reply = httpx.post(f"{server.url}/v1/chat/completions", json=body, headers=headers)
        assert reply.status_code == 400
        error = reply.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    reply = httpx.post(f"{server.url}/v1/chat/completions", content=b"{not json", headers=headers)
    assert reply.status_code == 400 and "error" in reply.json()
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"  # no key needed for the probe


def test_32_concurrent_streams_equal_the_same_requests_alone(served):
    server, _ = served
    questions = [[{"role": "user", "content": f"What is {a} plus {a + 1}?" + " Quick." * a}] for a in range(4)]

    def streamed(messages) -> str:
        chunks = server.client.chat.completions.create(model="run", messages=messages, max_tokens=5, temperature=0,
                                                       stream=True)
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

    alone = [streamed(q) for q in questions]
    with ThreadPoolExecutor(32) as pool:
        together = list(pool.map(streamed, [questions[i % 4] for i in range(32)]))
    assert together == [alone[i % 4] for i in range(32)]
    assert server.health()["largest_batch"] > 1  # they were decoded together, not one after another
    assert server.health()["running"] == 0 and server.health()["queued"] == 0


def test_a_client_leaving_mid_stream_frees_its_slot(tmp_path, tiny_model_dir):
    server = Server([str(tiny_model_dir)], api_key=None, max_pending=1, max_tokens=400)
    name = tiny_model_dir.name
    try:
        body = {"model": name, "prompt": "The tide", "max_tokens": 400, "temperature": 0, "stream": True}
        with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as reply:
            lines = reply.iter_lines()
            assert next(line for line in lines if line.startswith("data:"))
            with pytest.raises(openai.RateLimitError) as full:
                server.client.completions.create(model=name, prompt="hi", max_tokens=1)
            assert full.value.status_code == 429 and full.value.body["code"] == "rate_limit_exceeded"
        deadline = time.monotonic() + 60
        while server.health()["cancelled_rows"] < 1:
            assert time.monotonic() < deadline, "the left stream's generation did not stop"
            time.sleep(0.05)
        assert server.health()["running"] == 0
        done = server.client.completions.create(model=name, prompt="hi", max_tokens=2, temperature=0)
        assert done.usage.completion_tokens == 2
    finally:
        server.close()


def test_a_short_request_is_answered_while_its_batch_goes_on(tiny_model_dir):
    server = Server([str(tiny_model_dir)], api_key=None, max_tokens=400, batch_window_s=0.5)
    name, long_done, pieces = tiny_model_dir.name, threading.Event(), []

    def long_stream() -> None:
        body = {"model": name, "prompt": "The tide", "max_tokens": 400, "temperature": 0, "stream": True}
        with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=120) as reply:
            for line in reply.iter_lines():
                pieces.append(line)
                if stop_reading.is_set():
                    return
        long_done.set()

    stop_reading = threading.Event()
    reader = threading.Thread(target=long_stream)
    try:
        reader.start()
        short = server.client.completions.create(model=name, prompt="hi", max_tokens=1, temperature=0)
        assert short.usage.completion_tokens == 1
        assert not long_done.is_set() and server.health()["largest_batch"] == 2  # batched with the long one
    finally:
        stop_reading.set()
        reader.join(timeout=120)
        server.close()


def test_the_command_serves_until_interrupted(tiny_model_dir):
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "lmtune", "serve", str(tiny_model_dir), "--port", str(port)],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None and time.monotonic() < deadline, "lmtune serve did not start"
            try:
                models = httpx.get(f"http://127.0.0.1:{port}/v1/models").json()
                break
            except httpx.TransportError:
                time.sleep(0.2)
        assert [model["id"] for model in models["data"]] == [tiny_model_dir.name]
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=30)


def test_another_address_needs_an_api_key(served, capsys):
    _, root = served
    assert run_lmtune("serve", str(root), "--host", "0.0.0.0") == 2
    assert "--api-key" in capsys.readouterr().err


@pytest.mark.slow
def test_smollm2_answers_as_transformers_does(smollm2_dir, tokenizer):
    server = Server([str(smollm2_dir)], max_tokens=16)
    try:
        answer = server.client.chat.completions.create(model=smollm2_dir.name, messages=HELLO, max_tokens=8,
                                                       temperature=0)
    finally:
        server.close()
    prompt = tokenizer.apply_chat_template(HELLO, tokenize=False, add_generation_prompt=True)
    expected = greedy_with_transformers(smollm2_dir, tokenizer, prompt, 8)
    assert answer.choices[0].message.content == expected and expected.strip()


@pytest.mark.parametrize("name, template", [("run", "default"), ("tooled", None)])
def test_the_served_prompt_is_the_tokens_training_gives_the_same_turns(served, tokenizer, monkeypatch, name,
                                                                       template):
    """A multi-turn conversation: the tokens the server decodes from are those training put before the last
    reply (each turn tokenised on its own), not the whole rendered text tokenised at once."""
    from lmtune.data.templates import conversation_format, encode_conversation
    from lmtune.serving import batcher

    server, root = served
    seen = []

    def recording(model, tokenizer, prompts, *args, **kwargs):
        seen.extend(list(prompt) for prompt in prompts)
        return generate(model, tokenizer, prompts, *args, **kwargs)

    generate = batcher.generate
    monkeypatch.setattr(batcher, "generate", recording)
    # an earlier reply whose first characters join the template's text before it into one token when the
    # whole text is tokenised at once (':"' after "Assistant:", " Five" after "assistant: ")
    history = [{"role": "user", "content": "What is 2 plus 3?"}, {"role": "assistant", "content": '"Five"'},
               {"role": "user", "content": "And 4 plus 4?"}]
    server.client.chat.completions.create(model=name, messages=history, max_tokens=1, temperature=0)
    own = load_tokenizer(str(root / name))
    sequences = encode_conversation(own, conversation_format(own, template),
                                    [*history, {"role": "assistant", "content": "8"}])
    turns = sequences[-1]  # the sequence that trains the last reply
    trained_prompt = [token for prompt, reply in turns[:-1] for token in prompt + reply] + turns[-1][0]
    assert seen == [trained_prompt]
