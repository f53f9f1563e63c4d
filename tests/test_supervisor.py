"""Slots as real llama-server processes: crash recovery, unload, and no orphans when the gateway dies."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from pathlib import Path

import httpx
import psutil
import pytest

from supervisor import SlotConfig, SlotDefaults, SlotError, SlotState, Supervisor, Timing
from supervisor import slot as slot_module

from .conftest import SESSION_TEXT_SLOT, RunningGateway, port_open, start_gateway, wait_until

FAST = Timing(backoff_first=0.1, backoff_max=0.5, max_failures=3, stop_grace=3.0, health_interval=1.0)
UNLOAD_SLOT, CRASH_SLOT, STOP_SLOT, KILL_SLOT = 4803, 4804, 4805, 4806


def test_killed_slot_comes_back_and_serves(gateway: RunningGateway) -> None:
    before = gateway.slots()[SESSION_TEXT_SLOT]
    os.kill(before["pid"], signal.SIGKILL)
    down = httpx.post(f"{gateway.url}/v1/chat/completions", timeout=10, headers=gateway.headers(),
                      json={"model": "gemma", "messages": [{"role": "user", "content": "hi"}]})
    assert down.status_code == 503, down.text  # restarting, or not yet noticed: the port is closed
    assert down.json()["error"]["code"] in ("model_not_ready", "backend_unavailable")

    def restarted() -> dict | bool:
        slot = gateway.slots()[SESSION_TEXT_SLOT]
        return slot if slot["state"] == "ready" and slot["pid"] != before["pid"] else False

    after = wait_until(restarted, 60, "the killed slot to come back ready")
    assert after["restarts"] == before["restarts"] + 1
    assert not psutil.pid_exists(before["pid"]) or psutil.Process(before["pid"]).status() == psutil.STATUS_ZOMBIE
    reply = gateway.client().chat.completions.create(
        model="gemma", messages=[{"role": "user", "content": "Say hi"}], max_tokens=4)
    assert reply.choices[0].message.content is not None


def test_slot_status_reports_what_runs(gateway: RunningGateway) -> None:
    slot = gateway.slots()[SESSION_TEXT_SLOT]
    assert slot["model_type"] == "text" and slot["name"] == "gemma"
    assert psutil.Process(slot["pid"]).name() == "llama-server"
    assert slot["uptime_s"] >= 0 and Path(slot["log_path"]).read_text()


def test_admin_slots_needs_the_admin_key(gateway: RunningGateway) -> None:
    assert httpx.get(f"{gateway.url}/admin/api/slots").status_code == 401
    r = httpx.get(f"{gateway.url}/admin/api/slots", headers={"Authorization": "Bearer sk-wrong"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = httpx.get(f"{gateway.url}/admin/api/slots", headers=gateway.headers())
    assert r.status_code == 403 and r.json()["error"]["code"] == "not_admin"


async def test_unload_leaves_no_process(gemma_path: Path, llama_server_bin: Path, tmp_path: Path) -> None:
    changes: list[dict] = []
    sup = Supervisor(tmp_path, SlotDefaults(threads=1, ctx_size=1024), llama_server_bin, changes.append, FAST)
    await sup.start({})
    try:
        slot = await sup.load(UNLOAD_SLOT, SlotConfig(str(gemma_path), "text", name="unload-me"))
        assert await slot.wait_ready(120), slot.status()
        pid = slot.pid
        assert pid and port_open(UNLOAD_SLOT)
        with pytest.raises(SlotError, match="busy"):
            await sup.load(UNLOAD_SLOT, SlotConfig(str(gemma_path), "text"))
        await sup.unload(UNLOAD_SLOT)
        assert not psutil.pid_exists(pid)
        assert not port_open(UNLOAD_SLOT)
        assert not (tmp_path / "run" / f"slot-{UNLOAD_SLOT}.pid").exists()
        assert changes[0][UNLOAD_SLOT].name == "unload-me" and changes[-1][UNLOAD_SLOT] is None
    finally:
        await sup.stop()


async def test_a_big_log_is_rotated_while_the_slot_runs(gemma_path: Path, llama_server_bin: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(slot_module, "LOG_MAX_BYTES", 1024)  # the start-up lines alone are larger
    sup = Supervisor(tmp_path, SlotDefaults(threads=1, ctx_size=1024), llama_server_bin, timing=FAST)
    await sup.start({})
    log, older = tmp_path / "logs" / f"slot-{UNLOAD_SLOT}.log", tmp_path / "logs" / f"slot-{UNLOAD_SLOT}.log.1"
    try:
        slot = await sup.load(UNLOAD_SLOT, SlotConfig(str(gemma_path), "text"))
        assert await slot.wait_ready(120), slot.status()
        await asyncio.to_thread(wait_until, older.exists, 10, "the log to be rotated")
        assert older.read_bytes().startswith(b"\n=== ") and b"starting:" in older.read_bytes()
        async with httpx.AsyncClient() as client:
            r = await client.post(f"{slot.base_url}/v1/completions", json={"prompt": "Hi", "max_tokens": 2}, timeout=60)
        assert r.status_code == 200
        await asyncio.to_thread(wait_until, lambda: b"print_timing" in log.read_bytes(), 10,
                                "llama-server to go on writing into the truncated log")
        assert log.stat().st_size < older.stat().st_size and slot.state is SlotState.READY
    finally:
        await sup.stop()


async def test_load_refuses_bad_requests(gemma_path: Path, llama_server_bin: Path, tmp_path: Path) -> None:
    sup = Supervisor(tmp_path, SlotDefaults(), llama_server_bin, timing=FAST)
    await sup.start({})
    try:
        with pytest.raises(SlotError, match="outside 4801-4807"):
            await sup.load(4900, SlotConfig(str(gemma_path)))
        with pytest.raises(SlotError, match="not found"):
            await sup.load(UNLOAD_SLOT, SlotConfig(str(tmp_path / "missing.gguf")))
        with pytest.raises(SlotError, match="model_type"):
            await sup.load(UNLOAD_SLOT, SlotConfig(str(gemma_path), "painting"))
        assert sup.slots == {}
    finally:
        await sup.stop()


async def test_model_that_cannot_load_ends_failed_with_a_reason(llama_server_bin: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"this is not a gguf file" * 100)
    sup = Supervisor(tmp_path, SlotDefaults(threads=1), llama_server_bin, timing=FAST)
    await sup.start({})
    try:
        slot = await sup.load(CRASH_SLOT, SlotConfig(str(broken), "text"))
        assert not await slot.wait_ready(60)
        assert slot.state is SlotState.FAILED
        assert slot.restarts == FAST.max_failures
        assert "exited with code" in (slot.last_error or "")
        assert slot.pid is None
    finally:
        await sup.stop()


async def test_leftover_llama_server_from_a_dead_gateway_is_cleaned_up(
        gemma_path: Path, llama_server_bin: Path, tmp_path: Path) -> None:
    sup = Supervisor(tmp_path, SlotDefaults(threads=1, ctx_size=1024), llama_server_bin, timing=FAST)
    await sup.start({})
    slot = await sup.load(UNLOAD_SLOT, SlotConfig(str(gemma_path), "text"))
    assert await slot.wait_ready(120)
    pid = slot.pid
    pidfile = tmp_path / "run" / f"slot-{UNLOAD_SLOT}.pid"
    left_behind = pidfile.read_text()
    slot._proc = None  # forget the process, as a gateway killed where no parent-death signal exists would
    await sup.stop()
    pidfile.write_text(left_behind)
    assert pid and psutil.pid_exists(pid)
    successor = Supervisor(tmp_path, SlotDefaults(), llama_server_bin, timing=FAST)
    await successor.start({})
    await successor.stop()
    assert not psutil.pid_exists(pid)


def _gateway_with_one_slot(tmp_path: Path, port: int, gemma_path: Path) -> RunningGateway:
    gw = start_gateway(tmp_path / "data", {"slots": {str(port): {"model_path": str(gemma_path), "name": "g"}},
                                           "default_threads": 1, "default_ctx_size": 1024})
    gw.wait_ready([port])
    return gw


@pytest.mark.parametrize("sig,port", [(signal.SIGTERM, STOP_SLOT), (signal.SIGKILL, KILL_SLOT)],
                         ids=["graceful-stop", "killed-hard"])
def test_no_llama_server_outlives_the_gateway(sig: int, port: int, gemma_path: Path, llama_server_bin: Path,
                                              tmp_path: Path) -> None:
    gw = _gateway_with_one_slot(tmp_path, port, gemma_path)
    pids = gw.llama_pids()
    assert len(pids) == 1
    gw.stop(sig)
    wait_until(lambda: not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE
                               for p in pids), 15, "llama-server to exit with its gateway")
    wait_until(lambda: not port_open(port), 10, f"port {port} to close")


def test_slots_come_back_when_the_gateway_restarts(gemma_path: Path, llama_server_bin: Path,
                                                   tmp_path: Path) -> None:
    gw = _gateway_with_one_slot(tmp_path, STOP_SLOT, gemma_path)
    gw.stop()
    config = json.loads((tmp_path / "data" / "config.json").read_text())
    assert config["slots"][str(STOP_SLOT)]["name"] == "g"
    again = start_gateway(tmp_path / "data", config)
    try:
        again.wait_ready([STOP_SLOT])
        assert again.slots()[STOP_SLOT]["name"] == "g"
    finally:
        again.stop()


async def test_stop_is_prompt_even_for_a_loading_slot(gemma_path: Path, llama_server_bin: Path,
                                                      tmp_path: Path) -> None:
    sup = Supervisor(tmp_path, SlotDefaults(threads=1, ctx_size=1024), llama_server_bin, timing=FAST)
    await sup.start({})
    slot = await sup.load(UNLOAD_SLOT, SlotConfig(str(gemma_path), "text"))
    await asyncio.sleep(0.05)
    pid = slot.pid
    await asyncio.wait_for(sup.stop(), 10)
    assert pid is None or not psutil.pid_exists(pid)


async def test_port_taken_by_another_program_is_not_mistaken_for_ready(
        gemma_path: Path, llama_server_bin: Path, tmp_path: Path) -> None:
    import socket

    squatter = socket.socket()
    squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    squatter.bind(("127.0.0.1", CRASH_SLOT))
    squatter.listen()
    sup = Supervisor(tmp_path, SlotDefaults(threads=1), llama_server_bin, timing=FAST)
    await sup.start({})
    try:
        slot = await sup.load(CRASH_SLOT, SlotConfig(str(gemma_path), "text"))
        assert not await slot.wait_ready(30)
        assert slot.state is SlotState.FAILED and "already in use" in (slot.last_error or "")
    finally:
        await sup.stop()
        squatter.close()
