"""`data/config.json`: reading it with validation that names the bad field, and writing it back.

Unknown keys are kept as they are, so a config edited by hand (or by a newer version) survives
a save. `LLM_GATEWAY_ADMIN_KEY` overrides `admin_key` without ever being written to the file.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from supervisor.spec import KV_CACHE_TYPES, MODEL_TYPES, SLOT_PORTS, PerformanceConfig, SlotConfig, SlotDefaults

ADMIN_KEY_ENV = "LLM_GATEWAY_ADMIN_KEY"


class ConfigError(ValueError):
    """The config cannot be used; the message starts with the dotted path of the bad field."""


@dataclass
class UpstreamConfig:
    """A remote OpenAI-compatible server whose models the gateway forwards to."""

    name: str
    url: str  # base URL including /v1, e.g. http://127.0.0.1:11434/v1
    api_key: str | None = None
    models: list[str] = field(default_factory=list)
    model_type: str = "text"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "url": self.url, "api_key": self.api_key,
                "models": list(self.models), "model_type": self.model_type}


@dataclass
class Price:
    input_per_1k: float = 0.0
    output_per_1k: float = 0.0

    def to_dict(self) -> dict[str, float]:
        return {"input_per_1k": self.input_per_1k, "output_per_1k": self.output_per_1k}


@dataclass
class Pricing(Price):
    """Global prices, with per-model overrides under `pricing.models.<model id>`."""

    models: dict[str, Price] = field(default_factory=dict)

    def for_model(self, model: str | None) -> Price:
        return self.models.get(model or "", self)

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = super().to_dict()
        if self.models:
            data["models"] = {name: price.to_dict() for name, price in self.models.items()}
        return data


@dataclass
class Config:
    slots: dict[int, SlotConfig | None] = field(default_factory=lambda: {p: None for p in SLOT_PORTS})
    upstreams: list[UpstreamConfig] = field(default_factory=list)
    admin_key: str | None = None
    default_threads: int | None = None  # None: one per physical core (supervisor.spec.machine_threads)
    default_ctx_size: int = 8192
    pricing: Pricing = field(default_factory=Pricing)
    rate_limits: dict[str, int] = field(default_factory=lambda: {"payg": 25, "sub": 100})
    credit_costs: dict[str, float] = field(default_factory=lambda: {"payg": 1.0, "sub": 1.0, "admin": 0.0})
    max_concurrent_requests: int = 0  # requests in flight to backends; 0 = unlimited
    max_queued_requests: int = 100  # beyond the cap, this many wait; more get 503
    queue_timeout: float = 30.0  # seconds a queued request waits before a 503
    signups_per_hour: int = 5  # per client IP, on POST /api/signup
    performance: PerformanceConfig = field(default_factory=PerformanceConfig)
    request_timeout: float = 600.0  # seconds without a byte from a backend before a 504
    llama_server: str | None = None  # path to the binary; default build/bin/llama-server
    extra: dict[str, Any] = field(default_factory=dict)  # keys this version does not know

    @property
    def effective_admin_key(self) -> str | None:
        return os.environ.get(ADMIN_KEY_ENV) or self.admin_key

    def slot_defaults(self, data_dir: Path) -> SlotDefaults:
        """Slot fallbacks; relative model paths in the config are relative to the data dir."""
        return SlotDefaults(self.default_threads, self.default_ctx_size, self.performance, data_dir)

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = dict(self.extra)
        data.update({
            "slots": {str(p): (s.to_dict() if s else None) for p, s in sorted(self.slots.items())},
            "upstreams": [u.to_dict() for u in self.upstreams],
            "admin_key": self.admin_key,
            "default_threads": self.default_threads,
            "default_ctx_size": self.default_ctx_size,
            "pricing": self.pricing.to_dict(),
            "rate_limits": dict(self.rate_limits),
            "credit_costs": dict(self.credit_costs),
            "max_concurrent_requests": self.max_concurrent_requests,
            "max_queued_requests": self.max_queued_requests,
            "queue_timeout": self.queue_timeout,
            "signups_per_hour": self.signups_per_hour,
            "performance": self.performance.to_dict(),
            "request_timeout": self.request_timeout,
        })
        if self.llama_server:
            data["llama_server"] = self.llama_server
        return data


# --- validation helpers -------------------------------------------------------------------
def _get(obj: dict[str, Any], key: str, types: type | tuple[type, ...], path: str, default: Any) -> Any:
    if key not in obj or (obj[key] is None and default is None):
        return default
    value = obj[key]
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise ConfigError(f"{path}{key}: expected {_names(types)}, got a boolean")
    if not isinstance(value, types):
        raise ConfigError(f"{path}{key}: expected {_names(types)}, got {type(value).__name__}")
    return value


def _names(types: type | tuple[type, ...]) -> str:
    return " or ".join(t.__name__ for t in (types if isinstance(types, tuple) else (types,)))


def _positive(value: int | float | None, path: str) -> None:
    if value is not None and value <= 0:
        raise ConfigError(f"{path}: must be greater than 0, got {value}")


def _model_type(value: str, path: str) -> str:
    if value not in MODEL_TYPES:
        raise ConfigError(f"{path}: {value!r} is not one of {', '.join(MODEL_TYPES)}")
    return value


def _parse_slot(raw: Any, path: str) -> SlotConfig | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected an object or null")
    p = path + "."
    model_path = _get(raw, "model_path", str, p, None)
    if not model_path:
        raise ConfigError(f"{p}model_path: required")
    slot = SlotConfig(
        model_path=model_path,
        model_type=_model_type(_get(raw, "model_type", str, p, "text"), p + "model_type"),
        name=_get(raw, "name", str, p, None),
        mmproj=_get(raw, "mmproj", str, p, None),
        ctx_size=_get(raw, "ctx_size", int, p, None),
        threads=_get(raw, "threads", int, p, None),
    )
    _positive(slot.ctx_size, p + "ctx_size")
    _positive(slot.threads, p + "threads")
    return slot


def _parse_slots(raw: Any) -> dict[int, SlotConfig | None]:
    if not isinstance(raw, dict):
        raise ConfigError("slots: expected an object keyed by port (\"4801\" .. \"4807\")")
    slots: dict[int, SlotConfig | None] = {p: None for p in SLOT_PORTS}
    for key, value in raw.items():
        if not str(key).isdigit() or int(key) not in SLOT_PORTS:
            raise ConfigError(f"slots.{key}: slot ports are 4801-4807")
        slots[int(key)] = _parse_slot(value, f"slots.{key}")
    return slots


def _parse_upstreams(raw: Any) -> list[UpstreamConfig]:
    if not isinstance(raw, list):
        raise ConfigError("upstreams: expected a list")
    result: list[UpstreamConfig] = []
    names: set[str] = set()
    for i, item in enumerate(raw):
        p = f"upstreams[{i}]."
        if not isinstance(item, dict):
            raise ConfigError(f"upstreams[{i}]: expected an object")
        name = _get(item, "name", str, p, None)
        url = _get(item, "url", str, p, None)
        if not name:
            raise ConfigError(f"{p}name: required")
        if name in names:
            raise ConfigError(f"{p}name: {name!r} is used twice")
        if not url or not url.startswith(("http://", "https://")):
            raise ConfigError(f"{p}url: expected an http(s) URL such as http://127.0.0.1:11434/v1")
        models = _get(item, "models", list, p, [])
        if not all(isinstance(m, str) and m for m in models):
            raise ConfigError(f"{p}models: expected a list of model names")
        names.add(name)
        result.append(UpstreamConfig(
            name=name, url=url.rstrip("/"), api_key=_get(item, "api_key", str, p, None), models=models,
            model_type=_model_type(_get(item, "model_type", str, p, "text"), p + "model_type"),
        ))
    return result


def _parse_price(raw: dict[str, Any], path: str) -> Price:
    price = Price(float(_get(raw, "input_per_1k", (int, float), path, 0.0)),
                  float(_get(raw, "output_per_1k", (int, float), path, 0.0)))
    if price.input_per_1k < 0 or price.output_per_1k < 0:
        raise ConfigError(f"{path}: prices must be >= 0")
    return price


def _parse_pricing(raw: dict[str, Any]) -> Pricing:
    base = _parse_price(raw, "pricing.")
    models = {}
    for name, item in _get(raw, "models", dict, "pricing.", {}).items():
        if not isinstance(item, dict):
            raise ConfigError(f"pricing.models.{name}: expected an object with input_per_1k, output_per_1k")
        models[name] = _parse_price(item, f"pricing.models.{name}.")
    return Pricing(base.input_per_1k, base.output_per_1k, models)


def _parse_performance(raw: Any) -> PerformanceConfig:
    if not isinstance(raw, dict):
        raise ConfigError("performance: expected an object")
    p = "performance."
    d = PerformanceConfig()
    fa = _get(raw, "flash_attention", (bool, str), p, d.flash_attention)
    if isinstance(fa, str) and fa != "auto":
        raise ConfigError(f"{p}flash_attention: expected true, false or \"auto\"")
    kv = _get(raw, "kv_cache_quantization", str, p, None) if "kv_cache_quantization" in raw else d.kv_cache_quantization
    if kv is not None and kv not in KV_CACHE_TYPES:
        raise ConfigError(f"{p}kv_cache_quantization: {kv!r} is not one of {', '.join(KV_CACHE_TYPES)}")
    perf = PerformanceConfig(
        flash_attention=fa,
        mlock=_get(raw, "mlock", bool, p, d.mlock),
        kv_cache_quantization=kv,
        batch_size=_get(raw, "batch_size", int, p, d.batch_size),
        parallel=_get(raw, "parallel", int, p, d.parallel),
    )
    _positive(perf.batch_size, p + "batch_size")
    _positive(perf.parallel, p + "parallel")
    return perf


def parse_config(raw: Any) -> Config:
    if not isinstance(raw, dict):
        raise ConfigError("config: expected a JSON object at the top level")
    d = Config()
    known = {"slots", "upstreams", "admin_key", "default_threads", "default_ctx_size", "pricing",
             "rate_limits", "performance", "request_timeout", "llama_server", "credit_costs",
             "max_concurrent_requests", "max_queued_requests", "queue_timeout", "signups_per_hour"}
    rate_limits = _get(raw, "rate_limits", dict, "", d.rate_limits)
    for tier, limit in rate_limits.items():
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
            raise ConfigError(f"rate_limits.{tier}: expected a whole number of requests per minute")
    credit_costs = {**d.credit_costs, **_get(raw, "credit_costs", dict, "", {})}
    for tier, cost in credit_costs.items():
        if isinstance(cost, bool) or not isinstance(cost, int | float) or cost < 0:
            raise ConfigError(f"credit_costs.{tier}: expected a number >= 0")
    cfg = Config(
        slots=_parse_slots(raw.get("slots", {})),
        upstreams=_parse_upstreams(raw.get("upstreams", [])),
        admin_key=_get(raw, "admin_key", str, "", None),
        default_threads=_get(raw, "default_threads", int, "", d.default_threads),
        default_ctx_size=_get(raw, "default_ctx_size", int, "", d.default_ctx_size),
        pricing=_parse_pricing(_get(raw, "pricing", dict, "", {})),
        rate_limits=dict(rate_limits),
        credit_costs={k: float(v) for k, v in credit_costs.items()},
        max_concurrent_requests=_get(raw, "max_concurrent_requests", int, "", d.max_concurrent_requests),
        max_queued_requests=_get(raw, "max_queued_requests", int, "", d.max_queued_requests),
        queue_timeout=float(_get(raw, "queue_timeout", (int, float), "", d.queue_timeout)),
        signups_per_hour=_get(raw, "signups_per_hour", int, "", d.signups_per_hour),
        performance=_parse_performance(raw.get("performance", {})),
        request_timeout=float(_get(raw, "request_timeout", (int, float), "", d.request_timeout)),
        llama_server=_get(raw, "llama_server", str, "", None),
        extra={k: v for k, v in raw.items() if k not in known},
    )
    for name in ("max_concurrent_requests", "max_queued_requests", "signups_per_hour"):
        if getattr(cfg, name) < 0:
            raise ConfigError(f"{name}: must be 0 or more")
    _positive(cfg.queue_timeout, "queue_timeout")
    _positive(cfg.default_threads, "default_threads")
    _positive(cfg.default_ctx_size, "default_ctx_size")
    _positive(cfg.request_timeout, "request_timeout")
    return cfg


def load_config(path: Path) -> Config:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from e
    try:
        return parse_config(raw)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def save_config(config: Config, path: Path) -> None:
    """Write atomically: a crash mid-write leaves the old file, never half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".config.", suffix=".json")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(config.to_dict(), f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)  # it holds the admin key
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
