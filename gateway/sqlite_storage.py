"""`Storage` on SQLite through aiosqlite: WAL mode, versioned migrations, batched usage writes.

The schema version lives in `PRAGMA user_version`; each migration runs once, in order, inside a
transaction, so a database is always at exactly one known version.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Any

import aiosqlite

from .storage import ApiKey, Charge, SignupRequest, StorageConflict, UsageQuery, UsageRow, User

MIGRATIONS: list[str] = [
    # 1: accounts, usage, signups, uptime
    """
    CREATE TABLE users (
        id INTEGER PRIMARY KEY,
        username TEXT NOT NULL UNIQUE,
        tier TEXT NOT NULL CHECK (tier IN ('payg', 'sub', 'admin')),
        balance REAL NOT NULL DEFAULT 0,
        credits REAL,
        disabled INTEGER NOT NULL DEFAULT 0,
        created_at REAL NOT NULL
    );
    CREATE TABLE api_keys (
        id INTEGER PRIMARY KEY,
        user_id INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
        key_hash TEXT NOT NULL UNIQUE,
        prefix TEXT NOT NULL UNIQUE,
        disabled INTEGER NOT NULL DEFAULT 0,
        created_at REAL NOT NULL,
        last_used_at REAL
    );
    CREATE TABLE usage_logs (
        id INTEGER PRIMARY KEY,
        ts REAL NOT NULL,
        user_id INTEGER REFERENCES users(id) ON DELETE SET NULL,
        username TEXT NOT NULL,
        key_prefix TEXT,
        endpoint TEXT NOT NULL,
        model TEXT,
        backend TEXT,
        input_tokens INTEGER NOT NULL DEFAULT 0,
        output_tokens INTEGER NOT NULL DEFAULT 0,
        cached_tokens INTEGER NOT NULL DEFAULT 0,
        latency_ms REAL,
        ttft_ms REAL,
        status INTEGER NOT NULL,
        cost REAL NOT NULL DEFAULT 0
    );
    CREATE INDEX usage_logs_ts ON usage_logs(ts);
    CREATE INDEX usage_logs_user_ts ON usage_logs(user_id, ts);
    CREATE TABLE signup_requests (
        id INTEGER PRIMARY KEY,
        username TEXT NOT NULL,
        email TEXT,
        message TEXT,
        ip TEXT,
        created_at REAL NOT NULL,
        status TEXT NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'approved', 'rejected')),
        decided_at REAL
    );
    CREATE TABLE uptime_events (
        id INTEGER PRIMARY KEY,
        ts REAL NOT NULL,
        component TEXT NOT NULL,
        state TEXT NOT NULL
    );
    CREATE INDEX uptime_events_ts ON uptime_events(ts);
    """,
]

_USER_FIELDS = {"tier", "balance", "credits", "disabled", "username"}


class SQLiteStorage:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._db: aiosqlite.Connection | None = None
        self._data_version: int | None = None

    @property
    def db(self) -> aiosqlite.Connection:
        assert self._db is not None, "SQLiteStorage.open() was not called"
        return self._db

    async def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = await aiosqlite.connect(self.path, isolation_level=None)  # explicit transactions only
        await self.db.execute("PRAGMA journal_mode=WAL")
        await self.db.execute("PRAGMA synchronous=NORMAL")
        await self.db.execute("PRAGMA foreign_keys=ON")
        await self.db.execute("PRAGMA busy_timeout=5000")
        await self.migrate()
        self._data_version = await self._read_data_version()

    async def close(self) -> None:
        if self._db is not None:
            await self._db.close()
            self._db = None

    async def migrate(self) -> int:
        """Bring the schema to the newest version; returns the version it is at."""
        async with self.db.execute("PRAGMA user_version") as cur:
            row = await cur.fetchone()
        version = int(row[0]) if row else 0
        if version > len(MIGRATIONS):
            raise RuntimeError(f"{self.path} has schema version {version}, newer than this gateway "
                               f"({len(MIGRATIONS)}); upgrade llm-gateway")
        for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
            statements = [s.strip() for s in script.split(";") if s.strip()]
            await self.db.execute("BEGIN IMMEDIATE")
            try:
                for statement in statements:
                    await self.db.execute(statement)
                await self.db.execute(f"PRAGMA user_version = {number}")
                await self.db.execute("COMMIT")
            except BaseException:
                await self.db.execute("ROLLBACK")
                raise
            version = number
        return version

    async def _read_data_version(self) -> int:
        async with self.db.execute("PRAGMA data_version") as cur:
            row = await cur.fetchone()
        return int(row[0]) if row else 0

    async def changed_elsewhere(self) -> bool:
        """True when another connection (the CLI, say) committed since the last call.

        SQLite's data_version moves only for commits by other connections, never our own."""
        version = await self._read_data_version()
        changed = version != self._data_version
        self._data_version = version
        return changed

    # --- users and keys -----------------------------------------------------------------
    async def load_users(self) -> list[User]:
        async with self.db.execute(
                "SELECT id, username, tier, balance, credits, disabled, created_at FROM users") as cur:
            return [User(r[0], r[1], r[2], r[3], r[4], bool(r[5]), r[6]) async for r in cur]

    async def load_keys(self) -> list[ApiKey]:
        async with self.db.execute(
                "SELECT id, user_id, key_hash, prefix, disabled, created_at, last_used_at FROM api_keys") as cur:
            return [ApiKey(r[0], r[1], r[2], r[3], bool(r[4]), r[5], r[6]) async for r in cur]

    async def create_user(self, username: str, tier: str, balance: float, credits: float | None) -> User:
        now = time.time()
        try:
            cur = await self.db.execute(
                "INSERT INTO users (username, tier, balance, credits, created_at) VALUES (?, ?, ?, ?, ?)",
                (username, tier, balance, credits, now))
        except sqlite3.IntegrityError as e:
            raise StorageConflict(f"user {username!r} exists") from e
        assert cur.lastrowid is not None
        return User(cur.lastrowid, username, tier, balance, credits, False, now)

    async def update_user(self, user_id: int, **fields: Any) -> None:
        unknown = set(fields) - _USER_FIELDS
        if unknown:
            raise ValueError(f"unknown user fields: {', '.join(sorted(unknown))}")
        if fields:
            assignments = ", ".join(f"{name} = ?" for name in fields)
            await self.db.execute(f"UPDATE users SET {assignments} WHERE id = ?", (*fields.values(), user_id))

    async def delete_user(self, user_id: int) -> None:
        await self.db.execute("DELETE FROM users WHERE id = ?", (user_id,))

    async def add_key(self, user_id: int, key_hash: str, prefix: str) -> ApiKey:
        now = time.time()
        cur = await self.db.execute(
            "INSERT INTO api_keys (user_id, key_hash, prefix, created_at) VALUES (?, ?, ?, ?)",
            (user_id, key_hash, prefix, now))
        assert cur.lastrowid is not None
        return ApiKey(cur.lastrowid, user_id, key_hash, prefix, False, now)

    async def set_key_disabled(self, key_id: int, disabled: bool) -> None:
        await self.db.execute("UPDATE api_keys SET disabled = ? WHERE id = ?", (int(disabled), key_id))

    # --- usage ----------------------------------------------------------------------------
    async def record_usage(self, rows: list[UsageRow], charges: dict[int, Charge],
                           key_last_used: dict[int, float]) -> None:
        """One transaction: the rows, what they cost each user, and when each key was last used."""
        await self.db.execute("BEGIN IMMEDIATE")
        try:
            await self.db.executemany(
                "INSERT INTO usage_logs (ts, user_id, username, key_prefix, endpoint, model, backend, input_tokens,"
                " output_tokens, cached_tokens, latency_ms, ttft_ms, status, cost)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [(r.ts, r.user_id, r.username, r.key_prefix, r.endpoint, r.model, r.backend, r.input_tokens,
                  r.output_tokens, r.cached_tokens, r.latency_ms, r.ttft_ms, r.status, r.cost) for r in rows])
            await self.db.executemany(
                "UPDATE users SET balance = balance - ?, credits = CASE WHEN credits IS NULL THEN NULL"
                " ELSE credits - ? END WHERE id = ?",
                [(c.balance, c.credits, user_id) for user_id, c in charges.items()])
            await self.db.executemany("UPDATE api_keys SET last_used_at = ? WHERE id = ?",
                                      [(ts, key_id) for key_id, ts in key_last_used.items()])
            await self.db.execute("COMMIT")
        except BaseException:
            await self.db.execute("ROLLBACK")
            raise

    async def usage_summary(self, query: UsageQuery) -> list[dict[str, Any]]:
        where, args = ["1 = 1"], []
        if query.start is not None:
            where.append("ts >= ?")
            args.append(query.start)
        if query.end is not None:
            where.append("ts <= ?")
            args.append(query.end)
        if query.user_id is not None:
            where.append("user_id = ?")
            args.append(query.user_id)
        cond = " AND ".join(where)
        totals = ("COUNT(*), SUM(input_tokens), SUM(output_tokens), SUM(cached_tokens), SUM(cost), MAX(ts)")
        users: dict[str, dict[str, Any]] = {}
        async with self.db.execute(
                f"SELECT username, {totals} FROM usage_logs WHERE {cond} GROUP BY username ORDER BY username",
                args) as cur:
            async for r in cur:
                users[r[0]] = {"username": r[0], **_totals(r[1:]), "endpoints": {}}
        async with self.db.execute(
                f"SELECT username, endpoint, COUNT(*) FROM usage_logs WHERE {cond} GROUP BY username, endpoint",
                args) as cur:
            async for r in cur:
                users[r[0]]["endpoints"][r[1]] = r[2]
        if query.by_model:
            for entry in users.values():
                entry["models"] = {}
            async with self.db.execute(
                    f"SELECT username, COALESCE(model, ''), {totals} FROM usage_logs WHERE {cond}"
                    " GROUP BY username, model", args) as cur:
                async for r in cur:
                    users[r[0]]["models"][r[1]] = _totals(r[2:])
        return list(users.values())

    # --- signups --------------------------------------------------------------------------
    async def add_signup(self, username: str, email: str | None, message: str | None, ip: str | None) -> int:
        cur = await self.db.execute(
            "INSERT INTO signup_requests (username, email, message, ip, created_at) VALUES (?, ?, ?, ?, ?)",
            (username, email, message, ip, time.time()))
        assert cur.lastrowid is not None
        return cur.lastrowid

    async def list_signups(self, status: str | None) -> list[SignupRequest]:
        where, args = (" WHERE status = ?", (status,)) if status else ("", ())
        return await self._signups(where + " ORDER BY id", args)

    async def get_signup(self, signup_id: int) -> SignupRequest | None:
        found = await self._signups(" WHERE id = ?", (signup_id,))
        return found[0] if found else None

    async def _signups(self, condition: str, args: tuple[Any, ...]) -> list[SignupRequest]:
        sql = "SELECT id, username, email, message, ip, created_at, status, decided_at FROM signup_requests"
        async with self.db.execute(sql + condition, args) as cur:
            return [SignupRequest(*r) async for r in cur]

    async def decide_signup(self, signup_id: int, status: str) -> SignupRequest | None:
        """Move a pending request to `status`; None if it is not pending (or does not exist)."""
        cur = await self.db.execute(
            "UPDATE signup_requests SET status = ?, decided_at = ? WHERE id = ? AND status = 'pending'",
            (status, time.time(), signup_id))
        return await self.get_signup(signup_id) if cur.rowcount == 1 else None

    # --- uptime ---------------------------------------------------------------------------
    async def add_uptime_event(self, ts: float, component: str, state: str) -> None:
        await self.db.execute("INSERT INTO uptime_events (ts, component, state) VALUES (?, ?, ?)",
                              (ts, component, state))

    async def uptime_events(self, since: float) -> list[tuple[float, str, str]]:
        async with self.db.execute(
                "SELECT ts, component, state FROM uptime_events WHERE ts >= ? ORDER BY ts", (since,)) as cur:
            return [(r[0], r[1], r[2]) async for r in cur]


def _totals(r: tuple[Any, ...]) -> dict[str, Any]:
    return {"requests": r[0], "input_tokens": r[1] or 0, "output_tokens": r[2] or 0, "cached_tokens": r[3] or 0,
            "cost": round(r[4] or 0.0, 10), "last_request": r[5]}
