"""Usage accounting: what a request cost, and writing usage rows in the background, in batches.

Rows and the balance/credit charges they imply are queued in memory and written in one
transaction every `interval` seconds, so the request path never waits for the disk; `stop()`
writes whatever is still queued, so a graceful shutdown loses nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import defaultdict
from typing import Any

from .config import Price
from .storage import Charge, Storage, UsageRow

log = logging.getLogger("gateway.usage")


def token_counts(usage: dict[str, Any] | None) -> tuple[int, int, int]:
    """(input, output, cached) tokens from an OpenAI `usage` object."""
    if not usage:
        return 0, 0, 0
    details = usage.get("prompt_tokens_details") or {}
    return (int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0),
            int(details.get("cached_tokens") or 0))


def request_cost(price: Price, input_tokens: int, output_tokens: int, cached_tokens: int) -> float:
    """Cached prompt tokens are billed at half the input price."""
    cached = min(cached_tokens, input_tokens)
    return ((input_tokens - cached) / 1000 * price.input_per_1k + cached / 1000 * price.input_per_1k / 2
            + output_tokens / 1000 * price.output_per_1k)


class UsageRecorder:
    def __init__(self, storage: Storage, interval: float = 0.5, max_batch: int = 500) -> None:
        self.storage = storage
        self.interval = interval
        self.max_batch = max_batch
        self._rows: list[UsageRow] = []
        self._charges: dict[int, Charge] = defaultdict(Charge)
        self._key_used: dict[int, float] = {}
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="usage-writer")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.flush()

    def add(self, row: UsageRow, key_id: int | None, balance: float = 0.0, credits: float = 0.0) -> None:
        self._rows.append(row)
        if row.user_id is not None and (balance or credits):
            charge = self._charges[row.user_id]
            charge.balance += balance
            charge.credits += credits
        if key_id is not None:
            self._key_used[key_id] = row.ts
        if len(self._rows) >= self.max_batch:
            self._wake.set()

    @property
    def pending(self) -> int:
        return len(self._rows)

    def pending_charges(self) -> dict[int, Charge]:
        """Charges taken in memory but not yet written, per user id."""
        return dict(self._charges)

    async def flush(self) -> None:
        if not (self._rows or self._charges or self._key_used):
            return
        rows, charges, used = self._rows, dict(self._charges), self._key_used
        self._rows, self._charges, self._key_used = [], defaultdict(Charge), {}
        try:
            await self.storage.record_usage(rows, charges, used)
        except Exception:
            log.exception("writing %d usage rows failed; keeping them for the next try", len(rows))
            self._rows[:0] = rows
            for user_id, c in charges.items():
                self._charges[user_id].balance += c.balance
                self._charges[user_id].credits += c.credits
            self._key_used = {**used, **self._key_used}
            raise

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.interval)
            self._wake.clear()
            with contextlib.suppress(Exception):  # logged in flush; retried next round
                await self.flush()
