"""Templates by LLaMA-Factory's names: what each renders, and which tokens of a two-turn conversation are trained."""

from __future__ import annotations

import copy

import pytest

from lmtune.data.templates import IGNORE_INDEX, TEMPLATES, chat_template_for, encode_conversation, render
from lmtune.errors import UserError

TWO_TURNS = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "How are you?"},
    {"role": "assistant", "content": "Fine."},
]
MARKERS = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<start_of_turn>", "<end_of_turn>", "[INST]",
           "[/INST]", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>", "[gMASK]", "<sop>", "<|observation|>",
           "<|START_OF_TURN_TOKEN|>", "<|END_OF_TURN_TOKEN|>", "<|USER_TOKEN|>", "<|CHATBOT_TOKEN|>",
           "<|SYSTEM_TOKEN|>", "<<SYS>>", "<</SYS>>", "<think>", "</think>"]


@pytest.fixture(scope="module")
def bare_tokenizer(tokenizer):
    """The SmolLM2 tokenizer without a chat template of its own, each family's markers one token, as in
    the family's own tokenizer."""
    bare = copy.deepcopy(tokenizer)
    bare.chat_template = None
    bare.add_special_tokens({"additional_special_tokens": MARKERS}, replace_extra_special_tokens=False)
    return bare


def trained_runs(tokenizer, ids, labels) -> list[str]:
    """The trained text, one string per run of consecutive trained tokens."""
    runs, current = [], []
    for token, label in zip(ids, labels, strict=True):
        if label != IGNORE_INDEX:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tokenizer.decode(run) for run in runs]


EOS = "<|im_end|>"  # the SmolLM2 tokenizer's EOS, which {eos} stands for
FAMILIES = {
    "default": ["Hello!" + EOS, "Fine." + EOS],
    "empty": ["Hello!", "Fine."],
    "alpaca": ["Hello!" + EOS, "Fine." + EOS],
    "vicuna": ["Hello!" + EOS, "Fine." + EOS],
    "chatml": ["Hello!<|im_end|>", "Fine.<|im_end|>"],
    "qwen": ["Hello!<|im_end|>", "Fine.<|im_end|>"],
    "qwen2": ["Hello!<|im_end|>", "Fine.<|im_end|>"],
    "qwen2_5": ["Hello!<|im_end|>", "Fine.<|im_end|>"],
    "qwen3": ["<think>\n\n</think>\n\nHello!<|im_end|>", "<think>\n\n</think>\n\nFine.<|im_end|>"],
    "qwen3_nothink": ["Hello!<|im_end|>", "Fine.<|im_end|>"],
    "yi": ["Hello!<|im_end|>", "Fine.<|im_end|>"],
    "smollm": ["Hello!<|im_end|>", "Fine.<|im_end|>"],
    "smollm2": ["Hello!<|im_end|>", "Fine.<|im_end|>"],
    "llama3": ["Hello!<|eot_id|>", "Fine.<|eot_id|>"],
    "llama2": ["Hello!" + EOS, "Fine." + EOS],
    "mistral": [" Hello!" + EOS, " Fine." + EOS],
    "gemma": ["Hello!<end_of_turn>", "Fine.<end_of_turn>"],
    "gemma2": ["Hello!<end_of_turn>", "Fine.<end_of_turn>"],
    "gemma3": ["Hello!<end_of_turn>", "Fine.<end_of_turn>"],
    "phi": ["Hello!<|end|>", "Fine.<|end|>"],
    "phi3": ["Hello!<|end|>", "Fine.<|end|>"],
    "deepseek": ["Hello!" + EOS, "Fine." + EOS],
    "glm4": ["\nHello!<|user|>", "\nFine." + EOS],
    "cohere": ["Hello!" + EOS, "Fine." + EOS],
}


def test_every_named_template_has_a_mask_test():
    assert set(FAMILIES) == set(TEMPLATES)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_two_turns_train_each_reply_and_its_end_marker_only(bare_tokenizer, name):
    template = chat_template_for(bare_tokenizer, name)
    ids, labels = encode_conversation(bare_tokenizer, template, TWO_TURNS)
    runs = [run.strip(" ") if name != "mistral" else run for run in trained_runs(bare_tokenizer, ids, labels)]
    assert runs == FAMILIES[name]
    text = render(bare_tokenizer, template, TWO_TURNS, generation_prompt=False)
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
def test_named_templates_render_as_llama_factory_does(bare_tokenizer, name, expected):
    tokenizer = copy.copy(bare_tokenizer)
    special = {"bos_token": "<s>", "eos_token": "</s>"} if name != "llama3" else {"bos_token": "<|begin_of_text|>"}
    if name == "gemma":
        special = {"bos_token": "<bos>"}
    rendered = tokenizer.apply_chat_template(TWO_TURNS[:3], chat_template=chat_template_for(tokenizer, name),
                                             tokenize=False, **special)
    assert rendered == expected


def test_a_generation_prompt_opens_the_reply(bare_tokenizer):
    prompt = render(bare_tokenizer, chat_template_for(bare_tokenizer, "llama3"), TWO_TURNS[:2], generation_prompt=True)
    assert prompt.endswith("Hi there<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")


def test_the_default_system_prompt_is_used_when_the_data_has_none(bare_tokenizer):
    text = render(bare_tokenizer, chat_template_for(bare_tokenizer, "qwen"), TWO_TURNS[1:3], generation_prompt=False)
    assert text.startswith("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud.")


def test_the_tokenizers_own_template_is_used_where_it_is_the_family(tokenizer):
    # SmolLM2's own template is ChatML: qwen names that family, so the tokenizer's own template is used
    assert chat_template_for(tokenizer, "qwen") == tokenizer.chat_template
    assert chat_template_for(tokenizer, "llama3") != tokenizer.chat_template
    assert chat_template_for(tokenizer, "chatml") != tokenizer.chat_template  # chatml is always the named one


QWEN3_LIKE = (  # the part of Qwen3's own template that enable_thinking changes
    "{% for message in messages %}{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\\n' }}{% if loop.last %}{{ '<think>\\n\\n</think>\\n\\n' }}{% endif %}"
    "{{ message['content'] + '<|im_end|>\\n' }}"
    "{% else %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{% if enable_thinking is defined and enable_thinking is false %}{{ '<think>\\n\\n</think>\\n\\n' }}{% endif %}"
    "{% endif %}"
)


def test_qwen3_nothink_renders_the_own_template_with_thinking_off_and_does_not_train_the_empty_thought(
        bare_tokenizer):
    tokenizer = copy.copy(bare_tokenizer)
    tokenizer.chat_template = QWEN3_LIKE
    template = chat_template_for(tokenizer, "qwen3_nothink")
    assert template.startswith("{% set enable_thinking = false %}") and template.endswith(QWEN3_LIKE)
    prompt = render(tokenizer, template, TWO_TURNS[:2], generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    ids, labels = encode_conversation(tokenizer, template, TWO_TURNS[:3])
    assert trained_runs(tokenizer, ids, labels) == ["Hello!<|im_end|>"]


def test_an_unknown_template_lists_the_names(bare_tokenizer):
    with pytest.raises(UserError, match="qwen3_nothink"):
        chat_template_for(bare_tokenizer, "qwen4")
