"""Admin routes for accounts (`/admin/api/...`, admin keys only): users, keys, usage, signups."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from .accounts import check_amount, check_tier
from .api_common import (
    gateway_of,
    json_object,
    json_response,
    parse_json_object,
    read_body,
    require_admin,
    usage_query,
)
from .errors import APIError


async def create_user(request: Request) -> Response:
    require_admin(request)
    payload = await json_object(request)
    balance = check_amount(payload.get("balance", 0.0), "balance")
    credits = check_amount(payload.get("credits"), "credits", allow_none=True)
    user, key = await gateway_of(request).accounts.create_user(
        payload.get("username"), payload.get("tier", "payg"), balance or 0.0, credits)  # type: ignore[arg-type]
    return json_response({"username": user.username, "tier": user.tier, "api_key": key}, 201)


async def list_users(request: Request) -> Response:
    require_admin(request)
    accounts = gateway_of(request).accounts
    return json_response({"users": [accounts.describe(u) for u in sorted(accounts.users.values(),
                                                                           key=lambda u: u.username)]})


async def get_user(request: Request) -> Response:
    require_admin(request)
    accounts = gateway_of(request).accounts
    return json_response(accounts.describe(accounts.user(request.path_params["username"])))


async def update_user(request: Request) -> Response:
    """PATCH {"tier"?, "balance"?, "credits"?, "disabled"?}"""
    require_admin(request)
    accounts = gateway_of(request).accounts
    user = accounts.user(request.path_params["username"])
    payload = await json_object(request)
    allowed = {"tier", "balance", "credits", "disabled"}
    unknown = set(payload) - allowed
    if unknown or not payload:
        raise APIError(400, f"send one or more of {', '.join(sorted(allowed))}", "invalid_fields")
    if "disabled" in payload and not isinstance(payload["disabled"], bool):
        raise APIError(400, "disabled must be true or false", "invalid_disabled")
    await accounts.update_user(user, **payload)
    return json_response(accounts.describe(user))


async def set_user_enabled(request: Request) -> Response:
    require_admin(request)
    accounts = gateway_of(request).accounts
    user = accounts.user(request.path_params["username"])
    await accounts.update_user(user, disabled=request.url.path.endswith("/disable"))
    return json_response(accounts.describe(user))


async def delete_user(request: Request) -> Response:
    require_admin(request)
    accounts = gateway_of(request).accounts
    await accounts.delete_user(accounts.user(request.path_params["username"]))
    return Response(status_code=204)


async def add_key(request: Request) -> Response:
    require_admin(request)
    accounts = gateway_of(request).accounts
    user = accounts.user(request.path_params["username"])
    key = await accounts.add_key(user)
    return json_response({"username": user.username, "api_key": key, "prefix": key[:12]}, 201)


async def set_key_enabled(request: Request) -> Response:
    require_admin(request)
    record = await gateway_of(request).accounts.set_key_disabled(
        request.path_params["prefix"], request.url.path.endswith("/disable"))
    return json_response(record.public())


async def usage(request: Request) -> Response:
    require_admin(request)
    return json_response({"usage": await gateway_of(request).storage.usage_summary(usage_query(request))})


async def list_signups(request: Request) -> Response:
    require_admin(request)
    status = request.query_params.get("status")
    signups = await gateway_of(request).storage.list_signups(status)
    return json_response({"signups": [s.__dict__ for s in signups]})


async def decide_signup(request: Request) -> Response:
    """approve (creates the user; the key is in this response only) or reject a pending request."""
    require_admin(request)
    gw = gateway_of(request)
    approve = request.url.path.endswith("/approve")
    body = await read_body(request) if approve else b""  # approving may say how: tier, balance, credits
    payload = parse_json_object(body) if body else {}
    tier = check_tier(payload.get("tier", "payg"))
    balance = check_amount(payload.get("balance", 0.0), "balance") or 0.0
    credits = check_amount(payload.get("credits"), "credits", allow_none=True)
    signup = await gw.storage.get_signup(request.path_params["signup_id"])
    if signup is None or signup.status != "pending":
        raise APIError(404, "no pending signup request with that id", "signup_not_found")
    if approve:
        user, key = await gw.accounts.create_user(signup.username, tier, balance, credits)
        await gw.storage.decide_signup(signup.id, "approved")
        return json_response({"username": user.username, "tier": user.tier, "api_key": key}, 201)
    await gw.storage.decide_signup(signup.id, "rejected")
    return json_response({"id": signup.id, "status": "rejected"})


routes = [
    Route("/admin/api/users", create_user, methods=["POST"]),
    Route("/admin/api/users", list_users, methods=["GET"]),
    Route("/admin/api/users/{username}", get_user, methods=["GET"]),
    Route("/admin/api/users/{username}", update_user, methods=["PATCH"]),
    Route("/admin/api/users/{username}", delete_user, methods=["DELETE"]),
    Route("/admin/api/users/{username}/keys", add_key, methods=["POST"]),
    *(Route(f"/admin/api/users/{{username}}/{action}", set_user_enabled, methods=["POST"], name=f"user-{action}")
      for action in ("disable", "enable")),
    *(Route(f"/admin/api/keys/{{prefix}}/{action}", set_key_enabled, methods=["POST"], name=f"key-{action}")
      for action in ("disable", "enable")),
    Route("/admin/api/usage", usage, methods=["GET"]),
    Route("/admin/api/signups", list_signups, methods=["GET"]),
    *(Route(f"/admin/api/signups/{{signup_id:int}}/{action}", decide_signup, methods=["POST"], name=f"signup-{action}")
      for action in ("approve", "reject")),
]
