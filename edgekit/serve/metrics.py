"""Prometheus metrics written by hand: counters, gauges and histograms in the text exposition
format (version 0.0.4), so a device needs no client library.

    registry = Registry()
    requests = registry.counter("edgekit_requests_total", "HTTP requests answered.", ("endpoint", "code"))
    requests.inc(endpoint="/v1/completions", code="200")
    ttft = registry.histogram("edgekit_time_to_first_token_seconds", "...", buckets=(0.05, 0.1, 0.5))
    ttft.observe(0.12)
    registry.gauge("edgekit_queue_depth", "...", read=lambda: admission.queued)
    registry.render()      # the /metrics body

Every family renders its ``# HELP`` and ``# TYPE`` lines, then one sample per label set
(label values escaped: backslash, double quote, newline). A histogram renders cumulative
``_bucket{le="..."}`` samples ending with ``le="+Inf"``, then ``_sum`` and ``_count``. All
updates take one lock per family, so request threads can update concurrently.
"""

from __future__ import annotations

import math
import threading
from typing import Callable, Sequence

#: the exposition format's Content-Type
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def format_value(value: float) -> str:
    """A sample value: integers without a fraction, +Inf/-Inf/NaN as Prometheus spells them."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if float(value).is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(float(value))


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _labels_text(names: Sequence[str], values: Sequence[str], extra: tuple[str, str] | None = None) -> str:
    pairs = [f'{n}="{_escape_label(v)}"' for n, v in zip(names, values, strict=True)]
    if extra is not None:
        pairs.append(f'{extra[0]}="{extra[1]}"')
    return "{" + ",".join(pairs) + "}" if pairs else ""


class _Family:
    kind = "untyped"

    def __init__(self, name: str, help_text: str, labels: Sequence[str] = ()):
        self.name, self.help, self.labels = name, help_text, tuple(labels)
        self._lock = threading.Lock()

    def _key(self, labels: dict[str, object]) -> tuple[str, ...]:
        if set(labels) != set(self.labels):
            raise ValueError(f"{self.name} takes labels {self.labels}, got {tuple(sorted(labels))}")
        return tuple(str(labels[n]) for n in self.labels)

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {_escape_help(self.help)}", f"# TYPE {self.name} {self.kind}"]


class Counter(_Family):
    """A monotonically increasing count per label set."""

    kind = "counter"

    def __init__(self, name: str, help_text: str, labels: Sequence[str] = ()):
        super().__init__(name, help_text, labels)
        self._values: dict[tuple[str, ...], float] = {} if labels else {(): 0.0}

    def inc(self, amount: float = 1.0, **labels: object) -> None:
        if amount < 0:
            raise ValueError(f"{self.name}: a counter only goes up (got {amount})")
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def touch(self, **labels: object) -> None:
        """Make a label set appear (at 0) before its first event, so rates start from 0."""
        key = self._key(labels)
        with self._lock:
            self._values.setdefault(key, 0.0)

    def value(self, **labels: object) -> float:
        with self._lock:
            return self._values.get(self._key(labels), 0.0)

    def render(self) -> list[str]:
        with self._lock:
            items = sorted(self._values.items())
        return self.header() + [f"{self.name}{_labels_text(self.labels, key)} {format_value(v)}" for key, v in items]


class Gauge(_Family):
    """A value that goes up and down; ``read`` (no labels) computes it at scrape time."""

    kind = "gauge"

    def __init__(self, name: str, help_text: str, labels: Sequence[str] = (), read: Callable[[], float] | None = None):
        super().__init__(name, help_text, labels)
        if read is not None and labels:
            raise ValueError("a gauge read at scrape time has no labels")
        self._read = read
        self._values: dict[tuple[str, ...], float] = {} if labels else {(): 0.0}

    def set(self, value: float, **labels: object) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = float(value)

    def value(self, **labels: object) -> float:
        if self._read is not None:
            return float(self._read())
        with self._lock:
            return self._values.get(self._key(labels), 0.0)

    def render(self) -> list[str]:
        if self._read is not None:
            return self.header() + [f"{self.name} {format_value(float(self._read()))}"]
        with self._lock:
            items = sorted(self._values.items())
        return self.header() + [f"{self.name}{_labels_text(self.labels, key)} {format_value(v)}" for key, v in items]


class Histogram(_Family):
    """Observations counted into cumulative buckets (upper bounds ``le``), with their sum."""

    kind = "histogram"

    def __init__(self, name: str, help_text: str, buckets: Sequence[float], labels: Sequence[str] = ()):
        super().__init__(name, help_text, labels)
        bounds = sorted(float(b) for b in buckets if not math.isinf(b))
        if not bounds or len(set(bounds)) != len(bounds):
            raise ValueError(f"{name}: buckets must be distinct finite numbers, got {list(buckets)}")
        self.bounds = tuple(bounds)
        # per label set: [count per bucket (non-cumulative, +Inf last)], sum
        self._series: dict[tuple[str, ...], tuple[list[int], list[float]]] = {} if labels else {(): self._empty()}

    def _empty(self) -> tuple[list[int], list[float]]:
        return [0] * (len(self.bounds) + 1), [0.0]

    def observe(self, value: float, **labels: object) -> None:
        value = float(value)
        if math.isnan(value):
            return  # nothing to count; NaN would poison the sum
        key = self._key(labels)
        index = next((i for i, b in enumerate(self.bounds) if value <= b), len(self.bounds))
        with self._lock:
            counts, total = self._series.setdefault(key, self._empty())
            counts[index] += 1
            total[0] += value

    def count(self, **labels: object) -> int:
        with self._lock:
            series = self._series.get(self._key(labels))
            return sum(series[0]) if series else 0

    def render(self) -> list[str]:
        with self._lock:
            items = sorted((key, (list(c), s[0])) for key, (c, s) in self._series.items())
        lines = self.header()
        for key, (counts, total) in items:
            cumulative = 0
            for bound, n in zip(list(self.bounds) + [math.inf], counts, strict=True):
                cumulative += n
                le = format_value(bound) if math.isinf(bound) else repr(bound)
                lines.append(f"{self.name}_bucket{_labels_text(self.labels, key, ('le', le))} {cumulative}")
            lines.append(f"{self.name}_sum{_labels_text(self.labels, key)} {format_value(total)}")
            lines.append(f"{self.name}_count{_labels_text(self.labels, key)} {cumulative}")
        return lines


class Registry:
    """The families one /metrics page shows, in registration order."""

    def __init__(self):
        self._families: dict[str, _Family] = {}

    def _add(self, family: _Family) -> _Family:
        if family.name in self._families:
            raise ValueError(f"metric {family.name} is registered twice")
        self._families[family.name] = family
        return family

    def counter(self, name: str, help_text: str, labels: Sequence[str] = ()) -> Counter:
        return self._add(Counter(name, help_text, labels))  # type: ignore[return-value]

    def gauge(self, name: str, help_text: str, labels: Sequence[str] = (), read: Callable[[], float] | None = None) -> Gauge:
        return self._add(Gauge(name, help_text, labels, read))  # type: ignore[return-value]

    def histogram(self, name: str, help_text: str, buckets: Sequence[float], labels: Sequence[str] = ()) -> Histogram:
        return self._add(Histogram(name, help_text, buckets, labels))  # type: ignore[return-value]

    def get(self, name: str) -> _Family:
        return self._families[name]

    def render(self) -> str:
        lines: list[str] = []
        for family in self._families.values():
            lines.extend(family.render())
        return "\n".join(lines) + "\n"


# Buckets: TTFT spans a fast local prefill (tens of ms) to a queued request behind a cold remote
# branch (tens of s); time per output token spans a GPU (a few ms) to a loaded CPU (~1 s).
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5)
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
QUEUE_BUCKETS = (0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class ServeMetrics:
    """The families ``edgekit serve`` exposes (docs/serve.md lists them)."""

    ERROR_KINDS = (
        "bad_request", "unauthorized", "not_found", "method_not_allowed", "payload_too_large", "queue_full",
        "unavailable", "queue_timeout", "request_timeout", "generation_failed", "client_disconnected", "internal",
    )

    def __init__(self, *, queue_depth: Callable[[], float], in_flight: Callable[[], float], info: dict[str, str]):
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

    def render(self) -> str:
        return self.registry.render()
