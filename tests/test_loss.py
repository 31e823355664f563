"""What is computed changes, what is learned does not: logits only at trained positions, and padding-free
micro-batches, give the losses and gradients of full logits over padded batches."""

from __future__ import annotations

import pytest
import torch
from conftest import read_jsonl, run_lmtune, torchrun
from safetensors.torch import load_file

import lmtune.batching
import lmtune.loss
from lmtune.batching import Collator, batching_of, keeps_examples_apart, model_keeps_examples_apart
from lmtune.config import build_config
from lmtune.data import IGNORE_INDEX
from lmtune.loss import FullLogitsLoss, TrainedPositionsLoss, batch_loss_for
from lmtune.models import load_model

M = IGNORE_INDEX


def example(length: int, trained_from: int, offset: int = 0) -> dict:
    """A row of `length` tokens whose labels are masked before `trained_from` (and at 0, as always)."""
    ids = [(offset + 7 * i) % 400 + 5 for i in range(length)]
    labels = [M if i < max(trained_from, 1) else token for i, token in enumerate(ids)]
    return {"input_ids": ids, "labels": labels, "position_ids": list(range(length))}


BATCHES = {
    "with padding": [example(9, 4), example(3, 1, 50), example(6, 2, 90)],
    "an example with every label masked": [example(7, 3), example(5, 5, 20), example(8, 6, 40)],
    "a single example": [example(12, 5)],
}


def assert_same_gradients(grads: dict, expected: dict) -> None:
    """Within float tolerance of the largest entry: a sum over many tokens rounds differently per order."""
    assert set(grads) == set(expected) and grads
    for name, grad in grads.items():
        scale = float(expected[name].abs().max())
        assert float((grad - expected[name]).abs().max()) <= 1e-4 * scale + 1e-7, name


def loss_and_grads(model, loss_of, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = loss_of(model, batch)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


@pytest.mark.parametrize("finetuning_type", ["full", "lora", "freeze"])
@pytest.mark.parametrize("rows", list(BATCHES.values()), ids=list(BATCHES))
def test_trained_positions_loss_equals_the_full_logits_loss(tiny_model_dir, rows, finetuning_type):
    config = build_config({"finetuning_type": finetuning_type, "freeze_trainable_layers": 1, "lora_rank": 4})
    model = load_model(str(tiny_model_dir), config)
    if finetuning_type == "lora":  # lora_B starts at zero; move it so that the adapter shapes the loss
        for name, param in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(param, std=0.1)
    batch, counts = Collator(0, packed=False)(rows)
    assert "attention_mask" in batch and counts.tokens < batch["input_ids"].numel() or len(rows) == 1

    expected, expected_grads = loss_and_grads(model, FullLogitsLoss(), batch)
    loss_of = batch_loss_for(model)
    assert isinstance(loss_of, TrainedPositionsLoss)
    loss, grads = loss_and_grads(model, loss_of, batch)

    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    assert_same_gradients(grads, expected_grads)


def test_chunks_of_positions_give_the_same_loss_and_gradients(tiny_model_dir, monkeypatch):
    """Pre-training trains every position: the logits are computed a chunk at a time (here 5 positions)."""
    model = load_model(str(tiny_model_dir), build_config({"finetuning_type": "full", "stage": "pt"}))
    rows = [example(40, 1), example(23, 1, 10)]
    batch, _ = Collator(0, packed=True)(rows)
    expected, expected_grads = loss_and_grads(model, FullLogitsLoss(), batch)
    loss_of = batch_loss_for(model)
    calls = []
    monkeypatch.setattr(lmtune.loss, "LOGITS_PER_CHUNK", 5 * loss_of.vocab_size)
    monkeypatch.setattr(loss_of, "_chunk_loss", lambda h, t: calls.append(len(t)) or
                        TrainedPositionsLoss._chunk_loss(loss_of, h, t))
    loss, grads = loss_and_grads(model, loss_of, batch)
    assert max(calls) == 5 and sum(calls) >= 39 + 22  # every trained position, 5 at a time (and again backward)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    assert_same_gradients(grads, expected_grads)


def test_a_padding_free_row_holds_the_same_examples_without_padding(tiny_model_dir):
    rows = BATCHES["with padding"]
    padded, padded_counts = Collator(0, packed=False)(rows)
    joined, counts = Collator(0, packed=False, padding_free=True)(rows)
    assert joined["input_ids"].shape == (1, sum(len(r["input_ids"]) for r in rows)) and "attention_mask" not in joined
    assert joined["position_ids"][0].tolist() == [p for r in rows for p in r["position_ids"]]
    assert (counts.samples, counts.tokens, counts.trained_tokens) == (
        padded_counts.samples, padded_counts.tokens, padded_counts.trained_tokens)
    model = load_model(str(tiny_model_dir), build_config({"finetuning_type": "full"}))
    loss_of = batch_loss_for(model)
    torch.testing.assert_close(loss_of(model, joined), FullLogitsLoss()(model, padded), rtol=1e-5, atol=1e-6)


def losses_and_weights(run_dir):
    rows = [r for r in read_jsonl(run_dir / "metrics.jsonl") if r["type"] == "train"]
    weights = run_dir / ("adapter_model.safetensors" if (run_dir / "adapter_model.safetensors").exists()
                         else "model.safetensors")
    return [r["loss"] for r in rows], [r["tokens_seen"] for r in rows], load_file(weights)


def assert_same_training(a, b):
    losses_a, tokens_a, weights_a = losses_and_weights(a)
    losses_b, tokens_b, weights_b = losses_and_weights(b)
    assert len(losses_a) == len(losses_b) and tokens_a == tokens_b
    assert losses_a == pytest.approx(losses_b, rel=1e-4)
    assert set(weights_a) == set(weights_b)
    for key in weights_a:
        torch.testing.assert_close(weights_a[key], weights_b[key], rtol=1e-4, atol=1e-5, msg=key)


@pytest.mark.parametrize("finetuning_type", ["full", "lora"])
def test_padding_free_trains_as_padded_batches_do(tiny_config, tmp_path, capsys, finetuning_type):
    common = dict(max_steps=4, learning_rate=1e-2, seed=3, finetuning_type=finetuning_type, lora_rank=4,
                  gradient_accumulation_steps=2, val_size=4, eval_steps=2)
    assert run_lmtune("train", tiny_config(output_dir=str(tmp_path / "free"), **common)) == 0
    log = capsys.readouterr().err
    assert "batching: padding-free" in log and "removes" in log
    assert run_lmtune("train", tiny_config(output_dir=str(tmp_path / "padded"), padding_free=False, **common)) == 0
    assert "batching: padded" in capsys.readouterr().err
    assert_same_training(tmp_path / "free", tmp_path / "padded")
    evals = [[r["eval_loss"] for r in read_jsonl(tmp_path / run / "metrics.jsonl") if r["type"] == "eval"]
             for run in ("free", "padded")]
    assert len(evals[0]) == 2 and evals[0] == pytest.approx(evals[1], rel=1e-4)


def test_padding_free_with_two_processes_trains_as_padded_batches_do(tiny_config, tmp_path):
    torchrun(tiny_config(max_steps=3, seed=5, output_dir=str(tmp_path / "free"), padding_free=True))
    # one process with both processes' rows in one padded micro-batch: the two processes' gradients were
    # averaged token-weighted, and laying the rows end to end changed nothing
    padded = tiny_config(max_steps=3, seed=5, output_dir=str(tmp_path / "padded"), per_device_train_batch_size=8,
                         padding_free=False)
    assert run_lmtune("train", padded) == 0
    assert_same_training(tmp_path / "free", tmp_path / "padded")


def tiny_lfm2(tokenizer, folder):
    """A random LFM2: short convolutions between its attention layers carry state from token to token."""
    from transformers import Lfm2Config, Lfm2ForCausalLM

    torch.manual_seed(0)
    config = Lfm2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, layer_types=["conv", "full_attention"],
                        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    Lfm2ForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_a_model_that_cannot_keep_examples_apart_gets_padded_batches(tiny_config, tiny_model_dir, tokenizer,
                                                                     tmp_path, capsys):
    config = build_config({"finetuning_type": "full"})
    assert keeps_examples_apart(load_model(str(tiny_model_dir), config))
    folder = tiny_lfm2(tokenizer, tmp_path / "lfm2")
    assert not keeps_examples_apart(load_model(str(folder), config))

    assert run_lmtune("train", tiny_config(model_name_or_path=str(folder), max_steps=2)) == 0
    log = capsys.readouterr().err
    assert log.count("mixes examples laid end to end") == 1 and "batching: padded" in log
    assert batching_of(build_config({}), [3, 5], None)["padding_free"] is True  # the plan, before a model


def test_the_verdict_on_keeping_examples_apart_is_checked_once_per_architecture(tiny_model_dir, monkeypatch,
                                                                                 tmp_path):
    monkeypatch.setenv("LMTUNE_HOME", str(tmp_path))  # no verdict from the tests before this one
    checked = []
    check = lmtune.batching.keeps_examples_apart
    monkeypatch.setattr(lmtune.batching, "keeps_examples_apart", lambda model: checked.append(1) or check(model))
    full, lora = build_config({"finetuning_type": "full"}), build_config({"finetuning_type": "lora"})
    assert model_keeps_examples_apart(load_model(str(tiny_model_dir), full)) is True
    assert model_keeps_examples_apart(load_model(str(tiny_model_dir), full)) is True  # the next run: no forward
    assert len(checked) == 1
    model = load_model(str(tiny_model_dir), full).to(torch.bfloat16)  # another precision is checked again
    assert model_keeps_examples_apart(model) is True and len(checked) == 2
    assert model_keeps_examples_apart(load_model(str(tiny_model_dir), lora)) is True
