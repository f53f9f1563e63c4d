"""Metrics (Prometheus text at /metrics) and the structured access log, both fed per finished request.

Each gateway has its own `CollectorRegistry`, so several gateways in one process (tests) never mix.
prometheus-client writes the exposition format; the counting itself is plain dict arithmetic.
"""

from __future__ import annotations

import bisect
import collections
import itertools
import logging
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import orjson
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from .policy import RequestContext

if TYPE_CHECKING:
    from .app import Gateway

access_log = logging.getLogger("gateway.access")
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Metrics:
    """Counted in plain dicts on the request path (a few dict updates per request) and turned into
    Prometheus families only when /metrics is scraped."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.requests: collections.Counter[tuple[str, str, str]] = collections.Counter()
        self.tokens: collections.Counter[tuple[str, str]] = collections.Counter()
        self.latency: dict[str, _Histogram] = collections.defaultdict(_Histogram)
        self.ttft: dict[str, _Histogram] = collections.defaultdict(_Histogram)
        self.registry = CollectorRegistry()
        self.registry.register(self)

    def observe(self, ctx: RequestContext) -> None:
        model = ctx.target.model_id if ctx.target else (ctx.model or "")
        self.requests[(ctx.endpoint, model, str(ctx.status))] += 1
        self.latency[ctx.endpoint].observe(ctx.latency_s)
        usage = ctx.usage
        if usage:
            details = usage.get("prompt_tokens_details") or {}
            self.tokens[(model, "input")] += usage.get("prompt_tokens") or 0
            self.tokens[(model, "output")] += usage.get("completion_tokens") or 0
            self.tokens[(model, "cached")] += details.get("cached_tokens") or 0
        ttft = ctx.ttft_s
        if ttft is not None:
            self.ttft[model].observe(ttft)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily("llm_gateway_requests", "Requests by endpoint, model and status",
                                       labels=["endpoint", "model", "status"])
        for labels, count in self.requests.items():
            requests.add_metric(list(labels), count)
        yield requests
        tokens = CounterMetricFamily("llm_gateway_tokens", "Tokens by model and kind (input, output, cached)",
                                     labels=["model", "kind"])
        for labels, count in self.tokens.items():
            tokens.add_metric(list(labels), count)
        yield tokens
        yield _histogram_family("llm_gateway_request_seconds", "Request latency by endpoint", "endpoint",
                                self.latency)
        yield _histogram_family("llm_gateway_time_to_first_token_seconds", "Time to first token of streams",
                                "model", self.ttft)
        yield from _live_state(self.gateway)


class _Histogram:
    __slots__ = ("counts", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(_LATENCY_BUCKETS) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(_LATENCY_BUCKETS, value)] += 1
        self.sum += value


def _histogram_family(name: str, doc: str, label: str, histograms: dict[str, _Histogram]) -> Metric:
    family = HistogramMetricFamily(name, doc, labels=[label])
    for value, h in histograms.items():
        cumulative = list(itertools.accumulate(h.counts))
        buckets = [(str(le), c) for le, c in zip(_LATENCY_BUCKETS, cumulative, strict=False)]
        family.add_metric([value], buckets + [("+Inf", cumulative[-1])], sum_value=h.sum)
    return family


def _live_state(gateway: Gateway) -> Iterator[Metric]:
    """Read at scrape time: slot states and restarts, requests in flight and queued."""
    slots = gateway.supervisor.slots.values()
    states = GaugeMetricFamily("llm_gateway_slot_state", "1 for the state each slot is in",
                               labels=["slot", "model", "state"])
    for slot in slots:
        states.add_metric([str(slot.port), slot.config.display_name, slot.state.value], 1)
    yield states
    restarts = GaugeMetricFamily("llm_gateway_slot_restarts", "Restarts of each slot's process", labels=["slot"])
    for slot in slots:
        restarts.add_metric([str(slot.port)], slot.restarts)
    yield restarts
    in_flight = GaugeMetricFamily("llm_gateway_in_flight_requests", "Requests in flight per backend",
                                  labels=["backend"])
    for key, count in gateway.registry.in_flight.items():
        in_flight.add_metric([key], count)
    yield in_flight
    queued = GaugeMetricFamily("llm_gateway_queued_requests", "Requests waiting for the concurrency cap")
    queued.add_metric([], gateway.gate.queued)
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
        "ttft_ms": None if ctx.ttft_s is None else round(ctx.ttft_s * 1000, 2),
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
