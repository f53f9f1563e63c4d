"""How the gateway behaves when a remote upstream misbehaves: slow, down, broken, or abandoned mid-stream.

The upstream here is a small OpenAI-compatible server run by the test (a remote server cannot be
reached from this machine); the gateway under test is the real one, in its own process.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator

import httpx
import openai
import pytest
from aiohttp import web

from .conftest import RunningGateway, free_port, start_gateway, wait_until

UPSTREAM_KEY = "sk-upstream-secret"


class ScriptedUpstream:
    """An OpenAI-compatible server whose answer per model is chosen by the test."""

    def __init__(self) -> None:
        self.port = free_port()
        self.seen_auth: list[str | None] = []
        self.stream_cancelled = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        self.seen_auth.append(request.headers.get("Authorization"))
        body = await request.json()
        model = body.get("model")
        if model == "slow":
            await asyncio.sleep(5)
        if model == "broken":
            return web.Response(status=500, text="Internal kaboom")
        if model in ("endless", "stall"):
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            try:
                for i in range(10_000):
                    chunk = {"id": "x", "object": "chat.completion.chunk", "model": model,
                             "choices": [{"index": 0, "delta": {"content": f"w{i} "}}]}
                    await resp.write(b"data: " + web.json_response(chunk).body + b"\n\n")  # type: ignore[operator]
                    await asyncio.sleep(5 if model == "stall" and i == 2 else 0.02)
            except (asyncio.CancelledError, ConnectionResetError):
                self.stream_cancelled.set()
                raise
            return resp
        return web.json_response({"id": "ok", "object": "chat.completion", "model": model,
                                  "choices": [{"index": 0, "message": {"role": "assistant", "content": "fine"},
                                               "finish_reason": "stop"}],
                                  "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}})

    def start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        runner = web.AppRunner(app)
        self._thread.start()
        asyncio.run_coroutine_threadsafe(runner.setup(), self._loop).result()
        site = web.TCPSite(runner, "127.0.0.1", self.port)
        asyncio.run_coroutine_threadsafe(site.start(), self._loop).result()
        self._runner = runner

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result()
        self._loop.call_soon_threadsafe(self._loop.stop)


@pytest.fixture(scope="module")
def upstream() -> Iterator[ScriptedUpstream]:
    up = ScriptedUpstream()
    up.start()
    yield up
    up.stop()


@pytest.fixture(scope="module")
def gw(upstream: ScriptedUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningGateway]:
    dead_port = free_port()
    config = {
        "slots": {},
        "request_timeout": 1,
        "upstreams": [
            {"name": "scripted", "url": f"http://127.0.0.1:{upstream.port}/v1", "api_key": UPSTREAM_KEY,
             "models": ["ok", "slow", "broken", "endless", "stall"]},
            {"name": "gone", "url": f"http://127.0.0.1:{dead_port}/v1", "models": ["gone-model"]},
        ],
    }
    gateway = start_gateway(tmp_path_factory.mktemp("failures"), config)
    gateway.user_key = gateway.new_user("failures", "sub")
    yield gateway
    gateway.stop()


def chat(gw: RunningGateway, model: str, **extra) -> httpx.Response:  # type: ignore[no-untyped-def]
    return httpx.post(f"{gw.url}/v1/chat/completions", timeout=20, headers=gw.headers(),
                      json={"model": model, "messages": [{"role": "user", "content": "hi"}], **extra})


def test_upstream_gets_its_own_key_never_the_clients(gw: RunningGateway, upstream: ScriptedUpstream) -> None:
    upstream.seen_auth.clear()
    assert chat(gw, "ok").status_code == 200
    assert upstream.seen_auth == [f"Bearer {UPSTREAM_KEY}"]


def test_upstream_timeout_is_504(gw: RunningGateway) -> None:
    started = time.monotonic()
    r = chat(gw, "slow")
    assert r.status_code == 504
    assert r.json()["error"]["code"] == "backend_timeout"
    assert time.monotonic() - started < 4


def test_upstream_down_is_503(gw: RunningGateway) -> None:
    r = chat(gw, "gone-model")
    assert r.status_code == 503
    assert r.json()["error"]["code"] == "backend_unavailable"
    assert "upstream gone" in r.json()["error"]["message"]


def test_upstream_plain_text_error_becomes_openai_shaped(gw: RunningGateway) -> None:
    client = gw.client()
    with pytest.raises(openai.InternalServerError) as err:
        client.chat.completions.create(model="broken", messages=[{"role": "user", "content": "hi"}])
    assert "Internal kaboom" in err.value.body["message"]


def test_client_leaving_mid_stream_stops_the_upstream(gw: RunningGateway, upstream: ScriptedUpstream) -> None:
    upstream.stream_cancelled.clear()
    with httpx.stream("POST", f"{gw.url}/v1/chat/completions", timeout=20, headers=gw.headers(),
                      json={"model": "endless", "stream": True, "messages": []}) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]
    assert any(line.startswith("data: ") for line in got)
    wait_until(upstream.stream_cancelled.is_set, 10, "the upstream stream to be cancelled")


def test_stream_that_stalls_ends_with_an_error_event(gw: RunningGateway) -> None:
    with httpx.stream("POST", f"{gw.url}/v1/chat/completions", timeout=20, headers=gw.headers(),
                      json={"model": "stall", "stream": True, "messages": []}) as r:
        assert r.status_code == 200
        events = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert '"stream_error"' in events[-1] and events[0].startswith('data: {"id"')
