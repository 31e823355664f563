"""`lmtune serve`'s server: the catalog, the model pool, the batcher and the API, behind uvicorn."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from fastapi import FastAPI

from lmtune.errors import UserError
from lmtune.serving.api import build_app
from lmtune.serving.batcher import Batcher
from lmtune.serving.catalog import Catalog
from lmtune.serving.pool import ModelPool

log = logging.getLogger("lmtune")
LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass
class Limits:
    max_tokens: int = 1024  # the longest answer, whatever a request asks for
    max_pending: int = 64  # requests queued or generating; more are answered 429
    max_batch: int = 32  # rows decoded together
    batch_window_s: float = 0.05  # how long the first request of a batch waits for others
    max_models: int = 2  # models (bases) kept loaded
    max_adapters: int = 8  # adapters kept loaded per base


def check_address(host: str, api_key: str | None) -> None:
    if host not in LOOPBACK and not api_key:
        raise UserError(f"--host {host} opens the API to the network: give --api-key KEY (or LMTUNE_API_KEY) too, "
                        "so that only clients sending 'Authorization: Bearer KEY' are answered")


def create(roots: list[str], api_key: str | None = None, limits: Limits | None = None,
           device: str | None = None) -> tuple[FastAPI, Batcher]:
    """The app and its batcher (whose generation thread runs until `close()`)."""
    limits = limits or Limits()
    if limits.batch_window_s < 0:
        raise UserError("--batch-window-ms must be 0 or more")
    if limits.max_tokens < 1 or limits.max_pending < 1 or limits.max_batch < 1 or limits.max_models < 1 \
            or limits.max_adapters < 1:
        raise UserError("--max-tokens, --max-pending, --max-batch, --max-models and --max-adapters must be at least 1")
    catalog = Catalog(roots)
    pool = ModelPool(limits.max_models, limits.max_adapters, device)
    batcher = Batcher(pool, limits.max_pending, limits.max_batch, limits.batch_window_s)
    return build_app(catalog, batcher, api_key, limits.max_tokens), batcher


def serve(roots: list[str], host: str, port: int, api_key: str | None, limits: Limits) -> None:
    import uvicorn

    check_address(host, api_key)
    app, batcher = create(roots, api_key, limits)
    names = app.state.catalog.names()
    log.info("serving %d model name(s) on http://%s:%d/v1 (GET /v1/models lists them)%s", len(names), host, port,
             "" if names else ": none found yet under the given folders")
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning")
    finally:
        batcher.close()
