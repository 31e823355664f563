"""`lmtune serve`: an OpenAI-compatible API over runs, checkpoints, model folders and adapters.

catalog (names and the folders behind them), pool (loaded models, adapters switched per request),
batcher (dynamic batching on one generation thread), api (the HTTP routes and OpenAI's schemas),
server (putting them together behind uvicorn).
"""
