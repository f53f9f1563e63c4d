"""The accounts `RequestPolicy`: who is asking, may they, and what did it cost.

admit:    key -> user (401/403), balance and credits (429 insufficient_quota), requests per minute
          (429 rate_limit_exceeded), then a place among the requests in flight (503 when full).
finished: releases what admit took, prices the tokens, charges the user in memory at once and
          queues the usage row for the background writer.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from starlette.requests import Request

from .accounts import Accounts
from .config import Config
from .errors import APIError
from .keys import key_from_headers
from .limits import ConcurrencyGate, RateLimiter
from .policy import RequestContext
from .storage import ApiKey, UsageRow, User
from .usage import UsageRecorder, request_cost, token_counts

CLIENT_CLOSED = 499  # nginx's status for "the client went away first"


@dataclass
class Principal:
    user: User
    key: ApiKey | None  # None for the configured admin key
    reserved_credits: float = 0.0


class AccountPolicy:
    def __init__(self, config: Config, accounts: Accounts, recorder: UsageRecorder,
                 limiter: RateLimiter, gate: ConcurrencyGate) -> None:
        self.config = config
        self.accounts = accounts
        self.recorder = recorder
        self.limiter = limiter
        self.gate = gate

    def rate_limit(self, user: User) -> int | None:
        return None if user.tier == "admin" else self.config.rate_limits.get(user.tier)

    async def admit(self, request: Request, ctx: RequestContext) -> None:
        user, key = self.accounts.authenticate(key_from_headers(request.headers))
        principal = Principal(user, key)
        ctx.principal = principal
        limit = self.rate_limit(user)
        credit_cost = self.config.credit_costs.get(user.tier, 1.0) if user.credits is not None else 0.0
        try:
            if user.tier == "payg" and user.balance <= 0:
                raise APIError(429, f"Your balance is used up ({user.balance:.6f}). Ask an administrator to "
                                    "add funds.", "insufficient_quota")
            if credit_cost > 0 and (user.credits or 0) < credit_cost:
                raise APIError(429, f"You have no credits left ({user.credits:g}).", "insufficient_quota")
            ctx.headers = self.limiter.take(user.id, limit).headers()
        except APIError:
            ctx.headers = self.limiter.status(user.id, limit).headers()  # refusals carry them too
            raise
        await self.gate.acquire()
        # Nothing below can fail: what was taken is given back in `finished`.
        ctx.admitted = True
        if credit_cost > 0:
            assert user.credits is not None
            user.credits -= credit_cost  # reserved now, so concurrent requests cannot overdraw
            principal.reserved_credits = credit_cost

    async def finished(self, ctx: RequestContext) -> None:
        principal: Principal | None = ctx.principal
        if ctx.admitted:
            self.gate.release()
        if principal is None:
            return  # unknown key: nobody to account to
        user = principal.user
        if ctx.disconnected:
            ctx.status = CLIENT_CLOSED
        input_tokens, output_tokens, cached_tokens = token_counts(ctx.usage)  # estimated for cut-off streams
        served = 200 <= ctx.status < 300 or (ctx.disconnected and output_tokens > 0)
        credits = principal.reserved_credits
        if credits and not served and user.credits is not None:
            user.credits += credits  # refund: nothing was served
            credits = 0.0
        cost = 0.0
        if user.tier == "payg" and served:
            price = self.config.pricing.for_model(ctx.target.model_id if ctx.target else ctx.model)
            cost = request_cost(price, input_tokens, output_tokens, cached_tokens)
            user.balance -= cost
        self.recorder.add(UsageRow(
            ts=time.time(), user_id=user.id, username=user.username,
            key_prefix=principal.key.prefix if principal.key else None,
            endpoint=ctx.endpoint, model=ctx.target.model_id if ctx.target else ctx.model,
            backend=ctx.target.label if ctx.target else None, input_tokens=input_tokens,
            output_tokens=output_tokens, cached_tokens=cached_tokens, latency_ms=ctx.latency_s * 1000,
            ttft_ms=None if ctx.ttft_s is None else ctx.ttft_s * 1000,
            status=ctx.status, cost=cost,
        ), principal.key.id if principal.key else None, balance=cost, credits=credits)

