"""Model management over the admin API: Hugging Face search and download (through HF_ENDPOINT to a
local hub), the local model list, and loading what was downloaded."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import RunningGateway, start_gateway, wait_until
from .hf_fake_server import FakeHub, running_hub


def tiny_gguf(architecture: str, file_type: int) -> bytes:
    """A header-only GGUF: enough for the local model list to read."""
    def string(s: str) -> bytes:
        return struct.pack("<Q", len(s)) + s.encode()
    kvs = (string("general.architecture") + struct.pack("<I", 8) + string(architecture)
           + string("general.file_type") + struct.pack("<II", 4, file_type))
    return b"GGUF" + struct.pack("<IQQ", 3, 0, 2) + kvs + b"\0" * 4096


@pytest.fixture(scope="module")
def hub() -> Iterator[FakeHub]:
    with running_hub() as h:
        h.add_repo("acme/Tiny-GGUF", {"tiny-q8.gguf": tiny_gguf("llama", 7), "mmproj-tiny.gguf": tiny_gguf("clip", 1)},
                   downloads=42)
        yield h


@pytest.fixture(scope="module")
def gw(hub: FakeHub, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningGateway]:
    gateway = start_gateway(tmp_path_factory.mktemp("models-admin"), {"slots": {}}, env={"HF_ENDPOINT": hub.endpoint})
    yield gateway
    gateway.stop()


def test_search_and_repo_files(gw: RunningGateway) -> None:
    found = gw.admin("GET", "/admin/api/models/search", params={"q": "tiny"}).json()["data"]
    assert [r["id"] for r in found] == ["acme/Tiny-GGUF"]
    files = gw.admin("GET", "/admin/api/models/search", params={"repo": "acme/Tiny-GGUF"}).json()["data"]
    assert {f["filename"] for f in files} == {"tiny-q8.gguf", "mmproj-tiny.gguf"}


def test_download_then_list_locally(gw: RunningGateway, hub: FakeHub) -> None:
    r = gw.admin("POST", "/admin/api/models/download", json={"repo": "acme/Tiny-GGUF", "filename": "tiny-q8.gguf"})
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]

    def done() -> dict | None:
        job = gw.admin("GET", f"/admin/api/models/downloads/{job_id}").json()
        assert job["state"] != "failed", job
        return job if job["state"] == "done" else None

    job = wait_until(done, 30, "the download to finish")
    assert job["percent"] == 100 and job["bytes_done"] == job["total_bytes"] == len(tiny_gguf("llama", 7))
    assert Path(job["path"]).read_bytes() == tiny_gguf("llama", 7)
    assert Path(job["path"]).is_relative_to(gw.data_dir / "models")
    assert any(d["id"] == job_id for d in gw.admin("GET", "/admin/api/models/downloads").json()["data"])

    local = {m["path"]: m for m in gw.admin("GET", "/admin/api/models/local").json()["models"]}
    entry = next(m for p, m in local.items() if p.endswith("tiny-q8.gguf"))
    assert entry["architecture"] == "llama" and entry["quantization"] == "Q8_0" and not entry["is_mmproj"]


@pytest.mark.parametrize("body", [
    {"repo": "acme/Tiny-GGUF", "filename": "../../escape.gguf"},
    {"repo": "acme/Tiny-GGUF", "filename": "/etc/passwd.gguf"},
    {"repo": "../acme", "filename": "tiny-q8.gguf"},
], ids=["dotdot", "absolute", "bad-repo"])
def test_path_traversal_is_refused(gw: RunningGateway, body: dict) -> None:
    r = gw.admin("POST", "/admin/api/models/download", json=body)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_download"
    assert not (gw.data_dir.parent / "escape.gguf").exists()


def test_model_admin_needs_admin(gw: RunningGateway) -> None:
    import httpx

    assert httpx.get(f"{gw.url}/admin/api/models/local").status_code == 401
    key = gw.new_user("no-admin", "sub")
    r = httpx.post(f"{gw.url}/admin/api/models/download", headers={"Authorization": f"Bearer {key}"},
                   json={"repo": "acme/Tiny-GGUF", "filename": "tiny-q8.gguf"})
    assert r.status_code == 403
