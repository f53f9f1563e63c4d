"""Users and API keys: held in memory for the request path, persisted through `Storage`.

The in-memory copy is authoritative while the gateway runs (balances are charged there at once and
written in batches); when another process changes the database (the CLI), the copy is reloaded.
The admin key from config (or LLM_GATEWAY_ADMIN_KEY) authenticates as the `admin` user.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from typing import Any

from .errors import APIError
from .keys import hash_key, new_key, same_hash, visible_prefix
from .storage import TIERS, ApiKey, Storage, StorageConflict, User
from .usage import UsageRecorder

log = logging.getLogger("gateway.accounts")
ADMIN_USERNAME = "admin"
USERNAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")


def check_username(username: Any) -> str:
    if not isinstance(username, str) or not USERNAME_RE.match(username):
        raise APIError(400, "username must be 1-64 letters, digits, '_', '.', '@' or '-'", "invalid_username")
    return username


def check_tier(tier: Any) -> str:
    if tier not in TIERS:
        raise APIError(400, f"tier must be one of {', '.join(TIERS)}", "invalid_tier")
    return str(tier)


def check_amount(value: Any, name: str, allow_none: bool = False) -> float | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or value != value or value < 0:
        raise APIError(400, f"{name} must be a number >= 0" + (" or null" if allow_none else ""), f"invalid_{name}")
    return float(value)


class Accounts:
    def __init__(self, storage: Storage, recorder: UsageRecorder, admin_key: str | None) -> None:
        self.storage = storage
        self.recorder = recorder
        self._admin_key_hash = hash_key(admin_key) if admin_key else None
        self.users: dict[int, User] = {}
        self.by_name: dict[str, User] = {}
        self.keys: dict[str, ApiKey] = {}  # by hash
        self._watch: asyncio.Task[None] | None = None

    async def load(self) -> None:
        users = await self.storage.load_users()
        if self._admin_key_hash and not any(u.username == ADMIN_USERNAME for u in users):
            users.append(await self.storage.create_user(ADMIN_USERNAME, "admin", 0.0, None))
        pending = self.recorder.pending_charges()
        for user in users:  # charges not yet written are still owed
            if user.id in pending:
                user.balance -= pending[user.id].balance
                if user.credits is not None:
                    user.credits -= pending[user.id].credits
        # Update the User objects in place: requests in flight hold them and charge them when done.
        current = {}
        for fresh in users:
            user = self.users.get(fresh.id, fresh)
            if user is not fresh:
                user.__dict__.update(fresh.__dict__)
            current[user.id] = user
        self.users = current
        self.by_name = {u.username: u for u in current.values()}
        self.keys = {k.key_hash: k for k in await self.storage.load_keys()}

    def start_watching(self, interval: float = 2.0) -> None:
        """Reload when another process (the CLI) changed the database."""
        async def watch() -> None:
            while True:
                await asyncio.sleep(interval)
                try:
                    if await self.storage.changed_elsewhere():
                        log.info("database changed by another process: reloading users and keys")
                        await self.load()
                except Exception:
                    log.exception("reloading accounts failed")
        self._watch = asyncio.create_task(watch(), name="accounts-watch")

    async def stop_watching(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch

    # --- the request path -------------------------------------------------------------------
    def authenticate(self, key: str | None) -> tuple[User, ApiKey | None]:
        """The user behind `key`, or 401 (missing/unknown) / 403 (disabled)."""
        if not key:
            raise APIError(401, "You didn't provide an API key. Send it as 'Authorization: Bearer KEY' "
                                "(or an 'api-key' / 'x-api-key' header).", "missing_api_key")
        digest = hash_key(key)
        if self._admin_key_hash is not None and same_hash(digest, self._admin_key_hash):
            return self.by_name[ADMIN_USERNAME], None
        # Looked up by SHA-256 of a 256-bit random key: lookup timing can tell nothing about a valid key.
        found = self.keys.get(digest)
        if found is None:
            raise APIError(401, f"Incorrect API key provided: {visible_prefix(key)}...", "invalid_api_key")
        user = self.users.get(found.user_id)
        if user is None:
            raise APIError(401, "Incorrect API key provided", "invalid_api_key")
        if found.disabled:
            raise APIError(403, f"The API key {found.prefix}... is disabled", "key_disabled")
        if user.disabled:
            raise APIError(403, f"The account '{user.username}' is disabled", "user_disabled")
        return user, found

    # --- administration -----------------------------------------------------------------------
    def user(self, username: str) -> User:
        user = self.by_name.get(username)
        if user is None:
            raise APIError(404, f"no user named '{username}'", "user_not_found")
        return user

    def keys_of(self, user: User) -> list[ApiKey]:
        return sorted((k for k in self.keys.values() if k.user_id == user.id), key=lambda k: k.created_at)

    async def create_user(self, username: str, tier: str, balance: float = 0.0,
                          credits: float | None = None) -> tuple[User, str]:
        check_username(username)
        check_tier(tier)
        if username in self.by_name:
            raise APIError(409, f"a user named '{username}' already exists", "user_exists")
        try:
            user = await self.storage.create_user(username, tier, balance, credits)
        except StorageConflict:
            raise APIError(409, f"a user named '{username}' already exists", "user_exists") from None
        self.users[user.id] = user
        self.by_name[username] = user
        return user, await self.add_key(user)

    async def add_key(self, user: User) -> str:
        """A new key for `user`; the plaintext is returned here and never again."""
        key = new_key()
        record = await self.storage.add_key(user.id, hash_key(key), visible_prefix(key))
        self.keys[record.key_hash] = record
        return key

    def key_by_prefix(self, prefix: str) -> ApiKey:
        for record in self.keys.values():
            if record.prefix == prefix:
                return record
        raise APIError(404, f"no API key starting with '{prefix}'", "key_not_found")

    async def set_key_disabled(self, prefix: str, disabled: bool) -> ApiKey:
        record = self.key_by_prefix(prefix)
        await self.storage.set_key_disabled(record.id, disabled)
        record.disabled = disabled
        return record

    async def update_user(self, user: User, **fields: Any) -> User:
        """Set tier, balance, credits or disabled. Pending charges are written first, so an
        absolute balance set here is not then reduced by requests that finished before it."""
        if "tier" in fields:
            check_tier(fields["tier"])
        if "balance" in fields:
            check_amount(fields["balance"], "balance")
        if "credits" in fields:
            check_amount(fields["credits"], "credits", allow_none=True)
        await self.recorder.flush()
        await self.storage.update_user(user.id, **fields)
        for name, value in fields.items():
            setattr(user, name, value)
        return user

    async def delete_user(self, user: User) -> None:
        if user.username == ADMIN_USERNAME and self._admin_key_hash:
            raise APIError(400, "the admin user belongs to the configured admin key and cannot be deleted",
                           "cannot_delete_admin")
        await self.recorder.flush()
        await self.storage.delete_user(user.id)
        self.users.pop(user.id, None)
        self.by_name.pop(user.username, None)
        self.keys = {h: k for h, k in self.keys.items() if k.user_id != user.id}

    def describe(self, user: User) -> dict[str, Any]:
        return {**user.public(), "keys": [k.public() for k in self.keys_of(user)]}
