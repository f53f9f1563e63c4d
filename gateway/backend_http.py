"""A lean HTTP/1.1 client for the proxy's hot path: pooled keep-alive connections, httptools parsing.

Why not aiohttp or httpx: bench/client_choice.py puts each in the same Starlette pass-through in
front of a fast upstream. On the 2-core development machine (wrk, c=16) httpx reached 339 rps,
aiohttp 3,233 and this client 4,596 (p50 at c=1: 2.17 / 0.55 / 0.26 ms); the libraries spend their
time building request and response objects a proxy does not need. This client writes each request
in one syscall, parses the answer with httptools (the parser uvicorn uses) and hands body chunks
over as they arrive. It speaks HTTP and HTTPS (remote upstreams such as OpenAI itself).
"""

from __future__ import annotations

import asyncio
import collections
import functools
import ssl
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import httptools

_READ_BUFFER_HIGH = 1 << 20  # stop reading from a backend whose answer the client is not taking


class BackendError(Exception):
    """The backend could not be reached or broke off; `stage` says where it happened."""

    def __init__(self, message: str, stage: str) -> None:
        super().__init__(message)
        self.stage = stage  # "connect", "timeout" or "response"


class BackendResponse:
    """Status and headers of a backend answer, with its body to read whole or in chunks."""

    def __init__(self, conn: _Connection) -> None:
        self._conn = conn
        self.status = 0
        self.headers: dict[str, str] = {}
        self._chunks: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._complete = False
        self._error: BackendError | None = None
        self._wakeup: asyncio.Future[None] | None = None

    @property
    def content_type(self) -> str:
        return self.headers.get("content-type", "")

    async def read(self, timeout: float) -> bytes:
        parts = [chunk async for chunk in self.iter_chunks(timeout)]
        return b"".join(parts)

    async def iter_chunks(self, timeout: float) -> AsyncIterator[bytes]:
        """Body chunks as they arrive; `timeout` is the longest wait for the next one."""
        while True:
            while self._chunks:
                chunk = self._chunks.popleft()
                self._buffered -= len(chunk)
                self._conn.resume_if_drained(self._buffered)
                yield chunk
            if self._error is not None:
                raise self._error
            if self._complete:
                return
            self._wakeup = asyncio.get_running_loop().create_future()
            try:
                if not await _wait(self._wakeup, timeout):
                    raise BackendError(f"no data for {timeout:g}s", "timeout")
            finally:
                self._wakeup = None

    def release(self) -> None:
        """Done with this answer: the connection goes back to the pool if it can be reused."""
        self._conn.done(reusable=self._complete and self._error is None)

    def close(self) -> None:
        """Abandon the answer and the connection (the backend sees the client leave)."""
        self._conn.done(reusable=False)

    # called by the connection
    def _feed(self, chunk: bytes) -> int:
        self._chunks.append(chunk)
        self._buffered += len(chunk)
        self._wake()
        return self._buffered

    def _finish(self, error: BackendError | None = None) -> None:
        if not self._complete and self._error is None:
            self._complete = error is None
            self._error = error
            self._wake()

    def _wake(self) -> None:
        if self._wakeup is not None and not self._wakeup.done():
            self._wakeup.set_result(None)


class _Connection(asyncio.Protocol):
    """One keep-alive connection to one backend; serves one request at a time."""

    def __init__(self, pool: BackendClient, key: tuple[str, str, int]) -> None:
        self.pool = pool
        self.key = key
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.response: BackendResponse | None = None
        self.headers_ready: asyncio.Future[None] | None = None
        self.closed = False
        self.used = False  # has served a request before: a failure may be a stale keep-alive
        self.got_bytes = False
        self.paused = False
        self.idle_handle: asyncio.TimerHandle | None = None
        self._header_name = b""

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.got_bytes = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as e:
            self._fail(f"invalid HTTP from the backend: {e}")
            self._close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool.forget(self)
        resp = self.response
        if resp is not None and not resp._complete:
            if self.headers_ready is None or self.headers_ready.done():
                length_known = "content-length" in resp.headers or "chunked" in resp.headers.get(
                    "transfer-encoding", "")
                if resp.status and not length_known:
                    resp._finish()  # a body delimited by the connection closing
                    return
            self._fail("the backend closed the connection")

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        assert self.response is not None
        key = name.decode("latin-1").lower()
        self.response.headers[key] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        assert self.response is not None
        self.response.status = self.parser.get_status_code()
        if self.headers_ready is not None and not self.headers_ready.done():
            self.headers_ready.set_result(None)

    def on_body(self, body: bytes) -> None:
        assert self.response is not None
        if self.response._feed(body) > _READ_BUFFER_HIGH and self.transport and not self.paused:
            self.paused = True
            self.transport.pause_reading()

    def on_message_complete(self) -> None:
        assert self.response is not None
        self.response._finish()
        if not self.parser.should_keep_alive():
            self.closed = True

    # used by BackendResponse / BackendClient
    def resume_if_drained(self, buffered: int) -> None:
        if self.paused and buffered < _READ_BUFFER_HIGH // 2 and self.transport:
            self.paused = False
            self.transport.resume_reading()

    def done(self, reusable: bool) -> None:
        if self.response is None:
            return
        self.response = None
        if reusable and not self.closed and self.transport and not self.transport.is_closing():
            self.pool.give_back(self)
        else:
            self._close()

    def send(self, data: bytes) -> BackendResponse:
        assert self.transport is not None
        self.response = BackendResponse(self)
        self.headers_ready = asyncio.get_running_loop().create_future()
        self.got_bytes = False
        self.parser = httptools.HttpResponseParser(self)
        self.transport.write(data)
        return self.response

    def _fail(self, message: str) -> None:
        error = BackendError(message, "response")
        if self.headers_ready is not None and not self.headers_ready.done():
            self.headers_ready.set_exception(error)
        if self.response is not None:
            self.response._finish(error)

    def _close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class BackendClient:
    """Keep-alive connection pools per backend host, shared by all requests."""

    def __init__(self, connect_timeout: float = 5.0, idle_timeout: float = 60.0,
                 max_idle_per_host: int = 64) -> None:
        self.connect_timeout = connect_timeout
        self.idle_timeout = idle_timeout
        self.max_idle_per_host = max_idle_per_host
        self._idle: dict[tuple[str, str, int], list[_Connection]] = collections.defaultdict(list)
        self._all: set[_Connection] = set()
        self._ssl: ssl.SSLContext | None = None

    async def request(self, method: str, url: str, headers: dict[str, str], body: bytes,
                      timeout: float) -> BackendResponse:
        """Send a request and wait for the answer's status and headers (not its body)."""
        scheme, host, port, target = _split(url)
        head = f"{method} {target} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Length: {len(body)}\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        data = (head + "\r\n").encode("latin-1") + body
        for attempt in (1, 2):
            conn = await self._acquire((scheme, host, port))
            response = conn.send(data)
            assert conn.headers_ready is not None
            try:
                answered = await _wait(conn.headers_ready, timeout)
            except BackendError:
                stale = conn.used and not conn.got_bytes  # a kept-alive connection the server had closed
                conn.done(reusable=False)
                if stale and attempt == 1:
                    continue  # once more, on a fresh connection
                raise
            except BaseException:
                conn.done(reusable=False)
                raise
            if answered:
                return response
            conn.done(reusable=False)
            raise BackendError(f"no answer within {timeout:g}s", "timeout")
        raise AssertionError("unreachable")

    async def _acquire(self, key: tuple[str, str, int]) -> _Connection:
        idle = self._idle[key]
        while idle:
            conn = idle.pop()
            if conn.idle_handle is not None:
                conn.idle_handle.cancel()
            if not conn.closed and conn.transport is not None and not conn.transport.is_closing():
                conn.used = True
                return conn
        return await self._connect(key)

    async def _connect(self, key: tuple[str, str, int]) -> _Connection:
        scheme, host, port = key
        loop = asyncio.get_running_loop()
        if scheme == "https" and self._ssl is None:
            self._ssl = ssl.create_default_context()
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(lambda: _Connection(self, key), host, port,
                                       ssl=self._ssl if scheme == "https" else None),
                self.connect_timeout)
        except TimeoutError:
            raise BackendError(f"could not connect to {host}:{port} within {self.connect_timeout:g}s",
                               "connect") from None
        except OSError as e:
            raise BackendError(f"could not connect to {host}:{port}: {e.strerror or e}", "connect") from None
        self._all.add(conn)
        return conn

    def give_back(self, conn: _Connection) -> None:
        idle = self._idle[conn.key]
        if len(idle) >= self.max_idle_per_host:
            conn._close()
            return
        idle.append(conn)
        conn.idle_handle = asyncio.get_running_loop().call_later(self.idle_timeout, conn._close)

    def forget(self, conn: _Connection) -> None:
        self._all.discard(conn)
        idle = self._idle.get(conn.key)
        if idle and conn in idle:
            idle.remove(conn)

    async def close(self) -> None:
        for conn in list(self._all):
            conn._close()
        self._idle.clear()


async def _wait(future: asyncio.Future[None], timeout: float) -> bool:
    """Await `future` for at most `timeout` seconds; False on timeout. (asyncio.wait_for costs a
    task and several callbacks per call, which shows on the proxy's hot path.)"""
    if not future.done():
        timer = asyncio.get_running_loop().call_later(
            timeout, lambda: future.done() or future.set_exception(_TimedOut()))
        try:
            await future
        except _TimedOut:
            return False
        finally:
            timer.cancel()
    else:
        future.result()
    return True


class _TimedOut(Exception):
    pass


@functools.lru_cache(maxsize=1024)
def _split(url: str) -> tuple[str, str, int, str]:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise BackendError(f"unsupported backend URL {url!r}", "connect")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    return parts.scheme, parts.hostname, port, target
