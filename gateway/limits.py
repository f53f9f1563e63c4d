"""Request limits: a per-user sliding window of requests per minute, and a global in-flight cap.

Both live in the event loop's thread and never await between checking and taking, so they are
exact under any concurrency without locks.
"""

from __future__ import annotations

import asyncio
import collections
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from .errors import APIError

WINDOW_S = 60.0


@dataclass(frozen=True)
class RateStatus:
    limit: int | None  # None: unlimited
    remaining: int | None
    reset_s: float  # until the oldest request in the window leaves it

    def headers(self) -> dict[str, str]:
        if self.limit is None:
            return {}
        return {"x-ratelimit-limit-requests": str(self.limit),
                "x-ratelimit-remaining-requests": str(self.remaining),
                "x-ratelimit-reset-requests": f"{self.reset_s:.3f}s"}


class RateLimiter:
    """Sliding-window log: a user may start `limit` requests in any `window_s` seconds."""

    def __init__(self, window_s: float = WINDOW_S, clock: Callable[[], float] = time.monotonic) -> None:
        self.window_s = window_s
        self._clock = clock
        self._log: dict[object, collections.deque[float]] = collections.defaultdict(collections.deque)

    def _window(self, who: object, now: float) -> collections.deque[float]:
        log = self._log[who]
        while log and log[0] <= now - self.window_s:
            log.popleft()
        return log

    def status(self, who: object, limit: int | None) -> RateStatus:
        if limit is None:
            return RateStatus(None, None, 0.0)
        now = self._clock()
        log = self._window(who, now)
        reset = (log[0] + self.window_s - now) if log else 0.0
        return RateStatus(limit, max(0, limit - len(log)), max(0.0, reset))

    def take(self, who: object, limit: int | None, what: str = "requests per minute") -> RateStatus:
        """Count one request, or raise 429 `rate_limit_exceeded` with Retry-After."""
        if limit is None:
            return RateStatus(None, None, 0.0)
        now = self._clock()
        log = self._window(who, now)
        if len(log) >= limit:
            reset = max(0.0, log[0] + self.window_s - now)
            raise APIError(429, f"Rate limit reached: {limit} {what}. Try again in {reset:.1f}s.",
                           "rate_limit_exceeded", headers={"Retry-After": str(max(1, math.ceil(reset)))})
        log.append(now)
        return RateStatus(limit, limit - len(log), log[0] + self.window_s - now)


class ConcurrencyGate:
    """At most `limit` requests in flight to the backends; up to `max_queue` more wait their turn.

    `limit` 0 means unlimited. A request that waits longer than `queue_timeout` seconds, or finds
    the queue full, is refused with 503.
    """

    def __init__(self, limit: int, max_queue: int = 100, queue_timeout: float = 30.0) -> None:
        self.limit = limit
        self.max_queue = max_queue
        self.queue_timeout = queue_timeout
        self.in_flight = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    @property
    def queued(self) -> int:
        return len(self._waiters)

    async def acquire(self) -> None:
        if self.limit <= 0:
            self.in_flight += 1
            return
        if self.in_flight < self.limit and not self._waiters:
            self.in_flight += 1
            return
        if len(self._waiters) >= self.max_queue:
            raise APIError(503, f"The gateway is at capacity ({self.limit} requests in flight, "
                                f"{len(self._waiters)} waiting). Try again shortly.", "server_overloaded",
                           headers={"Retry-After": "1"})
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await asyncio.wait_for(asyncio.shield(waiter), self.queue_timeout)
        except (TimeoutError, asyncio.CancelledError) as e:
            if waiter.done() and not waiter.cancelled():
                self.release()  # the turn came just as we gave up: pass it on
            else:
                waiter.cancel()
                self._waiters.remove(waiter)
            if isinstance(e, TimeoutError):
                raise APIError(503, f"The gateway is at capacity: waited {self.queue_timeout:g}s for one of "
                                    f"{self.limit} backend slots.", "server_overloaded",
                               headers={"Retry-After": "1"}) from None
            raise

    def release(self) -> None:
        """Hand the freed place to the longest waiter, or give it back."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # in_flight stays: the place moves to the waiter
                return
        self.in_flight -= 1
