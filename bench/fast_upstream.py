"""A minimal, fast OpenAI-compatible upstream for benchmarks: the thing the gateway forwards to.

It owns nothing but answering quickly: a raw asyncio Protocol with the httptools parser (on
uvloop when installed) writes pre-built responses, so a benchmark measures the gateway rather
than the upstream. Routes: POST /v1/chat/completions (a fixed small chat.completion with a
`usage` object; the request body is read and ignored), GET /v1/models, GET /health.
HTTP/1.1 keep-alive and pipelining work; anything else gets a 404 JSON error.

    python bench/fast_upstream.py --port 8800 [--host 127.0.0.1] [--model bench-model]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from typing import cast

import httptools

MODEL = "bench-model"


def _response(status: str, body: bytes, keep_alive: bool) -> bytes:
    head = (f"HTTP/1.1 {status}\r\n"
            "Content-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n"
            f"Connection: {'keep-alive' if keep_alive else 'close'}\r\n\r\n")
    return head.encode("ascii") + body


def build_routes(model: str) -> dict[tuple[bytes, bytes], bytes]:
    """The JSON bodies of each route, serialised once."""
    chat = {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": 1700000000,
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello!"},
                     "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11},
    }
    models = {"object": "list", "data": [{"id": model, "object": "model", "created": 1700000000,
                                          "owned_by": "bench"}]}
    def dump(obj: object) -> bytes:
        return json.dumps(obj, separators=(",", ":")).encode()

    return {
        (b"POST", b"/v1/chat/completions"): dump(chat),
        (b"GET", b"/v1/models"): dump(models),
        (b"GET", b"/health"): b'{"status":"ok"}',
    }


class Responses:
    """Every possible answer, pre-built for both keep-alive and close."""

    def __init__(self, model: str) -> None:
        self.ok: dict[tuple[bytes, bytes], tuple[bytes, bytes]] = {
            key: (_response("200 OK", body, True), _response("200 OK", body, False))
            for key, body in build_routes(model).items()
        }
        missing = b'{"error":{"message":"not found","type":"invalid_request_error","code":"not_found"}}'
        self.not_found = (_response("404 Not Found", missing, True), _response("404 Not Found", missing, False))
        bad = b'{"error":{"message":"bad request","type":"invalid_request_error","code":"bad_request"}}'
        self.bad_request = _response("400 Bad Request", bad, False)


class UpstreamProtocol(asyncio.Protocol):
    """One client connection: parse requests with httptools, answer each as it completes."""

    __slots__ = ("responses", "parser", "transport", "url")

    def __init__(self, responses: Responses) -> None:
        self.responses = responses
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.url = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not subclasses

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            if self.transport is not None:
                self.transport.write(self.responses.bad_request)
                self.transport.close()

    # httptools callbacks (only those defined are called; the body is skipped)
    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_message_complete(self) -> None:
        transport = self.transport
        if transport is None:
            return
        path = self.url.split(b"?", 1)[0]
        self.url = b""
        pair = self.responses.ok.get((self.parser.get_method(), path), self.responses.not_found)
        if self.parser.should_keep_alive():
            transport.write(pair[0])
        else:
            transport.write(pair[1])
            transport.close()


async def serve(host: str, port: int, model: str) -> None:
    loop = asyncio.get_running_loop()
    responses = Responses(model)
    server = await loop.create_server(lambda: UpstreamProtocol(responses), host, port,
                                      reuse_address=True, backlog=2048)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(f"[fast_upstream] listening on http://{host}:{port}/v1 (model {model})", flush=True)
    await stop.wait()
    server.close()  # open keep-alive connections are not waited for: the process ends now


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model", default=MODEL, help="model id it reports (default %(default)s)")
    args = parser.parse_args(argv)
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(args.host, args.port, args.model))
    else:
        uvloop.run(serve(args.host, args.port, args.model))
    return 0


if __name__ == "__main__":
    sys.exit(main())
