"""What a slot is: its port range, model types, per-slot settings and performance settings.

Also turns those settings into the `llama-server` command line, so the mapping from our
config to llama.cpp's flags lives in exactly one place.
"""

from __future__ import annotations

import functools
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil

SLOT_PORTS = range(4801, 4808)
MODEL_TYPES = ("text", "vision", "omni", "embedding", "vision-embedding", "audio", "tts")
EMBEDDING_TYPES = frozenset({"embedding", "vision-embedding"})
MMPROJ_TYPES = frozenset({"vision", "omni", "vision-embedding"})
KV_CACHE_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1")


@dataclass
class SlotConfig:
    """One slot as written in `config.json` under `slots.<port>`."""

    model_path: str
    model_type: str = "text"
    name: str | None = None
    mmproj: str | None = None
    ctx_size: int | None = None
    threads: int | None = None

    @property
    def display_name(self) -> str:
        """The model id clients use: `name`, else the GGUF file stem."""
        return self.name or Path(self.model_path).stem

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass
class PerformanceConfig:
    """llama-server tuning shared by all slots (`performance` in config.json)."""

    flash_attention: bool | str = True  # True, False or "auto"
    mlock: bool = False
    kv_cache_quantization: str | None = "q8_0"  # None or "f16" keeps llama.cpp's default
    batch_size: int = 512
    parallel: int | None = None  # None: llama-server decides

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class SlotDefaults:
    """Values a slot falls back to when it does not set its own."""

    threads: int | None = None  # None: machine_threads()
    ctx_size: int = 8192
    performance: PerformanceConfig = field(default_factory=PerformanceConfig)
    base_dir: Path = field(default_factory=Path.cwd)  # relative model paths start here (the data dir)

    def resolve(self, path: str) -> Path:
        return (self.base_dir / path).resolve()


@functools.cache
def machine_threads() -> int:
    """llama.cpp's own default: one thread per physical core, within the CPUs this process may run on.
    More threads than cores makes generation slower, not faster (about 25% with 4 threads on 2 cores)."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(usable, psutil.cpu_count(logical=False) or usable))


def llama_server_args(port: int, slot: SlotConfig, defaults: SlotDefaults) -> list[str]:
    """The llama-server arguments (without the binary) that serve `slot` on `port`."""
    perf = defaults.performance
    args = [
        "--model", str(defaults.resolve(slot.model_path)),
        "--alias", slot.display_name,
        "--host", "127.0.0.1",
        "--port", str(port),
        "--threads", str(slot.threads or defaults.threads or machine_threads()),
        "--ctx-size", str(slot.ctx_size or defaults.ctx_size),
        "--batch-size", str(perf.batch_size),
        "--no-webui",
    ]
    fa = perf.flash_attention
    flash = "auto" if fa == "auto" else ("on" if fa else "off")
    args += ["--flash-attn", flash]
    kv = perf.kv_cache_quantization
    if kv and kv != "f16":
        args += ["--cache-type-k", kv]
        # llama.cpp can only quantize the V cache when flash attention may be used.
        if flash != "off":
            args += ["--cache-type-v", kv]
    if perf.parallel:
        args += ["--parallel", str(perf.parallel)]
    if perf.mlock:
        args += ["--load-mode", "mmap+mlock"]
    if slot.model_type in EMBEDDING_TYPES:
        args += ["--embeddings", "--pooling", "mean"]
    if slot.mmproj and slot.model_type in MMPROJ_TYPES:
        args += ["--mmproj", str(defaults.resolve(slot.mmproj))]
    return args
