"""The OpenAI-compatible routes: /v1/models, /v1/chat/completions, /v1/completions, /v1/embeddings."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from .errors import APIError
from .policy import RequestContext
from .proxy import forward, json_response
from .targets import Endpoint

if TYPE_CHECKING:
    from .app import Gateway

log = logging.getLogger("gateway")
MAX_BODY_BYTES = 64 * 1024 * 1024  # base64 images and audio make bodies large, but not unbounded
_STARTED = int(time.time())


def _gateway(request: Request) -> Gateway:
    return request.app.state.gateway  # type: ignore[no-any-return]


async def read_json_body(request: Request) -> tuple[bytes, dict[str, Any]]:
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > MAX_BODY_BYTES:
        raise APIError(413, f"request body is larger than {MAX_BODY_BYTES // 2**20} MiB", "request_too_large")
    body = await request.body()
    if len(body) > MAX_BODY_BYTES:
        raise APIError(413, f"request body is larger than {MAX_BODY_BYTES // 2**20} MiB", "request_too_large")
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError as e:
        raise APIError(400, f"We could not parse the JSON body of your request: {e}", "invalid_json") from e
    if not isinstance(payload, dict):
        raise APIError(400, "The request body must be a JSON object", "invalid_json")
    return body, payload


async def _proxy(request: Request, endpoint: Endpoint, path: str) -> Response:
    gw = _gateway(request)
    body, payload = await read_json_body(request)
    model = payload.get("model")
    if model is not None and not isinstance(model, str):
        raise APIError(400, "'model' must be a string", "invalid_model")
    ctx = RequestContext(endpoint=endpoint, model=model, stream=payload.get("stream") is True, payload=payload)
    await gw.policy.admit(request, ctx)
    target = gw.registry.resolve(model, endpoint)
    return await forward(gw.upstream, target, path, body, ctx, gw.policy.finished)


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
        except APIError as e:
            response = e.response()
        except Exception:
            log.exception("unhandled error in %s", scope["path"])
            response = APIError(500, "internal error in the gateway", "internal_error").response()
        await response(scope, receive, send)


async def list_models(request: Request) -> Response:
    gw = _gateway(request)
    data = []
    for t in gw.registry.targets():
        data.append({
            "id": t.model_id,
            "object": "model",
            "created": _STARTED,
            "owned_by": "llm-gateway" if t.slot else t.upstream,
            "type": t.model_type,
            "backend": f"slot:{t.slot.port}" if t.slot else f"upstream:{t.upstream}",
            "state": t.slot.state.value if t.slot else "remote",
        })
    return json_response({"object": "list", "data": data})


routes = [
    Route("/v1/models", list_models, methods=["GET"]),
    *(Route(path, proxied, methods=["POST"]) for path in PROXIED),
]
