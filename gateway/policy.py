"""The seam where authentication, limits and usage accounting plug into the request path.

Every OpenAI route builds a `RequestContext`, asks the policy to `admit` it before anything is
forwarded (raise `APIError` to refuse) and tells the policy when it is `finished`, with the
backend's token usage, even for streams and client disconnects. The proxy never changes for it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from starlette.requests import Request

from .targets import Endpoint, Target


@dataclass
class RequestContext:
    endpoint: Endpoint
    model: str | None
    stream: bool
    payload: dict[str, Any]
    started: float = field(default_factory=time.perf_counter)
    target: Target | None = None
    principal: Any = None  # who is asking; set by an authenticating policy
    status: int = 0
    usage: dict[str, Any] | None = None  # the backend's `usage` object, when it sent one
    first_byte_at: float | None = None
    disconnected: bool = False

    @property
    def latency_s(self) -> float:
        return time.perf_counter() - self.started


class RequestPolicy(Protocol):
    async def admit(self, request: Request, ctx: RequestContext) -> None: ...
    async def finished(self, ctx: RequestContext) -> None: ...


class OpenPolicy:
    """Lets everything through and records nothing: the gateway before accounts exist."""

    async def admit(self, request: Request, ctx: RequestContext) -> None:
        return None

    async def finished(self, ctx: RequestContext) -> None:
        return None
