"""A raw row of a data file -> training examples (tokens, labels, first-label mask) -> training rows.

Map-style data (processing.py) and streamed data (streaming.py) both go through `RowEncoder` and
`row_of`, so that the same file gives the same rows either way. A preference pair is one example of
two sequences end to end, the chosen then the rejected answer, each after the same prompt: its
position ids restart where the rejected one starts, as between the examples of a packed row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lmtune.config import TrainConfig
from lmtune.data.registry import DatasetSpec, standard_row
from lmtune.data.templates import IGNORE_INDEX, TEMPLATES, NamedTemplate, encode_turns
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
    lengths: list[int] | None = None  # a preference pair: the lengths of its chosen and rejected sequences

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
    """Turns the rows of a data set into examples, as the config says (stage, template, cutoff_len), the
    way LLaMA-Factory's supervised and pairwise processors do."""

    def __init__(self, config: TrainConfig, tokenizer: Any, template: str | None):
        """`template`: the Jinja chat template of the run (chat_template_for), read when `config.template`
        names no template of its own."""
        self.tokenizer = tokenizer
        self.format = TEMPLATES[config.template] if config.template in TEMPLATES else template
        self.cutoff_len = config.cutoff_len

    def examples(self, spec: DatasetSpec, row: dict[str, Any], where: str) -> list[Example]:
        """`where` names the row in an error message: `file.json, row 3`."""
        try:
            standard = standard_row(spec, row)
        except ValueError as error:
            raise UserError(f"{where}: {error} (data set '{spec.name}')") from None
        if "chosen" in standard:
            return [self._pair(standard)]
        if "messages" in standard:
            return [self._conversation(standard["messages"])]
        return [Example(chunk, [IGNORE_INDEX, *chunk[1:]], len(chunk), 0) for chunk in self._chunks(standard["text"])]

    @property
    def _efficient_eos(self) -> bool:
        return isinstance(self.format, NamedTemplate) and self.format.efficient_eos

    def _conversation(self, messages: list[dict[str, str]]) -> Example:
        """Turn after turn, each cut by LLaMA-Factory's rule: the turns share cutoff_len in order, each turn's
        prompt and reply share what is left (`truncated_lengths`); a turn that no longer fits is left out."""
        turns = encode_turns(self.tokenizer, self.format, messages)
        eos = self.tokenizer.eos_token_id
        total = 1 if self._efficient_eos else 0
        input_ids: list[int] = []
        labels: list[int] = []
        for index, (prompt, reply) in enumerate(turns):
            if total >= self.cutoff_len:
                break
            prompt_keep, reply_keep = truncated_lengths(len(prompt), len(reply), self.cutoff_len - total)
            total += prompt_keep + reply_keep
            prompt_labels = [IGNORE_INDEX] * prompt_keep
            if self._efficient_eos and index > 0 and prompt_keep:
                prompt_labels[0] = eos  # the reply before ends here: the next turn's first token is its EOS
            input_ids += prompt[:prompt_keep] + reply[:reply_keep]
            labels += prompt_labels + reply[:reply_keep]
        if self._efficient_eos:
            input_ids.append(eos)
            labels.append(eos)
        raw = sum(len(prompt) + len(reply) for prompt, reply in turns) + (1 if self._efficient_eos else 0)
        return Example(input_ids, [IGNORE_INDEX, *labels[1:]], raw, len(turns[0][0]) if turns else 0)

    def _chunks(self, text: str):
        """One text for pre-training, split into cutoff_len chunks."""
        # The tokenizer's own special tokens (BOS for Llama; none for GPT-2 or SmolLM2, whose bos_token is the
        # chat marker <|im_start|>, which has no place in raw text), then EOS to end the document.
        ids = self.tokenizer(text, add_special_tokens=True)["input_ids"]
        if not ids or ids[-1] != self.tokenizer.eos_token_id:
            ids = ids + [self.tokenizer.eos_token_id]
        for start in range(0, len(ids), self.cutoff_len):
            chunk = ids[start : start + self.cutoff_len]
            if len(chunk) > 1:
                yield chunk

    def _pair(self, standard: dict) -> Example:
        """The chosen and the rejected sequence, each cut to cutoff_len as LLaMA-Factory cuts a pair: the
        answers keep the larger share (the longer answer decides), the prompt is cut from its end."""
        answers = []
        for key in ("chosen", "rejected"):
            turns = encode_turns(self.tokenizer, self.format,
                                 [*standard["messages"], {"role": "assistant", "content": standard[key]}])
            prompt = [token for earlier, reply in turns[:-1] for token in earlier + reply] + turns[-1][0]
            answers.append(turns[-1][1] + ([self.tokenizer.eos_token_id] if self._efficient_eos else []))
        prompt_keep, answer_keep = truncated_lengths(len(prompt), max(map(len, answers)), self.cutoff_len)
        input_ids, labels, lengths = [], [], []
        for answer in answers:
            sequence = prompt[:prompt_keep] + answer[:answer_keep]
            input_ids += sequence
            labels += [IGNORE_INDEX] * max(prompt_keep, 1) + sequence[max(prompt_keep, 1):]
            lengths.append(len(sequence))
        raw = 2 * len(prompt) + sum(map(len, answers))
        return Example(input_ids, labels, raw, len(prompt), lengths)


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
