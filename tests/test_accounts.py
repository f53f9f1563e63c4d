"""Accounts against a real gateway and a real llama-server: keys, money, credits, limits, usage rows."""

from __future__ import annotations

import asyncio
import json
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from .conftest import ADMIN_KEY, ROOT, RunningGateway, start_gateway, wait_until

MODEL = "remote-gemma"
PRICES = {"input_per_1k": 0.5, "output_per_1k": 1.0}
RATE_LIMIT = 5
ASK = [{"role": "user", "content": "Count to five."}]


@pytest.fixture(scope="module")
def gw(remote_llama: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningGateway]:
    config = {
        "slots": {},
        "upstreams": [{"name": "remote", "url": remote_llama, "models": [MODEL]}],
        "pricing": PRICES,
        "rate_limits": {"payg": RATE_LIMIT, "sub": 1000},
        "signups_per_hour": 3,
    }
    gateway = start_gateway(tmp_path_factory.mktemp("accounts"), config)
    yield gateway
    gateway.stop()


def usage_rows(gw: RunningGateway, username: str, count: int) -> list[sqlite3.Row]:
    """The user's usage rows, once the background writer has written `count` of them."""
    def read() -> list[sqlite3.Row] | None:
        with sqlite3.connect(gw.data_dir / "gateway.db") as db:
            db.row_factory = sqlite3.Row
            rows = db.execute("SELECT * FROM usage_logs WHERE username = ? ORDER BY id", (username,)).fetchall()
        return rows if len(rows) >= count else None
    return wait_until(read, 10, f"{count} usage rows for {username}")


def me(gw: RunningGateway, key: str) -> dict:
    r = httpx.get(f"{gw.url}/user/api/me", headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 200, r.text
    return r.json()


def chat(gw: RunningGateway, key: str, **extra) -> httpx.Response:  # type: ignore[no-untyped-def]
    body = {"model": MODEL, "messages": ASK, "max_tokens": 4, **extra}
    return httpx.post(f"{gw.url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"},
                      timeout=60)


def expected_cost(usage: dict) -> float:
    cached = usage.get("prompt_tokens_details", {}).get("cached_tokens", 0)
    return ((usage["prompt_tokens"] - cached) / 1000 * PRICES["input_per_1k"]
            + cached / 1000 * PRICES["input_per_1k"] / 2 + usage["completion_tokens"] / 1000 * PRICES["output_per_1k"])


# --- keys -------------------------------------------------------------------------------------
@pytest.mark.parametrize("header", ["Authorization", "api-key", "x-api-key"])
def test_each_header_form_authenticates(gw: RunningGateway, header: str) -> None:
    key = gw.new_user(f"header-{header.lower()}", "sub")
    value = f"Bearer {key}" if header == "Authorization" else key
    r = httpx.get(f"{gw.url}/v1/models", headers={header: value})
    assert r.status_code == 200, r.text
    reply = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=key, max_retries=0).chat.completions.create(
        model=MODEL, messages=ASK, max_tokens=2)
    assert reply.choices


def test_missing_unknown_disabled_keys(gw: RunningGateway) -> None:
    r = httpx.post(f"{gw.url}/v1/chat/completions", json={"model": MODEL, "messages": ASK})
    assert r.status_code == 401 and r.json()["error"]["code"] == "missing_api_key"
    with pytest.raises(openai.AuthenticationError) as err:
        openai.OpenAI(base_url=f"{gw.url}/v1", api_key="sk-not-a-real-key", max_retries=0).models.list()
    assert err.value.body["code"] == "invalid_api_key"

    key = gw.new_user("to-disable", "sub")
    prefix = key[:12]
    assert gw.admin("POST", f"/admin/api/keys/{prefix}/disable").status_code == 200
    r = chat(gw, key)
    assert r.status_code == 403 and r.json()["error"]["code"] == "key_disabled"
    assert gw.admin("POST", f"/admin/api/keys/{prefix}/enable").status_code == 200
    assert chat(gw, key).status_code == 200

    assert gw.admin("POST", "/admin/api/users/to-disable/disable").status_code == 200
    r = chat(gw, key)
    assert r.status_code == 403 and r.json()["error"]["code"] == "user_disabled"


def test_admin_routes_need_an_admin_key(gw: RunningGateway) -> None:
    key = gw.new_user("not-an-admin", "sub")
    r = httpx.get(f"{gw.url}/admin/api/users", headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 403 and r.json()["error"]["code"] == "not_admin"
    assert httpx.get(f"{gw.url}/admin/api/users").status_code == 401
    listed = gw.admin("GET", "/admin/api/users").json()["users"]
    assert any(u["username"] == "not-an-admin" and u["keys"][0]["prefix"] == key[:12] for u in listed)
    assert key not in json.dumps(listed)


def test_second_key_works_and_plaintext_is_never_stored(gw: RunningGateway) -> None:
    first = gw.new_user("two-keys", "sub")
    r = gw.admin("POST", "/admin/api/users/two-keys/keys")
    assert r.status_code == 201
    second = r.json()["api_key"]
    assert second.startswith("sk-") and len(second) >= 35 and second != first
    assert chat(gw, second).status_code == 200
    time.sleep(1)  # let the usage writer touch the database too
    stored = b"".join(p.read_bytes() for p in gw.data_dir.glob("gateway.db*"))
    for key in (first, second, ADMIN_KEY):
        assert key.encode() not in stored
    assert first[:12].encode() in stored  # only the visible prefix


# --- money and credits -----------------------------------------------------------------------
def test_payg_balance_drops_by_exactly_the_priced_amount(gw: RunningGateway) -> None:
    key = gw.new_user("payer", "payg", balance=1.0)
    r = chat(gw, key)
    assert r.status_code == 200, r.text
    usage = r.json()["usage"]
    assert me(gw, key)["balance"] == pytest.approx(1.0 - expected_cost(usage), abs=1e-12)
    row = usage_rows(gw, "payer", 1)[0]
    assert row["cost"] == pytest.approx(expected_cost(usage), abs=1e-12)


def test_payg_user_hits_the_wall(gw: RunningGateway) -> None:
    key = gw.new_user("nearly-broke", "payg", balance=0.000001)  # less than one request costs
    assert chat(gw, key).status_code == 200
    assert me(gw, key)["balance"] < 0
    r = chat(gw, key)
    assert r.status_code == 429 and r.json()["error"]["code"] == "insufficient_quota"
    with pytest.raises(openai.RateLimitError):
        gw.client(key).chat.completions.create(model=MODEL, messages=ASK, max_tokens=2)
    assert gw.admin("PATCH", "/admin/api/users/nearly-broke", json={"balance": 5}).status_code == 200
    assert chat(gw, key).status_code == 200


def test_sub_users_are_recorded_but_not_charged(gw: RunningGateway) -> None:
    key = gw.new_user("subscriber", "sub", balance=0)
    assert chat(gw, key).status_code == 200
    assert me(gw, key)["balance"] == 0
    row = usage_rows(gw, "subscriber", 1)[0]
    assert row["cost"] == 0 and row["output_tokens"] > 0


async def test_credits_run_out_exactly_at_zero_under_concurrency(gw: RunningGateway) -> None:
    key = gw.new_user("credited", "sub", credits=3)
    async with httpx.AsyncClient(timeout=60, headers={"Authorization": f"Bearer {key}"}) as client:
        replies = await asyncio.gather(*(client.post(f"{gw.url}/v1/chat/completions",
                                                     json={"model": MODEL, "messages": ASK, "max_tokens": 2})
                                         for _ in range(6)))
    codes = sorted(r.status_code for r in replies)
    assert codes == [200, 200, 200, 429, 429, 429]
    assert all(r.json()["error"]["code"] == "insufficient_quota" for r in replies if r.status_code == 429)
    assert me(gw, key)["credits"] == 0


def test_failed_request_gives_its_credit_back(gw: RunningGateway) -> None:
    key = gw.new_user("refunded", "sub", credits=1)
    r = chat(gw, key, model="no-such-model")
    assert r.status_code == 404
    assert me(gw, key)["credits"] == 1
    assert chat(gw, key).status_code == 200
    assert me(gw, key)["credits"] == 0


# --- rate limit -----------------------------------------------------------------------------
async def test_rate_limit_admits_exactly_n_under_concurrency(gw: RunningGateway) -> None:
    key = gw.new_user("hasty", "payg", balance=100)
    async with httpx.AsyncClient(timeout=60, headers={"Authorization": f"Bearer {key}"}) as client:
        replies = await asyncio.gather(*(client.post(f"{gw.url}/v1/chat/completions",
                                                     json={"model": MODEL, "messages": ASK, "max_tokens": 1})
                                         for _ in range(RATE_LIMIT + 5)))
    ok = [r for r in replies if r.status_code == 200]
    limited = [r for r in replies if r.status_code == 429]
    assert len(ok) == RATE_LIMIT and len(limited) == 5
    for r in limited:
        assert r.json()["error"]["code"] == "rate_limit_exceeded"
        assert 1 <= int(r.headers["retry-after"]) <= 60
    for r in ok:
        assert r.headers["x-ratelimit-limit-requests"] == str(RATE_LIMIT)
        assert int(r.headers["x-ratelimit-remaining-requests"]) < RATE_LIMIT
        assert r.headers["x-ratelimit-reset-requests"].endswith("s")
    status = httpx.get(f"{gw.url}/user/api/ratelimit", headers={"Authorization": f"Bearer {key}"}).json()
    assert status["limit_per_minute"] == RATE_LIMIT and status["remaining"] == 0


# --- usage rows -----------------------------------------------------------------------------
def test_usage_rows_match_the_backends_counts(gw: RunningGateway) -> None:
    key = gw.new_user("counted", "sub")
    r = chat(gw, key, max_tokens=6)
    usage = r.json()["usage"]
    with httpx.stream("POST", f"{gw.url}/v1/chat/completions", timeout=60, headers={"Authorization": f"Bearer {key}"},
                      json={"model": MODEL, "messages": ASK, "max_tokens": 7, "stream": True,
                            "stream_options": {"include_usage": True}}) as s:
        events = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
    stream_usage = events[-1]["usage"]
    rows = usage_rows(gw, "counted", 2)
    plain, streamed = rows[0], rows[1]
    assert (plain["input_tokens"], plain["output_tokens"]) == (usage["prompt_tokens"], usage["completion_tokens"])
    assert plain["cached_tokens"] == usage["prompt_tokens_details"]["cached_tokens"]
    assert plain["endpoint"] == "chat" and plain["model"] == MODEL and plain["backend"] == "upstream remote"
    assert plain["status"] == 200 and plain["key_prefix"] == key[:12] and plain["latency_ms"] > 0
    assert (streamed["input_tokens"], streamed["output_tokens"]) == (stream_usage["prompt_tokens"],
                                                                     stream_usage["completion_tokens"])
    assert streamed["ttft_ms"] is not None and 0 < streamed["ttft_ms"] <= streamed["latency_ms"]


def test_stream_usage_is_counted_but_not_shown_unless_asked(gw: RunningGateway) -> None:
    key = gw.new_user("quiet-stream", "sub")
    with httpx.stream("POST", f"{gw.url}/v1/chat/completions", timeout=60, headers={"Authorization": f"Bearer {key}"},
                      json={"model": MODEL, "messages": ASK, "max_tokens": 8, "ignore_eos": True,
                            "stream": True}) as s:
        lines = [line for line in s.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    assert not any('"usage"' in line for line in lines)  # the client did not ask for it
    row = usage_rows(gw, "quiet-stream", 1)[0]
    assert row["output_tokens"] == 8 and row["input_tokens"] > 0


def test_client_leaving_mid_stream_is_still_recorded(gw: RunningGateway) -> None:
    key = gw.new_user("leaver", "sub")
    leave_after(gw, key, MODEL, 6)
    row = usage_rows(gw, "leaver", 1)[0]
    assert row["status"] == 499
    assert 5 <= row["output_tokens"] < 400
    assert row["input_tokens"] == 4  # a remote upstream cannot count for us: 14 characters at 4 per token


def leave_after(gw: RunningGateway, key: str, model: str, events: int) -> None:
    with httpx.stream("POST", f"{gw.url}/v1/chat/completions", timeout=60, headers={"Authorization": f"Bearer {key}"},
                      json={"model": model, "messages": ASK, "max_tokens": 400, "ignore_eos": True,
                            "stream": True}) as s:
        seen = 0
        for line in s.iter_lines():
            seen += line.startswith("data: {")
            if seen == events:
                return


def test_a_slot_counts_the_prompt_of_a_stream_cut_short(gateway: RunningGateway) -> None:
    """The client leaves before the usage event: the slot itself counts the prompt, as it would have reported."""
    key = gateway.new_user("slot-leaver", "payg", balance=1.0)
    leave_after(gateway, key, "gemma", 6)
    row = usage_rows(gateway, "slot-leaver", 1)[0]
    whole = httpx.post(f"{gateway.url}/v1/chat/completions", headers={"Authorization": f"Bearer {key}"}, timeout=60,
                       json={"model": "gemma", "messages": ASK, "max_tokens": 1}).json()
    assert row["status"] == 499 and 5 <= row["output_tokens"] < 400
    assert row["input_tokens"] == whole["usage"]["prompt_tokens"] > 4


def test_usage_windows_and_by_model(gw: RunningGateway) -> None:
    key = gw.new_user("windowed", "sub")
    for _ in range(2):
        assert chat(gw, key).status_code == 200
    usage_rows(gw, "windowed", 2)
    r = gw.admin("GET", "/admin/api/usage", params={"last_hours": 1, "by_model": "true"})
    mine = next(u for u in r.json()["usage"] if u["username"] == "windowed")
    assert mine["requests"] == 2 and mine["endpoints"] == {"chat": 2}
    assert mine["models"][MODEL]["requests"] == 2 and mine["models"][MODEL]["output_tokens"] == mine["output_tokens"]
    past = gw.admin("GET", "/admin/api/usage", params={"start_time": "2020-01-01T00:00:00Z",
                                                        "end_time": "2020-01-02T00:00:00Z"}).json()["usage"]
    assert past == []
    both = gw.admin("GET", "/admin/api/usage", params={"last_hours": 1, "start_time": "2020-01-01T00:00:00Z"})
    assert both.status_code == 400 and both.json()["error"]["code"] == "conflicting_window"
    own = httpx.get(f"{gw.url}/user/api/usage", params={"last_hours": 1},
                    headers={"Authorization": f"Bearer {key}"}).json()["usage"]
    assert own["username"] == "windowed" and own["requests"] == 2


# --- signup and public routes -----------------------------------------------------------------
def test_signup_approve_reject_and_the_per_ip_limit(gw: RunningGateway) -> None:
    """signups_per_hour is 3 for this gateway, and every request here comes from 127.0.0.1."""
    r = httpx.post(f"{gw.url}/api/signup", json={"username": "newcomer", "email": "n@example.org"})
    assert r.status_code == 202
    signup_id = r.json()["id"]
    pending = gw.admin("GET", "/admin/api/signups", params={"status": "pending"}).json()["signups"]
    assert any(s["id"] == signup_id and s["username"] == "newcomer" for s in pending)
    assert gw.admin("GET", "/admin/api/users/newcomer").status_code == 404  # no account before approval
    approved = gw.admin("POST", f"/admin/api/signups/{signup_id}/approve", json={"tier": "sub"})
    assert approved.status_code == 201
    assert chat(gw, approved.json()["api_key"]).status_code == 200
    assert gw.admin("POST", f"/admin/api/signups/{signup_id}/approve").status_code == 404  # only once

    unwelcome = httpx.post(f"{gw.url}/api/signup", json={"username": "unwelcome"}).json()["id"]
    assert gw.admin("POST", f"/admin/api/signups/{unwelcome}/reject").json()["status"] == "rejected"
    assert gw.admin("GET", "/admin/api/users/unwelcome").status_code == 404

    assert httpx.post(f"{gw.url}/api/signup", json={"username": "third"}).status_code == 202
    r = httpx.post(f"{gw.url}/api/signup", json={"username": "fourth"})
    assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limit_exceeded"


def test_public_routes_need_no_key(gw: RunningGateway) -> None:
    assert MODEL in [m["id"] for m in httpx.get(f"{gw.url}/api/models").json()["data"]]
    uptime = httpx.get(f"{gw.url}/api/uptime").json()
    assert uptime["components"]["gateway"]["state"] == "up"
    assert uptime["history"]["gateway"][-1]["state"] == "up"


# --- the CLI and the database it shares ----------------------------------------------------------
def test_cli_changes_reach_the_running_gateway(gw: RunningGateway) -> None:
    def cli(*args: str) -> str:
        return subprocess.run([sys.executable, "-m", "gateway", *args, "--data-dir", str(gw.data_dir)],
                              cwd=ROOT, capture_output=True, text=True, timeout=60, check=True).stdout
    out = cli("users", "add", "from-cli", "--tier", "sub")
    key = out.strip().splitlines()[-1]
    assert key.startswith("sk-")
    wait_until(lambda: chat(gw, key).status_code == 200, 10, "the gateway to know the CLI's user")
    assert "from-cli" in cli("users", "list")
    cli("users", "disable", "from-cli")
    wait_until(lambda: chat(gw, key).status_code == 403, 10, "the gateway to see the CLI's disable")
    assert "from-cli" in cli("usage", "--last-hours", "1")


def test_graceful_shutdown_loses_no_usage_rows(remote_llama: str, tmp_path: Path) -> None:
    gw = start_gateway(tmp_path / "data", {"slots": {}, "upstreams": [{"name": "remote", "url": remote_llama,
                                                                         "models": [MODEL]}]})
    key = gw.new_user("last-words", "sub")
    for _ in range(3):
        assert chat(gw, key, max_tokens=1).status_code == 200
    gw.stop(signal.SIGTERM)  # right away: the rows may still be queued in memory
    with sqlite3.connect(tmp_path / "data" / "gateway.db") as db:
        count = db.execute("SELECT COUNT(*) FROM usage_logs WHERE username = 'last-words'").fetchone()[0]
    assert count == 3


async def test_concurrency_cap_queues_then_refuses(remote_llama: str, tmp_path: Path) -> None:
    gw = start_gateway(tmp_path / "data", {
        "slots": {}, "upstreams": [{"name": "remote", "url": remote_llama, "models": [MODEL]}],
        "max_concurrent_requests": 1, "max_queued_requests": 1, "queue_timeout": 30})
    try:
        key = gw.new_user("crowd", "sub")
        body = {"model": MODEL, "messages": ASK, "max_tokens": 24, "ignore_eos": True}
        async with httpx.AsyncClient(timeout=60, headers={"Authorization": f"Bearer {key}"}) as client:
            replies = await asyncio.gather(*(client.post(f"{gw.url}/v1/chat/completions", json=body)
                                             for _ in range(3)))
        codes = sorted(r.status_code for r in replies)
        assert codes == [200, 200, 503]  # one in flight, one queued, one refused
        refused = next(r for r in replies if r.status_code == 503)
        assert refused.json()["error"]["code"] == "server_overloaded"
    finally:
        gw.stop()


def test_deleted_user_loses_access_but_keeps_history(gw: RunningGateway) -> None:
    key = gw.new_user("leaving-for-good", "sub")
    assert chat(gw, key).status_code == 200
    usage_rows(gw, "leaving-for-good", 1)
    assert gw.admin("DELETE", "/admin/api/users/leaving-for-good").status_code == 204
    assert chat(gw, key).status_code == 401
    assert gw.admin("GET", "/admin/api/users/leaving-for-good").status_code == 404
    history = gw.admin("GET", "/admin/api/usage", params={"last_hours": 1}).json()["usage"]
    assert any(u["username"] == "leaving-for-good" and u["requests"] == 1 for u in history)


def test_user_sees_own_profile_and_models(gw: RunningGateway) -> None:
    key = gw.new_user("curious", "payg", balance=3, credits=7)
    profile = me(gw, key)
    assert profile["username"] == "curious" and profile["tier"] == "payg" and profile["balance"] == 3
    assert profile["credits"] == 7 and profile["key_prefix"] == key[:12]
    models = httpx.get(f"{gw.url}/user/api/models", headers={"Authorization": f"Bearer {key}"}).json()["data"]
    assert [m["id"] for m in models] == [MODEL]
    assert httpx.get(f"{gw.url}/user/api/me").status_code == 401
