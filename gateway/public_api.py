"""Routes without a key: /health, /api/models, /api/uptime, POST /api/signup (rate-limited per IP)."""

from __future__ import annotations

import time
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from .accounts import check_username
from .api_common import gateway_of, json_object, json_response
from .errors import APIError
from .openai_api import model_list

UPTIME_WINDOW_S = 24 * 3600


async def health(request: Request) -> Response:
    gw = gateway_of(request)
    slots = {str(s.port): s.state.value for s in gw.supervisor.slots.values()}
    return json_response({"status": "ok", "slots": slots})


async def models(request: Request) -> Response:
    return json_response(model_list(gateway_of(request)))


async def uptime(request: Request) -> Response:
    """The gateway's and each slot's current state and their up/down history of the last 24 hours."""
    gw = gateway_of(request)
    now = time.time()
    history: dict[str, list[dict[str, Any]]] = {}
    for ts, component, state in await gw.storage.uptime_events(now - UPTIME_WINDOW_S):
        history.setdefault(component, []).append({"time": ts, "state": state})
    components = {"gateway": {"state": "up", "since": gw.started_at, "uptime_s": round(now - gw.started_at, 1)}}
    for slot in gw.supervisor.slots.values():
        components[f"slot:{slot.port}"] = {"state": slot.state.value, "model": slot.config.display_name,
                                           "uptime_s": slot.status()["uptime_s"], "restarts": slot.restarts}
    return json_response({"now": now, "components": components, "history": history})


async def signup(request: Request) -> Response:
    gw = gateway_of(request)
    ip = request.client.host if request.client else "unknown"
    gw.signup_limiter.take(ip, gw.config.signups_per_hour or None, what="signup requests per hour")
    payload = await json_object(request)
    username = check_username(payload.get("username"))
    email, message = payload.get("email"), payload.get("message")
    for name, value in (("email", email), ("message", message)):
        if value is not None and (not isinstance(value, str) or len(value) > 2000):
            raise APIError(400, f"{name} must be a string of at most 2000 characters", f"invalid_{name}")
    if username in gw.accounts.by_name:
        raise APIError(409, f"the username '{username}' is taken", "user_exists")
    signup_id = await gw.storage.add_signup(username, email, message, ip)
    return json_response({"id": signup_id, "status": "pending",
                          "message": "Thanks! An administrator will review your request."}, 202)


routes = [
    Route("/health", health, methods=["GET"]),
    Route("/api/models", models, methods=["GET"]),
    Route("/api/uptime", uptime, methods=["GET"]),
    Route("/api/signup", signup, methods=["POST"]),
]
