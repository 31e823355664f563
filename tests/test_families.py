"""The family matrix: every architecture users bring, as a tiny random model built from transformers' own
config, trained by lmtune as a user would, and held to the model's own numbers (transformers' forward over
full logits). The output layer is scaled so that the logits have a trained model's size (several units),
and soft-capping is set where it shows: a loss that skipped a family's logit scaling or capping would
differ by far more than the tolerance."""

from __future__ import annotations

import pytest
import torch

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
