"""The Starlette application: wires config, storage, accounts, supervisor, router and proxy together.

`Gateway` is the one object a request handler reaches (as `request.app.state.gateway`); its
lifespan opens the database, starts the slots and, on the way out, writes the last usage rows and
stops every slot, so nothing is lost and no llama-server outlives the app.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp

from supervisor import SlotConfig, SlotState, Supervisor, find_llama_server

from . import admin_api, backends_api, hf_api, models_api, openai_api, public_api, system_api, user_api
from .account_policy import AccountPolicy
from .accounts import Accounts
from .config import Config, UpstreamConfig, save_config
from .cut_stream_usage import usage_of_cut_stream
from .errors import APIError
from .limits import ConcurrencyGate, RateLimiter
from .observability import Metrics, log_request
from .policy import RequestContext
from .proxy import UpstreamClient
from .sqlite_storage import SQLiteStorage
from .storage import Storage
from .targets import ModelRegistry
from .usage import UsageRecorder

log = logging.getLogger("gateway")
STATIC_DIR = Path(__file__).resolve().parent.parent / "static"


class Gateway:
    def __init__(self, config: Config, data_dir: Path, storage: Storage | None = None) -> None:
        self.config = config
        self.data_dir = data_dir
        self.config_path = data_dir / "config.json"
        self.started_at = time.time()
        self.storage: Storage = storage or SQLiteStorage(data_dir / "gateway.db")
        self.recorder = UsageRecorder(self.storage)
        self.accounts = Accounts(self.storage, self.recorder, config.effective_admin_key)
        self.limiter = RateLimiter()
        self.signup_limiter = RateLimiter(window_s=3600)  # per client IP
        self.gate = ConcurrencyGate(config.max_concurrent_requests, config.max_queued_requests, config.queue_timeout)
        self.policy = AccountPolicy(config, self.accounts, self.recorder, self.limiter, self.gate)
        binary = find_llama_server(config.llama_server)
        self.supervisor = Supervisor(data_dir, config.slot_defaults(data_dir), binary, self._persist_slots,
                                     on_state=self._slot_state)
        self.registry = ModelRegistry(self.supervisor, config.upstreams)
        self.upstream = UpstreamClient(read_timeout=config.request_timeout)
        self.metrics = Metrics(self)
        self._background: set[asyncio.Task[None]] = set()

    async def request_finished(self, ctx: RequestContext) -> None:
        """Called exactly once per proxied request, however it ended."""
        if ctx.target is not None:
            self.registry.end(ctx.target)
        if ctx.disconnected and ctx.usage is None and ctx.streamed_events > 1:  # cut off after some output
            ctx.usage = await usage_of_cut_stream(self.upstream.http, ctx)
        await self.policy.finished(ctx)
        self.metrics.observe(ctx)
        log_request(ctx)

    async def start(self) -> None:
        await self.storage.open()
        await self.accounts.load()
        self.recorder.start()
        self.accounts.start_watching()
        self._uptime_event("gateway", "up")
        if self.supervisor.binary is None and any(self.config.slots.values()):
            log.error("llama-server not found: run ./build_llamacpp.sh; local slots stay empty")
        await self.supervisor.start(self.config.slots)
        await self.discover_models(*(u for u in self.config.upstreams if not u.models))

    async def stop(self) -> None:
        await self.supervisor.stop()
        await self.upstream.close()
        self._uptime_event("gateway", "down")
        await asyncio.gather(*self._background, return_exceptions=True)
        await self.accounts.stop_watching()
        await self.recorder.stop()  # the last usage rows and charges reach the disk
        await self.storage.close()

    def _uptime_event(self, component: str, state: str) -> None:
        task = asyncio.get_running_loop().create_task(self.storage.add_uptime_event(time.time(), component, state))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _slot_state(self, port: int, state: SlotState) -> None:
        self._uptime_event(f"slot:{port}", state.value)

    def _persist_slots(self, slots: dict[int, SlotConfig | None]) -> None:
        self.config.slots = slots
        save_config(self.config, self.config_path)

    async def discover_models(self, *upstreams: UpstreamConfig) -> None:
        """Ask upstreams for their model lists (best effort, 5 s); used when `models` is not given."""
        async def discover(session: aiohttp.ClientSession, up: UpstreamConfig) -> None:
            headers = {"Authorization": f"Bearer {up.api_key}"} if up.api_key else {}
            try:
                async with session.get(f"{up.url}/models", headers=headers) as r:
                    up.models = [m["id"] for m in (await r.json()).get("data", []) if m.get("id")]
                    log.info("upstream %s serves %s", up.name, ", ".join(up.models) or "no models")
            except (aiohttp.ClientError, TimeoutError, ValueError, TypeError, KeyError, AttributeError) as e:
                log.warning("upstream %s: could not list its models (%s)", up.name, e.__class__.__name__)
        if upstreams:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
                await asyncio.gather(*(discover(session, u) for u in upstreams))
        self.registry.refresh_upstreams()


async def landing(request: Request) -> Response:
    return FileResponse(STATIC_DIR / "index.html")


async def metrics(request: Request) -> Response:
    return Response(request.app.state.gateway.metrics.render(), media_type=CONTENT_TYPE_LATEST)


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, APIError)
    return exc.response()


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    message = f"{request.method} {request.url.path}: {exc.detail}"
    return APIError(exc.status_code, message, code, headers=dict(exc.headers or {})).response()


def create_app(config: Config, data_dir: Path) -> ASGIApp:
    gateway = Gateway(config, data_dir)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await gateway.start()
        try:
            yield
        finally:
            await gateway.stop()

    app = Starlette(
        routes=[
            Route("/", landing, methods=["GET"]),
            Route("/metrics", metrics, methods=["GET"]),
            *public_api.routes,
            *openai_api.routes,
            *user_api.routes,
            *admin_api.routes,
            *backends_api.routes,
            *models_api.routes,
            *hf_api.routes,
            *system_api.routes,
        ],
        exception_handlers={APIError: _api_error, HTTPException: _http_error},
        lifespan=lifespan,
    )
    app.state.gateway = gateway
    return openai_api.ProxyFastPath(app)
