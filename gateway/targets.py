"""Where a request can go: local slots and remote upstreams, found by model name or by need.

This is the foundation's router: exact model name first (slot `name`, GGUF file stem, or an
upstream's model), else the first ready backend of the type the endpoint needs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from supervisor import Slot, Supervisor
from supervisor.spec import EMBEDDING_TYPES

from .config import UpstreamConfig
from .errors import APIError

Endpoint = Literal["chat", "completions", "embeddings"]
DEFAULT_MODEL_NAMES = frozenset({"", "auto", "default"})
# Which model types can serve each endpoint, in order of preference when no model is named.
SERVES: dict[Endpoint, tuple[str, ...]] = {
    "chat": ("text", "omni", "vision", "audio"),
    "completions": ("text", "omni", "vision", "audio"),
    "embeddings": ("embedding", "vision-embedding"),
}


@dataclass(frozen=True)
class Target:
    """One backend able to take a request for `model_id`."""

    model_id: str
    model_type: str
    base_url: str  # ends in /v1
    api_key: str | None = None
    slot: Slot | None = field(default=None, compare=False)
    upstream: str | None = None

    @property
    def label(self) -> str:
        return f"slot {self.slot.port}" if self.slot else f"upstream {self.upstream}"

    @property
    def available(self) -> bool:
        return self.slot is None or self.slot.is_ready


def slot_target(slot: Slot) -> Target:
    return Target(slot.config.display_name, slot.config.model_type, f"{slot.base_url}/v1", slot=slot)


class ModelRegistry:
    """All servable models; slots are read live from the supervisor, upstreams from config."""

    def __init__(self, supervisor: Supervisor, upstreams: list[UpstreamConfig]) -> None:
        self.supervisor = supervisor
        self.upstreams = upstreams
        self._upstream_targets: dict[str, Target] = {}
        self.refresh_upstreams()

    def refresh_upstreams(self) -> None:
        targets: dict[str, Target] = {}
        for up in self.upstreams:
            for model in up.models:
                targets.setdefault(model, Target(model, up.model_type, up.url, up.api_key, upstream=up.name))
        self._upstream_targets = targets

    def targets(self) -> list[Target]:
        slots = [slot_target(s) for _, s in sorted(self.supervisor.slots.items())]
        return slots + list(self._upstream_targets.values())

    def _by_name(self, model: str) -> Target | None:
        for slot in self.supervisor.slots.values():
            if model in (slot.config.display_name, Path(slot.config.model_path).stem):
                return slot_target(slot)
        return self._upstream_targets.get(model)

    def resolve(self, model: str | None, endpoint: Endpoint) -> Target:
        """The target for this request, or an APIError saying why there is none."""
        wanted = SERVES[endpoint]
        if model is None or model in DEFAULT_MODEL_NAMES:
            candidates = [t for t in self.targets() if t.model_type in wanted]
            for target in sorted(candidates, key=lambda t: wanted.index(t.model_type)):
                if target.available:
                    return target
            if candidates:
                raise APIError(503, f"no {wanted[0]} model is ready yet ({candidates[0].label} is "
                                    f"{candidates[0].slot.state.value if candidates[0].slot else 'down'})",
                               "model_not_ready", headers={"Retry-After": "2"})
            raise APIError(503, f"no model of type {' or '.join(wanted)} is loaded", "no_model_loaded")
        target = self._by_name(model)
        if target is None:
            names = ", ".join(t.model_id for t in self.targets()) or "none"
            raise APIError(404, f"The model '{model}' does not exist. Available models: {names}",
                           "model_not_found")
        if target.model_type not in wanted:
            need = "an embedding model" if endpoint == "embeddings" else "a text, vision, omni or audio model"
            kind = "embedding" if target.model_type in EMBEDDING_TYPES else target.model_type
            raise APIError(400, f"The model '{model}' is a {kind} model; /v1/{_path(endpoint)} needs {need}",
                           "model_not_supported")
        if not target.available:
            assert target.slot is not None
            raise APIError(503, f"The model '{model}' ({target.label}) is {target.slot.state.value}; "
                                "try again shortly", "model_not_ready", headers={"Retry-After": "2"})
        return target


def _path(endpoint: Endpoint) -> str:
    return "chat/completions" if endpoint == "chat" else endpoint
