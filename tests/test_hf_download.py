"""Hugging Face search, listing and resumable downloads, through huggingface-hub, against a local fake Hub.

The fake Hub (tests/hf_fake_server.py) answers the same HTTP calls, with the same headers, as huggingface.co;
it is reached through an explicit endpoint, or through the `HF_ENDPOINT` environment variable.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from huggingface_hub import constants as hf_constants

from gateway.hf_models import (
    DownloadJob,
    DownloadManager,
    HubError,
    check_filename,
    check_repo,
    default_endpoint,
    repo_gguf_files,
    search_gguf,
)
from tests.hf_fake_server import FakeHub, running_hub

TOKEN = "hf_test_token_123"
BIG = os.urandom(3 * 1024 * 1024 + 12345)  # not a multiple of the chunk size
SMALL = os.urandom(200_000)
GATED = os.urandom(100_000)
CHUNK = 64 * 1024


@pytest.fixture
def hub() -> Iterator[FakeHub]:
    with running_hub() as h:
        h.add_repo("acme/Tiny-GGUF", {"tiny.Q4_K_M.gguf": BIG, "quants/tiny.Q8_0.gguf": SMALL,
                                      "README.md": b"# tiny", "config.json": b"{}"},
                   downloads=500, likes=7)
        h.add_repo("acme/tiny-safetensors", {"model.safetensors": b"x" * 100}, tags=["safetensors"],
                   downloads=9000)
        h.add_repo("bigco/Tiny-Chat-GGUF", {"chat.gguf": SMALL}, downloads=900, likes=3)
        h.add_repo("gate/Locked-GGUF", {"locked.gguf": GATED}, token=TOKEN)
        yield h


@pytest.fixture
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """`http_get` reads the body in `DOWNLOAD_CHUNK_SIZE` pieces (10 MiB); make them small enough to see progress
    and partial files with files of a few MB."""
    monkeypatch.setattr(hf_constants, "DOWNLOAD_CHUNK_SIZE", CHUNK)


def manager(hub: FakeHub, tmp_path: Path, token: str | None = TOKEN) -> DownloadManager:
    return DownloadManager(tmp_path / "models", token, hub.endpoint)


def finish(m: DownloadManager, job: DownloadJob, timeout: float = 30) -> DownloadJob:
    m.wait(job.id, timeout)
    assert not job.active, f"download still {job.state} after {timeout}s"
    return job


# --- search and listing --------------------------------------------------------------------------------------

async def test_search_finds_gguf_repos_most_downloaded_first(hub: FakeHub) -> None:
    results = await search_gguf("tiny", 10, None, hub.endpoint)
    assert [r["id"] for r in results] == ["bigco/Tiny-Chat-GGUF", "acme/Tiny-GGUF"]  # not the safetensors repo
    tiny = results[1]
    assert tiny["downloads"] == 500 and tiny["likes"] == 7 and tiny["gated"] is False
    assert tiny["updated"].startswith("2025-01-02T03:04:05")
    (query,) = hub.queries("/api/models")
    assert query["search"] == ["tiny"] and query["filter"] == ["gguf"] and query["limit"] == ["10"]
    assert "lastModified" in query["expand"]

    assert [r["id"] for r in await search_gguf("locked", 5, None, hub.endpoint)] == ["gate/Locked-GGUF"]
    assert await search_gguf("nothing-like-this", 5, None, hub.endpoint) == []


async def test_repo_files_lists_the_gguf_files_with_sizes(hub: FakeHub) -> None:
    files = await repo_gguf_files("acme/Tiny-GGUF", None, hub.endpoint)
    assert files == [{"filename": "quants/tiny.Q8_0.gguf", "size": len(SMALL)},
                     {"filename": "tiny.Q4_K_M.gguf", "size": len(BIG)}]
    assert hub.queries("/api/models/acme/Tiny-GGUF")[0]["blobs"] == ["true"]


async def test_hub_failures_are_hub_errors(hub: FakeHub, tmp_path: Path) -> None:
    with pytest.raises(HubError) as missing:
        await repo_gguf_files("acme/no-such-repo", None, hub.endpoint)
    assert missing.value.status == 404 and missing.value.code == "hf_repo_not_found"

    with pytest.raises(HubError) as gated:
        await repo_gguf_files("gate/Locked-GGUF", None, hub.endpoint)
    assert gated.value.status == 403 and "hf_token" in gated.value.message
    assert await repo_gguf_files("gate/Locked-GGUF", TOKEN, hub.endpoint) == [
        {"filename": "locked.gguf", "size": len(GATED)}]

    # (Through `repo_gguf_files`: `list_models` retries a refused connection with back-off for ~23 s first.)
    dead = f"http://127.0.0.1:{_closed_port()}"
    with pytest.raises(HubError) as unreachable:
        await repo_gguf_files("acme/Tiny-GGUF", None, dead)
    assert unreachable.value.status == 502 and unreachable.value.code == "hf_unreachable"
    assert dead in unreachable.value.message

    with pytest.raises(ValueError):
        await repo_gguf_files("../etc", None, hub.endpoint)


def _closed_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- downloads -----------------------------------------------------------------------------------------------

def test_download_completes_with_the_right_bytes(hub: FakeHub, tmp_path: Path) -> None:
    m = manager(hub, tmp_path)
    job = finish(m, m.start("acme/Tiny-GGUF", "quants/tiny.Q8_0.gguf"))
    assert job.state == "done", job.error
    info = job.as_dict()
    assert info["percent"] == 100.0 and info["bytes_done"] == info["total_bytes"] == len(SMALL)
    assert info["resumed_from"] == 0 and info["error"] is None
    dest = tmp_path / "models" / "acme--Tiny-GGUF" / "quants" / "tiny.Q8_0.gguf"
    assert info["path"] == str(dest.resolve())
    assert dest.read_bytes() == SMALL
    assert not list(dest.parent.glob("*.incomplete"))
    # The HEAD went to the Hub with the token; the bytes came from the "CDN" (another origin) without it.
    heads = [h for meth, p, h in hub.requests if meth == "HEAD" and "/resolve/main/" in p]
    assert heads and heads[0].get("authorization") == f"Bearer {TOKEN}"
    assert [d.authorization for d in hub.downloads] == [None]
    assert hub.bytes_served == len(SMALL)


def test_download_without_cdn_redirect(tmp_path: Path) -> None:
    with running_hub(redirect_to_cdn=False) as hub:
        hub.add_repo("acme/Tiny-GGUF", {"tiny.gguf": SMALL})
        m = manager(hub, tmp_path)
        job = finish(m, m.start("acme/Tiny-GGUF", "tiny.gguf"))
        assert job.state == "done", job.error
        assert job.path.read_bytes() == SMALL
        assert hub.downloads[0].authorization == f"Bearer {TOKEN}"  # same origin: the token goes along


def test_progress_is_visible_while_downloading(hub: FakeHub, tmp_path: Path, small_chunks: None) -> None:
    hub.send_delay = 0.02  # ~50 blocks of 64 KiB: about a second
    m = manager(hub, tmp_path)
    job = m.start("acme/Tiny-GGUF", "tiny.Q4_K_M.gguf")
    seen: list[dict[str, Any]] = []
    deadline = time.monotonic() + 20
    while job.active and time.monotonic() < deadline:
        snap = job.as_dict()
        if snap["state"] == "downloading" and 0 < snap["bytes_done"] < len(BIG):
            seen.append(snap)
        time.sleep(0.05)
    assert job.state == "done", job.error
    assert seen, "never saw the download part way"
    mid = seen[len(seen) // 2]
    assert mid["total_bytes"] == len(BIG) and 0 < mid["percent"] < 100
    assert [s["bytes_done"] for s in seen] == sorted(s["bytes_done"] for s in seen)
    assert job.percent == 100.0 and job.path.read_bytes() == BIG


def test_same_file_is_not_started_twice(hub: FakeHub, tmp_path: Path, small_chunks: None) -> None:
    hub.send_delay = 0.01
    m = manager(hub, tmp_path)
    first = m.start("acme/Tiny-GGUF", "tiny.Q4_K_M.gguf")
    second = m.start("acme/Tiny-GGUF", "tiny.Q4_K_M.gguf")
    other = m.start("acme/Tiny-GGUF", "quants/tiny.Q8_0.gguf")
    assert second is first and other is not first
    finish(m, first), finish(m, other)
    assert [j.id for j in m.jobs()] == [first.id, other.id]
    assert len([d for d in hub.downloads if d.status in (200, 206)]) == 2


def test_a_dropped_connection_resumes_with_a_range_request(hub: FakeHub, tmp_path: Path, small_chunks: None) -> None:
    cut = 1024 * 1024
    hub.cut_next_download(cut)
    m = manager(hub, tmp_path)
    job = finish(m, m.start("acme/Tiny-GGUF", "tiny.Q4_K_M.gguf"))
    assert job.state == "done", job.error
    assert job.path.read_bytes() == BIG
    first, second = hub.downloads
    assert first.cut and first.range is None and first.sent == cut
    assert second.status == 206 and second.range == f"bytes={cut}-"
    assert hub.bytes_served == len(BIG) < 2 * len(BIG)


def test_a_failed_download_resumes_on_the_next_start(hub: FakeHub, tmp_path: Path, small_chunks: None) -> None:
    cut = 1536 * 1024
    hub.cut_next_download(cut, then_fail_with=503)  # the retry huggingface-hub makes after the cut fails too
    m = manager(hub, tmp_path)
    failed = finish(m, m.start("acme/Tiny-GGUF", "tiny.Q4_K_M.gguf"))
    assert failed.state == "failed" and "503" in (failed.error or "")
    (partial,) = failed.path.parent.glob("tiny.Q4_K_M.gguf.*.incomplete")
    assert partial.stat().st_size == cut and not failed.path.exists()

    hub.content_error = None
    job = finish(m, m.start("acme/Tiny-GGUF", "tiny.Q4_K_M.gguf"))
    assert job.id != failed.id and job.state == "done", job.error
    assert job.resumed_from == cut and job.path.read_bytes() == BIG and not partial.exists()
    served = [d for d in hub.downloads if d.status in (200, 206)]
    assert served[-1].range == f"bytes={cut}-" and served[-1].sent == len(BIG) - cut
    assert hub.bytes_served == len(BIG) < 2 * len(BIG)


def test_a_spoiled_partial_fails_the_checksum_and_the_next_start_begins_again(hub: FakeHub, tmp_path: Path,
                                                                             small_chunks: None) -> None:
    cut = 1024 * 1024
    hub.cut_next_download(cut, then_fail_with=503)
    m = manager(hub, tmp_path)
    assert finish(m, m.start("acme/Tiny-GGUF", "tiny.Q4_K_M.gguf")).state == "failed"
    (partial,) = (tmp_path / "models").rglob("*.incomplete")
    with open(partial, "r+b") as f:  # what a crash can leave: the right length, wrong bytes at the end
        f.seek(cut - 4096)
        f.write(bytes(4096))

    hub.content_error = None
    spoiled = finish(m, m.start("acme/Tiny-GGUF", "tiny.Q4_K_M.gguf"))
    assert spoiled.state == "failed" and "sha256" in (spoiled.error or "") and spoiled.resumed_from == cut
    assert not partial.exists() and not spoiled.path.exists()

    again = finish(m, m.start("acme/Tiny-GGUF", "tiny.Q4_K_M.gguf"))
    assert again.state == "done" and again.resumed_from == 0 and again.path.read_bytes() == BIG


def test_a_cancelled_download_keeps_its_part_and_resumes(hub: FakeHub, tmp_path: Path, small_chunks: None) -> None:
    hub.send_delay = 0.02
    m = manager(hub, tmp_path)
    job = m.start("acme/Tiny-GGUF", "tiny.Q4_K_M.gguf")
    deadline = time.monotonic() + 20
    while job.bytes_done < 512 * 1024 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert m.cancel(job.id) is job
    finish(m, job)
    assert job.state == "cancelled"
    (partial,) = job.path.parent.glob("*.incomplete")
    kept = partial.stat().st_size
    assert 0 < kept < len(BIG)

    hub.send_delay = 0
    again = finish(m, m.start("acme/Tiny-GGUF", "tiny.Q4_K_M.gguf"))
    assert again.state == "done" and again.resumed_from == kept and again.path.read_bytes() == BIG
    assert hub.downloads[-1].range == f"bytes={kept}-"


def test_a_complete_file_finishes_at_once(hub: FakeHub, tmp_path: Path) -> None:
    m = manager(hub, tmp_path)
    assert finish(m, m.start("acme/Tiny-GGUF", "quants/tiny.Q8_0.gguf")).state == "done"
    hub.reset_counters()
    again = finish(m, m.start("acme/Tiny-GGUF", "quants/tiny.Q8_0.gguf"), timeout=5)
    assert again.state == "done" and again.percent == 100.0 and again.bytes_done == len(SMALL)
    assert hub.downloads == [] and hub.bytes_served == 0


def test_gated_repo_needs_the_token(hub: FakeHub, tmp_path: Path) -> None:
    anonymous = DownloadManager(tmp_path / "anon", None, hub.endpoint)
    denied = finish(anonymous, anonymous.start("gate/Locked-GGUF", "locked.gguf"))
    assert denied.state == "failed" and "gated" in (denied.error or "") and not denied.path.exists()

    m = manager(hub, tmp_path)
    job = finish(m, m.start("gate/Locked-GGUF", "locked.gguf"))
    assert job.state == "done" and job.path.read_bytes() == GATED


def test_missing_file_fails_clearly(hub: FakeHub, tmp_path: Path) -> None:
    m = manager(hub, tmp_path)
    job = finish(m, m.start("acme/Tiny-GGUF", "absent.gguf"))
    assert job.state == "failed" and "file not found" in (job.error or "")


def test_not_enough_disk_space_fails_before_downloading(hub: FakeHub, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda path: real(path)._replace(free=10))
    m = manager(hub, tmp_path)
    job = finish(m, m.start("acme/Tiny-GGUF", "quants/tiny.Q8_0.gguf"))
    assert job.state == "failed" and "not enough disk space" in (job.error or "")
    assert "reach" not in (job.error or "") and hub.downloads == []


def test_hf_endpoint_environment_variable_is_the_default(hub: FakeHub, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_ENDPOINT", hub.endpoint + "/")
    assert default_endpoint() == hub.endpoint
    m = DownloadManager(tmp_path / "models", TOKEN)
    assert m.endpoint == hub.endpoint
    job = finish(m, m.start("acme/Tiny-GGUF", "quants/tiny.Q8_0.gguf"))
    assert job.state == "done" and job.path.read_bytes() == SMALL
    monkeypatch.delenv("HF_ENDPOINT")
    assert default_endpoint() == "https://huggingface.co"


async def test_search_uses_hf_endpoint_by_default(hub: FakeHub, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
    assert [r["id"] for r in await search_gguf("chat")] == ["bigco/Tiny-Chat-GGUF"]


# --- refused names -------------------------------------------------------------------------------------------

BAD_FILENAMES = [
    "../evil.gguf", "../../etc/passwd.gguf", "quants/../../evil.gguf", "/etc/evil.gguf", "/abs.gguf",
    "a/./b.gguf", "a//b.gguf", "..\\evil.gguf", "sub\\evil.gguf", "C:\\evil.gguf", "C:evil.gguf", "nul\x00.gguf",
    ".hidden.gguf", "a/.cache/x.gguf", "model.bin", "model.gguf.exe", "", "line\nbreak.gguf", "..", "x.gguf/..",
]
BAD_REPOS = ["", "noslash", "a/b/c", "../x", "a/..", "..%2f/x", "a /b", "a/b c", "a--b/c", "a/b..c", "/a",
             "a/", "a\\b", "a/b\x00", "-a/b", "a/b-", "a" * 97 + "/b"]


@pytest.mark.parametrize("filename", BAD_FILENAMES)
def test_bad_filenames_are_refused(filename: str, tmp_path: Path) -> None:
    m = DownloadManager(tmp_path / "models", None, "http://127.0.0.1:9")
    with pytest.raises(ValueError):
        m.start("acme/Tiny-GGUF", filename)
    with pytest.raises(ValueError):
        check_filename(filename)
    assert m.jobs() == [] and not (tmp_path / "models").exists()


@pytest.mark.parametrize("repo", BAD_REPOS)
def test_bad_repos_are_refused(repo: str, tmp_path: Path) -> None:
    m = DownloadManager(tmp_path / "models", None, "http://127.0.0.1:9")
    with pytest.raises(ValueError):
        m.start(repo, "model.gguf")
    with pytest.raises(ValueError):
        check_repo(repo)
    assert m.jobs() == []


def test_good_names_are_accepted(tmp_path: Path) -> None:
    m = DownloadManager(tmp_path / "models", None, "http://127.0.0.1:9")
    for repo in ("TheBloke/Llama-2-7B-GGUF", "unsloth/gemma-3-270m-it-GGUF", "bartowski/Qwen2.5_7B.v1-GGUF"):
        check_repo(repo)
    dest = m.destination("unsloth/Qwen3-30B-A3B-GGUF", "Q4_K_M/Qwen3-30B-A3B-Q4_K_M-00001-of-00002.gguf")
    assert dest == (tmp_path / "models").resolve() / "unsloth--Qwen3-30B-A3B-GGUF" / "Q4_K_M" / \
        "Qwen3-30B-A3B-Q4_K_M-00001-of-00002.gguf"
    m.destination("a/b", "Model.Q4_K_M.GGUF")


def test_a_symlink_out_of_the_models_folder_is_refused(tmp_path: Path) -> None:
    models = tmp_path / "models"
    (models / "acme--Tiny-GGUF").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    (models / "acme--Tiny-GGUF" / "quants").symlink_to(tmp_path / "elsewhere")
    m = DownloadManager(models, None, "http://127.0.0.1:9")
    with pytest.raises(ValueError, match="outside"):
        m.start("acme/Tiny-GGUF", "quants/tiny.Q8_0.gguf")


def test_route_module_imports() -> None:
    from gateway import hf_api
    paths = {(r.path, tuple(sorted(r.methods or ()))) for r in hf_api.routes}
    assert ("/admin/api/models/search", ("GET", "HEAD")) in paths
    assert ("/admin/api/models/download", ("POST",)) in paths
    assert ("/admin/api/models/downloads/{job_id}", ("GET", "HEAD")) in paths
