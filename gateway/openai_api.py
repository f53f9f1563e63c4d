"""The OpenAI-compatible routes: /v1/models, /v1/chat/completions, /v1/completions, /v1/embeddings."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from .api_common import caller, gateway_of, json_response, read_json_body
from .errors import APIError
from .policy import RequestContext
from .proxy import StreamedAnswer, forward
from .targets import Endpoint

if TYPE_CHECKING:
    from .app import Gateway

log = logging.getLogger("gateway")
_STARTED = int(time.time())


async def _proxy(request: Request, endpoint: Endpoint, path: str) -> Response:
    """Admit, route, forward; the policy hears `finished` exactly once, whatever happens."""
    gw = gateway_of(request)
    ctx = RequestContext(endpoint=endpoint, model=None, stream=False, payload={})
    stream_reports = False  # a streamed answer calls `finished` itself when it ends
    try:
        await gw.policy.admit(request, ctx)  # who asks comes first: a bad key is a 401, whatever the body
        body, payload = await read_json_body(request)
        model = payload.get("model")
        if model is not None and not isinstance(model, str):
            raise APIError(400, "'model' must be a string", "invalid_model")
        ctx.model, ctx.stream, ctx.payload = model, payload.get("stream") is True, payload
        target = gw.registry.resolve(model, endpoint)
        if ctx.stream and endpoint != "embeddings":
            body = _with_stream_usage(body, payload, ctx)
        response = await forward(gw.upstream, target, path, body, ctx, gw.policy.finished)
        stream_reports = isinstance(response, StreamedAnswer)
    except APIError as e:
        ctx.status = e.status
        response = e.response()
    except asyncio.CancelledError:
        ctx.disconnected = True
        raise
    finally:
        if not stream_reports:
            await gw.policy.finished(ctx)
    if ctx.headers:  # set by the policy and never by the backend, so appending cannot duplicate
        response.raw_headers.extend((k.encode(), v.encode()) for k, v in ctx.headers.items())
    return response


def _with_stream_usage(body: bytes, payload: dict[str, Any], ctx: RequestContext) -> bytes:
    """Ask the backend to end the stream with token usage; hide that chunk if the client did not ask."""
    options = payload.get("stream_options")
    if isinstance(options, dict) and options.get("include_usage") is True:
        return body
    payload["stream_options"] = {**(options if isinstance(options, dict) else {}), "include_usage": True}
    ctx.strip_usage_chunk = True
    return orjson.dumps(payload)


PROXIED: dict[str, tuple[Endpoint, str]] = {  # gateway path -> (endpoint, backend path)
    "/v1/chat/completions": ("chat", "/chat/completions"),
    "/v1/completions": ("completions", "/completions"),
    "/v1/embeddings": ("embeddings", "/embeddings"),
}


async def proxied(request: Request) -> Response:
    endpoint, backend_path = PROXIED[request.url.path]
    return await _proxy(request, endpoint, backend_path)


class ProxyFastPath:
    """ASGI front door: POSTs to the proxied routes go straight to `_proxy`.

    They are the gateway's hot path, and Starlette's routing and middleware layers cost about a
    fifth of the gateway's CPU per request (bench/overhead.py); everything else, including other
    methods on these paths, goes through the Starlette app as usual.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = PROXIED.get(scope.get("path", "")) if scope["type"] == "http" and scope["method"] == "POST" else None
        if route is None:
            return await self.app(scope, receive, send)
        scope["app"] = self.app
        try:
            response = await _proxy(Request(scope, receive), *route)
        except Exception:
            log.exception("unhandled error in %s", scope["path"])
            response = APIError(500, "internal error in the gateway", "internal_error").response()
        await response(scope, receive, send)


def model_list(gw: Gateway) -> dict[str, Any]:
    """Every model a client can name, in OpenAI's list shape plus type, backend and state."""
    data = [{
        "id": t.model_id,
        "object": "model",
        "created": _STARTED,
        "owned_by": "llm-gateway" if t.slot else t.upstream,
        "type": t.model_type,
        "backend": f"slot:{t.slot.port}" if t.slot else f"upstream:{t.upstream}",
        "state": t.slot.state.value if t.slot else "remote",
    } for t in gw.registry.targets()]
    return {"object": "list", "data": data}


async def list_models(request: Request) -> Response:
    caller(request)
    return json_response(model_list(gateway_of(request)))


routes = [
    Route("/v1/models", list_models, methods=["GET"]),
    *(Route(path, proxied, methods=["POST"]) for path in PROXIED),
]
