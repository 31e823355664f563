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
from lmtune.data.templates import (
    IGNORE_INDEX,
    TEMPLATES,
    NamedTemplate,
    Turn,
    encode_conversation,
    generation_prompt_ids,
    no_tool_format,
    takes_tools,
)
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
    """Turns the rows of a data set into examples, as the config says (stage, template, cutoff_len), the
    way LLaMA-Factory's supervised, pairwise and feedback processors do."""

    def __init__(self, config: TrainConfig, tokenizer: Any, template: str | None):
        """`template`: the Jinja chat template of the run (chat_template_for), read when `config.template`
        names no template of its own."""
        self.tokenizer = tokenizer
        self.format = TEMPLATES[config.template] if config.template in TEMPLATES else template
        self.template_name = config.template
        self.cutoff_len = config.cutoff_len
        self.enable_thinking = config.enable_thinking

    def examples(self, spec: DatasetSpec, row: dict[str, Any], where: str) -> list[Example]:
        """`where` names the row in an error message: `file.json, row 3`."""
        return self._examples_of(self._checked(_standard(spec, row, where), where))

    def batch_examples(self, spec: DatasetSpec, rows: list[dict[str, Any]], wheres: list[str]) -> list[list[Example]]:
        """The examples of each of a batch of rows. KTO rows take the answer of the row before them in the
        batch (the first takes the last's) for their KL sequence, as LLaMA-Factory and TRL pair them."""
        standards = [self._checked(_standard(spec, row, where), where) for row, where in zip(rows, wheres, strict=True)]
        if spec.feedback:
            answers = [standard["completion"] for standard in standards]
            for standard, other in zip(standards, answers[-1:] + answers[:-1], strict=True):
                standard["kl_completion"] = other
        return [self._examples_of(standard) for standard in standards]

    def _checked(self, standard: dict[str, Any], where: str) -> dict[str, Any]:
        """A row with tools needs a template that writes them: refused, naming the template, where it has none."""
        if uses_tools(standard) and not takes_tools(self.format):
            raise UserError(f"{where}: {no_tool_format(self.template_name)}")
        return standard

    def _examples_of(self, standard: dict[str, Any]) -> list[Example]:
        if "chosen" in standard:
            return [self._pair(standard)]
        if "completion" in standard:
            return [self._feedback(standard)]
        if "messages" in standard:
            return [self._conversation(turns) for turns in self._sequences(standard["messages"], standard.get("tools"))]
        return [Example(chunk, [IGNORE_INDEX, *chunk[1:]], len(chunk), 0) for chunk in self._chunks(standard["text"])]

    @property
    def _efficient_eos(self) -> bool:
        return isinstance(self.format, NamedTemplate) and self.format.efficient_eos

    def _sequences(self, messages: list[dict[str, Any]], tools: list[dict] | None) -> list[list[Turn]]:
        return encode_conversation(self.tokenizer, self.format, messages, tools, self.enable_thinking)

    def _conversation(self, turns: list[Turn]) -> Example:
        """Turn after turn, each cut by LLaMA-Factory's rule: the turns share cutoff_len in order, each turn's
        prompt and reply share what is left (`truncated_lengths`); a turn that no longer fits is left out."""
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

    def prompt(self, spec: DatasetSpec, row: dict[str, Any], where: str, max_length: int) -> tuple[list[int], dict]:
        """Stage grpo: the token ids of the prompt with the template's generation prompt after it, as `lmtune
        chat` renders it, and what the reward functions receive of the row: its prompt and its other columns."""
        standard = self._checked(_standard(spec, row, where), where)
        ids = generation_prompt_ids(self.tokenizer, self.format, standard["messages"], standard.get("tools"),
                                    self.enable_thinking)
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
        """The prompt's ids and the answer's, as LLaMA-Factory's `encode_oneturn` gives them (with EOS after
        the answer under an efficient-EOS template)."""
        messages = [*standard["messages"], {"role": "assistant", "content": standard[answer]}]
        turns = self._sequences(messages, standard.get("tools"))[-1]
        prompt = [token for earlier, reply in turns[:-1] for token in earlier + reply] + turns[-1][0]
        return prompt, turns[-1][1] + ([self.tokenizer.eos_token_id] if self._efficient_eos else [])

    def _joined(self, sequences: list[tuple[list[int], list[int]]]) -> Example:
        """Answers after the same prompt, cut alike to cutoff_len (the longest answer decides), end to end."""
        prompt_length = max(len(prompt) for prompt, _ in sequences)
        prompt_keep, answer_keep = truncated_lengths(prompt_length, max(len(answer) for _, answer in sequences),
                                                     self.cutoff_len)
        input_ids, labels, lengths = [], [], []
        for prompt, answer in sequences:
            sequence = prompt[:prompt_keep] + answer[:answer_keep]
            kept_prompt = min(prompt_keep, len(prompt))
            input_ids += sequence
            labels += [IGNORE_INDEX] * max(kept_prompt, 1) + sequence[max(kept_prompt, 1):]
            lengths.append(len(sequence))
        raw = sum(len(prompt) + len(answer) for prompt, answer in sequences)
        return Example(input_ids, labels, raw, prompt_length, lengths)


def _standard(spec: DatasetSpec, row: dict[str, Any], where: str) -> dict[str, Any]:
    try:
        return standard_row(spec, row)
    except ValueError as error:
        raise UserError(f"{where}: {error} (data set '{spec.name}')") from None


def uses_tools(standard: dict[str, Any]) -> bool:
    """Tool definitions, tool calls or tool results in a row."""
    return bool(standard.get("tools")) or any(message["role"] == "tool" or message.get("tool_calls")
                                              for message in standard.get("messages", []))


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
