"""The GGUF header reader and the local model listing, against the real Gemma 3 270M file."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response

from gateway import models_api
from gateway.app import Gateway
from gateway.config import Config
from gateway.errors import APIError
from gateway.gguf import read_gguf_info
from gateway.local_models import list_local_models, list_local_models_async

ADMIN_KEY = "sk-admin-gguf-" + "y" * 24


def _str(s: str) -> bytes:
    raw = s.encode()
    return struct.pack("<Q", len(raw)) + raw


def _kv(key: str, vtype: int, payload: bytes) -> bytes:
    return _str(key) + struct.pack("<I", vtype) + payload


def tiny_mmproj_gguf() -> bytes:
    """A hand-built GGUF v3 with no tensors: a CLIP projector's kinds of keys, arrays included."""
    kvs = [
        _kv("general.architecture", 8, _str("clip")),
        _kv("general.name", 8, _str("tiny projector")),
        _kv("clip.has_vision_encoder", 7, b"\x01"),
        _kv("clip.vision.image_mean", 9, struct.pack("<IQ", 6, 3) + struct.pack("<3f", 0.5, 0.5, 0.5)),
        _kv("tokenizer.ggml.tokens", 9, struct.pack("<IQ", 8, 3) + _str("a") + _str("bc") + _str("")),
        _kv("nested", 9, struct.pack("<IQ", 9, 2) + struct.pack("<IQ", 4, 1) + struct.pack("<I", 7)
            + struct.pack("<IQ", 8, 1) + _str("x")),
        _kv("clip.vision.embedding_length", 4, struct.pack("<I", 1152)),
        _kv("general.file_type", 4, struct.pack("<I", 1)),
    ]
    return b"GGUF" + struct.pack("<IQQ", 3, 0, len(kvs)) + b"".join(kvs)


def test_reads_the_real_gemma_header(gemma_path: Path) -> None:
    info = read_gguf_info(gemma_path)
    assert info.architecture == "gemma3"
    assert info.quantization == "Q4_K_M" and info.file_type == 15
    assert info.context_length == 32768
    assert info.embedding_length == 640
    assert info.name and "gemma" in info.name.lower()
    assert not info.is_mmproj
    assert info.version == 3 and info.tensor_count > 100
    assert info.size_bytes == gemma_path.stat().st_size > 200 * 2**20
    # Only the metadata is read (its 262k-token vocabulary is ~6.5 MB, partly seeked over), not 253 MB:
    assert info.bytes_read < 8 * 2**20
    assert info.metadata_bytes < 8 * 2**20
    # ... and it ends exactly where the first tensor info (a name string) starts:
    with open(gemma_path, "rb") as f:
        f.seek(info.metadata_bytes)
        (name_len,) = struct.unpack("<Q", f.read(8))
        assert f.read(name_len).decode("ascii").endswith(".weight")


def test_metadata_cap_is_enforced(gemma_path: Path) -> None:
    with pytest.raises(ValueError, match="larger than"):
        read_gguf_info(gemma_path, max_metadata_bytes=2**20)


def test_truncated_and_foreign_files_raise(gemma_path: Path, tmp_path: Path) -> None:
    truncated = tmp_path / "truncated.gguf"
    with open(gemma_path, "rb") as f:
        truncated.write_bytes(f.read(100))
    with pytest.raises(ValueError, match="truncated"):
        read_gguf_info(truncated)

    foreign = tmp_path / "notes.gguf"
    foreign.write_text("this is not a model, just text long enough to hold a header\n" * 4)
    with pytest.raises(ValueError, match="not a GGUF"):
        read_gguf_info(foreign)

    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    with pytest.raises(ValueError):
        read_gguf_info(empty)

    v1 = tmp_path / "v1.gguf"
    v1.write_bytes(b"GGUF" + struct.pack("<IQQ", 1, 0, 0))
    with pytest.raises(ValueError, match="version 1"):
        read_gguf_info(v1)


def test_synthetic_mmproj_is_read_and_detected(tmp_path: Path) -> None:
    path = tmp_path / "mmproj-tiny.gguf"
    data = tiny_mmproj_gguf()
    path.write_bytes(data)
    info = read_gguf_info(path)
    assert info.architecture == "clip" and info.is_mmproj
    assert info.name == "tiny projector"
    assert info.quantization == "F16" and info.file_type == 1  # read after the arrays: they were skipped right
    assert info.context_length is None and info.embedding_length is None  # no `clip.context_length`
    assert info.tensor_count == 0 and info.kv_count == 8
    assert info.metadata_bytes == len(data) == info.size_bytes

    # Cut anywhere inside the metadata, it is a clear ValueError, never a struct.error or a hang:
    for cut in (3, 10, 30, len(data) // 2, len(data) - 1):
        path.write_bytes(data[:cut])
        with pytest.raises(ValueError):
            read_gguf_info(path)


def test_general_type_mmproj_and_unknown_file_type(tmp_path: Path) -> None:
    kvs = [_kv("general.architecture", 8, _str("llama")), _kv("general.type", 8, _str("mmproj")),
           _kv("general.file_type", 4, struct.pack("<I", 999)), _kv("llama.context_length", 4, struct.pack("<I", 4096))]
    path = tmp_path / "x.gguf"
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 2, 0, len(kvs)) + b"".join(kvs))
    info = read_gguf_info(path)
    assert info.is_mmproj and info.version == 2
    assert info.quantization is None and info.file_type == 999
    assert info.context_length == 4096


def _local_models_dir(gemma_path: Path, root: Path) -> Path:
    models = root / "models"
    (models / "google").mkdir(parents=True)
    try:
        os.link(gemma_path, models / "google" / "gemma.gguf")
    except OSError:  # another filesystem: a symlink reads the same
        (models / "google" / "gemma.gguf").symlink_to(gemma_path)
    (models / "broken.gguf").write_bytes(b"GGUF" + struct.pack("<I", 3) + b"\x00" * 6)  # cut in tensor_count
    (models / "mmproj-tiny.gguf").write_bytes(tiny_mmproj_gguf())
    (models / "half.gguf.incomplete").write_bytes(b"GGUF")
    (models / "readme.txt").write_text("not a model")
    (models / ".cache").mkdir()
    (models / ".cache" / "hidden.gguf").write_bytes(tiny_mmproj_gguf())
    return models


def test_list_local_models(gemma_path: Path, tmp_path: Path) -> None:
    models = _local_models_dir(gemma_path, tmp_path)
    listed = {m["path"]: m for m in list_local_models(models)}
    assert sorted(listed) == ["broken.gguf", "google/gemma.gguf", "mmproj-tiny.gguf"]

    gemma = listed["google/gemma.gguf"]
    assert gemma["architecture"] == "gemma3" and gemma["quantization"] == "Q4_K_M"
    assert gemma["context_length"] == 32768 and gemma["is_mmproj"] is False and gemma["error"] is None
    assert gemma["size_bytes"] == gemma_path.stat().st_size
    assert gemma["absolute_path"] == str(models / "google" / "gemma.gguf")

    broken = listed["broken.gguf"]
    assert broken["error"] and "truncated" in broken["error"]
    assert broken["size_bytes"] == 14 and broken["architecture"] is None

    assert listed["mmproj-tiny.gguf"]["is_mmproj"] is True

    assert list_local_models(tmp_path / "nowhere") == []


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, APIError)
    return exc.response()


async def test_local_models_route(gemma_path: Path, tmp_path: Path) -> None:
    _local_models_dir(gemma_path, tmp_path)
    assert len(await list_local_models_async(tmp_path / "models")) == 3

    gateway = Gateway(Config(admin_key=ADMIN_KEY), tmp_path)
    app = Starlette(routes=models_api.routes, exception_handlers={APIError: _api_error})
    app.state.gateway = gateway
    await gateway.start()
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as client:
            assert (await client.get("/admin/api/models/local")).status_code == 401
            user_key = (await gateway.accounts.create_user("gguf-user", "payg", 0.0, None))[1]
            denied = await client.get("/admin/api/models/local", headers={"Authorization": f"Bearer {user_key}"})
            assert denied.status_code == 403

            r = await client.get("/admin/api/models/local", headers={"Authorization": f"Bearer {ADMIN_KEY}"})
            assert r.status_code == 200
            models = r.json()["models"]
            assert [m["path"] for m in models] == ["broken.gguf", "google/gemma.gguf", "mmproj-tiny.gguf"]
            assert models[1]["architecture"] == "gemma3" and models[1]["quantization"] == "Q4_K_M"
    finally:
        await gateway.stop()
