"""The GGUF files on disk under the models directory, described from their headers."""

from __future__ import annotations

import asyncio
import contextlib
import os
from pathlib import Path
from typing import Any

from .gguf import read_gguf_info


def _describe(path: Path, models_dir: Path, base_dir: Path) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "path": path.relative_to(models_dir).as_posix(), "absolute_path": str(path.absolute()),
        "model_path": path.relative_to(base_dir).as_posix() if path.is_relative_to(base_dir) else str(path.absolute()),
        "size_bytes": None, "name": None, "architecture": None, "quantization": None,
        "context_length": None, "embedding_length": None, "is_mmproj": False, "error": None,
    }
    try:
        info = read_gguf_info(path)
    except (OSError, ValueError) as e:
        with contextlib.suppress(OSError):
            entry["size_bytes"] = path.stat().st_size
        entry["error"] = str(e) or type(e).__name__
        return entry
    entry.update(size_bytes=info.size_bytes, name=info.name, architecture=info.architecture,
                 quantization=info.quantization, context_length=info.context_length,
                 embedding_length=info.embedding_length, is_mmproj=info.is_mmproj)
    return entry


def list_local_models(models_dir: Path, base_dir: Path | None = None) -> list[dict[str, Any]]:
    """Every `*.gguf` under `models_dir` (recursively, sorted by relative path); blocking file I/O.

    `path` is relative to `models_dir`; `model_path` is what to give `/admin/api/slots/load` (and `config.json`):
    relative to `base_dir`, the directory relative model paths start from (the data dir; default: the parent
    of `models_dir`).

    Partial downloads (`*.incomplete`, `*.part`, ...) do not end in `.gguf` and hidden files and
    folders (huggingface_hub's `.cache`) are skipped. A file whose header does not parse is still
    listed, with `error` set and the header fields left null.
    """
    if not models_dir.is_dir():
        return []
    base_dir = models_dir.parent if base_dir is None else base_dir
    found: list[Path] = []
    for root, dirs, files in os.walk(models_dir):  # does not follow symlinked folders: no loops
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found.extend(Path(root) / name for name in files
                     if name.lower().endswith(".gguf") and not name.startswith("."))
    found.sort(key=lambda p: p.relative_to(models_dir).as_posix())
    return [_describe(path, models_dir, base_dir) for path in found]


async def list_local_models_async(models_dir: Path, base_dir: Path | None = None) -> list[dict[str, Any]]:
    """list_local_models in a worker thread, so the event loop never waits on the disk."""
    return await asyncio.to_thread(list_local_models, models_dir, base_dir)
