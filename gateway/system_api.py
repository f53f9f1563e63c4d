"""`GET /admin/api/system`: CPU, memory, swap, disk, load, GPU (via nvidia-smi) and per-slot usage."""

from __future__ import annotations

import asyncio
import os
import shutil
from typing import Any

import psutil
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from .api_common import gateway_of, json_response, require_admin

NVIDIA_QUERY = "name,memory.total,memory.used,utilization.gpu"


async def gpu_info() -> dict[str, Any]:
    """What nvidia-smi reports, or why there is nothing to report."""
    binary = shutil.which("nvidia-smi")
    if binary is None:
        return {"available": False, "reason": "nvidia-smi not found"}
    try:
        proc = await asyncio.create_subprocess_exec(
            binary, f"--query-gpu={NVIDIA_QUERY}", "--format=csv,noheader,nounits",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), 5)
    except (OSError, TimeoutError) as e:
        return {"available": False, "reason": f"nvidia-smi failed: {e}"}
    if proc.returncode != 0:
        return {"available": False, "reason": err.decode(errors="replace").strip() or "nvidia-smi failed"}
    gpus = []
    for line in out.decode().strip().splitlines():
        name, total, used, util = (part.strip() for part in line.split(","))
        gpus.append({"name": name, "memory_total_mib": float(total), "memory_used_mib": float(used),
                     "utilization_percent": float(util)})
    return {"available": bool(gpus), "gpus": gpus}


def _host_numbers(data_dir: str, pids: dict[int, int]) -> dict[str, Any]:
    """Blocking psutil reads (a 0.2 s CPU sample among them): run in a thread."""
    procs = {}
    for port, pid in pids.items():
        try:
            procs[port] = psutil.Process(pid)
            procs[port].cpu_percent(interval=None)  # starts the sample
        except psutil.Error:
            pass
    per_core = psutil.cpu_percent(interval=0.2, percpu=True)
    mem, swap, disk = psutil.virtual_memory(), psutil.swap_memory(), psutil.disk_usage(data_dir)
    slots = {}
    for port, proc in procs.items():
        try:
            slots[str(port)] = {"pid": proc.pid, "rss_bytes": proc.memory_info().rss,
                                "cpu_percent": proc.cpu_percent(interval=None)}
        except psutil.Error:
            slots[str(port)] = {"pid": proc.pid, "error": "process went away"}
    return {
        "cpu": {"count": psutil.cpu_count(), "percent": round(sum(per_core) / len(per_core), 1),
                "per_core_percent": per_core},
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "memory": {"total_bytes": mem.total, "available_bytes": mem.available, "used_bytes": mem.used,
                   "percent": mem.percent},
        "swap": {"total_bytes": swap.total, "used_bytes": swap.used, "percent": swap.percent},
        "disk": {"path": data_dir, "total_bytes": disk.total, "free_bytes": disk.free, "percent": disk.percent},
        "slots": slots,
    }


async def system(request: Request) -> Response:
    require_admin(request)
    gw = gateway_of(request)
    pids = {s.port: s.pid for s in gw.supervisor.slots.values() if s.pid}
    host, gpu = await asyncio.gather(asyncio.to_thread(_host_numbers, str(gw.data_dir), pids), gpu_info())
    return json_response({**host, "gpu": gpu})


routes = [Route("/admin/api/system", system, methods=["GET"])]
