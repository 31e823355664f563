"""The OpenAI-compatible HTTP API: /v1/models, /v1/chat/completions, /v1/completions and /health.

Requests and answers follow OpenAI's schema (streams as server-sent events), errors too:
`{"error": {"message", "type", "param", "code"}}` with the status OpenAI uses.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from lmtune.chat import Target
from lmtune.data.templates import reply_tool_format
from lmtune.data.tool_formats import ToolFormat, dumps
from lmtune.errors import UserError
from lmtune.generation import (
    Completion,
    Sampling,
    TokenLogprob,
    context_length,
    prompt_ids,
    text_of,
)
from lmtune.serving.batcher import Batcher, Job, QueueFull
from lmtune.serving.catalog import Catalog, UnknownModel
from lmtune.serving.pool import Ready


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.kind, "param": self.param,
                                       "code": self.code}}, status_code=self.status)


class PromptTooLong(ValueError):
    pass


# --- request bodies -----------------------------------------------------------------------------------


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")  # tool_calls, tool_call_id, name go to the template as they are

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None

    def for_template(self) -> dict[str, Any]:
        extra = {k: v for k, v in (self.model_extra or {}).items() if v is not None}
        return {**extra, "role": "system" if self.role == "developer" else self.role,
                "content": text_of(self.content)}


class StreamOptions(BaseModel):
    include_usage: bool = False


class Common(BaseModel):
    """What chat and plain completions share; unknown keys are ignored, as OpenAI-compatible servers do."""

    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=16)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None

    def stops(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4 or not all(stops):
            raise ApiError(400, "stop takes up to 4 non-empty strings", param="stop")
        return tuple(stops)


class ChatRequest(Common):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[dict[str, Any]] | None = None
    chat_template_kwargs: dict[str, Any] | None = None  # vLLM's: {"enable_thinking": false} reaches the template


class CompletionRequest(Common):
    prompt: str | list[str]
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for completions
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False


# --- the app ------------------------------------------------------------------------------------------


def build_app(catalog: Catalog, batcher: Batcher, api_key: str | None = None, max_tokens_cap: int = 1024) -> FastAPI:
    app = FastAPI(title="lmtune serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.catalog = catalog
    install_error_handlers(app)
    if api_key:
        require_key(app, api_key)

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", **batcher.load()}

    @app.get("/v1/models")
    def models() -> dict[str, Any]:
        cards = []
        for name in catalog.names():
            try:
                cards.append(model_card(catalog, name))
            except UnknownModel:
                continue  # gone since it was listed: a checkpoint that rotation deleted
        return {"object": "list", "data": cards}

    @app.get("/v1/models/{name:path}")
    def model(name: str) -> dict[str, Any]:
        find(catalog, name)
        return model_card(catalog, name)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest) -> Any:
        if body.top_logprobs and not body.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        target = find(catalog, body.model)
        messages = [m.for_template() for m in body.messages]
        wanted = body.max_completion_tokens or body.max_tokens or max_tokens_cap
        sampling = sampling_rows(body, min(wanted, max_tokens_cap), body.top_logprobs or 0 if body.logprobs else None)

        reading = {}  # how the served model writes tool calls, to return them parsed

        def prepare(ready: Ready) -> list[list[int]]:
            if body.tools:
                reading["tools"] = reply_tool_format(ready.tokenizer, ready.template)
            try:
                thinking = (body.chat_template_kwargs or {}).get("enable_thinking", True) is not False
                prompt = prompt_ids(ready.tokenizer, ready.template, messages, body.tools, thinking)
            except (UserError, Exception) as error:  # a template may refuse a conversation (jinja raises)
                raise ValueError(f"the model's chat template cannot render these messages: {error}") from None
            return [checked_prompt(prompt, ready)] * body.n

        job, tokenizer = await start(batcher, target, prepare, sampling, body.stream)
        shape = ChatShape(body.model, tokenizer, body.n)
        if body.stream:
            return stream(job, shape, body.n, wants_usage(body))
        return with_tool_calls(shape.whole(await collect(job)), reading.get("tools"))

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest) -> Any:
        if body.echo:
            raise ApiError(400, "echo is not supported", param="echo")
        target = find(catalog, body.model)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not prompts:
            raise ApiError(400, "prompt is empty", param="prompt")
        sampling = sampling_rows(body, min(body.max_tokens or max_tokens_cap, max_tokens_cap), body.logprobs,
                                 rows=len(prompts) * body.n)

        def prepare(ready: Ready) -> list[list[int]]:
            ids = [checked_prompt(ready.tokenizer(p)["input_ids"], ready) for p in prompts]
            return [row for row in ids for _ in range(body.n)]

        job, tokenizer = await start(batcher, target, prepare, sampling, body.stream)
        shape = CompletionShape(body.model, tokenizer, body.n)
        if body.stream:
            return stream(job, shape, len(sampling), wants_usage(body))
        return shape.whole(await collect(job))

    return app


def with_tool_calls(response: dict[str, Any], tool_format: ToolFormat | None) -> dict[str, Any]:
    """Replies that call tools (in the template's tool format) as OpenAI's `tool_calls`, arguments as JSON text."""
    if tool_format is None:
        return response
    for choice in response["choices"]:
        text, calls = tool_format.parse(choice["message"]["content"])
        if calls:
            for call in calls:
                call["function"]["arguments"] = dumps(call["function"]["arguments"])
            choice["message"] = {"role": "assistant", "content": text or None, "tool_calls": calls}
            choice["finish_reason"] = "tool_calls"
    return response


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_: Request, error: ApiError) -> JSONResponse:
        return error.response()

    @app.exception_handler(RequestValidationError)
    async def malformed(_: Request, error: RequestValidationError) -> JSONResponse:
        problems = error.errors()
        first = problems[0] if problems else {}
        where = ".".join(str(part) for part in first.get("loc", ())[1:]) or None
        message = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ())[1:]) or 'body'}: {e.get('msg')}"
                            for e in problems[:5])
        return ApiError(400, message or "malformed request body", param=where, code="invalid_request").response()

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, error: HTTPException) -> JSONResponse:
        return ApiError(error.status_code, str(error.detail), code="not_found" if error.status_code == 404
                        else None).response()

    @app.exception_handler(Exception)
    async def unexpected(_: Request, error: Exception) -> JSONResponse:
        return ApiError(500, f"{type(error).__name__}: {error}", kind="server_error").response()


def require_key(app: FastAPI, api_key: str) -> None:
    """Every /v1 route wants `Authorization: Bearer KEY`; /health stays open for probes."""

    @app.middleware("http")
    async def check_key(request: Request, call_next: Callable) -> Any:
        if request.url.path.startswith("/v1"):
            given = request.headers.get("authorization", "")
            scheme, _, token = given.partition(" ")
            if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), api_key.encode()):
                return ApiError(401, "Incorrect API key provided: send it as 'Authorization: Bearer KEY'",
                                code="invalid_api_key").response()
        return await call_next(request)


def find(catalog: Catalog, name: str) -> Target:
    try:
        return catalog.resolve(name)
    except UnknownModel:
        raise ApiError(404, f"The model '{name}' does not exist here: GET /v1/models lists the served names",
                       param="model", code="model_not_found") from None


def model_card(catalog: Catalog, name: str) -> dict[str, Any]:
    target = catalog.resolve(name)
    path = Path(target.model_path)
    created = int(path.stat().st_mtime) if path.exists() else 0
    return {"id": name, "object": "model", "created": created, "owned_by": "lmtune", "kind": target.kind}


def wants_usage(body: Common) -> bool:
    return bool(body.stream_options and body.stream_options.include_usage)


def sampling_rows(body: Common, max_new_tokens: int, top_logprobs: int | None,
                  rows: int | None = None) -> list[Sampling]:
    """One row per choice; seeded rows get seed, seed + 1, ... so that n samples differ but repeat."""
    rows = rows or body.n
    return [Sampling(max_new_tokens=max_new_tokens, temperature=body.temperature, top_p=body.top_p,
                     stop=body.stops(), seed=None if body.seed is None else body.seed + i, top_logprobs=top_logprobs)
            for i in range(rows)]


def checked_prompt(ids: list[int], ready: Ready) -> list[int]:
    limit = context_length(ready.model)
    if not ids:
        raise ValueError("the prompt is empty")
    if limit and len(ids) >= limit:
        raise PromptTooLong(f"This model's maximum context length is {limit} tokens; the prompt has {len(ids)} "
                            "tokens, which leaves no room for an answer. Shorten the messages or the prompt.")
    return ids


async def start(batcher: Batcher, target: Target, prepare: Callable, sampling: list[Sampling],
                streams: bool) -> tuple[Job, Any]:
    """Queue the job and wait until its model is loaded and its prompts checked; errors become ApiErrors."""
    job = Job(target, prepare, sampling, asyncio.get_running_loop(), streams=streams)
    try:
        batcher.submit(job)
    except QueueFull as error:
        raise ApiError(429, f"the server is busy ({error}): retry shortly", kind="rate_limit_error",
                       code="rate_limit_exceeded") from None
    try:
        kind, value = await job.events.get()
    except asyncio.CancelledError:
        job.cancelled.set()
        raise
    if kind == "error":
        raise failure(value)
    return job, value


def failure(error: BaseException) -> ApiError:
    if isinstance(error, PromptTooLong):
        return ApiError(400, str(error), param="messages", code="context_length_exceeded")
    if isinstance(error, ValueError):
        return ApiError(400, str(error))
    if isinstance(error, UserError):
        return ApiError(500, f"the model could not be loaded: {error}", kind="server_error")
    return ApiError(500, f"generation failed: {type(error).__name__}: {error}", kind="server_error")


async def collect(job: Job) -> list[Completion]:
    try:
        while True:
            kind, *rest = await job.events.get()
            if kind == "done":
                return rest[0]
            if kind == "error":
                raise failure(rest[0])
    finally:
        job.cancelled.set()  # a client that went away stops its rows; a finished job is unaffected


# --- answers ------------------------------------------------------------------------------------------


def usage(completions: list[Completion], per_prompt: int) -> dict[str, int]:
    """per_prompt: the choices (n) of each prompt, whose prompt is counted once."""
    prompt = sum(c.prompt_tokens for c in completions[::per_prompt])
    generated = sum(len(c.token_ids) for c in completions)
    return {"prompt_tokens": prompt, "completion_tokens": generated, "total_tokens": prompt + generated}


def finish_reason(completion: Completion) -> str:
    return completion.finish_reason if completion.finish_reason in ("stop", "length") else "stop"


class ChatShape:
    object_name, chunk_name = "chat.completion", "chat.completion.chunk"

    def __init__(self, model: str, tokenizer: Any, per_prompt: int) -> None:
        self.model, self.tokenizer, self.per_prompt = model, tokenizer, per_prompt
        self.id, self.created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

    def usage(self, completions: list[Completion]) -> dict[str, int]:
        return usage(completions, self.per_prompt)

    def head(self) -> dict[str, Any]:
        return {"id": self.id, "created": self.created, "model": self.model, "system_fingerprint": None}

    def logprobs(self, entries: list[TokenLogprob] | None) -> dict[str, Any] | None:
        if entries is None:
            return None
        return {"content": [{**self.token(e.token_id, e.logprob),
                             "top_logprobs": [self.token(t, lp) for t, lp in e.top]} for e in entries]}

    def token(self, token_id: int, logprob: float) -> dict[str, Any]:
        text = self.tokenizer.decode([token_id])
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    def whole(self, completions: list[Completion]) -> dict[str, Any]:
        choices = [{"index": i, "message": {"role": "assistant", "content": c.text},
                    "logprobs": self.logprobs(c.logprobs), "finish_reason": finish_reason(c)}
                   for i, c in enumerate(completions)]
        return {**self.head(), "object": self.object_name, "choices": choices, "usage": self.usage(completions)}

    def opening(self, index: int) -> dict[str, Any] | None:
        return self.chunk(index, {"role": "assistant", "content": ""}, None)

    def piece(self, index: int, text: str, entries: list[TokenLogprob]) -> dict[str, Any]:
        return self.chunk(index, {"content": text}, entries or None)

    def ending(self, index: int, completion: Completion) -> dict[str, Any]:
        return {**self.chunk(index, {}, None), "choices": [{"index": index, "delta": {}, "logprobs": None,
                                                             "finish_reason": finish_reason(completion)}]}

    def chunk(self, index: int, delta: dict[str, Any], entries: list[TokenLogprob] | None) -> dict[str, Any]:
        choice = {"index": index, "delta": delta, "logprobs": self.logprobs(entries), "finish_reason": None}
        return {**self.head(), "object": self.chunk_name, "choices": [choice]}


class CompletionShape(ChatShape):
    object_name = chunk_name = "text_completion"

    def __init__(self, model: str, tokenizer: Any, per_prompt: int) -> None:
        super().__init__(model, tokenizer, per_prompt)
        self.id = f"cmpl-{uuid.uuid4().hex}"

    def logprobs(self, entries: list[TokenLogprob] | None) -> dict[str, Any] | None:
        if entries is None:
            return None
        tokens = [self.tokenizer.decode([e.token_id]) for e in entries]
        offsets = [sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]
        return {"tokens": tokens, "token_logprobs": [e.logprob for e in entries],
                "top_logprobs": [{self.tokenizer.decode([t]): lp for t, lp in e.top} for e in entries],
                "text_offset": offsets}

    def whole(self, completions: list[Completion]) -> dict[str, Any]:
        choices = [{"index": i, "text": c.text, "logprobs": self.logprobs(c.logprobs),
                    "finish_reason": finish_reason(c)} for i, c in enumerate(completions)]
        return {**self.head(), "object": self.object_name, "choices": choices, "usage": self.usage(completions)}

    def opening(self, index: int) -> dict[str, Any] | None:
        return None

    def piece(self, index: int, text: str, entries: list[TokenLogprob]) -> dict[str, Any]:
        return self.chunk(index, text, entries or None, None)

    def ending(self, index: int, completion: Completion) -> dict[str, Any]:
        return self.chunk(index, "", None, finish_reason(completion))

    def chunk(self, index: int, text: str, entries: list[TokenLogprob] | None, reason: str | None) -> dict[str, Any]:
        choice = {"index": index, "text": text, "logprobs": self.logprobs(entries), "finish_reason": reason}
        return {**self.head(), "object": self.chunk_name, "choices": [choice]}


def stream(job: Job, shape: ChatShape, choices: int, include_usage: bool) -> StreamingResponse:
    """Server-sent events: the pieces of every choice as they are decided, each choice's finish, [DONE]."""

    async def events() -> AsyncIterator[str]:
        try:
            for index in range(choices):
                if (opening := shape.opening(index)) is not None:
                    yield sse(opening)
            while True:
                kind, *rest = await job.events.get()
                if kind == "text":
                    index, text, entries = rest
                    yield sse(shape.piece(index, text, entries))
                elif kind == "done":
                    for index, completion in enumerate(rest[0]):
                        yield sse(shape.ending(index, completion))
                    if include_usage:
                        yield sse({**shape.head(), "object": shape.chunk_name, "choices": [],
                                   "usage": shape.usage(rest[0])})
                    break
                else:
                    error = failure(rest[0])
                    yield sse({"error": {"message": error.message, "type": error.kind, "param": None,
                                         "code": error.code}})
                    break
            yield "data: [DONE]\n\n"
        finally:
            job.cancelled.set()  # the client went away (or all is sent): its rows leave the batch

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"
