"""Model management routes (`/admin/api/models/...`, admin keys only): the GGUF files on disk."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from .api_common import gateway_of, json_response, require_admin
from .local_models import list_local_models_async


async def local_models(request: Request) -> Response:
    require_admin(request)
    gw = gateway_of(request)
    models = await list_local_models_async(gw.data_dir / "models", gw.supervisor.defaults.base_dir)
    return json_response({"models": models})


routes = [
    Route("/admin/api/models/local", local_models, methods=["GET"]),
]
