"""Which upstream HTTP client the gateway should use: httpx vs aiohttp vs gateway.backend_http.

Three tiny Starlette apps forward POST /v1/chat/completions to the same fast upstream, with
a pooled httpx.AsyncClient, an aiohttp.ClientSession, or the gateway's own
gateway.backend_http.BackendClient (httptools parsing), each under uvicorn (uvloop,
httptools, no access log), i.e. the gateway's own stack minus everything but the forwarding.
The same load (c=16 and c=1, non-streaming chat, via bench/loadgen.py) goes at each of them
and straight at the upstream, and rps/p50/p99 are printed for each.

    .venv/bin/python bench/client_choice.py [--duration 5] [--concurrency 16,1] [--generator auto|wrk|python]

Internally, `--serve httpx|aiohttp|backend_http --port N --upstream URL` runs one of the apps.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # loadgen/harness, also under `python -m`

from harness import (  # noqa: E402
    HOST,
    MODEL,
    Children,
    add_load_args,
    chat_body,
    exit_on_sigterm,
    fmt,
    free_port,
    load_note,
    measure_paths,
    run_and_report,
    start_fast_upstream,
)
from loadgen import LoadResult, pick_generator  # noqa: E402
from starlette.applications import Starlette  # noqa: E402
from starlette.requests import Request  # noqa: E402
from starlette.responses import Response  # noqa: E402
from starlette.routing import Route  # noqa: E402

CLIENTS = ("httpx", "aiohttp", "backend_http")
Forward = Callable[[bytes], Awaitable[tuple[int, bytes, str]]]  # body -> (status, body, content type)


@contextlib.asynccontextmanager
async def _httpx_forwarder(upstream: str) -> AsyncIterator[Forward]:
    import httpx

    limits = httpx.Limits(max_connections=100, max_keepalive_connections=100, keepalive_expiry=60)
    async with httpx.AsyncClient(base_url=upstream, limits=limits,
                                 timeout=httpx.Timeout(60.0, connect=5.0)) as client:
        async def forward(body: bytes) -> tuple[int, bytes, str]:
            resp = await client.post("/chat/completions", content=body,
                                     headers={"Content-Type": "application/json"})
            return resp.status_code, resp.content, resp.headers.get("content-type", "application/json")
        yield forward


@contextlib.asynccontextmanager
async def _aiohttp_forwarder(upstream: str) -> AsyncIterator[Forward]:
    import aiohttp

    connector = aiohttp.TCPConnector(limit=100, keepalive_timeout=60)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=5.0, sock_read=60.0)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, auto_decompress=False,
                                     skip_auto_headers=("User-Agent",)) as session:
        url = upstream + "/chat/completions"

        async def forward(body: bytes) -> tuple[int, bytes, str]:
            async with session.post(url, data=body, headers={"Content-Type": "application/json"}) as resp:
                return resp.status, await resp.read(), resp.headers.get("Content-Type", "application/json")
        yield forward


@contextlib.asynccontextmanager
async def _backend_http_forwarder(upstream: str) -> AsyncIterator[Forward]:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from gateway.backend_http import BackendClient

    client = BackendClient()
    url = upstream + "/chat/completions"
    headers = {"Content-Type": "application/json"}

    async def forward(body: bytes) -> tuple[int, bytes, str]:
        resp = await client.request("POST", url, headers, body, 60.0)
        try:
            return resp.status, await resp.read(60.0), resp.content_type or "application/json"
        finally:
            resp.release()
    try:
        yield forward
    finally:
        await client.close()


FORWARDERS = {"httpx": _httpx_forwarder, "aiohttp": _aiohttp_forwarder, "backend_http": _backend_http_forwarder}


def build_app(client: str, upstream: str) -> Starlette:
    """A pass-through app: the request body goes to the upstream, its answer comes back as is."""
    opener = FORWARDERS[client]
    holder: dict[str, Forward] = {}

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with opener(upstream) as forward:  # created on uvicorn's loop
            holder["forward"] = forward
            yield

    async def chat(request: Request) -> Response:
        status, data, content_type = await holder["forward"](await request.body())
        return Response(data, status_code=status, media_type=content_type)

    async def health(request: Request) -> Response:
        return Response(b'{"status":"ok"}', media_type="application/json")

    return Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"]),
                             Route("/health", health, methods=["GET"])], lifespan=lifespan)


def serve(client: str, port: int, upstream: str) -> int:
    import uvicorn

    uvicorn.run(build_app(client, upstream), host=HOST, port=port, loop="uvloop", http="httptools",
                access_log=False, log_level="warning", server_header=False)
    return 0


def run(args: argparse.Namespace, children: Children) -> list[tuple[str, LoadResult]]:
    upstream = start_fast_upstream(children, free_port())
    paths = {"direct": upstream}
    for client in CLIENTS:
        port = free_port()
        children.start(client, [sys.executable, str(Path(__file__).resolve()), "--serve", client,
                                "--port", str(port), "--upstream", upstream])
        children.wait_ready(client, f"http://{HOST}:{port}/health")
        paths[client] = f"http://{HOST}:{port}/v1"
    chat = {name: (base + "/chat/completions", {}) for name, base in paths.items()}
    return measure_paths(chat, chat_body(MODEL), args)


def print_comparison(rows: list[tuple[str, LoadResult]]) -> None:
    by_key = {(name, r.concurrency): r for name, r in rows}
    for conc in sorted({r.concurrency for _, r in rows}, reverse=True):
        base = by_key.get(("httpx", conc))
        for name in CLIENTS[1:]:
            other = by_key.get((name, conc))
            if base and other:
                ratio = other.rps / base.rps if base.rps else math.nan
                print(f"c={conc:<3} {name}/httpx rps {fmt(ratio, 2)}x   p50 httpx {fmt(base.p50_ms, 3)} ms, "
                      f"{name} {fmt(other.p50_ms, 3)} ms")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_load_args(parser, concurrency="16,1")
    parser.add_argument("--serve", choices=CLIENTS, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--upstream", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        return serve(args.serve, args.port, args.upstream)

    exit_on_sigterm()
    args.generator = pick_generator(args.generator)
    print(f"upstream client benchmark: {' vs '.join(CLIENTS)} pass-through, {args.duration:g} s per measurement "
          f"after {args.warmup:g} s warm-up")
    print(f"load generator: {args.generator}")
    print(f"machine: {load_note()}", flush=True)
    return run_and_report(lambda tmp, children: run(args, children), print_comparison)

if __name__ == "__main__":
    sys.exit(main())
