"""Admin routes for what serves models: slots (load, unload, status) and remote upstreams (add, remove)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from supervisor import MODEL_TYPES, SLOT_PORTS, SlotConfig, SlotError
from supervisor.spec import EMBEDDING_TYPES, MMPROJ_TYPES

from .api_common import gateway_of, json_object, json_response, require_admin
from .config import ConfigError, parse_config, save_config
from .errors import APIError
from .gguf import GGUFInfo, read_gguf_info

if TYPE_CHECKING:
    from .app import Gateway


# psutil measures a process's CPU between two calls on the same Process object, so keep them by pid.
_processes: dict[int, psutil.Process] = {}


def _slot_status(status: dict[str, Any]) -> dict[str, Any]:
    """Supervisor status plus the process's memory, and its CPU since the previous look (None the first time)."""
    status = dict(status)
    status["rss_bytes"] = status["cpu_percent"] = None
    pid = status["pid"]
    if pid:
        try:
            proc = _processes.get(pid)
            if proc is None:
                proc = _processes[pid] = psutil.Process(pid)
                proc.cpu_percent(interval=None)  # starts the measurement
            else:
                status["cpu_percent"] = proc.cpu_percent(interval=None)
            status["rss_bytes"] = proc.memory_info().rss
        except psutil.Error:
            _processes.pop(pid, None)
    return status


def _forget_gone_processes(running_pids: set[int]) -> None:
    for pid in _processes.keys() - running_pids:
        del _processes[pid]


async def list_slots(request: Request) -> Response:
    require_admin(request)
    gw = gateway_of(request)
    running = {s["port"]: _slot_status(s) for s in gw.supervisor.status()}
    _forget_gone_processes({s["pid"] for s in running.values() if s["pid"]})
    slots = [running.get(port, {"port": port, "state": "empty"}) for port in SLOT_PORTS]
    return json_response({"slots": slots})


def _optional_int(payload: dict[str, Any], name: str) -> int | None:
    value = payload.get(name)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
        raise APIError(400, f"{name} must be a whole number greater than 0", f"invalid_{name}")
    return value


async def _gguf_info(path: Path) -> GGUFInfo:
    try:
        return await asyncio.to_thread(read_gguf_info, path)
    except ValueError as e:
        raise APIError(400, f"{path.name} is not a usable GGUF file: {e}", "invalid_model_file") from None


async def _check_model_file(path: Path, model_type: str) -> None:
    """Refuse what llama-server would fail on later: a projector as a model, or an embedding slot for a
    file that cannot embed."""
    info = await _gguf_info(path)
    if info.is_mmproj:
        raise APIError(400, f"{path.name} is a multimodal projector (mmproj), not a model; pass it as 'mmproj' "
                            "next to a vision model", "model_is_mmproj")
    if model_type in EMBEDDING_TYPES and info.architecture in _CANNOT_EMBED:
        raise APIError(400, f"{path.name} ({info.architecture}) cannot produce embeddings; load it as another "
                            "type", "model_cannot_embed")


async def _check_projector(path: Path, given: str, model_type: str) -> None:
    if model_type not in MMPROJ_TYPES:
        raise APIError(400, f"mmproj only applies to {', '.join(sorted(MMPROJ_TYPES))} slots, not {model_type}",
                       "invalid_mmproj")
    if not path.is_file():
        raise APIError(400, f"mmproj file not found: {given}", "model_not_found")
    if not (await _gguf_info(path)).is_mmproj:
        raise APIError(400, f"{path.name} is a model, not a multimodal projector (mmproj)", "invalid_mmproj")


# Architectures whose output is not a text model's hidden state: no pooled embeddings from them.
_CANNOT_EMBED = frozenset({"clip", "wavtokenizer-dec", "snac", "dac", "mimi"})


async def load_slot(request: Request) -> Response:
    """POST {"slot", "model_path", "model_type", "mmproj"?, "name"?, "ctx_size"?, "threads"?}"""
    require_admin(request)
    gw = gateway_of(request)
    payload = await json_object(request)
    port = payload.get("slot")
    if isinstance(port, bool) or not isinstance(port, int) or port not in SLOT_PORTS:
        raise APIError(400, f"slot must be a port from {SLOT_PORTS.start} to {SLOT_PORTS.stop - 1}", "invalid_slot")
    model_type = payload.get("model_type", "text")
    if model_type not in MODEL_TYPES:
        raise APIError(400, f"model_type must be one of {', '.join(MODEL_TYPES)}", "invalid_model_type")
    model_path, mmproj, name = payload.get("model_path"), payload.get("mmproj"), payload.get("name")
    for field, value in (("model_path", model_path), ("mmproj", mmproj), ("name", name)):
        if value is not None and (not isinstance(value, str) or not value):
            raise APIError(400, f"{field} must be a non-empty string", f"invalid_{field}")
    if not model_path:
        raise APIError(400, "model_path is required", "invalid_model_path")
    config = SlotConfig(model_path, model_type, name, mmproj, _optional_int(payload, "ctx_size"),
                        _optional_int(payload, "threads"))
    if port in gw.supervisor.slots:
        raise APIError(409, f"slot {port} is busy with {gw.supervisor.slots[port].config.display_name}; "
                            "unload it first", "slot_busy")
    resolved = gw.supervisor.defaults.resolve(model_path)
    if not resolved.is_file():
        raise APIError(400, f"model file not found: {model_path}", "model_not_found")
    await _check_model_file(resolved, model_type)
    if mmproj is not None:
        await _check_projector(gw.supervisor.defaults.resolve(mmproj), mmproj, model_type)
    try:
        slot = await gw.supervisor.load(port, config)
    except SlotError as e:
        raise APIError(409 if "busy" in str(e) else 400, str(e), "slot_error") from None
    return json_response(_slot_status(slot.status()), 202)


async def unload_slot(request: Request) -> Response:
    require_admin(request)
    try:
        await gateway_of(request).supervisor.unload(request.path_params["slot"])
    except SlotError as e:
        raise APIError(404, str(e), "slot_empty") from None
    return json_response({"port": request.path_params["slot"], "state": "empty"})


async def list_upstreams(request: Request) -> Response:
    require_admin(request)
    return json_response({"upstreams": [{**u.to_dict(), "api_key": "set" if u.api_key else None}
                                        for u in gateway_of(request).config.upstreams]})


async def add_upstream(request: Request) -> Response:
    """POST {"name", "url", "api_key"?, "models"?, "model_type"?}; models are discovered when not given."""
    require_admin(request)
    gw = gateway_of(request)
    payload = await json_object(request)
    try:
        upstream = parse_config({"upstreams": [payload]}).upstreams[0]
    except ConfigError as e:
        raise APIError(400, str(e).replace("upstreams[0].", ""), "invalid_upstream") from None
    if any(u.name == upstream.name for u in gw.config.upstreams):
        raise APIError(409, f"an upstream named '{upstream.name}' exists; remove it first", "upstream_exists")
    if not upstream.models:
        await gw.discover_models(upstream)
        if not upstream.models:
            raise APIError(502, f"could not list the models of {upstream.url}; give 'models' explicitly",
                           "upstream_discovery_failed")
    gw.config.upstreams.append(upstream)
    _upstreams_changed(gw)
    return json_response({**upstream.to_dict(), "api_key": "set" if upstream.api_key else None}, 201)


async def remove_upstream(request: Request) -> Response:
    require_admin(request)
    gw = gateway_of(request)
    name = request.path_params["name"]
    kept = [u for u in gw.config.upstreams if u.name != name]
    if len(kept) == len(gw.config.upstreams):
        raise APIError(404, f"no upstream named '{name}'", "upstream_not_found")
    gw.config.upstreams[:] = kept
    _upstreams_changed(gw)
    return Response(status_code=204)


def _upstreams_changed(gw: Gateway) -> None:
    gw.registry.refresh_upstreams()
    save_config(gw.config, gw.config_path)


routes = [
    Route("/admin/api/slots", list_slots, methods=["GET"]),
    Route("/admin/api/slots/load", load_slot, methods=["POST"]),
    Route("/admin/api/slots/{slot:int}/unload", unload_slot, methods=["POST"]),
    Route("/admin/api/upstreams", list_upstreams, methods=["GET"]),
    Route("/admin/api/upstreams", add_upstream, methods=["POST"]),
    Route("/admin/api/upstreams/{name}", remove_upstream, methods=["DELETE"]),
]
