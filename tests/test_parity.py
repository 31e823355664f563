"""The same token ids and labels as LLaMA-Factory 0.9.5, for every template name lmtune accepts.

The expected encodings are LLaMA-Factory's own (its converters, template and supervised / pairwise
processors), recorded once by tests/fixtures/record_llamafactory_encodings.py on the rows in
tests/fixtures/llamafactory/rows.json, at several cutoff_len; LLaMA-Factory is not needed here.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from lmtune.config import build_config
from lmtune.data.encoding import RowEncoder
from lmtune.data.registry import DatasetSpec
from lmtune.data.templates import TEMPLATES, chat_template_for

FIXTURES = Path(__file__).parent / "fixtures" / "llamafactory"
ROWS = json.loads((FIXTURES / "rows.json").read_text())
SPECS = {
    "alpaca": DatasetSpec("parity", [], "alpaca"),
    "sharegpt": DatasetSpec("parity", [], "sharegpt", columns={"messages": "conversations"}),
    "pairs": DatasetSpec("parity", [], "alpaca", ranking=True),
}
NAMES = [*sorted(TEMPLATES), None]


def recorded(name: str | None) -> dict:
    return json.loads((FIXTURES / f"{name or 'null'}.json").read_text())


@pytest.fixture(scope="module")
def marked_tokenizer(tokenizer):
    """SmolLM2's tokenizer (its own ChatML template kept) with every family's markers as special tokens."""
    marked = copy.deepcopy(tokenizer)
    marked.add_special_tokens({"additional_special_tokens": recorded(None)["markers"]},
                              replace_extra_special_tokens=False)
    return marked


def encoder(tokenizer, name: str | None, stage: str, cutoff_len: int) -> RowEncoder:
    config = build_config({"stage": stage, "template": name, "cutoff_len": cutoff_len})
    return RowEncoder(config, tokenizer, chat_template_for(tokenizer, name))


def test_every_template_name_has_recorded_encodings():
    assert {path.stem for path in FIXTURES.glob("*.json")} - {"rows"} == {name or "null" for name in NAMES}
    assert recorded("llama3")["llamafactory"] == "0.9.5"


@pytest.mark.parametrize("name", NAMES)
def test_sft_rows_encode_as_llama_factory_encodes_them(marked_tokenizer, name):
    differences = []
    for case in recorded(name)["sft"]:
        row = ROWS[case["formatting"]][case["row"]]
        (example,) = encoder(marked_tokenizer, name, "sft", case["cutoff_len"]).examples(
            SPECS[case["formatting"]], row, "row")
        if (example.input_ids, example.labels) != (case["input_ids"], case["labels"]):
            differences.append(f"{case['formatting']} row {case['row']} at cutoff_len {case['cutoff_len']}")
    assert not differences


@pytest.mark.parametrize("name", NAMES)
def test_preference_pairs_encode_as_llama_factory_encodes_them(marked_tokenizer, name):
    differences = []
    for case in recorded(name)["pairs"]:
        (example,) = encoder(marked_tokenizer, name, "dpo", case["cutoff_len"]).examples(
            SPECS["pairs"], ROWS["pairs"][case["row"]], "row")
        chosen, rejected = example.lengths
        expected_ids = case["chosen_input_ids"] + case["rejected_input_ids"]
        expected_labels = case["chosen_labels"] + case["rejected_labels"]
        if (example.input_ids, example.labels, chosen) != (expected_ids, expected_labels,
                                                           len(case["chosen_input_ids"])):
            differences.append(f"row {case['row']} at cutoff_len {case['cutoff_len']}")
    assert not differences
