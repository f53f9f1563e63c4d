"""What the gateway keeps: users, API keys, usage rows, signup requests, uptime events.

`Storage` is the interface request handling depends on; `sqlite_storage.SQLiteStorage` is the
implementation. A PostgreSQL backend implements the same methods and nothing else changes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

TIERS = ("payg", "sub", "admin")


class StorageConflict(Exception):
    """A write that would break a uniqueness rule (a username or key that already exists)."""


@dataclass
class User:
    id: int
    username: str
    tier: str
    balance: float = 0.0
    credits: float | None = None  # None: credits are not used for this user
    disabled: bool = False
    created_at: float = 0.0

    def public(self) -> dict[str, Any]:
        return {"username": self.username, "tier": self.tier, "balance": round(self.balance, 10),
                "credits": self.credits, "disabled": self.disabled, "created_at": self.created_at}


@dataclass
class ApiKey:
    id: int
    user_id: int
    key_hash: str
    prefix: str  # the first characters of the key, shown in listings; never enough to use it
    disabled: bool = False
    created_at: float = 0.0
    last_used_at: float | None = None

    def public(self) -> dict[str, Any]:
        return {"prefix": self.prefix, "disabled": self.disabled, "created_at": self.created_at,
                "last_used_at": self.last_used_at}


@dataclass
class UsageRow:
    ts: float
    user_id: int | None
    username: str
    key_prefix: str | None
    endpoint: str
    model: str | None
    backend: str | None
    input_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0
    latency_ms: float = 0.0
    ttft_ms: float | None = None
    status: int = 200
    cost: float = 0.0


@dataclass
class Charge:
    """What a batch of requests takes from one user: added to the stored values, never overwriting."""

    balance: float = 0.0
    credits: float = 0.0


@dataclass
class SignupRequest:
    id: int
    username: str
    email: str | None
    message: str | None
    ip: str | None
    created_at: float
    status: str = "pending"  # pending, approved, rejected
    decided_at: float | None = None


@dataclass
class UsageQuery:
    start: float | None = None  # unix seconds, inclusive
    end: float | None = None  # unix seconds, inclusive
    user_id: int | None = None
    by_model: bool = False


class Storage(Protocol):
    async def open(self) -> None: ...
    async def close(self) -> None: ...
    async def changed_elsewhere(self) -> bool: ...

    async def load_users(self) -> list[User]: ...
    async def load_keys(self) -> list[ApiKey]: ...
    async def create_user(self, username: str, tier: str, balance: float, credits: float | None) -> User: ...
    async def update_user(self, user_id: int, **fields: Any) -> None: ...
    async def delete_user(self, user_id: int) -> None: ...
    async def add_key(self, user_id: int, key_hash: str, prefix: str) -> ApiKey: ...
    async def set_key_disabled(self, key_id: int, disabled: bool) -> None: ...

    async def record_usage(self, rows: list[UsageRow], charges: dict[int, Charge],
                           key_last_used: dict[int, float]) -> None: ...
    async def usage_summary(self, query: UsageQuery) -> list[dict[str, Any]]: ...

    async def add_signup(self, username: str, email: str | None, message: str | None, ip: str | None) -> int: ...
    async def list_signups(self, status: str | None) -> list[SignupRequest]: ...
    async def get_signup(self, signup_id: int) -> SignupRequest | None: ...
    async def decide_signup(self, signup_id: int, status: str) -> SignupRequest | None: ...

    async def add_uptime_event(self, ts: float, component: str, state: str) -> None: ...
    async def uptime_events(self, since: float) -> list[tuple[float, str, str]]: ...
