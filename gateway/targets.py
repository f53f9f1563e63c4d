"""The capability router: which slot or upstream takes a request.

In order: the exact model name or alias (a slot's `name`, its GGUF file stem, an upstream's model);
else what the request needs (image parts need vision/omni, input_audio parts need omni, embeddings
of images need vision-embedding, other embeddings need embedding, plain chat goes to text). Among
several able backends, the one with the fewest requests in flight comes first; the caller retries
on the next one if the first cannot be reached.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from supervisor import Slot, Supervisor

from .config import UpstreamConfig
from .errors import APIError

Endpoint = Literal["chat", "completions", "embeddings"]
DEFAULT_MODEL_NAMES = frozenset({"", "auto", "default"})

# What each model type can do; /v1/models shows these as `capabilities`.
CAPABILITIES: dict[str, tuple[str, ...]] = {
    "text": ("chat", "completions"),
    "vision": ("chat", "completions", "vision"),
    "omni": ("chat", "completions", "vision", "audio_input"),
    "embedding": ("embeddings",),
    "vision-embedding": ("embeddings", "vision"),
    "audio": ("transcriptions",),
    "tts": ("speech",),
}


@dataclass(frozen=True)
class Need:
    """What a request asks of a backend: an endpoint, and maybe image or audio input."""

    endpoint: Endpoint
    images: bool = False
    audio: bool = False

    @property
    def types(self) -> tuple[str, ...]:
        """The model types able to serve it, the preferred first."""
        if self.endpoint == "embeddings":
            return ("vision-embedding",) if self.images else ("embedding", "vision-embedding")
        if self.audio:
            return ("omni",)
        if self.images:
            return ("vision", "omni")
        return ("text", "omni", "vision")

    def describe(self) -> str:
        if self.endpoint == "embeddings":
            return "image embeddings" if self.images else "embeddings"
        return "audio input" if self.audio else "image input" if self.images else f"/{_path(self.endpoint)}"


def need_of(endpoint: Endpoint, payload: dict[str, Any]) -> Need:
    """Look through the request for image and audio parts."""
    images = audio = False
    if endpoint == "chat":
        for message in payload.get("messages") or ():
            content = message.get("content") if isinstance(message, dict) else None
            if isinstance(content, list):
                for part in content:
                    kind = part.get("type") if isinstance(part, dict) else None
                    images = images or kind in ("image_url", "image")
                    audio = audio or kind in ("input_audio", "audio")
    elif endpoint == "embeddings":
        items = payload.get("input")
        for item in items if isinstance(items, list) else (items,):
            if isinstance(item, dict) and ("image_url" in item or "image" in item or item.get("type") == "image_url"):
                images = True
    return Need(endpoint, images, audio)


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
    def key(self) -> str:
        """Stable identity for load counting: `slot:4801` or `upstream:name`."""
        return f"slot:{self.slot.port}" if self.slot else f"upstream:{self.upstream}"

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
        self.in_flight: Counter[str] = Counter()  # by Target.key
        self._upstream_targets: list[Target] = []
        self.refresh_upstreams()

    def refresh_upstreams(self) -> None:
        self._upstream_targets = [Target(model, up.model_type, up.url, up.api_key, upstream=up.name)
                                  for up in self.upstreams for model in up.models]

    def targets(self) -> list[Target]:
        slots = [slot_target(s) for _, s in sorted(self.supervisor.slots.items())]
        return slots + self._upstream_targets

    def begin(self, target: Target) -> None:
        self.in_flight[target.key] += 1

    def end(self, target: Target) -> None:
        self.in_flight[target.key] -= 1

    def _named(self, model: str) -> list[Target]:
        found = []
        for target in self.targets():
            stem = Path(target.slot.config.model_path).stem if target.slot else None
            if model in (target.model_id, stem):
                found.append(target)
        return found

    def candidates(self, model: str | None, need: Need) -> list[Target]:
        """Ready targets for this request, least busy first; an APIError says why there are none."""
        wanted = need.types
        if model is None or model in DEFAULT_MODEL_NAMES:
            able = [t for t in self.targets() if t.model_type in wanted]
            ready = [t for t in able if t.available]
            if ready:
                return sorted(ready, key=lambda t: (wanted.index(t.model_type), self.in_flight[t.key]))
            if able:
                state = able[0].slot.state.value if able[0].slot else "down"
                raise APIError(503, f"no {wanted[0]} model is ready yet ({able[0].label} is {state})",
                               "model_not_ready", headers={"Retry-After": "2"})
            raise APIError(503, f"no model of type {' or '.join(wanted)} is loaded for {need.describe()}",
                           "no_model_loaded")
        named = self._named(model)
        if not named:
            names = ", ".join(sorted({t.model_id for t in self.targets()})) or "none"
            raise APIError(404, f"The model '{model}' does not exist. Available models: {names}",
                           "model_not_found")
        able = [t for t in named if t.model_type in wanted]
        if not able:
            could = sorted({f"{t.model_id} ({t.model_type})" for t in self.targets() if t.model_type in wanted})
            raise APIError(400, f"The model '{model}' ({named[0].model_type}) cannot serve {need.describe()}; "
                                f"models that can: {', '.join(could) or 'none loaded'}", "model_not_supported")
        ready = [t for t in able if t.available]
        if not ready:
            assert able[0].slot is not None
            raise APIError(503, f"The model '{model}' ({able[0].label}) is {able[0].slot.state.value}; "
                                "try again shortly", "model_not_ready", headers={"Retry-After": "2"})
        return sorted(ready, key=lambda t: self.in_flight[t.key])


def _path(endpoint: Endpoint) -> str:
    return "chat/completions" if endpoint == "chat" else endpoint
