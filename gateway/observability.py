"""Metrics (Prometheus text at /metrics) and the structured access log, both fed per finished request.

Each gateway has its own `CollectorRegistry`, so several gateways in one process (tests) never mix.
Slot states and in-flight counts are read when /metrics is scraped, not tracked on the hot path.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

import orjson
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

from .policy import RequestContext

if TYPE_CHECKING:
    from .app import Gateway

access_log = logging.getLogger("gateway.access")
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Metrics:
    def __init__(self, gateway: Gateway) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("llm_gateway_requests", "Requests by endpoint, model and status",
                                ["endpoint", "model", "status"], registry=self.registry)
        self.tokens = Counter("llm_gateway_tokens", "Tokens by model and kind (input, output, cached)",
                              ["model", "kind"], registry=self.registry)
        self.latency = Histogram("llm_gateway_request_seconds", "Request latency by endpoint",
                                 ["endpoint"], buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.ttft = Histogram("llm_gateway_time_to_first_token_seconds", "Time to first token of streams",
                              ["model"], buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.registry.register(_LiveState(gateway))

    def observe(self, ctx: RequestContext) -> None:
        model = ctx.target.model_id if ctx.target else (ctx.model or "")
        self.requests.labels(ctx.endpoint, model, str(ctx.status)).inc()
        self.latency.labels(ctx.endpoint).observe(ctx.latency_s)
        if ctx.usage:
            details = ctx.usage.get("prompt_tokens_details") or {}
            counts = (("input", ctx.usage.get("prompt_tokens")), ("output", ctx.usage.get("completion_tokens")),
                      ("cached", details.get("cached_tokens")))
            for kind, value in counts:
                if value:
                    self.tokens.labels(model, kind).inc(value)
        if ctx.stream and ctx.first_byte_at is not None:
            self.ttft.labels(model).observe(ctx.first_byte_at - ctx.started)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _LiveState:
    """Collected at scrape time: slot states and requests in flight."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    def collect(self) -> Any:
        states = GaugeMetricFamily("llm_gateway_slot_state", "1 for the state each slot is in",
                                   labels=["slot", "model", "state"])
        for slot in self.gateway.supervisor.slots.values():
            states.add_metric([str(slot.port), slot.config.display_name, slot.state.value], 1)
        yield states
        restarts = GaugeMetricFamily("llm_gateway_slot_restarts", "Restarts of each slot's process",
                                     labels=["slot"])
        for slot in self.gateway.supervisor.slots.values():
            restarts.add_metric([str(slot.port)], slot.restarts)
        yield restarts
        in_flight = GaugeMetricFamily("llm_gateway_in_flight_requests", "Requests in flight per backend",
                                      labels=["backend"])
        for key, count in self.gateway.registry.in_flight.items():
            in_flight.add_metric([key], count)
        yield in_flight
        queued = GaugeMetricFamily("llm_gateway_queued_requests", "Requests waiting for the concurrency cap")
        queued.add_metric([], self.gateway.gate.queued)
        yield queued


def log_request(ctx: RequestContext) -> None:
    """One JSON line per proxied request; never the key, only its visible prefix."""
    if not access_log.isEnabledFor(logging.INFO):
        return
    principal = ctx.principal
    user = getattr(principal, "user", None)
    key = getattr(principal, "key", None)
    access_log.info(orjson.dumps({
        "ts": round(time.time(), 3), "request_id": ctx.request_id, "endpoint": ctx.endpoint,
        "user": user.username if user else None, "key_prefix": key.prefix if key else None,
        "model": ctx.target.model_id if ctx.target else ctx.model,
        "backend": ctx.target.label if ctx.target else None, "status": ctx.status, "stream": ctx.stream,
        "latency_ms": round(ctx.latency_s * 1000, 2),
        "ttft_ms": round((ctx.first_byte_at - ctx.started) * 1000, 2) if ctx.stream and ctx.first_byte_at else None,
        "usage": {k: ctx.usage.get(k) for k in ("prompt_tokens", "completion_tokens")} if ctx.usage else None,
    }).decode())


class JSONFormatter(logging.Formatter):
    """`--log-format json`: every log record as one JSON object per line."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        data: dict[str, Any] = {"ts": round(record.created, 3), "level": record.levelname, "logger": record.name}
        if message.startswith("{"):
            try:
                data.update(orjson.loads(message))
            except orjson.JSONDecodeError:
                data["message"] = message
        else:
            data["message"] = message
        if record.exc_info:
            data["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(data).decode()
