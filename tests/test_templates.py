"""Templates by LLaMA-Factory's names: what each renders, and which tokens of a two-turn conversation are trained."""

from __future__ import annotations

import copy

import pytest

from lmtune.config import build_config
from lmtune.data.encoding import RowEncoder
from lmtune.data.registry import DatasetSpec
from lmtune.data.templates import (
    IGNORE_INDEX,
    TEMPLATES,
    chat_template_for,
    conversation_format,
    generation_prompt_ids,
    render,
)
from lmtune.errors import UserError

TWO_TURNS = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "How are you?"},
    {"role": "assistant", "content": "Fine."},
]
def encode(tokenizer, name, messages, cutoff_len=1024):
    """A conversation's ids and labels, as a run with this template encodes it."""
    config = build_config({"stage": "sft", "template": name, "cutoff_len": cutoff_len})
    encoder = RowEncoder(config, tokenizer, chat_template_for(tokenizer, name))
    (example,) = encoder.examples(DatasetSpec("rows", [], "sharegpt"), {"messages": messages}, "row")
    return example.input_ids, example.labels


def trained_runs(tokenizer, ids, labels) -> list[str]:
    """The trained targets, one string per run of consecutive trained tokens."""
    runs, current = [], []
    for label in labels:
        if label != IGNORE_INDEX:
            current.append(label)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tokenizer.decode(run) for run in runs]


# Trained: each reply and everything the template writes after it up to the next turn (its end-of-turn
# marker, the newline after it), as LLaMA-Factory trains it; {eos} is the SmolLM2 tokenizer's EOS,
# <|im_end|>; gemma2 and glm4 learn EOS where the next turn starts.
FAMILIES = {
    "alpaca": ['Hello!<|im_end|>\n\n', 'Fine.<|im_end|>\n\n'],
    "chatml": ['Hello!<|im_end|>\n', 'Fine.<|im_end|>\n'],
    "cohere": ['Hello!<|im_end|>', 'Fine.<|im_end|>'],
    "deepseek": ['Hello!<|im_end|>', 'Fine.<|im_end|>'],
    "default": ['Hello!<|im_end|>\n', 'Fine.<|im_end|>\n'],
    "empty": ['Hello!', 'Fine.'],
    "gemma": ['Hello!<end_of_turn>\n', 'Fine.<end_of_turn>\n'],
    "gemma2": ['Hello!<end_of_turn>\n<|im_end|>', 'Fine.<end_of_turn>\n<|im_end|>'],
    "gemma3": ['Hello!<end_of_turn>\n', 'Fine.<end_of_turn>\n'],
    "glm4": ['\nHello!<|im_end|>', '\nFine.<|im_end|>'],
    "llama2": ['Hello!<|im_end|>', 'Fine.<|im_end|>'],
    "llama3": ['Hello!<|eot_id|>', 'Fine.<|eot_id|>'],
    "mistral": [' Hello!<|im_end|>', ' Fine.<|im_end|>'],
    "phi": ['Hello!<|end|>\n', 'Fine.<|end|>\n'],
    "phi3": ['Hello!<|end|>\n', 'Fine.<|end|>\n'],
    "qwen": ['Hello!<|im_end|>\n', 'Fine.<|im_end|>\n'],
    "qwen2": ['Hello!<|im_end|>\n', 'Fine.<|im_end|>\n'],
    "qwen2_5": ['Hello!<|im_end|>\n', 'Fine.<|im_end|>\n'],
    "qwen3": ['<think>\n\n</think>\n\nHello!<|im_end|>\n', '<think>\n\n</think>\n\nFine.<|im_end|>\n'],
    "qwen3_nothink": ['Hello!<|im_end|>\n', 'Fine.<|im_end|>\n'],
    "smollm": ['Hello!<|im_end|>\n', 'Fine.<|im_end|>\n'],
    "smollm2": ['Hello!<|im_end|>\n', 'Fine.<|im_end|>\n'],
    "vicuna": ['Hello!<|im_end|>', 'Fine.<|im_end|>'],
    "yi": ['Hello!<|im_end|>\n', 'Fine.<|im_end|>\n'],
}


def test_every_named_template_has_a_mask_test():
    assert set(FAMILIES) == set(TEMPLATES)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_two_turns_train_each_reply_and_its_end_marker_only(marked_tokenizer, name):
    template = chat_template_for(marked_tokenizer, name)
    ids, labels = encode(marked_tokenizer, name, TWO_TURNS)
    assert trained_runs(marked_tokenizer, ids, labels) == FAMILIES[name]
    text = render(marked_tokenizer, template, TWO_TURNS, generation_prompt=False)
    assert "Be brief." in text and "Hi there" in text and "How are you?" in text


@pytest.mark.parametrize("name, expected", [
    ("llama3", "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
               "<|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>"
               "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>"),
    ("mistral", "<s>[INST] Be brief.\n\nHi there[/INST] Hello!</s>"),
    ("gemma", "<bos><start_of_turn>user\nBe brief.\n\nHi there<end_of_turn>\n<start_of_turn>model\n"
              "Hello!<end_of_turn>\n"),
    ("llama2", "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi there [/INST]Hello!</s>"),
    ("qwen", "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n"
             "<|im_start|>assistant\nHello!<|im_end|>\n"),
    ("alpaca", "Be brief.### Instruction:\nHi there\n\n### Response:\nHello!</s>\n\n"),
    ("glm4", "[gMASK]<sop><|system|>\nBe brief.<|user|>\nHi there<|assistant|>\nHello!</s>"),
    ("cohere", "<s><|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|>Be brief.<|END_OF_TURN_TOKEN|>"
               "<|START_OF_TURN_TOKEN|><|USER_TOKEN|>Hi there<|END_OF_TURN_TOKEN|>"
               "<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>Hello!</s>"),
])
def test_named_templates_render_as_llama_factory_does(marked_tokenizer, name, expected):
    tokenizer = copy.copy(marked_tokenizer)
    special = {"bos_token": "<s>", "eos_token": "</s>"} if name != "llama3" else {"bos_token": "<|begin_of_text|>"}
    if name == "gemma":
        special = {"bos_token": "<bos>"}
    rendered = tokenizer.apply_chat_template(TWO_TURNS[:3], chat_template=chat_template_for(tokenizer, name),
                                             tokenize=False, **special)
    assert rendered == expected


def test_a_generation_prompt_opens_the_reply(marked_tokenizer):
    template = chat_template_for(marked_tokenizer, "llama3")
    prompt = render(marked_tokenizer, template, TWO_TURNS[:2], generation_prompt=True)
    assert prompt.endswith("Hi there<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")


def test_the_default_system_prompt_is_used_when_the_data_has_none(marked_tokenizer):
    template = chat_template_for(marked_tokenizer, "qwen")
    text = render(marked_tokenizer, template, TWO_TURNS[1:3], generation_prompt=False)
    assert text.startswith("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud.")


@pytest.mark.parametrize("name", ["qwen", "qwen3", "qwen3_nothink", "yi", "smollm"])
def test_a_template_name_gives_that_template_even_where_the_tokenizers_own_is_chatml(tokenizer, name):
    # SmolLM2's own template is ChatML with its own default system prompt; the name decides, as in LLaMA-Factory
    assert chat_template_for(tokenizer, name) != tokenizer.chat_template
    ids, labels = encode(tokenizer, name, TWO_TURNS[1:3])
    text = tokenizer.decode(ids)
    assert "SmolLM" not in text
    assert ("You are Qwen" in text) == (name == "qwen")
    thought = "<think>\n\n</think>\n\nHello!<|im_end|>\n"
    assert trained_runs(tokenizer, ids, labels) == [thought if name == "qwen3" else "Hello!<|im_end|>\n"]


def test_null_uses_the_tokenizers_own_template(tokenizer):
    assert chat_template_for(tokenizer, None) == tokenizer.chat_template
    ids, _ = encode(tokenizer, None, TWO_TURNS[1:3])
    assert "named SmolLM" in tokenizer.decode(ids)


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_the_prompt_is_tokenised_at_inference_as_in_training(marked_tokenizer, name):
    """No token straddles a prompt and its reply: the ids trained before the second reply are the ids of
    the generation prompt chat gives the model for the same conversation."""
    conversation = [{"role": "system", "content": "Quote."}, {"role": "user", "content": 'Say "yes".'},
                    {"role": "assistant", "content": '"Yes."'}, {"role": "user", "content": "Again:"},
                    {"role": "assistant", "content": '"Yes."'}]
    ids, labels = encode(marked_tokenizer, name, conversation)
    second_reply = max(i for i, label in enumerate(labels) if label == IGNORE_INDEX) + 1
    prompt = generation_prompt_ids(marked_tokenizer, conversation_format(marked_tokenizer, name), conversation[:4])
    assert ids[:second_reply] == prompt


def test_an_unknown_template_lists_the_names(marked_tokenizer):
    with pytest.raises(UserError, match="qwen3_nothink"):
        chat_template_for(marked_tokenizer, "qwen4")
