"""The Starlette application: wires config, supervisor, router, proxy and policy together.

`Gateway` is the one object a request handler reaches (as `request.app.state.gateway`); its
lifespan starts the slots and stops them again, so no llama-server outlives the app.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp

from supervisor import SlotConfig, Supervisor, Timing, find_llama_server

from . import openai_api
from .config import Config, UpstreamConfig, save_config
from .errors import APIError
from .policy import OpenPolicy, RequestPolicy
from .proxy import UpstreamClient, json_response
from .targets import ModelRegistry

log = logging.getLogger("gateway")
STATIC_DIR = Path(__file__).resolve().parent.parent / "static"


class Gateway:
    def __init__(self, config: Config, data_dir: Path, policy: RequestPolicy | None = None,
                 timing: Timing = Timing()) -> None:
        self.config = config
        self.data_dir = data_dir
        self.config_path = data_dir / "config.json"
        self.policy: RequestPolicy = policy or OpenPolicy()
        binary = find_llama_server(config.llama_server)
        self.supervisor = Supervisor(data_dir, config.slot_defaults(data_dir), binary, self._persist_slots, timing)
        self.registry = ModelRegistry(self.supervisor, config.upstreams)
        self.upstream = UpstreamClient(read_timeout=config.request_timeout)

    async def start(self) -> None:
        if self.supervisor.binary is None and any(self.config.slots.values()):
            log.error("llama-server not found: run ./build_llamacpp.sh; local slots stay empty")
        await self.supervisor.start(self.config.slots)
        await self._discover_upstream_models()

    async def stop(self) -> None:
        await self.supervisor.stop()
        await self.upstream.close()

    def _persist_slots(self, slots: dict[int, SlotConfig | None]) -> None:
        self.config.slots = slots
        save_config(self.config, self.config_path)

    async def _discover_upstream_models(self) -> None:
        """Upstreams configured without `models` are asked for theirs (best effort, 5 s)."""
        async def discover(session: aiohttp.ClientSession, up: UpstreamConfig) -> None:
            headers = {"Authorization": f"Bearer {up.api_key}"} if up.api_key else {}
            try:
                async with session.get(f"{up.url}/models", headers=headers) as r:
                    up.models = [m["id"] for m in (await r.json()).get("data", []) if m.get("id")]
                    log.info("upstream %s serves %s", up.name, ", ".join(up.models) or "no models")
            except (aiohttp.ClientError, TimeoutError, ValueError, TypeError, KeyError) as e:
                log.warning("upstream %s: could not list its models (%s)", up.name, e.__class__.__name__)
        pending = [u for u in self.config.upstreams if not u.models]
        if pending:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
                await asyncio.gather(*(discover(session, u) for u in pending))
        self.registry.refresh_upstreams()


def _require_admin(request: Request) -> None:
    expected = request.app.state.gateway.config.effective_admin_key
    if not expected:
        raise APIError(403, "the admin API is disabled: set admin_key in config.json or LLM_GATEWAY_ADMIN_KEY",
                       "admin_disabled")
    auth = request.headers.get("authorization", "")
    given = auth[7:] if auth[:7].lower() == "bearer " else request.headers.get("x-api-key", "")
    if not given:
        raise APIError(401, "missing admin key (Authorization: Bearer KEY)", "missing_api_key")
    if not hmac.compare_digest(given.encode(), expected.encode()):
        raise APIError(403, "this key is not an admin key", "not_admin")


async def health(request: Request) -> Response:
    gw: Gateway = request.app.state.gateway
    slots = {str(s.port): s.state.value for s in gw.supervisor.slots.values()}
    return json_response({"status": "ok", "slots": slots})


async def landing(request: Request) -> Response:
    return FileResponse(STATIC_DIR / "index.html")


async def admin_slots(request: Request) -> Response:
    _require_admin(request)
    gw: Gateway = request.app.state.gateway
    return json_response({"slots": gw.supervisor.status()})


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, APIError)
    return exc.response()


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    message = f"{request.method} {request.url.path}: {exc.detail}"
    return APIError(exc.status_code, message, code, headers=dict(exc.headers or {})).response()


def create_app(config: Config, data_dir: Path, policy: RequestPolicy | None = None,
               timing: Timing = Timing()) -> ASGIApp:
    gateway = Gateway(config, data_dir, policy, timing)

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
            Route("/health", health, methods=["GET"]),
            *openai_api.routes,
            Route("/admin/api/slots", admin_slots, methods=["GET"]),
        ],
        exception_handlers={APIError: _api_error, HTTPException: _http_error},
        lifespan=lifespan,
    )
    app.state.gateway = gateway
    return openai_api.ProxyFastPath(app)
