"""After training: chat, eval and export on a tiny LoRA run, through the CLI."""

from __future__ import annotations

import io
import json
import math
import shutil

import pytest
import torch
from conftest import ALPACA_ROWS, read_jsonl, run_lmtune, write_config
from safetensors import safe_open

PROMPT = "What is 2 plus 3?"


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_model_dir):
    """6 steps of LoRA on the sums (24 train, 8 eval rows), saved and evaluated at steps 3 and 6."""
    folder = tmp_path_factory.mktemp("lora-run")
    data = folder / "sums.json"
    data.write_text(json.dumps(ALPACA_ROWS))
    config = write_config(
        folder, model_name_or_path=str(tiny_model_dir), dataset=str(data), finetuning_type="lora", lora_rank=4,
        output_dir=str(folder / "run"), learning_rate=3e-2, per_device_train_batch_size=4, num_train_epochs=1,
        val_size=8, save_steps=3, eval_steps=3, logging_steps=1, report_to="none", plot_loss=False,
        preview_samples=0, cutoff_len=128, lr_scheduler_type="constant",
    )
    assert run_lmtune("train", config) == 0
    run = folder / "run"
    assert (run / "adapter_config.json").is_file() and (run / "checkpoint-3").is_dir()
    return run


def _logits(model, tokenizer, text: str = PROMPT) -> torch.Tensor:
    with torch.no_grad():
        return model(**tokenizer(text, return_tensors="pt")).logits.float()


def _with_adapter(tiny_model_dir, adapter_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    return PeftModel.from_pretrained(base, str(adapter_dir)).eval()


def _greedy_reply(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    """What the model says, computed with transformers directly from the tokenizer's chat template."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)
    inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()


# --- export -----------------------------------------------------------------------------------


def test_export_merges_lora_and_gives_the_same_logits(lora_run, tiny_model_dir, tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "exported"
    assert run_lmtune("export", lora_run, "--out", out, "--dtype", "fp32") == 0
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"} <= names
    assert not {"adapter_config.json", "adapter_model.safetensors"} & names  # nothing left for peft to pick up
    assert (out / "model.safetensors").stat().st_mode & 0o044  # others can read what is handed on

    exported = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(exported).__name__ == "LlamaForCausalLM"
    assert not any("lora" in name for name, _ in exported.named_parameters())
    reference = _logits(_with_adapter(tiny_model_dir, lora_run), tokenizer)
    base = _logits(AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(), tokenizer)
    assert not torch.allclose(reference, base, atol=1e-3)  # the adapter matters, so merging it is tested
    torch.testing.assert_close(_logits(exported, tokenizer), reference, atol=1e-5, rtol=1e-4)


def test_export_bf16_sharded_checkpoint(lora_run, tiny_model_dir, tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "bf16"
    assert run_lmtune("export", lora_run / "checkpoint-3", "--out", out, "--dtype", "bf16",
                      "--max-shard-size", "1MB") == 0
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 1 and (out / "model.safetensors.index.json").is_file()
    for shard in shards:
        with safe_open(str(shard), "pt") as f:
            assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    exported = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    reference = _logits(_with_adapter(tiny_model_dir, lora_run / "checkpoint-3"), tokenizer)
    torch.testing.assert_close(_logits(exported, tokenizer), reference, atol=0.05, rtol=0.05)


def test_export_refuses_bad_input(lora_run, tmp_path, capsys):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    assert run_lmtune("export", lora_run, "--out", busy) == 2
    assert "not empty" in capsys.readouterr().err
    assert [p.name for p in busy.iterdir()] == ["keep.txt"]

    assert run_lmtune("export", lora_run, "--out", tmp_path / "x", "--dtype", "int4") == 2
    assert "bf16" in capsys.readouterr().err


@pytest.mark.parametrize(("dtype", "tolerance"), [("fp32", 1e-5), ("fp16", 5e-2), ("bf16", 5e-2)])
def test_export_gguf_reads_back_with_the_same_tokens_and_logits(lora_run, tokenizer, tmp_path, dtype, tolerance):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    out = tmp_path / f"gguf-{dtype}"
    assert run_lmtune("export", lora_run, "--out", out, "--gguf", "--dtype", dtype) == 0
    alone = tmp_path / f"only-gguf-{dtype}"  # the file on its own, as llama.cpp users take it
    alone.mkdir()
    (alone / "model.gguf").write_bytes((out / "model.gguf").read_bytes())
    back = AutoModelForCausalLM.from_pretrained(alone, gguf_file="model.gguf",
                                                quantization_config=GgufConfig(dequantize=True)).eval()
    back_tokenizer = AutoTokenizer.from_pretrained(alone, gguf_file="model.gguf")
    text = "What is 3 plus 4? <|im_start|>assistant"
    assert back_tokenizer(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert back_tokenizer.chat_template == AutoTokenizer.from_pretrained(out).chat_template
    exported = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()  # the merged HF folder
    torch.testing.assert_close(_logits(back.float(), tokenizer), _logits(exported, tokenizer), atol=tolerance,
                               rtol=tolerance)


# --- chat -------------------------------------------------------------------------------------


def test_chat_prompt_on_run_and_checkpoint(lora_run, tiny_model_dir, tokenizer, capsys):
    for folder in (lora_run, lora_run / "checkpoint-3"):
        assert run_lmtune("chat", folder, "--prompt", PROMPT, "--max-new-tokens", "6") == 0
        said = capsys.readouterr().out.strip()
        expected = _greedy_reply(_with_adapter(tiny_model_dir, folder), tokenizer, PROMPT, 6)
        assert expected and said == expected, folder


def test_chat_base_model_and_generation_settings(lora_run, tiny_model_dir, tokenizer, tmp_path, capsys):
    plain = tmp_path / "plain-model"  # a plain HF folder (the run's weights merged by peft), no run around it
    merged = _with_adapter(tiny_model_dir, lora_run).merge_and_unload()
    merged.save_pretrained(plain)
    tokenizer.save_pretrained(plain)

    assert run_lmtune("chat", plain, "--prompt", PROMPT, "--max-new-tokens", "12") == 0
    long = capsys.readouterr().out.strip()
    assert long and long == _greedy_reply(merged, tokenizer, PROMPT, 12)
    assert run_lmtune("chat", plain, "--prompt", PROMPT, "--max-new-tokens", "2") == 0
    short = capsys.readouterr().out.strip()
    assert short and long.startswith(short) and len(short) < len(long)

    assert run_lmtune("chat", plain, "--prompt", PROMPT, "--max-new-tokens", "4",
                      "--temperature", "0.8", "--top-p", "0.9") == 0
    assert capsys.readouterr().out.strip()

    # --stop ends the answer before the text; --system puts a system prompt first (the template shows it)
    stop = long[len(long) // 2:][:3]
    assert run_lmtune("chat", plain, "--prompt", PROMPT, "--max-new-tokens", "12", "--stop", stop) == 0
    assert capsys.readouterr().out.strip() == long[:long.index(stop)].strip()
    from lmtune.chat import generate, load_for_chat, sampling_of, with_system

    session = load_for_chat(str(plain))
    system = generate(session, with_system("Answer in French.", [{"role": "user", "content": PROMPT}]),
                      sampling_of(12)).text
    assert run_lmtune("chat", plain, "--prompt", PROMPT, "--max-new-tokens", "12", "--system", "Answer in French.") == 0
    assert capsys.readouterr().out.strip() == system


def test_chat_interactive_reset_and_exit(lora_run, monkeypatch, capsys):
    assert run_lmtune("chat", lora_run, "--prompt", "hi", "--max-new-tokens", "5") == 0
    fresh = capsys.readouterr().out.strip()

    monkeypatch.setattr("sys.stdin", io.StringIO(f"{PROMPT}\n/reset\nhi\n/exit\nnever answered\n"))
    assert run_lmtune("chat", lora_run, "--max-new-tokens", "5") == 0
    out = capsys.readouterr().out
    replies = [line.split("model> ", 1)[1].strip() for line in out.splitlines() if "model> " in line]
    assert len(replies) == 2  # the line after /exit is not read
    assert replies[1] == fresh  # after /reset the history is gone: same answer as a new conversation
    assert "conversation cleared" in out


def test_chat_bad_input_exits_2(lora_run, tmp_path, capsys):
    empty = tmp_path / "nothing"
    empty.mkdir()
    assert run_lmtune("chat", empty, "--prompt", "hi") == 2
    assert "expected a Hugging Face model folder" in capsys.readouterr().err

    orphan = tmp_path / "orphan-adapter"
    orphan.mkdir()
    for name in ("adapter_model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(lora_run / name, orphan / name)
    settings = json.loads((lora_run / "adapter_config.json").read_text())
    settings["base_model_name_or_path"] = str(tmp_path / "moved-away-base")
    (orphan / "adapter_config.json").write_text(json.dumps(settings))
    assert run_lmtune("chat", orphan, "--prompt", "hi") == 2
    err = capsys.readouterr().err
    assert "moved-away-base" in err and "base model" in err

    unfinished = tmp_path / "unfinished"
    shutil.copytree(lora_run / "checkpoint-3", unfinished / "checkpoint-3")
    shutil.copy(lora_run / "run_config.yaml", unfinished / "run_config.yaml")
    assert run_lmtune("chat", unfinished, "--prompt", "hi") == 2
    assert "checkpoint-3" in capsys.readouterr().err

    assert run_lmtune("chat", lora_run, "--prompt", "hi", "--top-p", "0") == 2
    assert "--top-p" in capsys.readouterr().err


# --- eval -------------------------------------------------------------------------------------


def _eval(capsys, *args) -> dict:
    assert run_lmtune("eval", *args) == 0
    return json.loads(capsys.readouterr().out)


def test_eval_matches_training_eval_and_compares_checkpoints(lora_run, tmp_path, capsys):
    logged = {r["step"]: r["eval_loss"] for r in read_jsonl(lora_run / "metrics.jsonl") if r["type"] == "eval"}
    assert set(logged) == {3, 6}
    reports = {}
    for step in (3, 6):
        out = tmp_path / f"report-{step}.json"
        printed = _eval(capsys, lora_run, "--checkpoint", lora_run / f"checkpoint-{step}", "--out", out)
        report = json.loads(out.read_text())
        assert report["loss"] == printed["loss"]
        assert report["model"]["step"] == step and report["model"]["path"].endswith(f"checkpoint-{step}")
        assert report["examples"] == 8 and report["tokens"] > 0
        assert report["perplexity"] == pytest.approx(math.exp(report["loss"]), rel=1e-12)
        assert report["loss"] == pytest.approx(logged[step], rel=1e-4)  # the loss the run logged at that step
        reports[step] = report
    assert reports[3]["loss"] != pytest.approx(reports[6]["loss"], rel=1e-4)


def test_eval_of_packed_rows_equals_the_runs_own_eval(tiny_config, tmp_path, capsys):
    # packed rows hold several examples: each must be scored alone, as in training
    assert run_lmtune("train", tiny_config(val_size=6, eval_steps=3, save_steps=3, max_steps=3, packing=True)) == 0
    run = tmp_path / "run"
    logged = {r["step"]: r["eval_loss"] for r in read_jsonl(run / "metrics.jsonl") if r["type"] == "eval"}
    capsys.readouterr()
    report = _eval(capsys, run, "--checkpoint", run / "checkpoint-3")
    assert report["data"]["packing"] is True
    assert report["loss"] == pytest.approx(logged[3], rel=1e-6)


def test_eval_on_a_given_data_set(lora_run, tmp_path, capsys):
    few = tmp_path / "few.json"
    few.write_text(json.dumps(ALPACA_ROWS[:5]))
    report = _eval(capsys, lora_run, "--dataset", few)
    assert report["examples"] == 5 and report["data"]["split"] == "all"
    assert report["model"]["kind"] == "run"


def test_eval_bad_input_exits_2(lora_run, tmp_path, capsys):
    assert run_lmtune("eval", tmp_path / "missing.yaml") == 2
    assert "run_config.yaml" in capsys.readouterr().err
    no_split = write_config(tmp_path, model_name_or_path="x", dataset="y", output_dir=str(lora_run))
    assert run_lmtune("eval", no_split) == 2
    assert "val_size" in capsys.readouterr().err
