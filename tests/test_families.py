"""The family matrix: every architecture users bring, as a tiny random model built from transformers' own
config, trained by lmtune as a user would, and held to the model's own numbers (transformers' forward over
full logits). The output layer is scaled so that the logits have a trained model's size (several units),
and soft-capping is set where it shows: a loss that skipped a family's logit scaling or capping would
differ by far more than the tolerance."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import read_jsonl, run_lmtune

from lmtune.batching import Collator, keeps_examples_apart
from lmtune.data import IGNORE_INDEX
from lmtune.errors import RunFailed
from lmtune.loss import TrainedPositionsLoss, batch_loss_for
from lmtune.models import use_router_loss
from lmtune.preference import sequence_log_probs

# family: (config class, its own keys). Every model: hidden 64, 2 layers, 4 heads of 16, 2 KV heads.
FAMILIES = {
    "llama": ("LlamaConfig", {}),
    "qwen2": ("Qwen2Config", {}),
    "qwen3": ("Qwen3Config", {}),
    "qwen3_moe": ("Qwen3MoeConfig", {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32}),
    "mistral": ("MistralConfig", {}),
    "mixtral": ("MixtralConfig", {"num_local_experts": 4, "num_experts_per_tok": 2}),
    "gemma2": ("Gemma2Config", {"final_logit_softcapping": 1.0, "query_pre_attn_scalar": 16}),
    "gemma3_text": ("Gemma3TextConfig", {"final_logit_softcapping": 1.0, "query_pre_attn_scalar": 16,
                                         "sliding_window": 8}),
    "cohere": ("CohereConfig", {"logit_scale": 0.5}),
    "granite": ("GraniteConfig", {"logits_scaling": 4.0, "embedding_multiplier": 2.0, "residual_multiplier": 0.5,
                                  "attention_multiplier": 0.25}),
    "phi3": ("Phi3Config", {}),
    "olmo2": ("Olmo2Config", {}),
    "glm4": ("Glm4Config", {}),
    "smollm3": ("SmolLM3Config", {}),
}
MOE_FAMILIES = ("qwen3_moe", "mixtral")
# LLaMA-Factory's template of each family that has one (rendered with SmolLM2's tokenizer: the tiny models
# have no tokenizer of their own); granite, olmo2 and smollm3 train with the tokenizer's own template
TEMPLATES = {"llama": "llama3", "qwen2": "qwen", "qwen3": "qwen3", "qwen3_moe": "qwen3", "mistral": "mistral",
             "mixtral": "mistral", "gemma2": "gemma2", "gemma3_text": "gemma3", "cohere": "cohere", "phi3": "phi3",
             "glm4": "glm4"}
# the logits' scale: the output layer's random weights times this give logits of several units
LOGIT_GAIN = 30.0


def build_family(family: str, vocab_size: int, seed: int = 0) -> torch.nn.Module:
    """A tiny random causal LM of `family` (float32, eval mode), its output layer scaled up."""
    import transformers

    config_class, own = FAMILIES[family]
    config = getattr(transformers, config_class)(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=256, tie_word_embeddings=False,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, **own,
    )
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(LOGIT_GAIN)
    return model.eval()


def rows_of(vocab_size: int) -> list[dict]:
    """Three examples of different lengths, their prompts masked: a padded batch pads two of them."""
    made = []
    for index, (length, trained_from) in enumerate(((11, 4), (6, 2), (9, 5))):
        ids = [(17 * index + 7 * i) % (vocab_size - 3) + 3 for i in range(length)]
        labels = [IGNORE_INDEX if i < trained_from else token for i, token in enumerate(ids)]
        made.append({"input_ids": ids, "labels": labels, "position_ids": list(range(length))})
    return made


_BUILT: dict[str, torch.nn.Module] = {}


def family_model(family: str) -> torch.nn.Module:
    """The family's tiny model with a vocabulary of 256 (built once per session)."""
    if family not in _BUILT:
        _BUILT[family] = build_family(family, vocab_size=256)
    return _BUILT[family]


def own_loss(model: torch.nn.Module, padded: dict[str, torch.Tensor]) -> torch.Tensor:
    """transformers' own loss of a padded batch: its forward over full logits, the mean over trained tokens."""
    return model(**padded, use_cache=False).loss


@pytest.mark.parametrize("family", list(FAMILIES))
def test_the_sft_loss_is_the_models_own(family):
    model = family_model(family)
    rows = rows_of(256)
    padded, counts = Collator(0, packed=False)(rows)
    expected = own_loss(model, padded)
    loss_of = batch_loss_for(model)
    assert isinstance(loss_of, TrainedPositionsLoss)
    with torch.no_grad():
        assert float(loss_of(model, padded)) / counts.trained_tokens == pytest.approx(float(expected), rel=1e-5)
        if keeps_examples_apart(model):
            joined, _ = Collator(0, packed=False, padding_free=True)(rows)
            mean = float(loss_of(model, joined)) / counts.trained_tokens
            assert mean == pytest.approx(float(expected), rel=1e-5)
    loss_of.remove()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_dpo_log_probabilities_are_the_models_own(family):
    model = family_model(family)
    rows = rows_of(256)
    padded, _ = Collator(0, packed=False)(rows)
    loss_of = batch_loss_for(model)
    with torch.no_grad():
        sums, tokens = sequence_log_probs(loss_of, model, padded)
        logits = model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits[:, :-1]
    targets = padded["labels"][:, 1:]
    trained = targets != IGNORE_INDEX
    token_log_probs = torch.log_softmax(logits.float(), -1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    expected = (token_log_probs * trained).sum(-1)
    torch.testing.assert_close(sums, expected, rtol=1e-5, atol=1e-5)
    assert tokens.tolist() == trained.sum(-1).tolist()
    loss_of.remove()


@pytest.mark.parametrize("family", ["gemma2", "cohere", "qwen3_moe"])
def test_full_fine_tuning_lowers_the_models_own_loss(family):
    model = build_family(family, vocab_size=256, seed=1).train()
    for module in model.modules():  # no dropout: the two losses compare the same function
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    padded, counts = Collator(0, packed=False)(rows_of(256))
    loss_of = batch_loss_for(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    before = float(own_loss(model, padded))
    (loss_of(model, padded) / counts.trained_tokens).backward()
    trained = [name for name, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0]
    assert any("embed" in name for name in trained) and any("layers.1." in name for name in trained)
    optimizer.step()
    assert float(own_loss(model, padded)) < before
    loss_of.remove()


def test_a_mismatch_with_the_models_own_loss_is_an_error_naming_the_class(monkeypatch):
    model = family_model("llama")
    padded, _ = Collator(0, packed=False)(rows_of(256))
    loss_of = batch_loss_for(model)
    own_logits = loss_of.logits
    monkeypatch.setattr(loss_of, "logits", lambda hidden: own_logits(hidden) * 2)  # a tail that drifted
    with pytest.raises(RunFailed, match="LlamaForCausalLM"):
        loss_of(model, padded)
    loss_of.remove()


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_moe_aux_loss_coef_adds_the_routers_loss_as_transformers_does(family):
    model = build_family(family, vocab_size=256, seed=2)
    use_router_loss(model, 0.5)
    model.train()
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    padded, counts = Collator(0, packed=False)(rows_of(256))
    with torch.no_grad():
        own = model(**padded, use_cache=False)
        without = float(own.loss - 0.5 * own.aux_loss)
        loss_of = batch_loss_for(model)
        assert loss_of.metric_names == ("aux_loss",)
        mine = float(loss_of(model, padded)) / counts.trained_tokens
        aux = float(loss_of.metric_sums()[0]) / counts.trained_tokens
    assert float(own.aux_loss) > 0
    assert aux == pytest.approx(float(own.aux_loss), rel=1e-5)
    assert mine == pytest.approx(float(own.loss), rel=1e-5)  # cross-entropy + 0.5 x aux, the model's own
    assert mine - without == pytest.approx(0.5 * aux, rel=1e-4)
    loss_of.remove()


def save_family(family: str, tokenizer, folder: Path) -> Path:
    model = build_family(family, vocab_size=len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.eos_token_id = tokenizer.eos_token_id
    model.config.bos_token_id = tokenizer.bos_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


# a run through the CLI costs seconds a family: the families whose forward does most after its decoder, and an MoE
@pytest.mark.parametrize("family", ["gemma2", "cohere", "granite", "qwen3_moe"])
def test_lora_trains_and_exports_a_model_transformers_loads_alone(family, tokenizer, tiny_config, tmp_path):
    from transformers import AutoModelForCausalLM

    folder = save_family(family, tokenizer, tmp_path / family)
    extra = {"moe_aux_loss_coef": 0.01} if family in MOE_FAMILIES else {}
    run = tmp_path / "run"
    assert run_lmtune("train", tiny_config(model_name_or_path=str(folder), finetuning_type="lora", lora_rank=4,
                                           lora_target="all", max_steps=1, cutoff_len=96,
                                           template=TEMPLATES.get(family), **extra)) == 0
    rows = [r for r in read_jsonl(run / "metrics.jsonl") if r.get("type") == "train"]
    assert len(rows) == 1 and rows[0]["loss"] > 0
    assert ("aux_loss" in rows[0]) == (family in MOE_FAMILIES)
    assert run_lmtune("export", str(run), "--out", str(tmp_path / "export")) == 0
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "export", dtype=torch.float32)
    assert type(exported).__name__ == type(family_model(family)).__name__
    ids = torch.tensor([[5, 6, 7, 8]])
    assert torch.isfinite(exported(input_ids=ids).logits).all()


@pytest.mark.parametrize("family", sorted(TEMPLATES))
def test_the_family_template_trains_the_reply_and_its_end_of_turn_only(family, tokenizer):
    from lmtune.config import build_config
    from lmtune.data.encoding import RowEncoder
    from lmtune.data.registry import DatasetSpec
    from lmtune.data.templates import chat_template_for

    config = build_config({"stage": "sft", "template": TEMPLATES[family], "cutoff_len": 1024})
    encoder = RowEncoder(config, tokenizer, chat_template_for(tokenizer, TEMPLATES[family]))
    messages = [{"role": "user", "content": "What is 2 plus 3?"}, {"role": "assistant", "content": "It is 5."},
                {"role": "user", "content": "And 4 plus 4?"}, {"role": "assistant", "content": "It is 8."}]
    (example,) = encoder.examples(DatasetSpec("rows", [], "sharegpt"), {"messages": messages}, "row")
    ids, labels = example.input_ids, example.labels
    trained = tokenizer.decode([token for token, label in zip(ids, labels, strict=True) if label != IGNORE_INDEX])
    prompt = tokenizer.decode([token for token, label in zip(ids, labels, strict=True) if label == IGNORE_INDEX])
    assert "It is 5." in trained and "It is 8." in trained and "plus" not in trained
    assert "What is 2 plus 3?" in prompt and "It is" not in prompt
    # each reply with no more than its end-of-turn marker (qwen3 also trains its empty think block, as LLaMA-Factory)
    assert len(trained.replace("<think>\n\n</think>\n\n", "")) - len("It is 5.It is 8.") <= 2 * 24


def test_two_processes_shard_a_dense_and_a_moe_family_and_keep_the_models_own_loss(tokenizer, tiny_config, tmp_path):
    """FSDP over 2 processes, a soft-capped dense family and a mixture of experts with its router's loss: the
    first step's cross-entropy is the model's own over the step's 4 rows (2 on each process)."""
    from conftest import torchrun
    from transformers import AutoModelForCausalLM

    from lmtune.config import load_config
    from lmtune.data import prepare_data

    for family, extra in (("gemma2", {}), ("qwen3_moe", {"moe_aux_loss_coef": 0.5})):
        folder = save_family(family, tokenizer, tmp_path / family)
        run = tmp_path / f"run-{family}"
        config = tiny_config(model_name_or_path=str(folder), output_dir=str(run), fsdp="full_shard", max_steps=1,
                             max_samples=4, per_device_train_batch_size=2, cutoff_len=48, **extra)
        result = torchrun(config)
        assert f"fsdp: each of the 2 {type(family_model(family)).__name__.replace('ForCausalLM', '')}DecoderLayer " \
               "layers sharded on its own" in " ".join(result.stderr.split())  # the log wraps long lines
        row = next(r for r in read_jsonl(run / "metrics.jsonl") if r.get("type") == "train")
        cross_entropy = row["loss"] - 0.5 * row.get("aux_loss", 0.0)
        rows = prepare_data(load_config(config), tokenizer).train
        padded, _ = Collator(tokenizer.pad_token_id, packed=False)([rows[i] for i in range(len(rows))])
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        with torch.no_grad():
            assert cross_entropy == pytest.approx(float(own_loss(model, padded)), rel=1e-5), family
        assert (row.get("aux_loss", 0.0) > 0) == (family == "qwen3_moe")
