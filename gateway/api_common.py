"""What the admin, user and public routes share: reaching the gateway, who is asking, usage windows."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from .errors import APIError
from .keys import key_from_headers
from .storage import ApiKey, UsageQuery, User

MAX_BODY_BYTES = 64 * 1024 * 1024  # base64 images and audio make bodies large, but not unbounded

if TYPE_CHECKING:
    from .app import Gateway


def json_response(data: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(data), status_code=status, media_type="application/json")


def gateway_of(request: Request) -> Gateway:
    return request.app.state.gateway  # type: ignore[no-any-return]


def caller(request: Request) -> tuple[User, ApiKey | None]:
    """The user behind the request's key: 401 without a valid key, 403 when disabled."""
    return gateway_of(request).accounts.authenticate(key_from_headers(request.headers))


def require_admin(request: Request) -> User:
    user, _ = caller(request)
    if user.tier != "admin":
        raise APIError(403, "This route needs an admin key.", "not_admin")
    return user


async def read_body(request: Request) -> bytes:
    """The whole body, refused with a 413 as soon as it is known to be over MAX_BODY_BYTES: from its
    Content-Length, or while reading a chunked one (never held in memory past the limit)."""
    too_large = APIError(413, f"request body is larger than {MAX_BODY_BYTES // 2**20} MiB", "request_too_large")
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > MAX_BODY_BYTES:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise too_large
        chunks.append(chunk)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def parse_json_object(body: bytes) -> dict[str, Any]:
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError as e:
        raise APIError(400, f"We could not parse the JSON body of your request: {e}", "invalid_json") from e
    if not isinstance(payload, dict):
        raise APIError(400, "The request body must be a JSON object", "invalid_json")
    return payload


async def read_json_body(request: Request) -> tuple[bytes, dict[str, Any]]:
    body = await read_body(request)
    return body, parse_json_object(body)


async def json_object(request: Request) -> dict[str, Any]:
    return (await read_json_body(request))[1]


def _instant(value: str, name: str) -> float:
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise APIError(400, f"{name} must be an ISO 8601 time such as 2026-01-31T12:00:00Z", "invalid_time") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def usage_query(request: Request, user_id: int | None = None) -> UsageQuery:
    """`last_hours`, or `start_time`/`end_time` (ISO 8601, inclusive); both kinds at once is a 400."""
    params = request.query_params
    last_hours = params.get("last_hours")
    start, end = params.get("start_time"), params.get("end_time")
    by_model = params.get("by_model", "").lower() in ("1", "true", "yes")
    if last_hours is not None and (start or end):
        raise APIError(400, "Use last_hours or start_time/end_time, not both.", "conflicting_window")
    query = UsageQuery(user_id=user_id, by_model=by_model)
    if last_hours is not None:
        try:
            hours = float(last_hours)
        except ValueError:
            hours = -1
        if not hours > 0:
            raise APIError(400, "last_hours must be a number greater than 0", "invalid_window")
        query.start = time.time() - hours * 3600
    if start:
        query.start = _instant(start, "start_time")
    if end:
        query.end = _instant(end, "end_time")
    if query.start is not None and query.end is not None and query.start > query.end:
        raise APIError(400, "start_time is after end_time", "invalid_window")
    return query
