"""GGUF models from the Hugging Face Hub: search, list a repo's GGUF files, download them in the background.

Everything that talks to the Hub is huggingface-hub's own code, pointed at an explicit `endpoint` (the gateway's
default is the `HF_ENDPOINT` environment variable, read when asked, else https://huggingface.co):

- `search_gguf` is `HfApi.list_models(search=..., filter="gguf")` (`GET /api/models`);
- `repo_gguf_files` is `HfApi.model_info(files_metadata=True)` (`GET /api/models/{repo}?blobs=true`);
- a download is `get_hf_file_metadata` (`HEAD /{repo}/resolve/main/{file}`: size, ETag, CDN location) followed by
  `http_get` (`GET` of that location, `Range` when resuming; it also retries and resumes by itself, within one
  call, when the connection drops mid-file).

Why not `hf_hub_download` itself: in huggingface-hub 2.x it downloads into a temporary file with a random name
and deletes it when the download fails, so a second call always starts from byte 0. Here the partial file is
`<file>.<etag-hash>.incomplete` next to the destination and is kept on failure, cancellation or a gateway crash;
the next download of the same file (same ETag) continues from its size with a `Range` request. A finished file is
checked against the sha256 the Hub gives for LFS files (its ETag), so a partial spoiled by a crash cannot be resumed
into a broken model (a mismatch deletes it and fails the job), and then moved into place atomically. A file already
there with the Hub's size finishes at once.

Files land in `models_dir/<owner>--<name>/<filename>`. `--` cannot occur in a Hub repo id, so the folder name is
unambiguous (it is the separator the Hub's own cache uses). Names are checked before anything touches the disk:
see `check_repo` and `check_filename`; a refused name raises `ValueError` with a message fit for a 400.
"""

from __future__ import annotations

import asyncio
import functools
import glob
import hashlib
import logging
import os
import re
import shutil
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Literal, Self
from urllib.parse import urlsplit

import httpx2
from huggingface_hub import HfApi, get_hf_file_metadata, hf_hub_url
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    OfflineModeIsEnabled,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.file_download import http_get
from huggingface_hub.utils import build_hf_headers

log = logging.getLogger(__name__)

DEFAULT_ENDPOINT = "https://huggingface.co"
SEARCH_TIMEOUT_S = 30.0
MAX_SEARCH_LIMIT = 100

JobState = Literal["queued", "downloading", "verifying", "done", "failed", "cancelled"]
ACTIVE_STATES: frozenset[str] = frozenset({"queued", "downloading", "verifying"})
_SHA256 = re.compile(r"[0-9a-f]{64}")
_HASH_BLOCK = 8 * 1024 * 1024


def default_endpoint() -> str:
    """`HF_ENDPOINT` as it is now (huggingface-hub itself only reads it once, at import), else the public Hub."""
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


# --- names ---------------------------------------------------------------------------------------------------

_REPO_PART = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9_])?")
_FORBIDDEN_IN_FILENAME = set('\\:*?"<>|')


def check_repo(repo: object) -> str:
    """A Hub model id `owner/name` of safe characters, or ValueError."""
    if not isinstance(repo, str) or not repo:
        raise ValueError("repo must be a Hugging Face model id such as 'owner/name'")
    parts = repo.split("/")
    if (len(parts) != 2 or not all(_REPO_PART.fullmatch(p) for p in parts)
            or "--" in repo or ".." in repo):
        raise ValueError(f"invalid repo {repo!r}: it must be 'owner/name', each part made of letters, digits, "
                         "'.', '_' and '-' (no '--' or '..', at most 96 characters)")
    return repo


def check_filename(filename: object) -> str:
    """A relative path inside the repo ending in `.gguf`, with no way out of the folder it lands in, or ValueError."""
    if not isinstance(filename, str) or not filename:
        raise ValueError("filename must be the path of a .gguf file in the repo")
    if len(filename) > 1024:
        raise ValueError("filename is too long")
    if "\x00" in filename or any(ord(c) < 32 or ord(c) == 127 for c in filename):
        raise ValueError("filename must not contain NUL or control characters")
    if "\\" in filename:
        raise ValueError("filename must use '/' between folders, not backslashes")
    if _FORBIDDEN_IN_FILENAME & set(filename):
        raise ValueError(f"filename must not contain any of {''.join(sorted(_FORBIDDEN_IN_FILENAME))}")
    if filename.startswith("/") or PurePosixPath(filename).is_absolute():
        raise ValueError("filename must be a relative path inside the repo, not an absolute one")
    for part in filename.split("/"):
        if part in ("", ".", ".."):
            raise ValueError("filename must not contain '..', '.' or empty path segments")
        if part.startswith("."):
            raise ValueError("filename must not contain hidden ('.'-prefixed) path segments")
        if part.endswith((" ", ".")) or len(part) > 255:
            raise ValueError(f"invalid path segment {part!r} in filename")
    if not filename.lower().endswith(".gguf"):
        raise ValueError("only .gguf files can be downloaded")
    return filename


def repo_dir_name(repo: str) -> str:
    """`owner/name` -> `owner--name` (unambiguous: the Hub forbids `--` in repo ids)."""
    owner, name = check_repo(repo).split("/")
    return f"{owner}--{name}"


def destination_path(models_dir: Path, repo: str, filename: str) -> Path:
    """Where `repo`'s `filename` is stored; ValueError if the name is refused or would leave `models_dir`."""
    check_filename(filename)
    root = models_dir.resolve()
    dest = (root / repo_dir_name(repo) / Path(*filename.split("/"))).resolve()
    if not dest.is_relative_to(root / repo_dir_name(repo)):
        raise ValueError("filename resolves to a place outside the models folder")
    return dest


# --- errors from the Hub -------------------------------------------------------------------------------------

class HubError(Exception):
    """A failed call to the Hub; `status` and `code` are what the HTTP route should answer."""

    def __init__(self, message: str, status: int = 502, code: str = "hf_unreachable") -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code


def hub_error(exc: BaseException, endpoint: str, what: str) -> HubError:
    """Turn huggingface-hub's and httpx2's exceptions into a HubError with a clear message."""
    if isinstance(exc, HubError):
        return exc
    if isinstance(exc, GatedRepoError):
        return HubError(f"{what}: the repo is gated; accept its terms on the Hub and set hf_token in the gateway "
                        "config to a token of an account that has access", 403, "hf_gated")
    if isinstance(exc, RepositoryNotFoundError):
        return HubError(f"{what}: repository not found on the Hub (or private, and hf_token does not give access)",
                        404, "hf_repo_not_found")
    if isinstance(exc, RevisionNotFoundError):
        return HubError(f"{what}: revision not found on the Hub", 404, "hf_revision_not_found")
    if isinstance(exc, RemoteEntryNotFoundError):
        return HubError(f"{what}: file not found in the repo", 404, "hf_file_not_found")
    if isinstance(exc, HfHubHTTPError):
        response = exc.response
        status = response.status_code if response is not None else "?"
        where = endpoint
        if response is not None:
            url = urlsplit(str(response.url))
            where = f"{url.scheme}://{url.netloc}"
        return HubError(f"{what}: {where} answered HTTP {status}", 502, "hf_error")
    if isinstance(exc, OfflineModeIsEnabled):
        return HubError(f"{what}: HF_HUB_OFFLINE is set, so the Hub cannot be reached", 502, "hf_offline")
    detail = str(exc) or type(exc).__name__
    if isinstance(exc, (httpx2.HTTPError, ConnectionError, TimeoutError)):
        return HubError(f"{what}: could not reach the Hugging Face Hub at {endpoint}: {detail}", 502,
                        "hf_unreachable")
    if isinstance(exc, OSError):  # the disk (space, permissions) or huggingface-hub's size check
        return HubError(f"{what}: {detail}", 500, "download_error")
    return HubError(f"{what}: {type(exc).__name__}: {detail}", 502, "hf_error")


# --- search and listing --------------------------------------------------------------------------------------

def _search_sync(query: str, limit: int, token: str | None, endpoint: str) -> list[dict[str, Any]]:
    api = HfApi(endpoint=endpoint, token=token)
    models = api.list_models(search=query or None, filter="gguf", sort="downloads", limit=limit,
                             expand=["downloads", "likes", "lastModified", "gated", "private"])
    return [{"id": m.id, "downloads": m.downloads, "likes": m.likes,
             "updated": m.last_modified.isoformat() if m.last_modified else None,
             "gated": bool(m.gated)} for m in models]


def _gguf_files_sync(repo: str, token: str | None, endpoint: str) -> list[dict[str, Any]]:
    info = HfApi(endpoint=endpoint, token=token).model_info(repo, files_metadata=True, timeout=SEARCH_TIMEOUT_S)
    files = [{"filename": s.rfilename, "size": s.size} for s in info.siblings or []
             if s.rfilename.lower().endswith(".gguf")]
    return sorted(files, key=lambda f: f["filename"])


async def _in_thread(what: str, endpoint: str, fn: Any, *args: Any) -> Any:
    try:
        return await asyncio.wait_for(asyncio.to_thread(fn, *args), SEARCH_TIMEOUT_S)
    except TimeoutError:
        raise HubError(f"{what}: the Hugging Face Hub at {endpoint} did not answer within "
                       f"{SEARCH_TIMEOUT_S:.0f}s", 502, "hf_timeout") from None
    except Exception as e:  # every failure of the call becomes a HubError
        raise hub_error(e, endpoint, what) from e


async def search_gguf(query: str, limit: int = 20, token: str | None = None,
                      endpoint: str | None = None) -> list[dict[str, Any]]:
    """GGUF model repos matching `query`, most downloaded first: `[{"id", "downloads", "likes", "updated", "gated"}]`.

    `updated` is ISO 8601 or None. Raises HubError when the Hub cannot be asked.
    """
    endpoint = (endpoint or default_endpoint()).rstrip("/")
    limit = max(1, min(int(limit), MAX_SEARCH_LIMIT))
    result: list[dict[str, Any]] = await _in_thread("Hub search failed", endpoint, _search_sync,
                                                    query.strip(), limit, token, endpoint)
    return result


async def repo_gguf_files(repo: str, token: str | None = None,
                          endpoint: str | None = None) -> list[dict[str, Any]]:
    """The `.gguf` files of a model repo, by name: `[{"filename", "size"}]` (size in bytes, None if unknown).

    ValueError for a malformed repo id; HubError when the Hub cannot be asked or has no such repo.
    """
    check_repo(repo)
    endpoint = (endpoint or default_endpoint()).rstrip("/")
    result: list[dict[str, Any]] = await _in_thread(f"listing the files of {repo} failed", endpoint,
                                                    _gguf_files_sync, repo, token, endpoint)
    return result


# --- downloads -----------------------------------------------------------------------------------------------

class DownloadCancelled(Exception):
    pass


@dataclass(eq=False)
class DownloadJob:
    id: str
    repo: str
    filename: str
    path: Path
    state: JobState = "queued"
    bytes_done: int = 0
    total_bytes: int | None = None
    resumed_from: int = 0  # bytes already on disk when this job started (0: from scratch)
    error: str | None = None
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    _cancel: threading.Event = field(default_factory=threading.Event, repr=False)
    _finished: threading.Event = field(default_factory=threading.Event, repr=False)

    @property
    def percent(self) -> float | None:
        if self.state == "done":
            return 100.0
        if not self.total_bytes:
            return None
        return round(min(100.0, 100.0 * self.bytes_done / self.total_bytes), 1)

    @property
    def active(self) -> bool:
        return self.state in ACTIVE_STATES

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "repo": self.repo, "filename": self.filename, "state": self.state,
                "bytes_done": self.bytes_done, "total_bytes": self.total_bytes, "percent": self.percent,
                "resumed_from": self.resumed_from, "error": self.error, "path": str(self.path),
                "created_at": self.created_at, "started_at": self.started_at, "finished_at": self.finished_at}


class _ProgressHook:
    """Stands in for tqdm in huggingface-hub's `http_get` (its `tqdm_class`): counts bytes into the job.

    `http_get` calls `tqdm_class(desc=, total=, initial=, unit=, unit_scale=)` and then `update(n)` per chunk
    (`huggingface_hub.constants.DOWNLOAD_CHUNK_SIZE`, 10 MiB); a class that is not a huggingface-hub tqdm
    subclass is called as is, so no bar is drawn. `update` is also where a cancellation takes effect.
    """

    def __init__(self, job: DownloadJob, *, total: int | None = None, initial: int = 0, **_: Any) -> None:
        self.job = job
        if total:
            job.total_bytes = total
        job.bytes_done = initial

    def update(self, n: float | None = 1) -> None:
        if self.job._cancel.is_set():
            raise DownloadCancelled()
        self.job.bytes_done += int(n or 0)

    def close(self) -> None:
        pass

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _sha256_of(path: Path, cancel: threading.Event) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_HASH_BLOCK):
            if cancel.is_set():
                raise DownloadCancelled()
            digest.update(block)
    return digest.hexdigest()


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    return parts.scheme, (parts.hostname or "").lower(), parts.port


class DownloadManager:
    """Background downloads of GGUF files from the Hub into `models_dir`, one thread per job.

    At most `max_concurrent` jobs transfer at once; the others wait in state `queued`. Threads are daemons: a
    gateway that stops mid-download leaves the `.incomplete` file, and the next download of that file resumes.
    `token` may be changed at any time (it is read when a request is made); None lets huggingface-hub use
    `HF_TOKEN` or a saved `hf auth login`, as it does everywhere.
    """

    def __init__(self, models_dir: Path, token: str | None = None, endpoint: str | None = None, *,
                 max_concurrent: int = 2, revision: str = "main") -> None:
        self.models_dir = Path(models_dir)
        self.token = token
        self.endpoint = (endpoint or default_endpoint()).rstrip("/")
        self.revision = revision
        self._jobs: dict[str, DownloadJob] = {}
        self._active: dict[tuple[str, str], DownloadJob] = {}
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(max(1, max_concurrent))

    # -- public ---------------------------------------------------------------------------------------------

    def destination(self, repo: str, filename: str) -> Path:
        return destination_path(self.models_dir, repo, filename)

    def start(self, repo: str, filename: str) -> DownloadJob:
        """Start downloading `filename` of `repo` (ValueError for refused names); returns at once.

        A download of the same file that is still queued or running is returned instead of a second one.
        """
        dest = self.destination(repo, filename)
        with self._lock:
            running = self._active.get((repo, filename))
            if running is not None and running.active:
                return running
            job = DownloadJob(uuid.uuid4().hex[:16], repo, filename, dest)
            self._jobs[job.id] = job
            self._active[(repo, filename)] = job
        threading.Thread(target=self._run, args=(job,), name=f"hf-download-{job.id}", daemon=True).start()
        return job

    def get(self, job_id: str) -> DownloadJob | None:
        return self._jobs.get(job_id)

    def jobs(self) -> list[DownloadJob]:
        """All jobs of this process, oldest first."""
        with self._lock:
            return sorted(self._jobs.values(), key=lambda j: j.created_at)

    def cancel(self, job_id: str) -> DownloadJob | None:
        """Ask a job to stop (it becomes `cancelled` at its next chunk); the partial file is kept for a resume."""
        job = self._jobs.get(job_id)
        if job is not None and job.active:
            job._cancel.set()
        return job

    def wait(self, job_id: str, timeout: float | None = None) -> DownloadJob:
        """Block until the job has finished (done, failed or cancelled) or `timeout` passes."""
        job = self._jobs[job_id]
        job._finished.wait(timeout)
        return job

    # -- the worker -----------------------------------------------------------------------------------------

    def _run(self, job: DownloadJob) -> None:
        try:
            with self._slots:
                if job._cancel.is_set():
                    raise DownloadCancelled()
                job.started_at = time.time()
                job.state = "downloading"
                self._download(job)
            job.bytes_done = job.total_bytes if job.total_bytes is not None else job.bytes_done
            job.state = "done"
        except DownloadCancelled:
            job.state = "cancelled"
        except Exception as e:  # noqa: BLE001 - the job records every failure
            job.error = hub_error(e, self.endpoint, f"downloading {job.repo}/{job.filename} failed").message
            job.state = "failed"
            log.warning("%s", job.error)
        finally:
            job.finished_at = time.time()
            job._finished.set()

    def _headers(self) -> dict[str, str]:
        headers = build_hf_headers(token=self.token or None)
        headers["Accept-Encoding"] = "identity"  # the real size in Content-Length, and ranges that mean bytes
        return headers

    def _download(self, job: DownloadJob) -> None:
        dest = job.path
        url = hf_hub_url(job.repo, job.filename, revision=self.revision, endpoint=self.endpoint)
        try:
            meta = get_hf_file_metadata(url, token=self.token or None, endpoint=self.endpoint,
                                        retry_on_errors=True)
        except (httpx2.TransportError, OfflineModeIsEnabled):
            if dest.is_file():  # the Hub is out of reach but the file is here, whole: keep it
                job.total_bytes = job.bytes_done = dest.stat().st_size
                return
            raise
        size = meta.size
        job.total_bytes = size
        if dest.is_file() and (size is None or dest.stat().st_size == size):
            job.bytes_done = dest.stat().st_size
            job.total_bytes = job.bytes_done
            return

        dest.parent.mkdir(parents=True, exist_ok=True)
        tag = hashlib.sha256((meta.etag or "no-etag").encode()).hexdigest()[:16]
        partial = dest.with_name(f"{dest.name}.{tag}.incomplete")
        for stale in dest.parent.glob(f"{glob.escape(dest.name)}.*.incomplete"):
            if stale != partial:  # a partial of an older version of the file: useless now
                stale.unlink(missing_ok=True)
        resume = partial.stat().st_size if partial.is_file() else 0
        if size is not None and resume > size:
            resume = 0
        if size is not None:
            free = shutil.disk_usage(dest.parent).free
            if free < size - resume:
                raise OSError(f"not enough disk space in {dest.parent}: {size - resume} bytes needed, {free} free")

        headers = self._headers()
        if _origin(meta.location) != _origin(url):
            headers.pop("authorization", None)  # a signed CDN URL: the token stays with the Hub
        job.resumed_from = job.bytes_done = resume
        with open(partial, "r+b" if resume else "wb") as f:
            f.seek(resume)
            f.truncate()
            http_get(meta.location, f, resume_size=resume, headers=headers, expected_size=size,
                     displayed_filename=job.filename,
                     tqdm_class=functools.partial(_ProgressHook, job))  # type: ignore[arg-type]
        if meta.etag and _SHA256.fullmatch(meta.etag):  # an LFS file: its ETag is the content's sha256
            job.state = "verifying"
            if _sha256_of(partial, job._cancel) != meta.etag:
                partial.unlink(missing_ok=True)
                raise OSError(f"the downloaded file does not match the Hub's sha256 ({meta.etag[:12]}...); the "
                              "partial file was deleted, start the download again")
        os.replace(partial, dest)
