"""A raw row of a data file -> training examples (tokens, labels, first-label mask) -> training rows.

Map-style data (processing.py) and streamed data (streaming.py) both go through `RowEncoder` and
`row_of`, so that the same file gives the same rows either way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lmtune.config import TrainConfig
from lmtune.data.registry import DatasetSpec, standard_row
from lmtune.data.templates import IGNORE_INDEX, encode_conversation
from lmtune.errors import UserError


@dataclass
class Example:
    """One tokenised example, cut to cutoff_len. Its first label is always -100: the first token of an
    example is never a target (nothing of the example comes before it, and in a row of several
    examples it would be predicted from the example before)."""

    input_ids: list[int]
    labels: list[int]
    raw_length: int  # tokens before truncation
    prompt_length: int  # tokens before the first trained one, before truncation

    @property
    def truncated(self) -> bool:
        return self.raw_length > len(self.input_ids)

    @property
    def has_labels(self) -> bool:
        return any(label != IGNORE_INDEX for label in self.labels)


class RowEncoder:
    """Turns the rows of a data set into examples, as the config says (stage, template, cutoff_len)."""

    def __init__(self, config: TrainConfig, tokenizer: Any, template: str | None):
        self.tokenizer, self.template = tokenizer, template
        self.cutoff_len = config.cutoff_len

    def examples(self, spec: DatasetSpec, row: dict[str, Any], where: str) -> list[Example]:
        """`where` names the row in an error message: `file.json, row 3`."""
        try:
            standard = standard_row(spec, row)
        except ValueError as error:
            raise UserError(f"{where}: {error} (data set '{spec.name}')") from None
        cutoff = self.cutoff_len
        examples = []
        for input_ids, labels in self._tokenised(standard):
            trained = [i for i, label in enumerate(labels) if label != IGNORE_INDEX and i > 0]
            masked = [IGNORE_INDEX] * min(1, len(labels)) + labels[1:cutoff]
            examples.append(Example(input_ids[:cutoff], masked, len(input_ids),
                                    trained[0] if trained else len(input_ids)))
        return examples

    def _tokenised(self, standard: dict):
        """One SFT example, or one text split into cutoff_len chunks for pre-training."""
        if "messages" in standard:
            yield encode_conversation(self.tokenizer, self.template, standard["messages"])
            return
        # The tokenizer's own special tokens (BOS for Llama; none for GPT-2 or SmolLM2, whose bos_token is the
        # chat marker <|im_start|>, which has no place in raw text), then EOS to end the document.
        ids = self.tokenizer(standard["text"], add_special_tokens=True)["input_ids"]
        if not ids or ids[-1] != self.tokenizer.eos_token_id:
            ids = ids + [self.tokenizer.eos_token_id]
        for start in range(0, len(ids), self.cutoff_len):
            chunk = ids[start : start + self.cutoff_len]
            if len(chunk) > 1:
                yield chunk, list(chunk)


def row_of(examples: list[tuple[list[int], list[int]]]) -> dict[str, list[int]]:
    """Examples side by side in one training row, position ids restarting at 0 where each starts: that
    is how the model keeps them from attending to each other."""
    row: dict[str, list[int]] = {"input_ids": [], "labels": [], "position_ids": []}
    for input_ids, labels in examples:
        row["input_ids"] += input_ids
        row["labels"] += labels
        row["position_ids"] += range(len(input_ids))
    return row
