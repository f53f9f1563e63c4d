"""A small fake Hugging Face Hub for the download tests (a helper module, not a test file).

It answers the HTTP calls huggingface-hub 2.4.0 really makes, with the headers it really reads:

- `GET /api/models?search=&filter=gguf&sort=&limit=&expand=` (`HfApi.list_models`): a JSON list of models.
- `GET /api/models/{owner}/{name}[/revision/{rev}]?blobs=true` (`HfApi.model_info(files_metadata=True)`):
  the model with `siblings` carrying `size`, `blobId` and `lfs`.
- `HEAD|GET /{owner}/{name}/resolve/{rev}/{path}` (`get_hf_file_metadata`, `http_get`): like the real Hub for LFS
  files, a 302 to a "CDN" (a second listener on another port, so another origin: huggingface-hub must drop the
  `Authorization` header there) with `X-Repo-Commit`, `X-Linked-Etag`, `X-Linked-Size` and `ETag`; or, with
  `redirect_to_cdn=False`, the bytes themselves with `ETag`, `X-Repo-Commit` and `Content-Length`.
- `HEAD|GET /cdn/{sha256}`: the bytes, with `Accept-Ranges: bytes`, `Range` -> 206 + `Content-Range`.

Errors carry `X-Error-Code` (`RepoNotFound`, `GatedRepo`, `RevisionNotFound`, `EntryNotFound`) as the Hub does,
so `hf_raise_for_status` raises the matching typed errors.

The test controls the bytes of each file and can: slow sending down (`send_delay`), cut the next file download
off after N bytes (`cut_next_download`), make file downloads fail with a status (`content_error`), and read how
many file bytes were served (`bytes_served`) and which `Range`/`Authorization` headers each download carried
(`downloads`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

COMMIT = "0123456789abcdef0123456789abcdef01234567"
_SEND_BLOCK = 64 * 1024


@dataclass
class FakeFile:
    data: bytes

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def git_oid(self) -> str:  # what the Hub's plain `ETag` holds for an LFS file: the pointer's git oid
        return hashlib.sha1(b"pointer " + self.sha256.encode()).hexdigest()


@dataclass
class FakeRepo:
    id: str
    files: dict[str, FakeFile]
    tags: list[str] = field(default_factory=lambda: ["gguf"])
    downloads: int = 0
    likes: int = 0
    last_modified: str = "2025-01-02T03:04:05.000Z"
    token: str | None = None  # gated: this bearer token is required


@dataclass
class DownloadRecord:
    """One GET of file bytes, as the server saw it."""

    path: str
    range: str | None
    authorization: str | None
    status: int = 0
    sent: int = 0
    cut: bool = False


class FakeHub:
    def __init__(self, *, redirect_to_cdn: bool = True) -> None:
        self.repos: dict[str, FakeRepo] = {}
        self.redirect_to_cdn = redirect_to_cdn
        self.send_delay = 0.0  # seconds to sleep after each 64 KiB block of file bytes
        self.content_error: int | None = None  # answer file downloads (GET) with this status
        self.requests: list[tuple[str, str, dict[str, str]]] = []  # (method, path+query, lower-cased headers)
        self.downloads: list[DownloadRecord] = []
        self.bytes_served = 0
        self._cut_after: int | None = None
        self._fail_after_cut: int | None = None
        self._lock = threading.Lock()
        self._servers: list[ThreadingHTTPServer] = []
        self.endpoint = ""
        self.cdn = ""

    # -- set-up ---------------------------------------------------------------------------------------------

    def add_repo(self, repo_id: str, files: dict[str, bytes], **kwargs: Any) -> FakeRepo:
        repo = FakeRepo(repo_id, {name: FakeFile(data) for name, data in files.items()}, **kwargs)
        self.repos[repo_id] = repo
        return repo

    def cut_next_download(self, after_bytes: int, then_fail_with: int | None = None) -> None:
        """The next GET of file bytes sends the full headers, then `after_bytes` bytes, then drops the connection;
        with `then_fail_with`, later downloads get that status (until `content_error` is reset)."""
        with self._lock:
            self._cut_after = after_bytes
            self._fail_after_cut = then_fail_with

    def reset_counters(self) -> None:
        with self._lock:
            self.bytes_served = 0
            self.downloads.clear()
            self.requests.clear()

    def queries(self, path: str) -> list[dict[str, list[str]]]:
        """Query strings of the GET requests made to `path`."""
        return [parse_qs(urlsplit(p).query) for m, p, _ in list(self.requests)
                if m == "GET" and urlsplit(p).path == path]

    # -- life cycle -----------------------------------------------------------------------------------------

    def start(self) -> FakeHub:
        hub = self

        class Handler(_Handler):
            fake = hub

        for _ in range(2):  # the Hub, and the "CDN" on another port (another origin)
            server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
            server.daemon_threads = True
            threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
            self._servers.append(server)
        self.endpoint = f"http://127.0.0.1:{self._servers[0].server_address[1]}"
        self.cdn = f"http://127.0.0.1:{self._servers[1].server_address[1]}"
        return self

    def stop(self) -> None:
        for server in self._servers:
            server.shutdown()
            server.server_close()
        self._servers.clear()

    # -- used by the handler --------------------------------------------------------------------------------

    def _take_cut(self) -> int | None:
        with self._lock:
            cut, self._cut_after = self._cut_after, None
            if cut is not None and self._fail_after_cut is not None:
                self.content_error, self._fail_after_cut = self._fail_after_cut, None
            return cut

    def _count(self, n: int, record: DownloadRecord) -> None:
        with self._lock:
            self.bytes_served += n
            record.sent += n

    def _file_by_sha(self, sha: str) -> FakeFile | None:
        for repo in self.repos.values():
            for f in repo.files.values():
                if f.sha256 == sha:
                    return f
        return None


@contextmanager
def running_hub(**kwargs: Any) -> Iterator[FakeHub]:
    hub = FakeHub(**kwargs).start()
    try:
        yield hub
    finally:
        hub.stop()


_RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")
_MODEL_INFO = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+?)(?:/revision/(?P<rev>[^/]+))?$")
_RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")


class _Handler(BaseHTTPRequestHandler):
    fake: FakeHub
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    # -- plumbing -------------------------------------------------------------------------------------------

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None,
              content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, data: Any, status: int = 200, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(data).encode(), headers)

    def _error(self, status: int, code: str | None, message: str, extra: dict[str, str] | None = None) -> None:
        headers = {"X-Error-Message": message, **(extra or {})}
        if code:
            headers["X-Error-Code"] = code
        self._json({"error": message}, status, headers)

    def _authorized(self, repo: FakeRepo) -> bool:
        if repo.token is None:
            return True
        if self.headers.get("Authorization") == f"Bearer {repo.token}":
            return True
        self._error(401, "GatedRepo", "Access to model is restricted. You must have access to it and be authenticated.")
        return False

    def _repo(self, repo_id: str, rev: str | None) -> FakeRepo | None:
        repo = self.fake.repos.get(repo_id)
        if repo is None:
            self._error(401, "RepoNotFound", "Repository not found")
            return None
        if not self._authorized(repo):
            return None
        if rev not in (None, "main", COMMIT):
            self._error(404, "RevisionNotFound", "Invalid rev id: " + rev, {"X-Repo-Commit": COMMIT})
            return None
        return repo

    # -- routes ---------------------------------------------------------------------------------------------

    def do_HEAD(self) -> None:
        self._route()

    def do_GET(self) -> None:
        self._route()

    def _route(self) -> None:
        self.fake.requests.append((self.command, self.path, {k.lower(): v for k, v in self.headers.items()}))
        url = urlsplit(self.path)
        path = unquote(url.path)
        query = parse_qs(url.query)
        try:
            if path == "/api/models" and self.command == "GET":
                return self._list_models(query)
            if (m := _MODEL_INFO.match(path)) and self.command == "GET":
                return self._model_info(m["repo"], m["rev"], query)
            if m := _RESOLVE.match(path):
                return self._resolve(m["repo"], m["rev"], m["path"])
            if path.startswith("/cdn/"):
                f = self.fake._file_by_sha(path.removeprefix("/cdn/"))
                if f is None:
                    return self._send(404, b"NoSuchKey", content_type="text/plain")
                return self._content(f, {"ETag": f'"{f.sha256}"'})
            self._error(404, None, "not found")
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def _list_models(self, query: dict[str, list[str]]) -> None:
        search = (query.get("search") or [""])[0].lower()
        filters = query.get("filter", [])
        repos = [r for r in self.fake.repos.values()
                 if search in r.id.lower() and all(f in r.tags for f in filters)]
        if (query.get("sort") or [""])[0] == "downloads":
            repos.sort(key=lambda r: r.downloads, reverse=True)
        if query.get("limit"):
            repos = repos[:int(query["limit"][0])]
        self._json([{"_id": hashlib.md5(r.id.encode()).hexdigest()[:24], "id": r.id, "modelId": r.id,
                     "author": r.id.split("/")[0], "downloads": r.downloads, "likes": r.likes,
                     "lastModified": r.last_modified, "tags": r.tags, "private": False,
                     "gated": "auto" if r.token else False} for r in repos])

    def _model_info(self, repo_id: str, rev: str | None, query: dict[str, list[str]]) -> None:
        repo = self._repo(repo_id, rev)
        if repo is None:
            return
        blobs = (query.get("blobs") or ["false"])[0].lower() == "true"
        siblings: list[dict[str, Any]] = []
        for name, f in sorted(repo.files.items()):
            sibling: dict[str, Any] = {"rfilename": name}
            if blobs:
                sibling.update(size=len(f.data), blobId=f.git_oid,
                               lfs={"size": len(f.data), "sha256": f.sha256, "pointerSize": 134})
            siblings.append(sibling)
        self._json({"_id": "0" * 24, "id": repo.id, "modelId": repo.id, "author": repo.id.split("/")[0],
                    "sha": COMMIT, "lastModified": repo.last_modified, "private": False,
                    "gated": "auto" if repo.token else False, "disabled": False, "downloads": repo.downloads,
                    "likes": repo.likes, "tags": repo.tags, "siblings": siblings})

    def _resolve(self, repo_id: str, rev: str, filename: str) -> None:
        repo = self._repo(repo_id, rev)
        if repo is None:
            return
        f = repo.files.get(filename)
        if f is None:
            return self._error(404, "EntryNotFound", "Entry not found", {"X-Repo-Commit": COMMIT})
        if self.fake.redirect_to_cdn:
            location = f"{self.fake.cdn}/cdn/{f.sha256}"
            return self._send(302, b"", {
                "Location": location, "X-Repo-Commit": COMMIT, "ETag": f'"{f.git_oid}"',
                "X-Linked-Etag": f'"{f.sha256}"', "X-Linked-Size": str(len(f.data))})
        self._content(f, {"ETag": f'"{f.sha256}"', "X-Repo-Commit": COMMIT})

    def _content(self, f: FakeFile, headers: dict[str, str]) -> None:
        """The file's bytes, honouring `Range`, slowed by `send_delay`, cut by `cut_next_download`."""
        size = len(f.data)
        start, end, status = 0, size - 1, 200
        range_header = self.headers.get("Range")
        if range_header and (m := _RANGE.match(range_header.strip())):
            start = int(m[1])
            end = min(int(m[2]), size - 1) if m[2] else size - 1
            if start >= size:
                return self._send(416, b"", {"Content-Range": f"bytes */{size}"})
            status = 206
        headers = {"Accept-Ranges": "bytes", **headers}
        if status == 206:
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        if self.command == "HEAD":
            self.send_response(200)
            self.send_header("Content-Length", str(size))
            for k, v in headers.items():
                self.send_header(k, v)
            self.end_headers()
            return
        record = DownloadRecord(self.path, range_header, self.headers.get("Authorization"))
        self.fake.downloads.append(record)
        if self.fake.content_error is not None:
            record.status = self.fake.content_error
            return self._error(self.fake.content_error, None, "file download failed on purpose")
        record.status = status
        cut = self.fake._take_cut()
        body = f.data[start:end + 1]
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        if cut is not None:
            body = body[:cut]
        for i in range(0, len(body), _SEND_BLOCK):
            block = body[i:i + _SEND_BLOCK]
            self.fake._count(len(block), record)  # before the client can see it: no late counts after it is done
            self.wfile.write(block)
            self.wfile.flush()
            if self.fake.send_delay:
                threading.Event().wait(self.fake.send_delay)
        if cut is not None:
            record.cut = True
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)
