"""Admin routes for GGUF models from the Hugging Face Hub (`/admin/api/models/...`, admin keys only).

- `GET /admin/api/models/search?q=&limit=` -> `{"object": "list", "query", "data": [{"id", "downloads", "likes",
  "updated", "gated"}]}`; with `&repo=owner/name` instead -> `{"object": "list", "repo", "data": [{"filename",
  "size"}]}` (that repo's `.gguf` files).
- `POST /admin/api/models/download` `{"repo", "filename"}` -> 202 with the job (see `DownloadJob.as_dict`); the same
  file already queued or downloading gives that job back.
- `GET /admin/api/models/downloads` -> `{"object": "list", "data": [job, ...]}`;
  `GET /admin/api/models/downloads/{job_id}` -> the job; `DELETE` on it cancels (the partial file is kept, a new
  download of the file resumes from it).

Refused names are 400s, a repo or file the Hub does not have is a 404, and a Hub that cannot be reached or
fails is a 502, all in OpenAI's error shape. The token is the config's `hf_token`; the Hub is `HF_ENDPOINT`, else
https://huggingface.co.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from .api_common import gateway_of, json_object, json_response, require_admin
from .errors import APIError
from .hf_models import (
    MAX_SEARCH_LIMIT,
    DownloadJob,
    DownloadManager,
    HubError,
    default_endpoint,
    repo_gguf_files,
    search_gguf,
)


def _config_token(gw: Any) -> str | None:
    token = gw.config.extra.get("hf_token")
    return token if isinstance(token, str) and token.strip() else None


def downloads_of(request: Request) -> DownloadManager:
    """The gateway's DownloadManager, made on first use; its token follows the config's `hf_token`."""
    gw = gateway_of(request)
    manager: DownloadManager | None = getattr(gw, "downloads", None)
    if manager is None:
        manager = DownloadManager(gw.data_dir / "models", _config_token(gw), default_endpoint())
        gw.downloads = manager  # type: ignore[attr-defined]
    else:
        manager.token = _config_token(gw)
    return manager


def _hub_failure(e: HubError) -> APIError:
    return APIError(e.status, e.message, e.code)


async def search(request: Request) -> Response:
    require_admin(request)
    manager = downloads_of(request)
    params = request.query_params
    repo = params.get("repo")
    try:
        if repo:
            files = await repo_gguf_files(repo, manager.token, manager.endpoint)
            return json_response({"object": "list", "repo": repo, "data": files})
        query = params.get("q", "")
        if len(query) > 200:
            raise APIError(400, "q is longer than 200 characters", "invalid_query")
        raw_limit = params.get("limit", "20")
        if not raw_limit.isdigit() or not 1 <= int(raw_limit) <= MAX_SEARCH_LIMIT:
            raise APIError(400, f"limit must be a whole number from 1 to {MAX_SEARCH_LIMIT}", "invalid_limit")
        results = await search_gguf(query, int(raw_limit), manager.token, manager.endpoint)
        return json_response({"object": "list", "query": query, "data": results})
    except ValueError as e:
        raise APIError(400, str(e), "invalid_repo") from None
    except HubError as e:
        raise _hub_failure(e) from None


async def start_download(request: Request) -> Response:
    require_admin(request)
    payload = await json_object(request)
    repo, filename = payload.get("repo"), payload.get("filename")
    if not isinstance(repo, str) or not isinstance(filename, str):
        raise APIError(400, 'send {"repo": "owner/name", "filename": "file.gguf"}', "invalid_download")
    try:
        job = downloads_of(request).start(repo, filename)
    except ValueError as e:
        raise APIError(400, str(e), "invalid_download") from None
    return json_response(job.as_dict(), 202)


async def list_downloads(request: Request) -> Response:
    require_admin(request)
    return json_response({"object": "list", "data": [j.as_dict() for j in downloads_of(request).jobs()]})


def _answer_for(job: DownloadJob | None) -> Response:
    if job is None:
        raise APIError(404, "no download with that id", "download_not_found")
    return json_response(job.as_dict())


async def get_download(request: Request) -> Response:
    require_admin(request)
    return _answer_for(downloads_of(request).get(request.path_params["job_id"]))


async def cancel_download(request: Request) -> Response:
    require_admin(request)
    return _answer_for(downloads_of(request).cancel(request.path_params["job_id"]))


routes = [
    Route("/admin/api/models/search", search, methods=["GET"]),
    Route("/admin/api/models/download", start_download, methods=["POST"]),
    Route("/admin/api/models/downloads", list_downloads, methods=["GET"]),
    Route("/admin/api/models/downloads/{job_id}", get_download, methods=["GET"]),
    Route("/admin/api/models/downloads/{job_id}", cancel_download, methods=["DELETE"]),
]
