"""Preference training (stage dpo) on the same engine: pairs in each accepted format, the losses against a
hand computation, ln 2 at the first step, rewards that rise, and a resume that continues bit for bit."""

from __future__ import annotations

import json
import math
import os
import random

import pytest
import torch
from conftest import read_jsonl, run_lmtune, torchrun
from test_loss import assert_same_training
from test_resume import assert_same_run, straight_and_resumed

from lmtune.config import build_config, load_config
from lmtune.data import prepare_data
from lmtune.data.encoding import truncated_lengths
from lmtune.data.templates import IGNORE_INDEX
from lmtune.preference import preference_losses

LN2 = math.log(2)
WORDS = "apple river stone cloud seven purple engine quiet north ladder violin orbit".split()


def pair_rows(count: int = 32, seed: int = 0) -> list[dict]:
    """Prompts whose chosen answer is always the same short sentence and whose rejected one is noise."""
    rng = random.Random(seed)
    return [{"prompt": f"Question {i}: is {i} more than {i - 1}?", "chosen": "Yes, it is more.",
             "rejected": " ".join(rng.choice(WORDS) for _ in range(6))} for i in range(count)]


@pytest.fixture
def pairs_file(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in pair_rows()))
    return path


@pytest.fixture
def dpo_config(tiny_config, pairs_file):
    def make(**overrides):
        values = dict(stage="dpo", dataset=str(pairs_file), finetuning_type="lora", learning_rate=1e-2)
        return tiny_config(**{**values, **overrides})

    return make


def train_rows(run_dir) -> list[dict]:
    return [r for r in read_jsonl(run_dir / "metrics.jsonl") if r["type"] == "train"]


# --- the loss ---------------------------------------------------------------------------------


def test_the_first_step_of_a_fresh_lora_adapter_has_loss_ln2(dpo_config, tmp_path):
    assert run_lmtune("train", dpo_config(max_steps=1)) == 0
    first = train_rows(tmp_path / "run")[0]
    assert first["loss"] == pytest.approx(LN2, abs=1e-7)  # the adapter is zero: policy == reference
    assert first["rewards/chosen"] == first["rewards/rejected"] == first["rewards/margins"] == 0.0
    assert first["rewards/accuracies"] == 0.0
    assert first["logps/chosen"] > first["logps/rejected"]  # the chosen answer is the shorter
    assert first["samples_seen"] == 4  # pairs


def test_rewards_accuracies_rise_where_the_chosen_answers_are_clearly_better(dpo_config, tmp_path):
    assert run_lmtune("train", dpo_config(max_steps=8, val_size=4, eval_steps=8, learning_rate=0.02)) == 0
    rows = train_rows(tmp_path / "run")
    assert rows[0]["rewards/accuracies"] == 0.0 and rows[0]["rewards/margins"] == 0.0
    assert rows[-1]["rewards/accuracies"] == 1.0 and min(r["rewards/accuracies"] for r in rows[-3:]) >= 0.75
    assert rows[-1]["rewards/margins"] > 0.15
    assert rows[-1]["loss"] < 0.9 * LN2
    evaluation = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if r["type"] == "eval"][-1]
    assert evaluation["eval_rewards/accuracies"] == 1.0 and evaluation["eval_rewards/margins"] > 0.2
    assert set(evaluation) >= {f"eval_{name}" for name in ("rewards/chosen", "rewards/rejected", "logps/chosen",
                                                           "logps/rejected")}


def test_metric_for_best_model_names_a_reward_metric(dpo_config, tmp_path):
    config = dpo_config(max_steps=4, val_size=4, eval_steps=2, metric_for_best_model="eval_rewards/margins")
    assert run_lmtune("train", config) == 0
    index = json.loads((tmp_path / "run" / "checkpoints.json").read_text())
    evals = {r["step"]: r["eval_rewards/margins"] for r in read_jsonl(tmp_path / "run" / "metrics.jsonl")
             if r["type"] == "eval"}
    best = [c["step"] for c in index["checkpoints"] if c["best"]]
    assert best == [max(evals, key=evals.get)]  # greater is better for a margin


@pytest.mark.parametrize("method", [
    {},  # LoRA: the adapter switched off
    {"finetuning_type": "full", "learning_rate": 1e-3},  # a frozen copy of the model as loaded, not of the checkpoint
    {"finetuning_type": "full", "learning_rate": 1e-3, "precompute_ref_log_probs": True},
])
def test_a_resumed_dpo_run_continues_with_the_same_losses_bit_for_bit(dpo_config, tmp_path, method):
    settings = dict(max_steps=5, per_device_train_batch_size=2, gradient_accumulation_steps=2, **method)
    straight, resumed = straight_and_resumed(dpo_config, tmp_path, 2, **settings)
    assert_same_run(straight, resumed, from_step=2)
    expected = {r["step"]: r["rewards/margins"] for r in train_rows(straight)}
    assert {r["step"]: r["rewards/margins"] for r in train_rows(resumed)} == {s: expected[s] for s in (3, 4, 5)}


@pytest.mark.parametrize("settings", [
    {"finetuning_type": "full"},  # a frozen copy of the model as loaded
    {"finetuning_type": "full", "precompute_ref_log_probs": True},
    {"finetuning_type": "freeze", "freeze_trainable_layers": 1},
])
def test_full_fine_tuning_compares_with_the_model_as_loaded(dpo_config, tmp_path, settings):
    assert run_lmtune("train", dpo_config(learning_rate=1e-3, max_steps=2, **settings)) == 0
    rows = train_rows(tmp_path / "run")
    assert rows[0]["loss"] == pytest.approx(LN2, abs=1e-5)
    assert rows[1]["rewards/margins"] != 0.0  # the model moved away from its reference


@pytest.mark.parametrize("pref_loss", ["simpo", "orpo"])
def test_a_reference_free_loss_trains_without_a_reference(dpo_config, tmp_path, capsys, pref_loss):
    assert run_lmtune("train", dpo_config(finetuning_type="full", learning_rate=1e-3, max_steps=2,
                                          pref_loss=pref_loss, pref_beta=0.2)) == 0
    assert "frozen copy" not in capsys.readouterr().err
    for row in train_rows(tmp_path / "run"):
        # rewards are beta x the answers' mean log-probabilities, which are means over their tokens
        assert row["rewards/chosen"] == pytest.approx(0.2 * row["logps/chosen"], rel=1e-5)
        assert row["rewards/rejected"] == pytest.approx(0.2 * row["logps/rejected"], rel=1e-5)
        assert -12 < row["logps/chosen"] < 0  # a token mean of a random model (ln 49152 is 10.8)
    rows = train_rows(tmp_path / "run")
    assert rows[0]["loss"] != pytest.approx(LN2, abs=1e-3)


def test_precomputed_reference_log_probs_are_kept_with_the_processed_data(dpo_config, tmp_path, isolated_cache,
                                                                          capsys):
    settings = dict(finetuning_type="full", max_steps=1, precompute_ref_log_probs=True)
    before = set((isolated_cache / "data").glob("*/ref_logps-*.json"))
    assert run_lmtune("train", dpo_config(output_dir=str(tmp_path / "first"), **settings)) == 0
    assert "reference log-probabilities of 32 pairs computed" in " ".join(capsys.readouterr().err.split())
    stored = sorted(set((isolated_cache / "data").glob("*/ref_logps-*.json")) - before)
    assert len(stored) == 1
    values = json.loads(stored[0].read_text())
    assert len(values["train"]) == 32 and all(len(pair) == 2 and pair[0] < 0 for pair in values["train"])
    assert run_lmtune("train", dpo_config(output_dir=str(tmp_path / "second"), **settings)) == 0
    assert "reference log-probabilities read from" in " ".join(capsys.readouterr().err.split())
    first, second = train_rows(tmp_path / "first")[0], train_rows(tmp_path / "second")[0]
    for key in ("loss", "grad_norm", "rewards/chosen", "logps/chosen", "logps/rejected"):
        assert first[key] == second[key], key


def test_the_loss_formulas_match_a_hand_computation():
    chosen, rejected = torch.tensor([-3.0, -5.0]), torch.tensor([-4.0, -2.0])
    ref_chosen, ref_rejected = torch.tensor([-3.5, -4.0]), torch.tensor([-3.0, -3.0])
    mean = torch.tensor([-0.5, -1.0])
    beta = 0.2
    logits = (chosen - rejected) - (ref_chosen - ref_rejected)
    torch.testing.assert_close(logits, torch.tensor([1.5, -2.0]))

    def losses(**keys):
        config = build_config({"stage": "dpo", "pref_beta": beta, **keys})
        return preference_losses(config, chosen, rejected, ref_chosen, ref_rejected, mean)

    sigmoid, chosen_rewards, rejected_rewards = losses(pref_loss="sigmoid")
    expected = [math.log(1 + math.exp(-beta * x)) for x in (1.5, -2.0)]
    torch.testing.assert_close(sigmoid, torch.tensor(expected))
    torch.testing.assert_close(chosen_rewards, beta * (chosen - ref_chosen))
    torch.testing.assert_close(rejected_rewards, beta * (rejected - ref_rejected))
    ipo, _, _ = losses(pref_loss="ipo")
    torch.testing.assert_close(ipo, torch.tensor([(1.5 - 2.5) ** 2, (-2.0 - 2.5) ** 2]))
    simpo, simpo_chosen, _ = losses(pref_loss="simpo", simpo_gamma=0.5)
    margin = chosen - rejected  # [1, -3]
    torch.testing.assert_close(simpo, torch.tensor([math.log(1 + math.exp(-beta * (m - 0.5 / beta)))
                                                    for m in margin.tolist()]))
    torch.testing.assert_close(simpo_chosen, beta * chosen)  # reference-free rewards
    odds = torch.tensor([-0.1, -0.7]), torch.tensor([-0.3, -0.2])
    orpo, _, _ = preference_losses(build_config({"stage": "dpo", "pref_loss": "orpo", "pref_beta": beta}),
                                   *odds, None, None, mean)
    hand = []
    for c, r in zip(*(t.tolist() for t in odds), strict=True):
        log_odds = (c - math.log(1 - math.exp(c))) - (r - math.log(1 - math.exp(r)))
        hand.append(-c + beta * math.log(1 + math.exp(-log_odds)))
    torch.testing.assert_close(orpo, torch.tensor(hand))
    with_ftx, _, _ = losses(pref_loss="sigmoid", pref_ftx=0.5)
    torch.testing.assert_close(with_ftx, sigmoid + 0.5 * -mean)  # the chosen answer's mean NLL, weighted


def test_one_step_of_pairs_is_the_mean_over_pairs_whatever_the_accumulation(dpo_config, tmp_path):
    """Four pairs a step as 1 x 4 or 2 x 2 (accumulated): the same loss, metrics and update."""
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert run_lmtune("train", dpo_config(output_dir=str(whole), max_steps=2)) == 0
    assert run_lmtune("train", dpo_config(output_dir=str(split), max_steps=2, per_device_train_batch_size=2,
                                          gradient_accumulation_steps=2)) == 0
    for a, b in zip(train_rows(whole), train_rows(split), strict=True):
        for key in ("loss", "grad_norm", "rewards/margins", "logps/chosen", "logps/rejected"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key


@pytest.mark.parametrize("finetuning_type", ["lora", "full"])
def test_lmtune_eval_of_a_dpo_checkpoint_gives_the_runs_own_eval(dpo_config, tmp_path, capsys, finetuning_type):
    config = dpo_config(finetuning_type=finetuning_type, learning_rate=1e-2 if finetuning_type == "lora" else 1e-3,
                        max_steps=3, val_size=4, eval_steps=3)
    assert run_lmtune("train", config) == 0
    logged = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if r["type"] == "eval"][-1]
    capsys.readouterr()
    assert run_lmtune("eval", tmp_path / "run", "--checkpoint", tmp_path / "run" / "checkpoint-3") == 0
    report = json.loads(capsys.readouterr().out)
    assert report["pairs"] == 4 and "perplexity" not in report
    assert report["loss"] == pytest.approx(logged["eval_loss"], rel=1e-5)
    for name in ("rewards/margins", "rewards/accuracies", "logps/chosen"):
        assert report[name] == pytest.approx(logged[f"eval_{name}"], rel=1e-5, abs=1e-6), name
    assert report["rewards/margins"] != 0.0  # measured against the reference, not against itself


def assert_same_metrics(a, b) -> None:
    for row_a, row_b in zip(train_rows(a), train_rows(b), strict=True):
        for key in ("rewards/margins", "rewards/accuracies", "logps/chosen", "logps/rejected"):
            assert row_b[key] == pytest.approx(row_a[key], rel=1e-4, abs=1e-5), (row_a["step"], key)


def test_padded_pairs_train_as_padding_free_ones_do(dpo_config, tmp_path, capsys):
    """Padded, each sequence of a pair gets its own row (an attention mask would let the rejected answer
    see the chosen one): the same losses, metrics and weights as padding-free."""
    common = dict(max_steps=3, gradient_accumulation_steps=2, per_device_train_batch_size=2)
    assert run_lmtune("train", dpo_config(output_dir=str(tmp_path / "free"), **common)) == 0
    assert run_lmtune("train", dpo_config(output_dir=str(tmp_path / "padded"), padding_free=False, **common)) == 0
    assert "batching: padded" in capsys.readouterr().err
    assert_same_training(tmp_path / "free", tmp_path / "padded")
    assert_same_metrics(tmp_path / "free", tmp_path / "padded")


# Loaded as a callback (before the reference is computed): computing the reference log-probabilities takes
# longer than ddp_timeout and the process group's timeout after it (10 s and 3 heartbeats of 1 s).
SLOW_REFERENCE = '''
import os
import time

import lmtune.preference as preference

computing = preference._log_probs_of


def slow_log_probs(rows, *args, **kwargs):
    with open(os.path.join(os.path.dirname(__file__), "computed-by-" + os.environ["RANK"]), "a") as out:
        out.write(str(len(rows)) + "\\n")
    time.sleep(14)
    return computing(rows, *args, **kwargs)


preference._log_probs_of = slow_log_probs


class SlowReference:
    def on_train_begin(self, state, model):
        pass
'''


def test_two_processes_train_pairs_as_one_process_with_both_their_pairs(dpo_config, tmp_path):
    """The loss and the metrics of a step are means over the pairs of every process. 7 pairs: the last step's
    3 do not split over 2 processes, and the repeat that pads them counts in no loss and no metric. The
    reference log-probabilities are computed by one process while the other waits on its file lock, not in a
    collective: computing them for longer than ddp_timeout stops nothing."""
    (tmp_path / "slow_reference.py").write_text(SLOW_REFERENCE)
    common = dict(max_steps=2, max_samples=7, precompute_ref_log_probs=True)
    two = torchrun(dpo_config(output_dir=str(tmp_path / "two"), per_device_train_batch_size=2, ddp_timeout=10,
                              callbacks=["slow_reference:SlowReference"], **common),
                   env={"PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))})
    assert [path.read_text() for path in tmp_path.glob("computed-by-*")] == ["7\n"]  # one process, once
    log = " ".join(two.stderr.split())  # process 0's: it computed them, or waited and read them
    assert ("reference log-probabilities of 7 pairs computed" in log) != (
        "another process is preparing the reference log-probabilities" in log
        and "reference log-probabilities read from" in log)
    assert run_lmtune("train", dpo_config(output_dir=str(tmp_path / "one"), per_device_train_batch_size=4,
                                          **common)) == 0
    assert [r["samples_seen"] for r in train_rows(tmp_path / "two")] == [4, 7]
    assert_same_training(tmp_path / "two", tmp_path / "one")
    assert_same_metrics(tmp_path / "two", tmp_path / "one")


# --- data ------------------------------------------------------------------------------------


def trained_text(tokenizer, ids: list[int], labels: list[int]) -> str:
    return tokenizer.decode([token for token, label in zip(ids, labels, strict=True) if label != IGNORE_INDEX])


def sequences_of(row: dict) -> list[tuple[list[int], list[int]]]:
    starts = [i for i, p in enumerate(row["position_ids"]) if p == 0] + [len(row["input_ids"])]
    return [(row["input_ids"][a:b], row["labels"][a:b]) for a, b in zip(starts, starts[1:], strict=False)]


FORMATS = {
    "llamafactory sharegpt": (
        {"file_name": "p.json", "formatting": "sharegpt", "ranking": True,
         "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected"}},
        {"conversations": [{"from": "human", "value": "Name a colour."}],
         "chosen": {"from": "gpt", "value": "Blue."}, "rejected": {"from": "gpt", "value": "A car."}}),
    "llamafactory alpaca": (
        {"file_name": "p.json", "ranking": True,
         "columns": {"prompt": "instruction", "query": "input", "chosen": "chosen", "rejected": "rejected"}},
        {"instruction": "Name a colour.", "input": "", "chosen": "Blue.", "rejected": "A car."}),
    "trl prompt": (None, {"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "A car."}),
    "trl conversational": (None, {"prompt": [{"role": "user", "content": "Name a colour."}],
                                  "chosen": [{"role": "assistant", "content": "Blue."}],
                                  "rejected": [{"role": "assistant", "content": "A car."}]}),
    "openai messages": (None, {"messages": [{"role": "user", "content": "Name a colour."}],
                               "chosen": "Blue.", "rejected": "A car."}),
}


@pytest.mark.parametrize("name", FORMATS)
def test_each_preference_format_loads_as_the_same_pairs(name, tmp_path, tiny_config, tokenizer):
    entry, row = FORMATS[name]
    folder = tmp_path / "data"
    folder.mkdir(exist_ok=True)
    (folder / "p.json").write_text(json.dumps([row] * 3))
    dataset = "pairs" if entry else str(folder / "p.json")
    if entry:
        (folder / "dataset_info.json").write_text(json.dumps({"pairs": entry}))
    config = load_config(tiny_config(stage="dpo", dataset=dataset, dataset_dir=str(folder)))
    data = prepare_data(config, tokenizer, use_cache=False)
    assert len(data.train) == 3
    (chosen_ids, chosen_labels), (rejected_ids, rejected_labels) = sequences_of(data.train[0])
    assert trained_text(tokenizer, chosen_ids, chosen_labels) == "Blue.<|im_end|>\n"
    assert trained_text(tokenizer, rejected_ids, rejected_labels) == "A car.<|im_end|>\n"
    assert "<|im_start|>user\nName a colour.<|im_end|>" in tokenizer.decode(chosen_ids)
    prompt = tokenizer.decode(chosen_ids[:chosen_labels.index(next(x for x in chosen_labels if x != IGNORE_INDEX))])
    assert tokenizer.decode(rejected_ids).startswith(prompt)  # the same prompt before both answers


def test_only_the_final_answer_of_a_multi_turn_prompt_is_trained(tmp_path, tiny_config, tokenizer):
    row = {"messages": [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello!"},
                        {"role": "user", "content": "Name a colour."}], "chosen": "Blue.", "rejected": "A car."}
    path = tmp_path / "multi.jsonl"
    path.write_text(json.dumps(row))
    data = prepare_data(load_config(tiny_config(stage="dpo", dataset=str(path))), tokenizer, use_cache=False)
    (ids, labels), _ = sequences_of(data.train[0])
    assert trained_text(tokenizer, ids, labels) == "Blue.<|im_end|>\n"


@pytest.mark.parametrize("bad, words", [
    ({"prompt": "Q?", "chosen": "A."}, ["'rejected'"]),
    ({"prompt": "Q?", "rejected": "A.", "chosen": ""}, ["'chosen'"]),
    ({"chosen": "A.", "rejected": "B."}, ["no 'prompt'"]),
    ({"messages": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."}], "chosen": "A.",
      "rejected": "B."}, ["last message is the assistant's"]),
    ({"prompt": "Q?", "chosen": [{"role": "user", "content": "A."}], "rejected": "B."}, ["'chosen' is a user"]),
])
def test_a_bad_preference_row_exits_2_naming_the_file_and_row(bad, words, tmp_path, tiny_config, capsys):
    path = tmp_path / "pairs.jsonl"
    rows = pair_rows(4)
    rows[2] = bad
    path.write_text("\n".join(json.dumps(row) for row in rows))
    assert run_lmtune("train", tiny_config(stage="dpo", dataset=str(path), max_steps=1)) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"{path}, row 3" in errors[0], err
    for word in words:
        assert word in err, err
    assert not (tmp_path / "run").exists()


def test_stage_dpo_refuses_a_data_set_without_ranking_and_sft_refuses_one_with_it(tmp_path, tiny_config, capsys):
    folder = tmp_path / "registry"
    folder.mkdir()
    (folder / "p.json").write_text(json.dumps([{"instruction": "Q", "chosen": "A", "rejected": "B"}]))
    (folder / "dataset_info.json").write_text(json.dumps({"sums": {"file_name": "p.json"},
                                                          "pairs": {"file_name": "p.json", "ranking": True}}))
    assert run_lmtune("train", tiny_config(stage="dpo", dataset="sums", dataset_dir=str(folder))) == 2
    assert "no ranking: true" in capsys.readouterr().err
    assert run_lmtune("train", tiny_config(stage="sft", dataset="pairs", dataset_dir=str(folder))) == 2
    assert "for stage: dpo" in capsys.readouterr().err


def test_cutoff_len_cuts_a_pair_as_llamafactory_does_and_keeps_both_answers(tmp_path, tiny_config, tokenizer):
    assert truncated_lengths(10, 20, 100) == (10, 20)
    assert truncated_lengths(300, 20, 100) == (80, 20)  # a short answer keeps all of itself
    assert truncated_lengths(20, 300, 100) == (20, 80)  # a short prompt too
    assert truncated_lengths(200, 200, 100) == (50, 50)
    long = {"prompt": "Tell me. " * 60, "chosen": "Fine. " * 80, "rejected": "No."}
    path = tmp_path / "long.jsonl"
    path.write_text(json.dumps(long))
    data = prepare_data(load_config(tiny_config(stage="dpo", dataset=str(path), cutoff_len=64)), tokenizer,
                        use_cache=False)
    (chosen_ids, chosen_labels), (rejected_ids, rejected_labels) = sequences_of(data.train[0])
    assert len(chosen_ids) <= 64 and len(rejected_ids) <= 64
    assert trained_text(tokenizer, rejected_ids, rejected_labels) == "No.<|im_end|>\n"
    assert trained_text(tokenizer, chosen_ids, chosen_labels).startswith("Fine. Fine.")
    assert data.stats.truncated == 1


def test_streaming_preference_data_is_refused_with_the_way_out(tmp_path, dpo_config, capsys):
    assert run_lmtune("train", dpo_config(streaming=True, max_steps=2)) == 2
    assert "streaming: true with stage: dpo" in capsys.readouterr().err


# --- around the loop: preview, plan --------------------------------------------------------------


def test_preview_shows_prompt_chosen_and_rejected_with_the_trained_tokens_marked(dpo_config, capsys):
    assert run_lmtune("preview", dpo_config(), "-n", "1") == 0
    out = capsys.readouterr().out
    assert "a preference pair: prompt, chosen, rejected" in out
    prompt = out[out.index("prompt (masked in both):"):out.index("chosen: tokens")]
    assert "Question" in prompt and "Yes, it is more." not in prompt
    chosen = out[out.index("chosen: tokens"):out.index("rejected: tokens")]
    rejected = out[out.index("rejected: tokens"):]
    assert "]Yes, it is more.<|im_end|>\n" in chosen  # the labels: the answer trained, the rest masked
    assert "Yes, it is more." not in rejected and "8 trained" in rejected


def test_plan_counts_pairs(dpo_config, capsys):
    assert run_lmtune("plan", dpo_config(per_device_train_batch_size=4), "--json") == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["steps_per_epoch"] == 8  # 32 pairs, 4 a step
    assert plan["data"] == {"train": 32, "eval": 0, "unit": "pairs"}
    assert run_lmtune("plan", dpo_config(per_device_train_batch_size=4)) == 0
    assert "8 per epoch, 1.00 epochs over 32 training pairs" in capsys.readouterr().out


# --- SmolLM2 --------------------------------------------------------------------------------------


def test_smollm2_learns_to_prefer_the_chosen_answers(tmp_path, smollm2_dir, pairs_file):
    from conftest import write_config

    config = write_config(
        tmp_path, model_name_or_path=str(smollm2_dir), stage="dpo", dataset=str(pairs_file), finetuning_type="lora",
        lora_rank=8, pref_beta=0.1, learning_rate=5e-4, per_device_train_batch_size=2, max_steps=3,
        logging_steps=1, report_to="none", plot_loss=False, preview_samples=0, cutoff_len=128,
        output_dir=str(tmp_path / "run"), lr_scheduler_type="constant")
    assert run_lmtune("train", config) == 0
    rows = train_rows(tmp_path / "run")
    assert rows[0]["loss"] == pytest.approx(LN2, abs=1e-6)
    assert rows[-1]["rewards/margins"] > rows[1]["rewards/margins"] > 0
    assert rows[-1]["loss"] < LN2
    assert (tmp_path / "run" / "adapter_model.safetensors").exists()


def test_the_web_form_offers_stage_dpo_and_writes_its_keys_only_for_it(tmp_path, tiny_model_dir, pairs_file):
    import yaml
    from test_webui import make_workdir, tiny_form

    from lmtune.webui import form as F

    workdir = make_workdir(tmp_path / "work", tiny_model_dir)
    (workdir / "data" / "pairs.jsonl").write_text(pairs_file.read_text())
    form = tiny_form(stage="dpo", dataset=["data/pairs.jsonl"], pref_beta="0.2", pref_loss="ipo", pref_ftx="0.1",
                     precompute_ref_log_probs=True, metric_for_best_model="eval_rewards/accuracies", val_size="4")
    loaded = yaml.safe_load(F.values_to_yaml(F.form_to_values(workdir, form)))
    assert (loaded["stage"], loaded["pref_beta"], loaded["pref_loss"], loaded["pref_ftx"]) == ("dpo", 0.2, "ipo", 0.1)
    assert loaded["precompute_ref_log_probs"] is True and loaded["metric_for_best_model"] == "eval_rewards/accuracies"
    sft = yaml.safe_load(F.values_to_yaml(F.form_to_values(workdir, tiny_form(pref_beta="0.2"))))
    assert not set(F.STAGE_ONLY_KEYS) & set(sft)
