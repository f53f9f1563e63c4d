"""The OpenAI-compatible routes: /v1/models, /v1/chat/completions, /v1/completions, /v1/embeddings."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from typing import TYPE_CHECKING, Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .api_common import caller, gateway_of, json_response, read_json_body
from .errors import APIError
from .policy import RequestContext, new_request_id
from .proxy import StreamedAnswer, forward
from .targets import CAPABILITIES, Endpoint, Target, need_of

if TYPE_CHECKING:
    from .app import Gateway

log = logging.getLogger("gateway")
_SAFE_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_STARTED = int(time.time())


async def _proxy(request: Request, endpoint: Endpoint, path: str) -> Response:
    """Admit, route, forward; `request_finished` runs exactly once, whatever happens."""
    gw = gateway_of(request)
    ctx = RequestContext(endpoint=endpoint, model=None, stream=False, payload={})
    given_id = _request_id(request.scope)
    if given_id:
        ctx.request_id = given_id
    stream_reports = False  # a streamed answer calls `request_finished` itself when it ends
    try:
        await gw.policy.admit(request, ctx)  # who asks comes first: a bad key is a 401, whatever the body
        body, payload = await read_json_body(request)
        model = payload.get("model")
        if model is not None and not isinstance(model, str):
            raise APIError(400, "'model' must be a string", "invalid_model")
        ctx.model, ctx.stream, ctx.payload = model, payload.get("stream") is True, payload
        candidates = gw.registry.candidates(model, need_of(endpoint, payload))
        if ctx.stream and endpoint != "embeddings":
            body = _with_stream_usage(body, payload, ctx)
        response = await _forward_with_retry(gw, candidates, path, body, ctx)
        stream_reports = isinstance(response, StreamedAnswer)
    except APIError as e:
        ctx.status = e.status
        response = e.response()
    except asyncio.CancelledError:
        ctx.disconnected = True
        raise
    finally:
        if not stream_reports:
            await gw.request_finished(ctx)
    response.raw_headers.append((b"x-request-id", ctx.request_id.encode()))
    if ctx.headers:  # set by the policy and never by the backend, so appending cannot duplicate
        response.raw_headers.extend((k.encode(), v.encode()) for k, v in ctx.headers.items())
    return response


async def _forward_with_retry(gw: Gateway, candidates: list[Target], path: str, body: bytes,
                              ctx: RequestContext) -> Response:
    """Forward to the least busy candidate; if it cannot even be reached, once more to the next."""
    for attempt, target in enumerate(candidates[:2]):
        gw.registry.begin(target)
        ctx.target = target
        try:
            return await forward(gw.upstream, target, path, body, ctx, gw.request_finished)
        except APIError as e:
            if e.code != "backend_unavailable" or attempt == 1 or len(candidates) < 2:
                raise  # ctx.target stays counted: request_finished releases it
            gw.registry.end(target)
            ctx.target = None
            log.warning("request %s: %s unreachable, retrying on %s", ctx.request_id, target.label,
                        candidates[1].label)
    raise AssertionError("unreachable")


def _request_id(scope: Scope) -> str | None:
    """The client's own X-Request-ID, when it sent a sensible one."""
    for name, value in scope["headers"]:
        if name == b"x-request-id":
            text = value.decode("latin-1")
            return text if _SAFE_ID.fullmatch(text) else None
    return None


def _with_request_id(send: Send, request_id: str) -> Send:
    async def sender(message: Message) -> None:
        if message["type"] == "http.response.start":
            message["headers"] = [*message.get("headers", ()), (b"x-request-id", request_id.encode())]
        await send(message)
    return sender


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
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route = PROXIED.get(scope["path"]) if scope["method"] == "POST" else None
        if route is None:
            return await self.app(scope, receive, _with_request_id(send, _request_id(scope) or new_request_id()))
        scope["app"] = self.app
        try:
            response = await _proxy(Request(scope, receive), *route)
        except Exception:
            log.exception("unhandled error in %s", scope["path"])
            response = APIError(500, "internal error in the gateway", "internal_error").response()
        await response(scope, receive, send)


def model_list(gw: Gateway) -> dict[str, Any]:
    """Every model a client can name, once each, in OpenAI's list shape plus type, capabilities,
    state and the backends that serve it."""
    models: dict[str, dict[str, Any]] = {}
    for t in gw.registry.targets():
        backend = t.key
        if t.model_id in models:
            models[t.model_id]["backends"].append(backend)
            continue
        models[t.model_id] = {
            "id": t.model_id,
            "object": "model",
            "created": _STARTED,
            "owned_by": "llm-gateway" if t.slot else t.upstream,
            "type": t.model_type,
            "capabilities": list(CAPABILITIES.get(t.model_type, ())),
            "backend": backend,
            "backends": [backend],
            "state": t.slot.state.value if t.slot else "remote",
        }
    return {"object": "list", "data": list(models.values())}


async def list_models(request: Request) -> Response:
    caller(request)
    return json_response(model_list(gateway_of(request)))


async def get_model(request: Request) -> Response:
    """`GET /v1/models/{id}` (the SDK's `models.retrieve`); ids may contain slashes, as upstream ones often do."""
    caller(request)
    wanted = request.path_params["model_id"]
    for model in model_list(gateway_of(request))["data"]:
        if model["id"] == wanted:
            return json_response(model)
    raise APIError(404, f"The model '{wanted}' does not exist", "model_not_found")


routes = [
    Route("/v1/models", list_models, methods=["GET"]),
    Route("/v1/models/{model_id:path}", get_model, methods=["GET"]),
    *(Route(path, proxied, methods=["POST"]) for path in PROXIED),
]
