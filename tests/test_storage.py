"""SQLite storage and pricing, straight: migrations, charges, summaries, costs."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest

from gateway.config import parse_config
from gateway.sqlite_storage import MIGRATIONS, SQLiteStorage
from gateway.storage import Charge, StorageConflict, UsageQuery, UsageRow
from gateway.usage import request_cost, token_counts


async def test_migrations_run_once_and_refuse_a_newer_database(tmp_path: Path) -> None:
    path = tmp_path / "g.db"
    storage = SQLiteStorage(path)
    await storage.open()
    assert await storage.migrate() == len(MIGRATIONS)  # already there: nothing runs again
    await storage.create_user("kept", "sub", 0, None)
    await storage.close()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert db.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
    again = SQLiteStorage(path)
    await again.open()
    assert [u.username for u in await again.load_users()] == ["kept"]
    await again.close()
    with sqlite3.connect(path) as db:
        db.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    with pytest.raises(RuntimeError, match="newer than this gateway"):
        await SQLiteStorage(path).open()


async def test_usage_charges_add_up_and_summaries_group(tmp_path: Path) -> None:
    storage = SQLiteStorage(tmp_path / "g.db")
    await storage.open()
    try:
        alice = await storage.create_user("alice", "payg", 10.0, 5.0)
        with pytest.raises(StorageConflict):
            await storage.create_user("alice", "sub", 0, None)
        key = await storage.add_key(alice.id, "h" * 64, "sk-alice1234")
        now = time.time()
        who = (alice.id, "alice", key.prefix)
        rows = [UsageRow(now - 10, *who, "chat", "m1", "slot 4801", 10, 5, 2, 12.0, None, 200, 0.5),
                UsageRow(now - 5, *who, "embeddings", "m2", "slot 4802", 7, 0, 0, 3.0, None, 200, 0.25),
                UsageRow(now - 7200, *who, "chat", "m1", "slot 4801", 1, 1, 0, 1.0, None, 200, 0.1)]
        await storage.record_usage(rows, {alice.id: Charge(balance=0.85, credits=3)}, {key.id: now})
        user = (await storage.load_users())[0]
        assert user.balance == pytest.approx(9.15) and user.credits == 2
        assert (await storage.load_keys())[0].last_used_at == now
        recent = await storage.usage_summary(UsageQuery(start=now - 3600, by_model=True))
        assert len(recent) == 1
        summary = recent[0]
        assert summary["requests"] == 2 and summary["input_tokens"] == 17 and summary["cached_tokens"] == 2
        assert summary["cost"] == pytest.approx(0.75) and summary["endpoints"] == {"chat": 1, "embeddings": 1}
        assert summary["models"]["m1"]["requests"] == 1 and summary["models"]["m2"]["input_tokens"] == 7
        everything = await storage.usage_summary(UsageQuery())
        assert everything[0]["requests"] == 3
        await storage.delete_user(alice.id)
        assert (await storage.usage_summary(UsageQuery()))[0]["requests"] == 3  # history outlives the user
        assert await storage.load_keys() == []
    finally:
        await storage.close()


async def test_a_large_batch_is_stored_whole_and_in_order(tmp_path: Path) -> None:
    """Every row of a big batch lands, each field in its own column."""
    storage = SQLiteStorage(tmp_path / "g.db")
    await storage.open()
    try:
        now = time.time()
        rows = [UsageRow(now + i, None, f"user{i}", None, "chat", f"m{i % 3}", "slot 4801", i, 2 * i, i % 5,
                         float(i), None if i % 2 else i / 10, 200 if i % 7 else 429, i / 1000) for i in range(700)]
        await storage.record_usage(rows, {}, {})
    finally:
        await storage.close()
    with sqlite3.connect(tmp_path / "g.db") as db:
        stored = db.execute("SELECT ts, user_id, username, key_prefix, endpoint, model, backend, input_tokens,"
                            " output_tokens, cached_tokens, latency_ms, ttft_ms, status, cost"
                            " FROM usage_logs ORDER BY id").fetchall()
    assert stored == [tuple(vars(r).values()) for r in rows]


def test_cost_uses_model_prices_and_halves_cached_input() -> None:
    pricing = parse_config({"pricing": {"input_per_1k": 1.0, "output_per_1k": 2.0,
                                        "models": {"big": {"input_per_1k": 10.0, "output_per_1k": 20.0}}}}).pricing
    usage = {"prompt_tokens": 1000, "completion_tokens": 500, "prompt_tokens_details": {"cached_tokens": 400}}
    counts = token_counts(usage)
    assert counts == (1000, 500, 400)
    assert request_cost(pricing.for_model("small"), *counts) == pytest.approx(0.6 + 0.2 + 1.0)
    assert request_cost(pricing.for_model("big"), *counts) == pytest.approx(6.0 + 2.0 + 10.0)
    assert token_counts(None) == (0, 0, 0)
