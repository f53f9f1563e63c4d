"""Forwarding one request body to one backend and its answer back, streamed or whole.

Streams are passed through chunk by chunk as they arrive; a client that goes away closes the
backend connection at once, so llama-server stops generating for nobody. The HTTP client is
`backend_http.BackendClient` (see there for why, and bench/client_choice.py for the figures).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import Awaitable, Callable

import orjson
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from .backend_http import BackendClient, BackendError, BackendResponse
from .errors import APIError
from .policy import RequestContext
from .targets import Target

Finish = Callable[[RequestContext], Awaitable[None]]
_USAGE_MARK = b'"usage":{'


def _failure(e: BackendError, target: Target) -> APIError:
    who = f"{target.label} ({target.model_id})"
    if e.stage == "connect":
        return APIError(503, f"{who} is unreachable: {e}", "backend_unavailable")
    if e.stage == "timeout":
        return APIError(504, f"{who} did not answer in time: {e}", "backend_timeout")
    return APIError(502, f"{who} failed: {e}", "bad_gateway")


@functools.lru_cache(maxsize=64)
def _headers(api_key: str | None) -> dict[str, str]:
    headers = {"Content-Type": "application/json"}
    if api_key:  # the backend's own key; the client's gateway key never leaves us
        headers["Authorization"] = f"Bearer {api_key}"
    return headers


class UpstreamClient:
    """Posts to backends with the gateway's timeouts; failures become OpenAI-shaped errors."""

    def __init__(self, read_timeout: float, connect_timeout: float = 5.0) -> None:
        self.read_timeout = read_timeout
        self.http = BackendClient(connect_timeout=connect_timeout)

    async def close(self) -> None:
        await self.http.close()

    async def post(self, target: Target, path: str, body: bytes) -> BackendResponse:
        try:
            return await self.http.request("POST", target.base_url + path, _headers(target.api_key), body,
                                            self.read_timeout)
        except BackendError as e:
            raise _failure(e, target) from e


async def forward(client: UpstreamClient, target: Target, path: str, body: bytes,
                  ctx: RequestContext, finish: Finish) -> Response:
    """Send `body` to `target` and answer with what it says, in OpenAI's error shape on failure.

    A whole answer is returned with `ctx` filled in; a stream is returned as a `StreamedAnswer`,
    which calls `finish(ctx)` itself once the stream has ended, however it ended.
    """
    ctx.target = target
    resp = await client.post(target, path, body)
    ctx.status = resp.status
    content_type = resp.content_type
    if ctx.stream and resp.status == 200 and content_type.startswith("text/event-stream"):
        return StreamedAnswer(resp, ctx, finish, client.read_timeout)
    try:
        data = await resp.read(client.read_timeout)
    except BackendError as e:
        raise _failure(e, target) from e
    finally:
        resp.release()
    ctx.first_byte_at = time.perf_counter()
    if resp.status >= 400:
        data = _openai_error_body(resp.status, data, target)
    elif b'"usage"' in data:
        with contextlib.suppress(orjson.JSONDecodeError, AttributeError):
            ctx.usage = orjson.loads(data).get("usage")
    return Response(data, status_code=resp.status, media_type=content_type or "application/json")


def _openai_error_body(status: int, data: bytes, target: Target) -> bytes:
    """Backend errors pass through when already OpenAI-shaped; anything else is wrapped."""
    with contextlib.suppress(orjson.JSONDecodeError):
        parsed = orjson.loads(data)
        if isinstance(parsed, dict) and isinstance(parsed.get("error"), dict):
            return data
    text = data.decode(errors="replace").strip()[:500] or f"HTTP {status}"
    return APIError(status, f"{target.label} ({target.model_id}) answered: {text}", "backend_error").response().body


class StreamedAnswer(Response):
    """An SSE answer relayed from a backend response as it arrives."""

    def __init__(self, upstream: BackendResponse, ctx: RequestContext, finish: Finish, timeout: float) -> None:
        # Not Response.__init__: it would announce `content-length: 0`.
        self.status_code = 200
        self.background = None
        self.raw_headers = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache"),
                            (b"x-accel-buffering", b"no")]
        self.upstream = upstream
        self.ctx = ctx
        self.finish = finish
        self.timeout = timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        pump = asyncio.create_task(self._pump(send))
        watch = asyncio.create_task(_wait_for_disconnect(receive))
        clean = False
        try:
            await asyncio.wait({pump, watch}, return_when=asyncio.FIRST_COMPLETED)
            if not pump.done():
                self.ctx.disconnected = True
                pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pump
            clean = not self.ctx.disconnected and self.ctx.status == 200
        finally:
            pump.cancel()
            watch.cancel()
            if clean:
                self.upstream.release()
            else:
                self.upstream.close()  # drop the backend connection: generation stops
            await self.finish(self.ctx)

    async def _pump(self, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        tail = b""  # an event split across chunks, kept so `usage` is never missed
        try:
            async for chunk in self.upstream.iter_chunks(self.timeout):
                if self.ctx.first_byte_at is None:
                    self.ctx.first_byte_at = time.perf_counter()
                self.ctx.streamed_events += chunk.count(b"data: {")
                data = tail + chunk if tail else chunk
                cut = data.rfind(b"\n\n") + 2 if b"\n\n" in data else 0
                complete, tail = data[:cut], data[cut:]
                if self.ctx.strip_usage_chunk:
                    chunk = self._without_usage_event(complete)  # relayed by whole events only
                elif _USAGE_MARK in complete:
                    self._take_usage(complete)
                if chunk:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
            if tail and self.ctx.strip_usage_chunk:
                await send({"type": "http.response.body", "body": tail, "more_body": True})
        except BackendError as e:
            # Headers are gone already: tell the client in-band, as OpenAI's streams do.
            self.ctx.status = 504 if e.stage == "timeout" else 502
            err = APIError(self.ctx.status, f"the backend stream broke off: {e}", "stream_error")
            await send({"type": "http.response.body", "body": b"data: " + orjson.dumps(err.body()) + b"\n\n",
                        "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    def _take_usage(self, events: bytes) -> None:
        for line in events.split(b"\n"):
            if line.startswith(b"data: ") and _USAGE_MARK in line:
                with contextlib.suppress(orjson.JSONDecodeError, AttributeError):
                    self.ctx.usage = orjson.loads(line[6:]).get("usage")

    def _without_usage_event(self, events: bytes) -> bytes:
        """Drop the usage-only chunk (`"choices":[]`) we asked for; keep its numbers."""
        if _USAGE_MARK not in events:
            return events
        kept = []
        for event in events.split(b"\n\n"):
            if _USAGE_MARK in event and b'"choices":[]' in event:
                self._take_usage(event)
            elif event:
                kept.append(event + b"\n\n")
        return b"".join(kept)


async def _wait_for_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
