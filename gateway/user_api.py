"""Routes for a user's own key: /user/api/me, /usage, /models, /ratelimit."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from .api_common import caller, gateway_of, json_response, usage_query
from .openai_api import model_list


async def me(request: Request) -> Response:
    user, key = caller(request)
    gw = gateway_of(request)
    return json_response({**gw.accounts.describe(user), "key_prefix": key.prefix if key else None})


async def usage(request: Request) -> Response:
    user, _ = caller(request)
    rows = await gateway_of(request).storage.usage_summary(usage_query(request, user_id=user.id))
    return json_response({"usage": rows[0] if rows else {"username": user.username, "requests": 0}})


async def models(request: Request) -> Response:
    caller(request)
    return json_response(model_list(gateway_of(request)))


async def ratelimit(request: Request) -> Response:
    user, _ = caller(request)
    gw = gateway_of(request)
    limit = gw.policy.rate_limit(user)
    status = gw.limiter.status(user.id, limit)
    return json_response({"limit_per_minute": status.limit, "remaining": status.remaining,
                          "reset_s": round(status.reset_s, 3), "window_s": gw.limiter.window_s})


routes = [
    Route("/user/api/me", me, methods=["GET"]),
    Route("/user/api/usage", usage, methods=["GET"]),
    Route("/user/api/models", models, methods=["GET"]),
    Route("/user/api/ratelimit", ratelimit, methods=["GET"]),
]
