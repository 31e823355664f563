"""Online RL (stage grpo): the loss and advantages against TRL's formulas, a resume that samples the same
completions and computes the same losses bit for bit, and bad inputs refused before anything is written."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from conftest import EXAMPLES, read_jsonl, run_lmtune, torchrun
from test_resume import assert_same_run, straight_and_resumed

from lmtune.config import build_config
from lmtune.grpo import clipped_token_losses, group_advantages, kl_to_reference, summed_loss

# --- the loss and the advantages, against TRL's documented formulas ---------------------------------


def trl_advantages(rewards: torch.Tensor, G: int, scale: str) -> torch.Tensor:
    """TRL docs: A_i = (r_i - mean(r_group)) / (std(r_group) + 1e-4); `batch` takes the batch's std; `none`
    does not divide. std is the sample standard deviation."""
    grouped = rewards.view(-1, G)
    centred = (grouped - grouped.mean(dim=1, keepdim=True)).flatten()
    if scale == "none":
        return centred
    std = grouped.std(dim=1, keepdim=True).expand(-1, G).flatten() if scale == "group" else rewards.std()
    return centred / (std + 1e-4)


def trl_loss(logps, old, ref, adv, mask, loss_type, eps_low, eps_high, beta, max_len):
    """TRL docs, per token: l = -min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A) + beta KL with
    rho = exp(logp - old) and KL = exp(ref - logp) - (ref - logp) - 1; then
    grpo: 1/G sum_i 1/|o_i| sum_t l; dr_grpo: 1/(G L) sum_i sum_t l; dapo: sum_i sum_t l / sum_i |o_i|."""
    rho = torch.exp(logps - old)
    A = adv[:, None]
    per_token = -torch.min(rho * A, torch.clamp(rho, 1 - eps_low, 1 + eps_high) * A)
    per_token = per_token + beta * (torch.exp(ref - logps) - (ref - logps) - 1)
    if loss_type == "grpo":
        return ((per_token * mask).sum(1) / mask.sum(1)).mean()
    if loss_type == "dr_grpo":
        return (per_token * mask).sum() / (len(mask) * max_len)
    return (per_token * mask).sum() / mask.sum()


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_advantages_are_the_rewards_relative_to_their_group_and_zero_where_the_group_has_no_spread(scale):
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.0, 2.0, 2.0, 2.0, 2.0])  # the second group has no spread
    advantages, summed, zero_std = group_advantages(rewards[:, None], torch.tensor([1.0]), 4, scale)
    torch.testing.assert_close(advantages, trl_advantages(rewards, 4, scale))
    assert advantages[4:].tolist() == [0.0] * 4
    assert zero_std.tolist() == ([False] * 8 if scale == "batch" else [False] * 4 + [True] * 4)
    assert summed.tolist() == rewards.tolist()


def test_rewards_are_weighted_sums_and_a_completion_no_function_scores_has_no_advantage():
    per_func = torch.tensor([[1.0, float("nan")], [0.0, 1.0], [float("nan"), float("nan")], [1.0, 1.0]])
    advantages, rewards, _ = group_advantages(per_func, torch.tensor([1.0, 0.5]), 4, "group")
    assert rewards[[0, 1, 3]].tolist() == [1.0, 0.5, 1.5] and torch.isnan(rewards[2])
    assert advantages[2] == 0.0
    scored = torch.tensor([1.0, 0.5, 1.5])
    torch.testing.assert_close(advantages[[0, 1, 3]], (scored - scored.mean()) / (scored.std() + 1e-4))


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_each_loss_type_is_trls_formula(loss_type, beta):
    torch.manual_seed(0)
    G, T = 4, 5
    lengths = torch.tensor([5, 2, 3, 1])
    mask = (torch.arange(T)[None, :] < lengths[:, None]).float()
    logps = -torch.rand(G, T) * 3
    old = logps + torch.randn(G, T) * 0.3  # off-policy enough that some ratios are clipped
    ref = logps + torch.randn(G, T) * 0.2
    adv = trl_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]), G, "group")
    expected = trl_loss(logps, old, ref, adv, mask, loss_type, 0.2, 0.28, beta, T)

    trained = mask.bool()  # lmtune's layout: the completion tokens one after another, with their completion
    sequence = torch.arange(G)[:, None].expand(G, T)[trained]
    token_losses, clipped = clipped_token_losses(logps[trained], old[trained], adv[sequence], 0.2, 0.28)
    token_losses = token_losses + beta * kl_to_reference(logps[trained], ref[trained])
    summed = summed_loss(token_losses, torch.ones_like(token_losses), sequence, G, loss_type, T)
    divisor = lengths.sum() if loss_type == "dapo" else G  # the step's tokens, or its completions
    torch.testing.assert_close(summed / divisor, expected)
    assert clipped["region"].any() and not clipped["region"].all()


def test_with_the_ratio_at_one_the_loss_is_minus_the_mean_advantage_near_zero():
    """num_iterations 1: pi_old is pi, the ratio is 1, and the grpo loss is -mean(A): ~0 by construction."""
    adv = trl_advantages(torch.tensor([1.0, 0.0, 0.0, 0.5]), 4, "group")
    logps = -torch.rand(4, 3)
    sequence = torch.arange(4)[:, None].expand(4, 3).flatten()
    losses, _ = clipped_token_losses(logps.flatten(), logps.flatten(), adv[sequence], 0.2, 0.2)
    loss = summed_loss(losses, torch.ones(12), sequence, 4, "grpo", 3) / 4
    assert loss.item() == pytest.approx(-adv.mean().item(), abs=1e-7) and abs(loss.item()) < 1e-6


# --- runs on the tiny model ----------------------------------------------------------------------


PROMPTS = [{"instruction": f"What is {a} plus {b}?", "answer": str(a + b)} for a in range(1, 9) for b in range(1, 3)]
SHORT = "def short(completions, **kwargs):\n    return [1.0 if len(c.split()) <= 6 else 0.0 for c in completions]\n"


@pytest.fixture
def grpo_config(tiny_config, tmp_path):
    data = tmp_path / "prompts.json"
    data.write_text(json.dumps(PROMPTS))
    (tmp_path / "rewards.py").write_text(SHORT)

    def make(**overrides):
        values = dict(stage="grpo", dataset=str(data), finetuning_type="lora", learning_rate=1e-2,
                      reward_funcs=[f"{tmp_path / 'rewards.py'}:short", "length"], reward_max_words=6,
                      num_generations=4, max_completion_length=8, per_device_train_batch_size=2,
                      gradient_accumulation_steps=2, max_steps=4)
        return tiny_config(**{**values, **overrides})

    return make


def completions_by_step(run_dir) -> dict[int, list]:
    """completions.jsonl by step: written at each logging step whose interval generated."""
    path = run_dir / "completions.jsonl"
    rows = read_jsonl(path) if path.exists() else []
    return {step: [r for r in rows if r["step"] == step] for step in sorted({r["step"] for r in rows})}


@pytest.mark.parametrize("settings", [
    {},
    # the generated batch is trained twice: checkpoint-3 holds it with one step on it still to go
    {"num_iterations": 2, "beta": 0.1, "loss_type": "grpo", "finetuning_type": "full"},
], ids=["dapo", "num_iterations-beta-full"])
def test_a_resumed_run_samples_the_same_completions_and_losses_bit_for_bit(grpo_config, tmp_path, settings):
    straight, resumed = straight_and_resumed(grpo_config, tmp_path, 3, **settings)
    assert_same_run(straight, resumed, from_step=3)
    expected, got = completions_by_step(straight), completions_by_step(resumed)
    assert got == {step: rows for step, rows in expected.items() if step > 3}
    assert (4 in got) == ("num_iterations" not in settings)  # step 4 trains the batch step 3 generated
    rows = [r for r in read_jsonl(straight / "metrics.jsonl") if r["type"] == "train"]
    generating = rows[::settings.get("num_iterations", 1)]  # a step that trains a kept batch generates nothing
    assert all(0 <= r["frac_reward_zero_std"] <= 1 and "rewards/short/mean" in r for r in generating)
    assert ("kl" in rows[0]) == ("beta" in settings)


def test_two_processes_resume_with_the_same_completions_and_losses(grpo_config, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    settings = dict(save_steps=1, max_steps=2, gradient_accumulation_steps=1, per_device_train_batch_size=1)
    torchrun(grpo_config(output_dir=str(straight), **settings))
    resumed.mkdir()
    shutil.copytree(straight / "checkpoint-1", resumed / "checkpoint-1")
    torchrun(grpo_config(output_dir=str(resumed), resume_from_checkpoint=str(resumed / "checkpoint-1"), **settings))
    assert_same_run(straight, resumed, from_step=1)
    assert completions_by_step(resumed) == {2: completions_by_step(straight)[2]}


def test_a_reward_function_that_fails_mid_run_leaves_a_checkpoint_of_the_last_step_and_exits_1(
        grpo_config, tmp_path, capsys):
    (tmp_path / "flaky.py").write_text(
        "def flaky(completions, step, **kwargs):\n"
        "    if step == 2:\n"
        "        raise RuntimeError('the grader is down')\n"
        "    return [0.0] * len(completions)\n")
    assert run_lmtune("train", grpo_config(reward_funcs=[f"{tmp_path / 'flaky.py'}:flaky", "length"])) == 1
    err = capsys.readouterr().err
    assert "the grader is down" in err and "flaky.py" in err and "checkpoint of step 2" in err
    run = tmp_path / "run"
    state = json.loads((run / "checkpoint-2" / "train_state.json").read_text())
    assert state["step"] == 2 and state["data_rows"] == 8  # the third step's prompts are trained on resume


# --- bad inputs: exit 2 naming them, nothing written ----------------------------------------------------


@pytest.mark.parametrize(("override", "source", "words"), [
    ({"reward_funcs": ["missing.py:short"]}, None, ["missing.py", "not found"]),
    ({"reward_funcs": ["REWARDS:nothing"]}, SHORT, ["defines no function 'nothing'", "short"]),
    ({"reward_funcs": ["REWARDS:short"]}, "def short(text):\n    return [0.0]\n", ["'REWARDS:short'", "prompts"]),
    ({"reward_funcs": ["REWARDS:short"]}, "def short(completions, **kw):\n    return [1.0]\n",
     ["returned 1 values for 2 completions"]),
    ({"reward_funcs": ["math_answer"], "reward_answer_column": "solution"}, None, ["no 'solution' column", "answer"]),
    ({"num_generations": 1}, None, ["num_generations 1"]),
    ({"max_prompt_length": 8}, None, ["row 1", "max_prompt_length 8"]),
    ({"use_vllm": True}, None, ["use_vllm", "not available"]),
    ({"loss_type": "cispo"}, None, ["loss_type 'cispo'", "not available"]),
])
def test_a_bad_input_exits_2_naming_it_and_writes_nothing(grpo_config, tmp_path, capsys, override, source, words):
    path = tmp_path / "bad_rewards.py"
    if source is not None:
        path.write_text(source)
    override = {k: [f.replace("REWARDS", str(path)) for f in v] if k == "reward_funcs" else v
                for k, v in override.items()}
    assert run_lmtune("train", grpo_config(**override)) == 2
    err = capsys.readouterr().err
    for word in words:
        assert word.replace("REWARDS", str(path)) in " ".join(err.split()), err
    assert not (tmp_path / "run").exists()


def test_prompt_rows_come_from_each_format_with_the_other_columns_for_the_rewards(tmp_path, tokenizer):
    from lmtune.data import prepare_data

    question = "What is 2 plus 3?"
    formats = {
        "alpaca.json": [{"instruction": "What is 2 plus 3?", "answer": "5"}],
        "messages.json": [{"messages": [{"role": "user", "content": question}], "answer": "5"}],
        "prompt.json": [{"prompt": question, "answer": "5"}],
    }
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                             add_generation_prompt=True)
    for name, rows in formats.items():
        (tmp_path / name).write_text(json.dumps(rows))
        config = build_config({"stage": "grpo", "dataset": str(tmp_path / name), "reward_funcs": ["math_answer"]})
        row = prepare_data(config, tokenizer, use_cache=False).train[0]
        assert tokenizer.decode(row["input_ids"]) == rendered  # the generation prompt, as at inference
        assert json.loads(row["reward_inputs"]) == {"prompt": [{"role": "user", "content": question}],
                                                    "columns": {"answer": "5"}}, name


def test_a_conversation_that_ends_with_the_assistant_is_refused_naming_the_row(tmp_path, tiny_config, capsys):
    data = tmp_path / "chat.json"
    data.write_text(json.dumps([{"messages": [{"role": "user", "content": "hi"},
                                              {"role": "assistant", "content": "hello"}]}]))
    assert run_lmtune("train", tiny_config(stage="grpo", dataset=str(data), reward_funcs=["length"])) == 2
    assert "row 1" in capsys.readouterr().err


def test_the_built_in_math_answer_reward_reads_the_final_answer():
    from lmtune.rewards import final_answer, same_answer

    assert final_answer("so 2 + 3 = \\boxed{5}.") == "5"
    assert final_answer("Natalia sold 48 clips... #### 72") == "72"
    assert final_answer("The answer is 1,000.") == "1,000"
    assert final_answer("I think 3, no, 4") == "4"
    assert same_answer("1,000", "1000.0") and same_answer(" Paris", "paris") and not same_answer("4", "5")


def test_plan_shows_the_completions_generated_per_step_and_the_token_budget(grpo_config, capsys):
    assert run_lmtune("plan", grpo_config(num_iterations=2)) == 0
    out = " ".join(capsys.readouterr().out.split())
    # 2 prompts x 2 micro-batches x 4 completions; 4 steps, every second one generates
    assert "16 completions generated every 2 steps" in out and "at most 128 tokens each time" in out
    assert "2 generating steps, at most 256 tokens generated in the run" in out


# --- the built-in model learns (the one slow test) -----------------------------------------------------


@pytest.mark.skipif(not os.environ.get("LMTUNE_LONG_TESTS"),
                    reason="30 GRPO steps of SmolLM2 take minutes on a CPU: run with LMTUNE_LONG_TESTS=1")
def test_examples_grpo_yaml_raises_the_reward_of_the_built_in_model(tmp_path, smollm2_dir):
    """examples/grpo.yaml: short answers with the right sum; the base model gets there sometimes."""
    run = tmp_path / "run"
    assert run_lmtune("train", EXAMPLES / "grpo.yaml", f"output_dir={run}", "report_to=none", "plot_loss=false",
                      "save_steps=null", "save_total_limit=null") == 0
    rows = [r for r in read_jsonl(run / "metrics.jsonl") if r["type"] == "train"]
    assert len(rows) == 30 and all(0 <= r["frac_reward_zero_std"] <= 1 for r in rows)
    first, last = [sum(r["reward"] for r in part) / 5 for part in (rows[:5], rows[-5:])]
    assert last > first, (first, last)
    assert (run / "completions.jsonl").exists()


def test_the_rollout_samples_through_the_generation_module_with_top_k_and_its_own_generator(tiny_model_dir,
                                                                                            tokenizer):
    """top_k: 1 leaves one token to draw: every completion is the greedy one lmtune chat gives; the
    rollout's generator, not the global RNG, decides the draws, and its state replays them."""
    from lmtune.generation import Sampling, generate
    from lmtune.models import load_model
    from lmtune.rollout import LocalRollout

    config = build_config({"model_name_or_path": str(tiny_model_dir), "stage": "grpo", "reward_funcs": ["length"],
                           "max_completion_length": 6, "temperature": 1.0})
    model = load_model(str(tiny_model_dir), config)
    prompt = tokenizer("What is 2 plus 3?")["input_ids"]
    greedy = LocalRollout(model, config.model_copy(update={"top_k": 1}), tokenizer, seed=0).generate([prompt], 3)
    [expected] = generate(model, tokenizer, [prompt], [Sampling(max_new_tokens=6)])
    assert greedy.ids == [expected.token_ids] * 3 and greedy.truncated == [expected.finish_reason == "length"] * 3

    rollout = LocalRollout(model, config, tokenizer, seed=0)
    state = rollout.state_dict()
    first = rollout.generate([prompt], 4)
    torch.manual_seed(123)  # the global RNG plays no part
    rollout.load_state_dict(state)
    assert rollout.generate([prompt], 4).ids == first.ids
    assert len({tuple(ids) for ids in first.ids}) > 1  # sampled, not greedy
