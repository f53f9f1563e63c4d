"""The seam where authentication, limits and usage accounting plug into the request path.

Every OpenAI route builds a `RequestContext`, asks the policy to `admit` it before anything is
forwarded (raise `APIError` to refuse) and then calls `finished` exactly once, whatever happened:
refused, failed, answered, streamed to the end or cut off by the client. By then the context holds
the status and the backend's token usage. The proxy never changes for it.
"""

from __future__ import annotations

import itertools
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from starlette.requests import Request

from .targets import Endpoint, Target

_ID_PREFIX = secrets.token_hex(8)  # differs per gateway run...
_ID_COUNTER = itertools.count()  # ...and a counter within it: unique without a syscall per request


def new_request_id() -> str:
    return f"{_ID_PREFIX}{next(_ID_COUNTER):016x}"


@dataclass
class RequestContext:
    endpoint: Endpoint
    model: str | None
    stream: bool
    payload: dict[str, Any]
    started: float = field(default_factory=time.perf_counter)
    request_id: str = field(default_factory=lambda: new_request_id())
    target: Target | None = None  # where it went; counted in the registry's in-flight load until finished
    principal: Any = None  # who is asking; set by an authenticating policy
    admitted: bool = False  # the policy let it through (and may hold resources for it)
    headers: dict[str, str] = field(default_factory=dict)  # added to the response, refusals included
    status: int = 0
    usage: dict[str, Any] | None = None  # the backend's `usage` object, when it sent one
    first_byte_at: float | None = None
    disconnected: bool = False
    strip_usage_chunk: bool = False  # usage was asked of the backend for us, not by the client
    streamed_events: int = 0  # SSE events relayed: what a stream cut short is billed by

    @property
    def latency_s(self) -> float:
        return time.perf_counter() - self.started

    @property
    def ttft_s(self) -> float | None:
        """Time to the first streamed byte; None for answers that were not streamed."""
        return self.first_byte_at - self.started if self.stream and self.first_byte_at is not None else None


class RequestPolicy(Protocol):
    async def admit(self, request: Request, ctx: RequestContext) -> None: ...
    async def finished(self, ctx: RequestContext) -> None: ...
