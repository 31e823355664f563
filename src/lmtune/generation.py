"""Generation: token ids in, completions out, for `lmtune chat`, the web UI's chat, `lmtune serve` and the
rollouts of stage grpo.

`generate` decodes a batch of prompts together (left padding, one KV cache), each row with sampling
settings of its own (temperature, top-p, top-k, seed, stop strings, length), and can hand every new piece
of text to a callback as it is decided and drop rows whose caller has gone. A row with a seed does not
depend on the other rows in its batch: its sampling draws from its own random generator; the others draw
from the generator the caller passes (a grpo rollout's, saved with its checkpoints), else the global one.

`render_prompt` writes a conversation as the run's chat template wrote it in training.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache


@dataclass(frozen=True)
class Sampling:
    """How one row is decoded. temperature 0 is greedy; top_logprobs None asks for no log-probs,
    0 for the chosen token's only, k for the k likeliest alternatives too."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    stop: tuple[str, ...] = ()
    seed: int | None = None
    top_logprobs: int | None = None


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class Completion:
    """One row's answer: finish_reason is "stop" (end of sequence or a stop string), "length" or
    "cancelled" (its caller went away)."""

    prompt_tokens: int
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] | None = None


# on_text(row, new_text, logprobs_of_the_new_tokens): called as text becomes final (a stop string may still cut
# what is held back); on_finish(row, completion): called once, as the row ends; cancelled(row) -> True drops the row
OnText = Callable[[int, str, list[TokenLogprob]], None]
OnFinish = Callable[[int, Completion], None]


def stop_token_ids(model: Any, tokenizer: Any) -> set[int]:
    """The ids that end an answer: the tokenizer's end of sequence and the model's generation config's."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if configured is not None:
        ids.update(configured if isinstance(configured, list) else [configured])
    return ids


def context_length(model: Any) -> int | None:
    return getattr(model.config, "max_position_embeddings", None)


class _Row:
    def __init__(self, prompt: list[int], sampling: Sampling, device: torch.device) -> None:
        self.sampling = sampling
        self.done = Completion(len(prompt), logprobs=[] if sampling.top_logprobs is not None else None)
        self.sent = 0  # characters of text already handed to on_text
        self.pending: list[TokenLogprob] = []  # log-probs of tokens whose text is not handed out yet
        self.random = None
        if sampling.temperature > 0 and sampling.seed is not None:
            self.random = torch.Generator(device=device).manual_seed(sampling.seed)


@torch.no_grad()
def generate(model: Any, tokenizer: Any, prompts: Sequence[list[int]], sampling: Sequence[Sampling],
             on_text: OnText | None = None, cancelled: Callable[[int], bool] | None = None,
             on_finish: OnFinish | None = None, random: torch.Generator | None = None,
             synced: bool = False) -> list[Completion]:
    """Decode every prompt (a list of token ids) with its own sampling settings, all in one batch. `random`:
    the generator of the rows without a seed. `synced`: every process of a sharded model calls this together
    and runs as many forward passes (finished rows stay in the batch until every process has finished)."""
    device = next(model.parameters()).device
    rows = [_Row(list(p), s, device) for p, s in zip(prompts, sampling, strict=True)]
    ends = stop_token_ids(model, tokenizer)
    limit = context_length(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(ends), 0)
    width = max(len(p) for p in prompts)
    input_ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    slots = list(range(len(rows)))  # the rows in the batch, in batch order
    live = set(slots)  # the rows still generating
    cache = DynamicCache()
    while _any_live(live, synced, device):
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = model(input_ids=input_ids, attention_mask=mask, position_ids=positions[:, -input_ids.shape[1]:],
                    use_cache=True, **{_cache_keyword(model): cache})
        logits = out.logits[:, -1, :].float()
        chosen = _choose(logits, [rows[i] for i in slots], random)
        wants_logprobs = any(rows[i].sampling.top_logprobs is not None for i in live)
        logprobs = torch.log_softmax(logits, dim=-1) if wants_logprobs else None
        for slot, index in enumerate(slots):
            if index in live and _take(rows[index], index, int(chosen[slot]), logprobs, slot, ends, limit,
                                       tokenizer, on_text, cancelled):
                live.discard(index)
                if on_finish is not None:
                    on_finish(index, rows[index].done)
        if not synced and len(live) < len(slots):
            if not live:
                break
            keep = [slot for slot, index in enumerate(slots) if index in live]
            cache.batch_select_indices(torch.tensor(keep, device=device))
            mask, chosen = mask[keep], chosen[keep]
            slots = [slots[slot] for slot in keep]
        input_ids = chosen[:, None]
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=-1)
    return [row.done for row in rows]


def _take(row: _Row, index: int, token: int, logprobs: torch.Tensor | None, slot: int, ends: set[int],
          limit: int | None, tokenizer: Any, on_text: OnText | None, cancelled: Callable[[int], bool] | None) -> bool:
    """The row's next token added (its text handed on); whether the row has ended."""
    if logprobs is not None and row.sampling.top_logprobs is not None:
        row.pending.append(_logprob_of(logprobs[slot], token, row.sampling.top_logprobs))
    row.done.token_ids.append(token)
    total = row.done.prompt_tokens + len(row.done.token_ids)
    if token in ends:
        row.done.finish_reason = "stop"
    elif len(row.done.token_ids) >= row.sampling.max_new_tokens or (limit and total >= limit):
        row.done.finish_reason = "length"
    _advance_text(tokenizer, row, index, on_text)
    if row.done.finish_reason is None and cancelled is not None and cancelled(index):
        row.done.finish_reason = "cancelled"
    return row.done.finish_reason is not None


def _any_live(live: set[int], synced: bool, device: torch.device) -> bool:
    """Whether another forward pass is due: a row of this process is generating, or (synced) of any process."""
    if not synced:
        return bool(live)
    flag = torch.tensor([float(bool(live))], device=device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return bool(flag.item())


def _cache_keyword(model: Any) -> str:
    """transformers renamed the forward's past_key_values to cache (5.20); both are supported."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def _choose(logits: torch.Tensor, rows: list[_Row], random: torch.Generator | None = None) -> torch.Tensor:
    """Each row's next token: the likeliest, or a draw from its tempered, top-k- and top-p-cut distribution
    (in transformers' order), from the row's own generator or else `random`."""
    chosen = logits.argmax(dim=-1)
    for slot, row in enumerate(rows):
        settings = row.sampling
        if settings.temperature <= 0:
            continue
        probs = torch.softmax(logits[slot] / settings.temperature, dim=-1)
        if 0 < settings.top_k < probs.shape[-1]:
            probs[probs < probs.topk(settings.top_k).values[-1]] = 0
            probs = probs / probs.sum()
        if settings.top_p < 1:
            sorted_probs, order = probs.sort(descending=True)
            outside = sorted_probs.cumsum(-1) - sorted_probs >= settings.top_p  # the likeliest always stays
            sorted_probs[outside] = 0
            probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
        chosen[slot] = torch.multinomial(probs, 1, generator=row.random if row.random is not None else random)[0]
    return chosen


def _logprob_of(logprobs: torch.Tensor, token: int, top: int) -> TokenLogprob:
    entry = TokenLogprob(token, float(logprobs[token]))
    if top:
        values, ids = logprobs.topk(top)
        entry.top = [(int(i), float(v)) for i, v in zip(ids, values, strict=True)]
    return entry


def _advance_text(tokenizer: Any, row: _Row, index: int, on_text: OnText | None) -> None:
    """Decode the row's tokens, cut at a stop string, and hand on the text that can no longer change:
    a tail that could still begin a stop string, or an unfinished character, is held back."""
    stops = row.sampling.stop
    if on_text is None and not stops and row.done.finish_reason is None:
        return  # nothing reads the text before the row ends
    text = tokenizer.decode(row.done.token_ids, skip_special_tokens=True)
    hits = [text.find(s, max(0, row.sent - len(s))) for s in stops]
    hits = [h for h in hits if h >= 0]
    if hits:
        text, row.done.finish_reason = text[:min(hits)], "stop"
    final = len(text)
    if row.done.finish_reason is None:
        final -= max((len(s) - 1 for s in stops), default=0)
        if text.endswith("\ufffd"):
            final = min(final, len(text) - 1)
    row.done.text = text
    if final <= row.sent and row.done.finish_reason is None:
        return
    piece = text[row.sent:max(final, row.sent)]
    row.sent = max(final, row.sent)
    if row.done.logprobs is not None:
        row.done.logprobs.extend(row.pending)
    handed, row.pending = row.pending, []
    if on_text is not None and (piece or handed):
        on_text(index, piece, handed)


def render_prompt(tokenizer: Any, template: str | None, messages: list[dict[str, Any]],
                  tools: list[dict] | None = None, enable_thinking: bool = True) -> str:
    """The conversation as the run's template (None: the tokenizer's own) renders it in training, with the
    generation prompt for the answer; tool definitions go to templates that use them."""
    from lmtune.data.templates import chat_template_for, render

    return render(tokenizer, chat_template_for(tokenizer, template), messages, generation_prompt=True, tools=tools,
                  enable_thinking=enable_thinking)


def encode_prompt(tokenizer: Any, prompt: str) -> list[int]:
    """A rendered chat prompt's ids: the template wrote every special token already."""
    return tokenizer(prompt, add_special_tokens=False)["input_ids"]


def prompt_ids(tokenizer: Any, template: str | None, messages: list[dict[str, Any]],
               tools: list[dict] | None = None, enable_thinking: bool = True) -> list[int]:
    """A conversation's generation prompt as token ids, tokenised as training tokenised it: a named template
    piece by piece as LLaMA-Factory does (so the model sees the tokens it was trained on), the tokenizer's own
    template rendered whole (as training tokenises a reply's prompt). Chat and serve both prompt with it."""
    from lmtune.data.templates import conversation_format, generation_prompt_ids

    chosen = conversation_format(tokenizer, template)
    if isinstance(chosen, str):
        return encode_prompt(tokenizer, render_prompt(tokenizer, template, messages, tools, enable_thinking))
    return generation_prompt_ids(tokenizer, chosen, [{**m, "content": text_of(m.get("content"))} for m in messages],
                                 tools, enable_thinking)


def reply(model: Any, tokenizer: Any, template: str | None, messages: list[dict[str, Any]], sampling: Sampling,
          on_text: Callable[[str], None] | None = None, tools: list[dict] | None = None,
          enable_thinking: bool = True, cancelled: Callable[[], bool] | None = None) -> Completion:
    """One answer to a conversation (its text stripped), streamed piece by piece to on_text; `tools`: definitions
    the template shows. It ends early, finish_reason "cancelled", once cancelled() says so."""
    prompt = prompt_ids(tokenizer, template, messages, tools, enable_thinking)
    [done] = generate(model, tokenizer, [prompt], [sampling],
                      on_text=None if on_text is None else lambda _row, piece, _lp: on_text(piece),
                      cancelled=None if cancelled is None else lambda _row: cancelled())
    done.text = done.text.strip()
    return done


def text_of(content: Any) -> str:
    """A message's text: OpenAI's and gradio's content may be a list of parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(part.get("text", "") if isinstance(part, dict) else str(part) for part in content)
    return str(content)
