"""A raw row of a data file -> training examples (tokens, labels, first-label mask) -> training rows.

Map-style data (processing.py) and streamed data (streaming.py) both go through `RowEncoder` and
`row_of`, so that the same file gives the same rows either way. A preference pair is one example of
two sequences end to end, the chosen then the rejected answer, each after the same prompt: its
position ids restart where the rejected one starts, as between the examples of a packed row. A KTO
example is likewise two sequences: its prompt with its own answer, then its prompt with the answer of the
row before it (the mismatched pair KTO's KL estimate is taken from), and its mark (`kto_tag`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lmtune.config import TrainConfig
from lmtune.data.registry import DatasetSpec, standard_row
from lmtune.data.templates import IGNORE_INDEX, encode_conversation, render
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
    lengths: list[int] | None = None  # a preference pair or kto example: the lengths of its two sequences
    kto_tag: bool | None = None  # a kto example: whether its answer is desirable

    @property
    def truncated(self) -> bool:
        return self.raw_length > len(self.input_ids)

    @property
    def has_labels(self) -> bool:
        """Something to train: for a pair, in both of its sequences."""
        starts = [0]
        for length in self.lengths or [len(self.input_ids)]:
            starts.append(starts[-1] + length)
        return all(any(label != IGNORE_INDEX for label in self.labels[start:end])
                   for start, end in zip(starts, starts[1:], strict=False))

    @property
    def position_ids(self) -> list[int]:
        return [position for length in self.lengths or [len(self.input_ids)] for position in range(length)]


class RowEncoder:
    """Turns the rows of a data set into examples, as the config says (stage, template, cutoff_len)."""

    def __init__(self, config: TrainConfig, tokenizer: Any, template: str | None):
        self.tokenizer, self.template = tokenizer, template
        self.cutoff_len = config.cutoff_len

    def examples(self, spec: DatasetSpec, row: dict[str, Any], where: str) -> list[Example]:
        """`where` names the row in an error message: `file.json, row 3`."""
        return self._examples_of(_standard(spec, row, where))

    def batch_examples(self, spec: DatasetSpec, rows: list[dict[str, Any]], wheres: list[str]) -> list[list[Example]]:
        """The examples of each of a batch of rows. KTO rows take the answer of the row before them in the
        batch (the first takes the last's) for their KL sequence, as LLaMA-Factory and TRL pair them."""
        standards = [_standard(spec, row, where) for row, where in zip(rows, wheres, strict=True)]
        if spec.feedback:
            answers = [standard["completion"] for standard in standards]
            for standard, other in zip(standards, answers[-1:] + answers[:-1], strict=True):
                standard["kl_completion"] = other
        return [self._examples_of(standard) for standard in standards]

    def _examples_of(self, standard: dict[str, Any]) -> list[Example]:
        if "chosen" in standard:
            return [self._pair(standard)]
        if "completion" in standard:
            return [self._feedback(standard)]
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


    def prompt(self, spec: DatasetSpec, row: dict[str, Any], where: str, max_length: int) -> tuple[list[int], dict]:
        """Stage grpo: the token ids of the prompt with the template's generation prompt after it, as `lmtune
        chat` renders it, and what the reward functions receive of the row: its prompt and its other columns."""
        try:
            standard = standard_row(spec, row)
        except ValueError as error:
            raise UserError(f"{where}: {error} (data set '{spec.name}')") from None
        text = render(self.tokenizer, self.template, standard["messages"], generation_prompt=True)
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) > max_length:
            raise UserError(f"{where}: the prompt is {len(ids)} tokens, longer than max_prompt_length {max_length}; "
                            "raise max_prompt_length, or shorten or leave out this row")
        return ids, {"prompt": standard["messages"], "columns": standard["columns"]}

    def _pair(self, standard: dict) -> Example:
        """The chosen and the rejected sequence, each cut to cutoff_len as LLaMA-Factory cuts a pair: the
        answers keep the larger share (the longer answer decides), the prompt is cut from its end."""
        return self._joined([self._sequence(standard, "chosen"), self._sequence(standard, "rejected")])

    def _feedback(self, standard: dict) -> Example:
        """The answer's sequence and the KL sequence, each cut to cutoff_len on its own (LLaMA-Factory)."""
        own = self._joined([self._sequence(standard, "completion")])
        kl = self._joined([self._sequence(standard, "kl_completion")])
        return Example(own.input_ids + kl.input_ids, own.labels + kl.labels, own.raw_length + kl.raw_length,
                       own.prompt_length, [len(own.input_ids), len(kl.input_ids)], kto_tag=standard["kto_tag"])

    def _sequence(self, standard: dict, answer: str) -> tuple[list[int], list[int]]:
        messages = [*standard["messages"], {"role": "assistant", "content": standard[answer]}]
        return encode_conversation(self.tokenizer, self.template, messages, last_reply_only=True)

    def _joined(self, sequences: list[tuple[list[int], list[int]]]) -> Example:
        """Sequences after the same prompt, cut alike to cutoff_len, end to end."""
        prompt_lengths = [_first_trained(labels) for _, labels in sequences]
        prompt_keep, answer_keep = truncated_lengths(
            max(prompt_lengths), max(len(ids) - n for (ids, _), n in zip(sequences, prompt_lengths, strict=True)),
            self.cutoff_len)
        input_ids, labels, lengths = [], [], []
        for (ids, sequence_labels), prompt in zip(sequences, prompt_lengths, strict=True):
            keep = [*range(min(prompt, prompt_keep)), *range(prompt, min(len(ids), prompt + answer_keep))]
            input_ids += [ids[i] for i in keep]
            labels += [IGNORE_INDEX] + [sequence_labels[i] for i in keep[1:]]
            lengths.append(len(keep))
        raw = sum(len(ids) for ids, _ in sequences)
        return Example(input_ids, labels, raw, max(prompt_lengths), lengths)


def _standard(spec: DatasetSpec, row: dict[str, Any], where: str) -> dict[str, Any]:
    try:
        return standard_row(spec, row)
    except ValueError as error:
        raise UserError(f"{where}: {error} (data set '{spec.name}')") from None


def _first_trained(labels: list[int]) -> int:
    return next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), len(labels))


def truncated_lengths(prompt: int, answer: int, cutoff_len: int) -> tuple[int, int]:
    """How much of a prompt and of its answer fit in cutoff_len: LLaMA-Factory's `infer_seqlen`. A short
    answer keeps all of itself, a short prompt too; otherwise each keeps its share of the length."""
    if answer * 2 < cutoff_len:
        answer_room = cutoff_len
    elif prompt * 2 < cutoff_len:
        answer_room = cutoff_len - prompt
    else:
        answer_room = int(cutoff_len * (answer / (prompt + answer)))
    answer_kept = min(answer_room, answer)
    return min(max(cutoff_len - answer_kept, 0), prompt), answer_kept


def row_of(examples: list[tuple[list[int], list[int]]]) -> dict[str, list[int]]:
    """Examples side by side in one training row, position ids restarting at 0 where each starts: that
    is how the model keeps them from attending to each other."""
    row: dict[str, list[int]] = {"input_ids": [], "labels": [], "position_ids": []}
    for input_ids, labels in examples:
        row["input_ids"] += input_ids
        row["labels"] += labels
        row["position_ids"] += range(len(input_ids))
    return row
