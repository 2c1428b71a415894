"""Prometheus metrics for ``edgekit serve``, kept and written by ``prometheus_client``.

    registry = Registry()
    requests = registry.counter("edgekit_requests_total", "HTTP requests answered.", ("endpoint", "code"))
    requests.inc(endpoint="/v1/completions", code="200")
    ttft = registry.histogram("edgekit_time_to_first_token_seconds", "...", buckets=(0.05, 0.1, 0.5))
    ttft.observe(0.12)
    registry.gauge("edgekit_queue_depth", "...", read=lambda: admission.queued)
    registry.render()      # the /metrics body (text format 0.0.4, CONTENT_TYPE)

Each :class:`Registry` owns a ``prometheus_client.CollectorRegistry`` of its own (never the
process-wide default one), so two servers in one process — the tests start several — keep
separate counts. The families are prometheus_client's own ``Counter``, ``Gauge`` and
``Histogram`` (thread-safe updates, label and name validation, escaping, cumulative buckets);
this module only adds the keyword-label calls the server uses, a ``touch`` that makes a label
set appear at 0, and leaves out the ``*_created`` timestamp series that prometheus_client adds
to counters and histograms (the server's start time is not a metric anyone asked for, and
they would double the page).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Sequence

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client import Counter as _Counter
from prometheus_client import Gauge as _Gauge
from prometheus_client import Histogram as _Histogram
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

#: the exposition format's Content-Type (text format 0.0.4, what generate_latest writes)
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4


class _Family:
    def __init__(self, name: str, metric, labels: Sequence[str]):
        self.name, self._metric, self.labels = name, metric, tuple(labels)

    def _child(self, labels: dict[str, object]):
        if set(labels) != set(self.labels):
            raise ValueError(f"{self.name} takes labels {self.labels}, got {tuple(sorted(labels))}")
        if not self.labels:
            return self._metric
        return self._metric.labels(**{n: str(labels[n]) for n in self.labels})

    def _sample(self, suffix: str, labels: dict[str, object]) -> float:
        self._child(labels)  # checks the label names
        want = {n: str(labels[n]) for n in self.labels}
        for family in self._metric.collect():
            for s in family.samples:
                if s.name == family.name + suffix and s.labels == want:
                    return float(s.value)
        return 0.0


class Counter(_Family):
    """A monotonically increasing count per label set."""

    def inc(self, amount: float = 1.0, **labels: object) -> None:
        self._child(labels).inc(amount)  # prometheus_client refuses a negative amount (ValueError)

    def touch(self, **labels: object) -> None:
        """Make a label set appear (at 0) before its first event, so rates start from 0."""
        self._child(labels)

    def value(self, **labels: object) -> float:
        return self._sample("_total", labels)


class Gauge(_Family):
    """A value that goes up and down; ``read`` (no labels) computes it at scrape time."""

    def set(self, value: float, **labels: object) -> None:
        self._child(labels).set(float(value))

    def value(self, **labels: object) -> float:
        return self._sample("", labels)


class Histogram(_Family):
    """Observations counted into cumulative buckets (upper bounds ``le``), with their sum."""

    def observe(self, value: float, **labels: object) -> None:
        value = float(value)
        if math.isnan(value):
            return  # nothing to count; NaN would poison the sum
        self._child(labels).observe(value)

    def count(self, **labels: object) -> int:
        return int(self._sample("_count", labels))


class _WithoutCreated:
    """A collector over metric objects, minus their ``*_created`` samples."""

    def __init__(self) -> None:
        self.metrics: list = []

    def collect(self) -> Iterable:
        for metric in self.metrics:
            for family in metric.collect():
                family.samples = [s for s in family.samples if s.name != family.name + "_created"]
                yield family


class Registry:
    """The families one /metrics page shows, in registration order."""

    def __init__(self) -> None:
        self.collector_registry = CollectorRegistry(auto_describe=False)
        self._collector = _WithoutCreated()
        self.collector_registry.register(self._collector)
        self._families: dict[str, _Family] = {}

    def _add(self, family: _Family, name: str) -> _Family:
        if name in self._families:
            raise ValueError(f"metric {name} is registered twice")
        self._families[name] = family
        self._collector.metrics.append(family._metric)
        return family

    def counter(self, name: str, help_text: str, labels: Sequence[str] = ()) -> Counter:
        metric = _Counter(name, help_text, labelnames=tuple(labels), registry=None)
        return self._add(Counter(name, metric, labels), name)  # type: ignore[return-value]

    def gauge(self, name: str, help_text: str, labels: Sequence[str] = (), read: Callable[[], float] | None = None) -> Gauge:
        if read is not None and labels:
            raise ValueError("a gauge read at scrape time has no labels")
        metric = _Gauge(name, help_text, labelnames=tuple(labels), registry=None)
        if read is not None:
            metric.set_function(lambda: float(read()))
        return self._add(Gauge(name, metric, labels), name)  # type: ignore[return-value]

    def histogram(self, name: str, help_text: str, buckets: Sequence[float], labels: Sequence[str] = ()) -> Histogram:
        bounds = sorted(float(b) for b in buckets if not math.isinf(b))
        if not bounds or len(set(bounds)) != len(bounds):
            raise ValueError(f"{name}: buckets must be distinct finite numbers, got {list(buckets)}")
        metric = _Histogram(name, help_text, labelnames=tuple(labels), buckets=bounds, registry=None)
        return self._add(Histogram(name, metric, labels), name)  # type: ignore[return-value]

    def get(self, name: str) -> _Family:
        return self._families[name]

    def render(self) -> str:
        return generate_latest(self.collector_registry).decode("utf-8")


class _HealthCollector:
    """The device's health (:class:`edgekit.telemetry.DeviceHealth`) read at scrape time, as gauges
    ``edgekit_<reading name>``; a source that fails to read leaves its gauges out of that scrape."""

    HELP = {
        "device_temperature_celsius": "Temperature by sensor (tegrastats: cpu, gpu, tj, ...; NVML: gpu0, ...).",
        "device_utilization_ratio": "Busy fraction by unit (gpu from tegrastats' GR3D_FREQ; gpu0... from NVML; cpu).",
        "device_memory_used_bytes": "Memory in use: ram (MemTotal - MemAvailable; on a Jetson the GPU's too), gpu0... (NVML).",
        "device_memory_total_bytes": "Memory installed, by the same `memory` label as device_memory_used_bytes.",
        "device_power_watts": "Instant power by rail (tegrastats: VDD_IN is the module input) or GPU (NVML).",
        "device_load_1m": "The host's 1-minute load average (runnable threads).",
    }

    def __init__(self, health: Any):
        self.health = health

    def collect(self) -> Iterable:
        from prometheus_client.core import GaugeMetricFamily

        families: dict[str, GaugeMetricFamily] = {}
        try:
            readings = list(self.health.read())
        except Exception:  # a sensor that fails must not fail /metrics; the gauges are simply absent
            readings = []
        for reading in readings:
            family = families.get(reading.name)
            if family is None:
                family = families[reading.name] = GaugeMetricFamily(
                    f"edgekit_{reading.name}", self.HELP.get(reading.name, reading.name), labels=sorted(reading.labels))
            family.add_metric([reading.labels[k] for k in sorted(reading.labels)], reading.value)
        yield from families.values()


# Buckets: TTFT spans a fast local prefill (tens of ms) to a queued request behind a cold remote
# branch (tens of s); time per output token spans a GPU (a few ms) to a loaded CPU (~1 s).
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5)
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
QUEUE_BUCKETS = (0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)


class ServeMetrics:
    """The families ``edgekit serve`` exposes (docs/serve.md lists them)."""

    ERROR_KINDS = (
        "bad_request", "unauthorized", "not_found", "method_not_allowed", "payload_too_large", "queue_full",
        "unavailable", "queue_timeout", "request_timeout", "generation_failed", "client_disconnected", "internal",
        "client_timeout", "too_many_connections",
    )

    def __init__(self, *, queue_depth: Callable[[], float], in_flight: Callable[[], float], info: dict[str, str],
                 open_connections: Callable[[], float] | None = None, budgets: dict | None = None,
                 health: Any = None, prefix_cache_bytes: Callable[[], float] | None = None):
        r = self.registry = Registry()
        self.info = r.gauge("edgekit_serve_info", "The served bundle and policy (always 1).", tuple(sorted(info)))
        self.info.set(1, **info)
        self.requests = r.counter("edgekit_requests_total", "HTTP requests answered, by endpoint and status code "
                                  "(499: the client disconnected during the answer).", ("endpoint", "code"))
        self.prompt_tokens = r.counter("edgekit_prompt_tokens_total", "Prompt tokens of the requests that were answered.")
        self.generated_tokens = r.counter("edgekit_generated_tokens_total", "Tokens generated in answers (completion tokens).")
        self.answers = r.counter("edgekit_answers_total", "Answers by the branch that answered (small, large, speculative) and "
                                 "whether the policy's branch was unavailable (fell_back: true, false, unknown).",
                                 ("branch", "fell_back"))
        self.escalations = r.counter("edgekit_cascade_escalations_total",
                                     "Cascade answers the small branch handed to the large one.")
        # policy degrade (edgekit.runtime.load): requests the small branch answered because the large one was over budget
        self.downgrades = r.counter("edgekit_downgrades_total", "Answers policy degrade sent to the small branch because the "
                                    "large one was over its latency budget, by the signal (queue, ttft_p99, tpot_p99).",
                                    ("reason",))
        for reason in ("queue", "ttft_p99", "tpot_p99"):
            self.downgrades.touch(reason=reason)
        self.branch_failures = r.counter("edgekit_branch_failures_total", "Branch attempts that failed (timeout, unreachable) "
                                         "within answered requests.", ("branch",))
        self.errors = r.counter("edgekit_errors_total", "Requests that ended in an error, by kind.", ("kind",))
        for kind in self.ERROR_KINDS:
            self.errors.touch(kind=kind)
        self.ttft = r.histogram("edgekit_time_to_first_token_seconds", "Request arrival to the first token of the answer "
                                "returned (queue wait included).", TTFT_BUCKETS)
        self.tpot = r.histogram("edgekit_time_per_output_token_seconds", "Per answer: mean time per output token after the "
                                "first ((last - first token time) / (tokens - 1)).", TPOT_BUCKETS)
        self.duration = r.histogram("edgekit_request_duration_seconds", "Generation requests: arrival to the last byte.",
                                    DURATION_BUCKETS)
        self.queue_wait = r.histogram("edgekit_queue_wait_seconds", "Time admitted requests waited for a generation slot.",
                                      QUEUE_BUCKETS)
        self.queue_depth = r.gauge("edgekit_queue_depth", "Requests waiting for a generation slot.", read=queue_depth)
        self.in_flight = r.gauge("edgekit_requests_in_flight", "Requests generating now.", read=in_flight)
        self.connections = r.gauge("edgekit_open_connections", "Client connections open now (--max-connections caps them).",
                                   read=open_connections or (lambda: 0))
        # per answering branch: which one breaches the budget (a cascade's two branches differ by 10x)
        self.branch_ttft = r.histogram("edgekit_branch_time_to_first_token_seconds", "Start of generation to the "
                                       "answering branch's first token, by branch (no queue wait).", TTFT_BUCKETS, ("branch",))
        self.branch_tpot = r.histogram("edgekit_branch_time_per_output_token_seconds", "Per answer: mean time per output "
                                       "token after the first, by the branch that answered.", TPOT_BUCKETS, ("branch",))
        # the bundle's budgets (recipe `budgets:`), so that one alert rule file serves every model of a fleet
        self.budget = r.gauge("edgekit_budget_seconds", "The bundle's latency budget (p99), by what it bounds.",
                              ("kind", "quantile"))
        for key, kind in (("latency_p99_ms", "time_per_output_token"), ("ttft_p99_ms", "time_to_first_token")):
            value = (budgets or {}).get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0:
                self.budget.set(value / 1000.0, kind=kind, quantile="0.99")
        memory_gb = (budgets or {}).get("memory_gb")
        if isinstance(memory_gb, (int, float)) and not isinstance(memory_gb, bool) and math.isfinite(memory_gb) and memory_gb > 0:
            r.gauge("edgekit_budget_memory_bytes", "The bundle's peak-memory budget.").set(memory_gb * 2**30)
        # batched decoding (edgekit.runtime.backends.batched): how many streams share each decode step
        self.batch_size = r.histogram("edgekit_batch_size", "Streams decoded by one batched forward pass, by branch "
                                      "(small, large); only with batching on and --max-concurrency above 1.",
                                      BATCH_BUCKETS, ("branch",))
        # prompt-prefix KV reuse (edgekit.runtime.prefix_cache), summed over the local branches
        self.prefix_hits = r.counter("edgekit_prefix_cache_hits_total", "Prompts that started from a cached prefix's KV "
                                     "cache (per branch prefill).")
        self.prefix_misses = r.counter("edgekit_prefix_cache_misses_total", "Prompts long enough for a cached prefix that "
                                       "found none (per branch prefill).")
        self.prefix_tokens_reused = r.counter("edgekit_prefix_cache_tokens_reused_total", "Prompt tokens taken from the "
                                              "prefix cache instead of being prefilled.")
        self.prefix_bytes = r.gauge("edgekit_prefix_cache_bytes", "Memory the prefix caches hold now.",
                                    read=prefix_cache_bytes or (lambda: 0))
        if health is not None:
            r.collector_registry.register(_HealthCollector(health))
        # process_resident_memory_bytes, process_cpu_seconds_total, ... (Linux /proc; nothing elsewhere)
        ProcessCollector(registry=r.collector_registry)

    def prefix_lookup(self, hit: bool, tokens: int) -> None:
        """One prefix-cache lookup (PrefixCache's ``on_lookup``)."""
        if hit:
            self.prefix_hits.inc()
            self.prefix_tokens_reused.inc(tokens)
        else:
            self.prefix_misses.inc()

    def watch_load(self, monitor: Any) -> None:
        """Policy degrade's load monitor (edgekit.runtime.load.LoadMonitor) as gauges read at
        scrape time (NaN: no large-branch answer in the window)."""
        def p99(key: str) -> Callable[[], float]:
            return lambda: math.nan if (v := monitor.state()[key]) is None else v

        r = self.registry
        r.gauge("edgekit_degraded", "1 while policy degrade sends new requests to the small branch (the large one is over "
                "its latency budget), else 0.", read=lambda: float(monitor.state()["degraded"]))
        r.gauge("edgekit_large_in_flight", "Requests on the large branch now (policy degrade's queue).",
                read=lambda: monitor.state()["large_in_flight"])
        r.gauge("edgekit_large_ttft_p99_seconds", "Policy degrade's window: the large branch's time to first token, p99.",
                read=p99("ttft_p99_s"))
        r.gauge("edgekit_large_tpot_p99_seconds", "Policy degrade's window: the large branch's time per output token, p99.",
                read=p99("tpot_p99_s"))

    def render(self) -> str:
        return self.registry.render()
