"""The capability router, slot and upstream management over the admin API, system info, metrics."""

from __future__ import annotations

import asyncio
import json
import struct
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from .conftest import RunningGateway, free_port, start_gateway, wait_until
from .echo_upstream import EchoUpstream

TEXT_SLOT = 4807  # the one slot port no other test module uses
IMAGE = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}
LOOK = [{"role": "user", "content": [{"type": "text", "text": "What is in this picture?"}, IMAGE]}]
HELLO = [{"role": "user", "content": "Say hello."}]


@pytest.fixture(scope="module")
def seer() -> Iterator[EchoUpstream]:
    with EchoUpstream("seer") as up:  # stands in for a vision model (no small one ships on PyPI)
        yield up


@pytest.fixture(scope="module")
def twins() -> Iterator[tuple[EchoUpstream, EchoUpstream]]:
    with EchoUpstream("twin-a", delay=0.5) as a, EchoUpstream("twin-b", delay=0.5) as b:
        yield a, b


@pytest.fixture(scope="module")
def gw(gemma_path: Path, llama_server_bin: Path, seer: EchoUpstream, twins: tuple[EchoUpstream, EchoUpstream],
       tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningGateway]:
    a, b = twins
    config = {
        "slots": {str(TEXT_SLOT): {"model_path": str(gemma_path), "model_type": "text", "name": "gemma"}},
        "upstreams": [
            {"name": "seer", "url": seer.url, "models": ["seer-vl"], "model_type": "vision"},
            {"name": "twin-a", "url": a.url, "models": ["twin"]},
            {"name": "twin-b", "url": b.url, "models": ["twin"]},
            {"name": "dead", "url": f"http://127.0.0.1:{free_port()}/v1", "models": ["phoenix"]},
            {"name": "alive", "url": a.url, "models": ["phoenix"]},
        ],
        "rate_limits": {"payg": 1000, "sub": 1000},
    }
    gateway = start_gateway(tmp_path_factory.mktemp("router"), config)
    try:
        gateway.wait_ready([TEXT_SLOT])
        gateway.user_key = gateway.new_user("router-user", "sub")
        yield gateway
    finally:
        gateway.stop()


def chat(gw: RunningGateway, messages: list, model: str | None = None, **extra) -> httpx.Response:  # type: ignore[no-untyped-def]
    body = {"messages": messages, "max_tokens": 4, **extra}
    if model:
        body["model"] = model
    return httpx.post(f"{gw.url}/v1/chat/completions", json=body, headers=gw.headers(), timeout=60)


# --- routing -----------------------------------------------------------------------------------
def test_image_without_a_model_goes_to_the_vision_backend(gw: RunningGateway, seer: EchoUpstream) -> None:
    before = len(seer.bodies)
    r = chat(gw, LOOK)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == "answered by seer"
    assert len(seer.bodies) == before + 1 and seer.bodies[-1]["messages"][0]["content"][1] == IMAGE


def test_plain_chat_without_a_model_goes_to_the_text_slot(gw: RunningGateway, seer: EchoUpstream) -> None:
    before = len(seer.bodies)
    r = chat(gw, HELLO, model="auto")
    assert r.status_code == 200 and r.json()["model"] == "gemma"  # llama-server's alias: the real slot
    assert len(seer.bodies) == before


def test_image_to_a_text_model_by_name_is_400_naming_who_could(gw: RunningGateway) -> None:
    r = chat(gw, LOOK, model="gemma")
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["code"] == "model_not_supported"
    assert "image input" in error["message"] and "seer-vl (vision)" in error["message"]


def test_audio_input_with_no_omni_model_is_503_naming_the_type(gw: RunningGateway) -> None:
    audio = [{"role": "user", "content": [{"type": "input_audio",
                                           "input_audio": {"data": "UklGRg==", "format": "wav"}}]}]
    r = chat(gw, audio)
    assert r.status_code == 503
    assert r.json()["error"]["code"] == "no_model_loaded" and "omni" in r.json()["error"]["message"]


async def test_least_busy_target_is_chosen_under_concurrency(gw: RunningGateway,
                                                            twins: tuple[EchoUpstream, EchoUpstream]) -> None:
    a, b = twins
    a_before, b_before = len(a.bodies), len(b.bodies)
    async with httpx.AsyncClient(timeout=60, headers=gw.headers()) as client:
        replies = await asyncio.gather(*(client.post(f"{gw.url}/v1/chat/completions",
                                                     json={"model": "twin", "messages": HELLO}) for _ in range(6)))
    assert all(r.status_code == 200 for r in replies)
    assert (len(a.bodies) - a_before, len(b.bodies) - b_before) == (3, 3)  # spread evenly, not all to one
    assert a.peak_in_flight <= 3 and b.peak_in_flight <= 3


def test_unreachable_target_is_retried_on_another(gw: RunningGateway, twins: tuple[EchoUpstream, EchoUpstream]) -> None:
    a, _ = twins
    before = len(a.bodies)
    r = chat(gw, HELLO, model="phoenix")  # "dead" is listed first and refuses connections
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == "answered by twin-a"
    assert len(a.bodies) == before + 1


def test_models_show_type_and_capabilities(gw: RunningGateway) -> None:
    models = {m["id"]: m for m in httpx.get(f"{gw.url}/v1/models", headers=gw.headers()).json()["data"]}
    assert models["seer-vl"]["type"] == "vision" and "vision" in models["seer-vl"]["capabilities"]
    assert models["gemma"]["capabilities"] == ["chat", "completions"]
    assert models["twin"]["backends"] == ["upstream:twin-a", "upstream:twin-b"]  # listed once, served twice
    public = [m["id"] for m in httpx.get(f"{gw.url}/api/models").json()["data"]]
    assert sorted(public) == sorted(models) and len(public) == len(set(public))


# --- slots over the admin API --------------------------------------------------------------------
def test_load_and_unload_a_slot_over_the_api(gw: RunningGateway, gemma_path: Path, tmp_path: Path) -> None:
    port = 4806  # test_supervisor uses it too; test modules run one after another and each frees it
    if any(s.get("port") == port and s.get("state") != "empty" for s in gw.admin("GET", "/admin/api/slots")
           .json()["slots"]):
        pytest.fail(f"slot {port} is unexpectedly in use")
    # Loaded the way an operator would: by the model_path the local listing gives for a file under data/models.
    placed = gw.data_dir / "models" / "api-test" / "gemma-copy.gguf"
    placed.parent.mkdir(parents=True, exist_ok=True)
    placed.unlink(missing_ok=True)
    placed.symlink_to(gemma_path)
    local = gw.admin("GET", "/admin/api/models/local").json()["models"]
    model_path = next(m["model_path"] for m in local if m["path"] == "api-test/gemma-copy.gguf")
    assert model_path == "models/api-test/gemma-copy.gguf"
    r = gw.admin("POST", "/admin/api/slots/load", json={"slot": port, "model_path": model_path,
                                                        "model_type": "embedding", "name": "api-embed",
                                                        "ctx_size": 1024, "threads": 1})
    assert r.status_code == 202, r.text
    assert r.json()["state"] == "loading"

    def ready() -> dict | None:
        slot = next(s for s in gw.admin("GET", "/admin/api/slots").json()["slots"] if s["port"] == port)
        return slot if slot["state"] == "ready" else None

    slot = wait_until(ready, 60, "the API-loaded slot to be ready")
    assert slot["model_type"] == "embedding" and slot["rss_bytes"] > 10_000_000 and slot["pid"]
    saved = json.loads((gw.data_dir / "config.json").read_text())
    assert saved["slots"][str(port)]["name"] == "api-embed"
    emb = httpx.post(f"{gw.url}/v1/embeddings", json={"model": "api-embed", "input": "hi"}, headers=gw.headers())
    assert emb.status_code == 200 and len(emb.json()["data"][0]["embedding"]) == 640
    for _ in range(3):  # work for the slot, so its CPU since the previous look is above zero
        httpx.post(f"{gw.url}/v1/embeddings", json={"model": "api-embed", "input": "a longer sentence " * 40},
                   headers=gw.headers()).raise_for_status()
    assert ready()["cpu_percent"] > 0

    busy = gw.admin("POST", "/admin/api/slots/load", json={"slot": port, "model_path": str(gemma_path)})
    assert busy.status_code == 409
    assert gw.admin("POST", f"/admin/api/slots/{port}/unload").status_code == 200
    assert not psutil.pid_exists(slot["pid"]) or psutil.Process(slot["pid"]).status() == psutil.STATUS_ZOMBIE
    assert json.loads((gw.data_dir / "config.json").read_text())["slots"][str(port)] is None
    assert gw.admin("POST", f"/admin/api/slots/{port}/unload").status_code == 404


def _tiny_projector(path: Path) -> Path:
    """A minimal GGUF whose architecture is `clip`: what an mmproj file looks like."""
    def string(s: str) -> bytes:
        return struct.pack("<Q", len(s)) + s.encode()
    kv = string("general.architecture") + struct.pack("<I", 8) + string("clip")
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + kv)
    return path


@pytest.mark.parametrize("body,code", [
    ({"slot": 4900}, "invalid_slot"),
    ({"slot": 4805, "model_path": "/nope/missing.gguf"}, "model_not_found"),
    ({"slot": 4805, "model_type": "painting"}, "invalid_model_type"),
], ids=["port-outside-range", "missing-file", "bad-type"])
def test_load_refusals(gw: RunningGateway, gemma_path: Path, body: dict, code: str) -> None:
    r = gw.admin("POST", "/admin/api/slots/load", json={"model_path": str(gemma_path), **body})
    assert r.status_code == 400 and r.json()["error"]["code"] == code


def test_projector_cannot_be_loaded_as_an_embedding_model(gw: RunningGateway, tmp_path: Path) -> None:
    projector = _tiny_projector(tmp_path / "mmproj-tiny.gguf")
    r = gw.admin("POST", "/admin/api/slots/load", json={"slot": 4805, "model_path": str(projector),
                                                        "model_type": "embedding"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "model_is_mmproj"


def test_mmproj_must_be_a_projector_for_a_type_that_sees(gw: RunningGateway, gemma_path: Path, tmp_path: Path) -> None:
    def load(**body: object) -> dict:
        r = gw.admin("POST", "/admin/api/slots/load", json={"slot": 4805, "model_path": str(gemma_path), **body})
        assert r.status_code == 400, r.text
        return r.json()["error"]

    assert "not a multimodal projector" in load(model_type="vision", mmproj=str(gemma_path))["message"]
    projector = str(_tiny_projector(tmp_path / "mmproj-tiny.gguf"))
    assert "only applies to" in load(model_type="text", mmproj=projector)["message"]
    assert load(model_type="vision", mmproj=str(tmp_path / "missing.gguf"))["code"] == "model_not_found"
    assert gw.admin("GET", "/admin/api/slots").json()["slots"][4805 - 4801]["state"] == "empty"


def test_slots_admin_needs_admin(gw: RunningGateway) -> None:
    r = httpx.post(f"{gw.url}/admin/api/slots/load", json={"slot": 4805}, headers=gw.headers())
    assert r.status_code == 403


# --- upstreams at run time -------------------------------------------------------------------------
def test_add_upstream_discovers_models_and_remove_forgets_them(gw: RunningGateway) -> None:
    with EchoUpstream("newcomer") as up:
        r = gw.admin("POST", "/admin/api/upstreams", json={"name": "newcomer", "url": up.url})
        assert r.status_code == 201, r.text
        assert r.json()["models"] == ["newcomer-model"]
        reply = chat(gw, HELLO, model="newcomer-model")
        assert reply.json()["choices"][0]["message"]["content"] == "answered by newcomer"
        assert any(u["name"] == "newcomer" for u in json.loads((gw.data_dir / "config.json").read_text())["upstreams"])
        assert gw.admin("POST", "/admin/api/upstreams", json={"name": "newcomer", "url": up.url}).status_code == 409
        assert gw.admin("DELETE", "/admin/api/upstreams/newcomer").status_code == 204
        assert chat(gw, HELLO, model="newcomer-model").status_code == 404
    with EchoUpstream("hub-style") as up:  # Hub-style ids carry a slash; they are still one model each
        r = gw.admin("POST", "/admin/api/upstreams", json={"name": "hub-style", "url": up.url,
                                                           "models": ["acme/Tiny-Chat"]})
        assert r.status_code == 201, r.text
        got = httpx.get(f"{gw.url}/v1/models/acme/Tiny-Chat", headers=gw.headers())
        assert got.status_code == 200 and got.json()["backends"] == ["upstream:hub-style"]
        assert chat(gw, HELLO, model="acme/Tiny-Chat").json()["choices"][0]["message"]["content"] == \
            "answered by hub-style"
        assert gw.admin("DELETE", "/admin/api/upstreams/hub-style").status_code == 204
    bad = gw.admin("POST", "/admin/api/upstreams", json={"name": "x", "url": "ftp://nowhere"})
    assert bad.status_code == 400 and "url" in bad.json()["error"]["message"]


# --- observability --------------------------------------------------------------------------------
def test_system_reports_real_numbers(gw: RunningGateway) -> None:
    info = gw.admin("GET", "/admin/api/system").json()
    assert info["cpu"]["count"] >= 1 and len(info["cpu"]["per_core_percent"]) == psutil.cpu_count()
    assert info["memory"]["total_bytes"] == psutil.virtual_memory().total
    assert 0 < info["disk"]["free_bytes"] <= info["disk"]["total_bytes"]
    assert isinstance(info["gpu"]["available"], bool) and ("gpus" in info["gpu"] or info["gpu"]["reason"])
    assert info["slots"][str(TEXT_SLOT)]["rss_bytes"] > 10_000_000


def test_metrics_count_requests_and_show_slots(gw: RunningGateway) -> None:
    assert chat(gw, HELLO, model="gemma").status_code == 200
    text = httpx.get(f"{gw.url}/metrics").text
    assert 'llm_gateway_requests_total{endpoint="chat",model="gemma",status="200"}' in text
    assert f'llm_gateway_slot_state{{model="gemma",slot="{TEXT_SLOT}",state="ready"}} 1.0' in text
    assert "llm_gateway_request_seconds_bucket" in text
    assert 'llm_gateway_tokens_total{kind="output",model="gemma"}' in text


def test_every_answer_carries_a_request_id(gw: RunningGateway) -> None:
    r = chat(gw, HELLO, model="gemma")
    assert len(r.headers["x-request-id"]) == 32
    mine = chat(gw, HELLO, model="twin", stream=False)
    assert mine.headers["x-request-id"] != r.headers["x-request-id"]
    given = httpx.post(f"{gw.url}/v1/chat/completions", headers={**gw.headers(), "X-Request-ID": "trace-42"},
                       json={"model": "nope", "messages": HELLO})
    assert given.status_code == 404 and given.headers["x-request-id"] == "trace-42"
    assert httpx.get(f"{gw.url}/health").headers["x-request-id"]
    log = gw.log_path.read_text()
    assert '"request_id":"trace-42"' in log and '"status":404' in log
