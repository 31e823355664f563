"""What dynamic batching buys `lmtune serve`: tokens/s of one stream against 8 concurrent ones.

    python bench/serve.py [--model tiny|smollm2] [--tokens 64] [--concurrency 8] [--repeats 3] [--threads 1]
                          [--smoke]

The server runs in this process on a free loopback port (as `lmtune serve MODEL` would), on the CPU.
Every request is a greedy /v1/completions of `--tokens` tokens on its own prompt, sent with the
`openai` client. Single stream: the same requests one at a time; concurrent: `--concurrency` requests at once,
which the server decodes together in one batch. Tokens/s counts the generated tokens the server
reports (usage.completion_tokens) over the wall time. The last line is
`batched_speedup: X` = concurrent total tokens/s / single-stream tokens/s (median of the repeats).
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import WORDS, model_dir, scratch_home, select_device  # noqa: E402


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(model: Path, concurrency: int, max_tokens: int):
    import uvicorn

    from lmtune.serving.server import Limits, create

    app, batcher = create([str(model)], limits=Limits(max_tokens=max_tokens, max_batch=max(concurrency, 1)))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    return server, thread, batcher, f"http://127.0.0.1:{port}/v1"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("tiny", "smollm2"), default="tiny")
    parser.add_argument("--tokens", type=int, default=64, help="tokens generated per request")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: steady timings on a shared machine)")
    parser.add_argument("--smoke", action="store_true", help="a few tokens, one repeat: checks that it runs")
    args = parser.parse_args()
    if args.smoke:
        args.tokens, args.repeats = 4, 1
    select_device("cpu")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import openai
    import torch

    from lmtune.chat import quiet_transformers

    quiet_transformers()
    torch.set_num_threads(args.threads)
    with scratch_home(), tempfile.TemporaryDirectory() as scratch:
        model = model_dir(args.model, Path(scratch))
        server, thread, batcher, url = start_server(model, args.concurrency, args.tokens)
        client = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=600)
        prompts = [f"The {WORDS[i]} and the {WORDS[-i - 1]} of the" for i in range(args.concurrency)]

        def ask(prompt: str) -> int:
            done = client.completions.create(model=model.name, prompt=prompt, max_tokens=args.tokens, temperature=0)
            return done.usage.completion_tokens

        try:
            ask(prompts[0])  # warm-up: loads the model
            single, together = [], []
            for _ in range(args.repeats):
                begun = time.perf_counter()
                tokens = sum(ask(p) for p in prompts)
                single.append(tokens / (time.perf_counter() - begun))
                begun = time.perf_counter()
                with ThreadPoolExecutor(args.concurrency) as pool:
                    tokens = sum(pool.map(ask, prompts))
                together.append(tokens / (time.perf_counter() - begun))
            largest = batcher.load()["largest_batch"]
        finally:
            server.should_exit = True
            thread.join(timeout=30)
            batcher.close()
    one, many = statistics.median(single), statistics.median(together)
    print(f"model: {args.model}")
    print(f"tokens_per_request: {args.tokens}")
    print(f"torch_threads: {torch.get_num_threads()}")
    print(f"single_stream_tokens_per_s: {one:.1f}")
    print(f"concurrent_{args.concurrency}_total_tokens_per_s: {many:.1f}")
    print(f"largest_batch: {largest}")
    print(f"batched_speedup: {many / one:.2f}")


if __name__ == "__main__":
    main()
