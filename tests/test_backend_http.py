"""The proxy's HTTP client against real local HTTP servers: reuse, framing, failures, timeouts."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from aiohttp import web

from gateway.backend_http import BackendClient, BackendError

from .conftest import free_port


@pytest.fixture
async def server() -> AsyncIterator[tuple[str, set]]:
    """An aiohttp server that records each client's address and answers in several framings."""
    peers: set = set()

    async def echo(request: web.Request) -> web.StreamResponse:
        peers.add(request.transport.get_extra_info("peername") if request.transport else None)
        body = await request.read()
        if request.query.get("mode") == "chunked":
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            resp.enable_chunked_encoding()
            await resp.prepare(request)
            for i in range(3):
                await resp.write(f"data: {i}\n\n".encode())
                await asyncio.sleep(0.01)
            await resp.write_eof()
            return resp
        if request.query.get("mode") == "slow":
            await asyncio.sleep(2)
        return web.Response(body=b"echo:" + body, headers={"X-Auth": request.headers.get("Authorization", "")})

    app = web.Application()
    app.router.add_post("/echo", echo)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield f"http://127.0.0.1:{port}", peers
    await runner.cleanup()


async def test_keep_alive_reuses_one_connection(server: tuple[str, set]) -> None:
    url, peers = server
    client = BackendClient()
    try:
        for i in range(20):
            resp = await client.request("POST", f"{url}/echo", {"Authorization": "Bearer k"}, b"%d" % i, 5)
            assert resp.status == 200 and resp.headers["x-auth"] == "Bearer k"
            assert await resp.read(5) == b"echo:%d" % i
            resp.release()
        assert len(peers) == 1  # the server saw every request come from the same connection
    finally:
        await client.close()


async def test_chunked_body_arrives_in_pieces(server: tuple[str, set]) -> None:
    url, _ = server
    client = BackendClient()
    try:
        resp = await client.request("POST", f"{url}/echo?mode=chunked", {}, b"", 5)
        assert resp.content_type == "text/event-stream"
        chunks = [c async for c in resp.iter_chunks(5)]
        resp.release()
        assert b"".join(chunks) == b"data: 0\n\ndata: 1\n\ndata: 2\n\n"
        assert len(chunks) >= 2
    finally:
        await client.close()


async def test_connection_refused_is_a_connect_error() -> None:
    client = BackendClient()
    with pytest.raises(BackendError) as err:
        await client.request("POST", f"http://127.0.0.1:{free_port()}/x", {}, b"", 5)
    assert err.value.stage == "connect"


async def test_slow_backend_is_a_timeout_and_the_connection_is_dropped(server: tuple[str, set]) -> None:
    url, _ = server
    client = BackendClient()
    try:
        with pytest.raises(BackendError) as err:
            await client.request("POST", f"{url}/echo?mode=slow", {}, b"", 0.3)
        assert err.value.stage == "timeout"
        assert not client._all or all(c.closed for c in client._all)
    finally:
        await client.close()


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@contextlib.asynccontextmanager
async def raw_server(handle: Handler) -> AsyncIterator[tuple[str, BackendClient]]:
    """A hand-written HTTP peer (for what well-behaved servers never do) and a client for it."""
    srv = await asyncio.start_server(handle, "127.0.0.1", 0)
    client = BackendClient()
    try:
        yield f"http://127.0.0.1:{srv.sockets[0].getsockname()[1]}/", client
    finally:
        await client.close()
        srv.close()


async def test_connection_the_backend_closed_while_idle_is_not_reused() -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")  # says keep-alive, then...
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.close()  # ...closes anyway

    async with raw_server(handle) as (url, client):
        for _ in range(3):
            resp = await client.request("POST", url, {}, b"", 5)
            assert await resp.read(5) == b"ok"
            resp.release()
            await asyncio.sleep(0.1)


async def test_request_lost_on_a_reused_connection_is_retried_once() -> None:
    """The backend drops a kept-alive connection just as the next request arrives on it."""
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        await reader.readuntil(b"\r\n\r\n")  # the second request on this connection...
        writer.close()  # ...is dropped unanswered

    async with raw_server(handle) as (url, client):
        for _ in range(4):
            resp = await client.request("POST", url, {}, b"", 5)
            assert await resp.read(5) == b"ok"
            resp.release()


def answer_and_close(raw: bytes) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]:
    """A backend that reads one request head, writes `raw` and closes the connection."""
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(raw)
        await writer.drain()
        writer.close()
    return handle


async def test_body_delimited_by_close() -> None:
    async with raw_server(answer_and_close(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nwhole body")) \
            as (url, client):
        resp = await client.request("POST", url, {}, b"", 5)
        assert await resp.read(5) == b"whole body"
        resp.release()


async def test_broken_off_answer_is_an_error_not_a_short_body() -> None:
    async with raw_server(answer_and_close(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly part")) \
            as (url, client):
        resp = await client.request("POST", url, {}, b"", 5)
        with pytest.raises(BackendError) as err:
            await resp.read(5)
        assert err.value.stage == "response"
        resp.close()


async def test_https_backend(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    """Remote upstreams are often HTTPS: the certificate is verified against the trusted CAs."""
    import ssl
    import subprocess

    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)

    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="secure")

    app = web.Application()
    app.router.add_post("/v1/x", hello)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port, ssl_context=server_ctx).start()
    try:
        untrusting = BackendClient()
        with pytest.raises(BackendError, match="certificate"):
            await untrusting.request("POST", f"https://localhost:{port}/v1/x", {}, b"", 5)
        await untrusting.close()
        monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # now the machine trusts this CA
        client = BackendClient()
        resp = await client.request("POST", f"https://localhost:{port}/v1/x", {}, b"", 5)
        assert resp.status == 200 and await resp.read(5) == b"secure"
        resp.release()
        await client.close()
    finally:
        await runner.cleanup()
