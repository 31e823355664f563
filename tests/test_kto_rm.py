"""Stages kto and rm on the preference machinery: KTO's loss against its formula and at a fresh adapter's
first step, its KL estimate over every process; a reward model that learns separable pairs, is saved as a
sequence classifier transformers loads, and is scored by `lmtune eval`; LLaMA-Factory's own example
configs on its demo data; resume bit for bit; data errors that name the row."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import read_jsonl, run_lmtune, torchrun
from test_dpo import pair_rows
from test_loss import assert_same_training
from test_resume import assert_same_run, straight_and_resumed

from lmtune.config import build_config
from lmtune.preference import KTOLoss, kto_losses

LLAMAFACTORY_DATA = Path(__file__).parent / "data" / "llamafactory"


def kto_rows(count: int = 24) -> list[dict]:
    """TRL's unpaired layout: the same prompts as the pairs, each answer once, desirable or not."""
    rows = []
    for i, pair in enumerate(pair_rows(count)):
        desirable = i % 2 == 0
        rows.append({"prompt": pair["prompt"], "completion": pair["chosen" if desirable else "rejected"],
                     "label": desirable})
    return rows


@pytest.fixture
def kto_config(tiny_config, tmp_path):
    path = tmp_path / "kto.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in kto_rows()))

    def make(**overrides):
        values = dict(stage="kto", dataset=str(path), finetuning_type="lora", learning_rate=1e-2)
        return tiny_config(**{**values, **overrides})

    return make


@pytest.fixture
def rm_config(tiny_config, tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in pair_rows(16)))

    def make(**overrides):
        values = dict(stage="rm", dataset=str(path), finetuning_type="lora", learning_rate=1e-2)
        return tiny_config(**{**values, **overrides})

    return make


def train_rows(run_dir) -> list[dict]:
    return [r for r in read_jsonl(run_dir / "metrics.jsonl") if r["type"] == "train"]


# --- kto ------------------------------------------------------------------------------------------


def test_the_kto_loss_is_the_formula_on_fixed_log_probs():
    policy, ref = torch.tensor([-3.0, -5.0, -4.0, -2.0]), torch.tensor([-3.5, -4.0, -3.0, -3.0])
    desirable = torch.tensor([True, True, False, False])
    beta, kl = 0.2, torch.tensor(0.3)
    config = build_config({"stage": "kto", "pref_beta": beta, "kto_chosen_weight": 2.0, "kto_rejected_weight": 0.5})
    losses, rewards = kto_losses(config, policy, ref, desirable, kl)
    sigmoid = lambda x: 1 / (1 + torch.exp(torch.tensor(-x)))  # noqa: E731
    ratios = [0.5, -1.0, -1.0, 1.0]  # policy - reference
    expected = [2.0 * (1 - sigmoid(beta * (ratios[0] - 0.3))), 2.0 * (1 - sigmoid(beta * (ratios[1] - 0.3))),
                0.5 * (1 - sigmoid(beta * (0.3 - ratios[2]))), 0.5 * (1 - sigmoid(beta * (0.3 - ratios[3])))]
    torch.testing.assert_close(losses, torch.stack(expected))
    torch.testing.assert_close(rewards, beta * torch.tensor(ratios))
    # the KL estimate: the mean log-ratio of the KL sequences that train (a repeat's does not count), never below 0
    trained = torch.tensor([1.0, 1.0, 0.0])
    assert KTOLoss._kl_estimate(torch.tensor([0.4, 0.2, 9.0]), trained, False).item() == pytest.approx(0.3)
    assert KTOLoss._kl_estimate(torch.tensor([-0.4, 0.2, 9.0]), trained, False).item() == 0.0


def test_a_fresh_lora_adapter_starts_at_half_of_each_examples_weight(kto_config, tmp_path):
    """Policy == reference: every log-ratio and the KL estimate are 0, so each example costs
    weight x (1 - sigmoid(0)) = weight / 2; 12 desirable at 2.0 and 12 undesirable at 0.5 give 0.625."""
    config = kto_config(max_steps=1, per_device_train_batch_size=24, kto_chosen_weight=2.0, kto_rejected_weight=0.5)
    assert run_lmtune("train", config) == 0
    first = train_rows(tmp_path / "run")[0]
    assert first["loss"] == pytest.approx((12 * 2.0 / 2 + 12 * 0.5 / 2) / 24, abs=1e-7)
    assert first["rewards/chosen"] == first["rewards/rejected"] == first["rewards/margins"] == first["kl"] == 0.0
    assert first["logps/chosen"] < -20 and first["logps/rejected"] < -20  # sums over answers of a random model
    assert first["samples_seen"] == 24


def test_kto_raises_the_desirable_answers_reward_and_lmtune_eval_gives_the_runs_eval(kto_config, tmp_path, capsys):
    assert run_lmtune("train", kto_config(max_steps=8, val_size=4, eval_steps=8, learning_rate=0.02)) == 0
    rows = train_rows(tmp_path / "run")
    assert rows[-1]["rewards/margins"] > 0.1 and rows[-1]["loss"] < rows[0]["loss"]
    evaluation = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if r["type"] == "eval"][-1]
    assert set(evaluation) >= {"eval_loss", "eval_kl", "eval_logps/chosen", "eval_rewards/chosen"}
    capsys.readouterr()
    assert run_lmtune("eval", tmp_path / "run") == 0
    report = json.loads(capsys.readouterr().out)
    assert report["examples"] == 4 and "perplexity" not in report
    assert report["loss"] == pytest.approx(evaluation["eval_loss"], rel=1e-5)
    for name in ("kl", "logps/chosen", "rewards/chosen"):
        assert report[name] == pytest.approx(evaluation[f"eval_{name}"], rel=1e-5, abs=1e-6), name


@pytest.mark.parametrize("stage, method", [
    ("kto", {}),  # LoRA: the adapter switched off
    ("kto", {"finetuning_type": "full", "learning_rate": 1e-3, "precompute_ref_log_probs": True}),
    ("rm", {}),  # the score head saved whole with the adapter
])
def test_a_resumed_run_continues_bit_for_bit(kto_config, rm_config, tmp_path, stage, method):
    make = kto_config if stage == "kto" else rm_config
    settings = dict(max_steps=4, per_device_train_batch_size=2, gradient_accumulation_steps=2, **method)
    straight, resumed = straight_and_resumed(make, tmp_path, 2, **settings)
    assert_same_run(straight, resumed, from_step=2)
    metric = "rewards/chosen" if stage == "kto" else "margin"
    expected = {r["step"]: r.get(metric) for r in train_rows(straight)}
    assert {r["step"]: r.get(metric) for r in train_rows(resumed)} == {s: expected[s] for s in (3, 4)}


def test_two_processes_share_one_kl_estimate_and_train_as_one_process(kto_config, tmp_path):
    """The KL estimate of a micro-batch is taken over every process's examples: two processes with 2 examples
    each train as one process with all 4, KL and loss alike."""
    common = dict(max_steps=3, finetuning_type="full", learning_rate=5e-3)
    torchrun(kto_config(output_dir=str(tmp_path / "two"), per_device_train_batch_size=2, **common))
    assert run_lmtune("train", kto_config(output_dir=str(tmp_path / "one"), per_device_train_batch_size=4,
                                          **common)) == 0
    assert_same_training(tmp_path / "two", tmp_path / "one")
    one, two = train_rows(tmp_path / "one"), train_rows(tmp_path / "two")
    assert any(row["kl"] > 0 for row in one)  # the estimate is at work, not clamped to 0 throughout
    assert [r["kl"] for r in two] == pytest.approx([r["kl"] for r in one], rel=1e-4, abs=1e-7)


def test_a_kto_row_without_a_true_or_false_mark_exits_2_naming_the_row(tmp_path, tiny_config, capsys):
    rows = kto_rows(4)
    rows[2]["label"] = "yes"
    path = tmp_path / "marks.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in rows))
    assert run_lmtune("train", tiny_config(stage="kto", dataset=str(path), max_steps=1)) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"{path}, row 3" in err and "kto_tag column 'label' is 'yes'" in err
    assert not (tmp_path / "run").exists()


def test_a_dataset_info_entry_without_kto_tag_is_refused_for_kto(tmp_path, tiny_config, capsys):
    folder = tmp_path / "info"
    folder.mkdir()
    shutil.copy(LLAMAFACTORY_DATA / "kto_en_demo.json", folder)
    entry = json.loads((LLAMAFACTORY_DATA / "dataset_info.json").read_text())["kto_en_demo"]
    del entry["columns"]["kto_tag"]
    (folder / "dataset_info.json").write_text(json.dumps({"kto_en_demo": entry}))
    assert run_lmtune("train", tiny_config(stage="kto", dataset="kto_en_demo", dataset_dir=str(folder))) == 2
    assert "has no kto_tag column" in " ".join(capsys.readouterr().err.split())


def test_preview_shows_the_answer_its_mark_and_the_kl_sequence(kto_config, capsys):
    assert run_lmtune("preview", kto_config(), "-n", "2") == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "a kto example: prompt, completion (desirable), KL completion" in out
    assert "a kto example: prompt, completion (undesirable), KL completion" in out
    start = out.index("completion (desirable): tokens")
    first = out[start:out.index("KL completion (another", start)]
    assert "]Yes, it is more.<|im_end|>" in first  # row 0 is desirable: its own answer trained (and the newline after)


def test_plan_and_the_web_form_know_both_stages(kto_config, rm_config, tmp_path, tiny_model_dir, capsys):
    import yaml
    from test_webui import make_workdir, tiny_form

    from lmtune.webui import form as F

    assert run_lmtune("plan", kto_config(per_device_train_batch_size=4), "--json") == 0
    assert json.loads(capsys.readouterr().out)["data"] == {"train": 24, "eval": 0, "unit": "examples"}
    assert run_lmtune("plan", rm_config(per_device_train_batch_size=4), "--json") == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["data"] == {"train": 16, "eval": 0, "unit": "pairs"} and plan["steps_per_epoch"] == 4
    workdir = make_workdir(tmp_path / "work", tiny_model_dir)
    (workdir / "data" / "pairs.jsonl").write_text(json.dumps(pair_rows(1)[0]))
    form = tiny_form(stage="kto", dataset=["data/pairs.jsonl"], pref_beta="0.2", kto_chosen_weight="1.5",
                     kto_rejected_weight="0.7", pref_loss="ipo")
    kto = yaml.safe_load(F.values_to_yaml(F.form_to_values(workdir, form)))
    assert (kto["stage"], kto["pref_beta"], kto["kto_chosen_weight"], kto["kto_rejected_weight"]) == \
        ("kto", 0.2, 1.5, 0.7)
    assert "pref_loss" not in kto  # a dpo key, not written for kto
    rm = yaml.safe_load(F.values_to_yaml(F.form_to_values(workdir, tiny_form(
        stage="rm", dataset=["data/pairs.jsonl"], pref_beta="0.2", metric_for_best_model="eval_accuracy",
        val_size="4"))))
    assert rm["stage"] == "rm" and rm["metric_for_best_model"] == "eval_accuracy"
    assert not set(F.PREFERENCE_KEYS) & set(rm)


@pytest.mark.parametrize("keys, words", [
    ({"stage": "kto", "pref_loss": "ipo"}, "kto has its own loss"),
    ({"stage": "rm", "padding_free": True}, "each sequence is its own padded row"),
    ({"stage": "rm", "precompute_ref_log_probs": True}, "stage: rm, which needs no reference model"),
])
def test_settings_a_stage_cannot_use_are_refused(keys, words):
    from lmtune.errors import UserError

    with pytest.raises(UserError, match=words):
        build_config(keys)


# --- rm -------------------------------------------------------------------------------------------


def scores_of(model, tokenizer, texts: list[str]) -> torch.Tensor:
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**batch).logits[:, 0]


@pytest.mark.parametrize("finetuning_type", ["full", "lora"])
def test_a_reward_model_learns_separable_pairs_and_loads_as_a_sequence_classifier(rm_config, tmp_path, capsys,
                                                                               finetuning_type):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    lr = 2e-3 if finetuning_type == "full" else 3e-2
    assert run_lmtune("train", rm_config(finetuning_type=finetuning_type, learning_rate=lr, max_steps=8)) == 0
    rows = train_rows(tmp_path / "run")
    assert rows[-1]["accuracy"] == 1.0 and rows[-1]["margin"] > rows[0]["margin"]
    capsys.readouterr()
    assert run_lmtune("eval", tmp_path / "run", "--dataset", tmp_path / "pairs.jsonl") == 0
    report = json.loads(capsys.readouterr().out)
    assert report["pairs"] == 16 and report["accuracy"] == 1.0 and report["margin"] > 0
    assert run_lmtune("chat", tmp_path / "run", "--prompt", "hi") == 2  # it scores, it does not write
    assert "is a reward model" in " ".join(capsys.readouterr().err.split())
    folder = tmp_path / "run"
    if finetuning_type == "lora":  # the adapter carries the score head; export merges it into a standalone model
        assert json.loads((folder / "adapter_config.json").read_text())["modules_to_save"] == ["classifier", "score"]
        assert run_lmtune("export", folder, "--out", tmp_path / "merged") == 0
        folder = tmp_path / "merged"
    saved = json.loads((folder / "config.json").read_text())
    assert saved["architectures"] == ["LlamaForSequenceClassification"] and saved["pad_token_id"] is not None
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    assert model.config.num_labels == 1
    tokenizer = AutoTokenizer.from_pretrained(folder)
    pair = pair_rows(16)[3]
    chosen, rejected = (tokenizer.apply_chat_template(
        [{"role": "user", "content": pair["prompt"]}, {"role": "assistant", "content": pair[key]}], tokenize=False)
        for key in ("chosen", "rejected"))
    scores = scores_of(model, tokenizer, [chosen, rejected])
    assert scores[0] > scores[1]


# --- LLaMA-Factory's example configs ---------------------------------------------------------------

LLAMAFACTORY_EXAMPLES = Path(__file__).parent / "fixtures" / "llamafactory_examples" / "train_lora"


def on_this_machine(example: str, model, data, out) -> str:
    """LLaMA-Factory's example as it ships, comments kept; what differs: the model path, dataset_dir and
    output_dir (this machine's), and the worker counts (16 and 4 processes for a few rows on a 2-core test
    machine would only be slow)."""
    text = (LLAMAFACTORY_EXAMPLES / example).read_text()
    text = re.sub(r"(?m)^model_name_or_path: .*$", f"model_name_or_path: {model}", text)
    text = re.sub(r"(?m)^output_dir: .*$", f"output_dir: {out}", text)
    text = re.sub(r"(?m)^preprocessing_num_workers: .*$", "preprocessing_num_workers: 1", text)
    text = re.sub(r"(?m)^dataloader_num_workers: .*$", "dataloader_num_workers: 0", text)
    return text.replace("### dataset\n", f"### dataset\ndataset_dir: {data}\n", 1)


@pytest.mark.parametrize("example, unit", [("qwen3_lora_kto.yaml", "examples"), ("qwen3_lora_reward.yaml", "pairs")])
def test_llamafactorys_kto_and_reward_examples_train_on_its_demo_data(example, unit, tmp_path, tiny_model_dir, capsys):
    config = tmp_path / "example.yaml"
    out = tmp_path / "saves"
    config.write_text(on_this_machine(example, tiny_model_dir, LLAMAFACTORY_DATA, out))
    capsys.readouterr()
    assert run_lmtune("plan", config, "--json") == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["total_steps"] == 6 and plan["data"] == {"train": 12, "eval": 0, "unit": unit}  # 8 a step, 3 epochs
    # Two steps of the same run. bf16=false: accelerate keeps one mixed-precision setting per process,
    # and the other tests of this process train in float32 (`lmtune train` is one process per run).
    assert run_lmtune("train", config, "max_steps=2", "bf16=false") == 0
    assert [row["step"] for row in train_rows(out)] == [2]
    assert (out / "adapter_model.safetensors").exists() and (out / "loss.png").exists()
    assert f"stage: {'kto' if unit == 'examples' else 'rm'}" in (out / "run_config.yaml").read_text()
