"""Policy degrade (edgekit.runtime.load, the Router's ``degrade`` policy): the load monitor's
signals and hysteresis on a clock the test moves, the Router with a synthetic slow large branch
(an unbatched fake device whose forward passes wait for each other), and ``edgekit serve`` with
a large branch that holds its answers until the test releases them."""

from __future__ import annotations

import json
import threading

import pytest
from branch_fakes import LARGE_TABLE, Local, Model, SMALL_TABLE
from test_serve import bundle, metrics, post, remote, start, stream, wait_until  # noqa: F401 (fixtures)

from edgekit.errors import EdgekitError
from edgekit.runtime import router as R
from edgekit.runtime.config import DegradeSettings, RuntimeConfig
from edgekit.runtime.load import LoadMonitor, load_monitor


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def monitor(**kw):
    clock = Clock()
    return LoadMonitor(clock=clock, **kw), clock


# --------------------------------------------------------------------------- the monitor


def test_tpot_p99_over_budget_degrades_and_recovers_only_below_the_recover_fraction():
    m, clock = monitor(tpot_budget_s=0.050, window=8, window_s=60)
    d = m.admit()
    assert d.large and d.ticket is not None
    m.release(d.ticket, ttft_s=0.1, tpot_s=0.030)
    d = m.admit()
    assert d.large is True  # 30 ms p99 < 50 ms
    m.release(d.ticket, tpot_s=0.070)  # one slow answer: p99 70 ms > 50 ms
    d = m.admit()
    assert not d.large and d.reason == "tpot_p99" and "70 ms" in d.detail and "50 ms" in d.detail
    assert m.state()["degraded"] and m.downgrades["tpot_p99"] == 1


def test_no_flapping_at_the_budget():
    m, clock = monitor(tpot_budget_s=0.050, window=1, window_s=60, recover=0.8)  # window 1: the p99 is the last answer
    def large(tpot):
        m.record(tpot_s=tpot)
        d = m.admit()
        if d.large:
            m.release(d.ticket)
        return d.large

    decisions = [large(t) for t in (0.052, 0.049, 0.051, 0.045, 0.050, 0.041, 0.052, 0.048)]  # at the budget, never <= 40 ms
    assert decisions == [False] * 8 and m.transitions == 1  # degraded once, and it stays so
    assert large(0.040) and m.transitions == 2  # at 80 % of the budget: recovered
    assert [large(t) for t in (0.049, 0.050, 0.043)] == [True] * 3 and m.transitions == 2  # within budget: stays


def test_explicit_queue_limit_with_hysteresis():
    m, _ = monitor(max_in_flight=2, recover=0.8)
    a, b = m.admit(), m.admit()
    assert a.large and b.large and m.in_flight == 2
    c = m.admit()
    assert not c.large and c.reason == "queue" and "at most 2" in c.detail
    m.release(a.ticket)
    assert not m.admit().large  # 1 + 1 > max(1, floor(0.8 * 2)) = 1: still degraded
    m.release(b.ticket)
    assert m.admit().large and m.downgrades == {"queue": 2, "ttft_p99": 0, "tpot_p99": 0}
    one, _ = monitor(max_in_flight=1)
    first = one.admit()
    assert first.large and not one.admit().large
    one.release(first.ticket)
    assert one.admit().large  # max 1 recovers with nothing in flight


def test_queue_prediction_from_the_window_for_an_unbatched_branch():
    m, clock = monitor(tpot_budget_s=0.050, window_s=60)
    m.record(tpot_s=0.022, sharing=1)  # 22 ms per token alone
    m.record(tpot_s=0.044, sharing=2)  # the same per stream when two shared it
    a = m.admit()  # alone: the p99 (44 ms) is within budget
    b = m.admit()  # 2 x 22 ms = 44 ms <= 50
    c = m.admit()  # 3 x 22 ms = 66 ms > 50
    assert a.large and b.large and not c.large and c.reason == "queue" and "one more predicts 66 ms" in c.detail
    m.release(a.ticket)
    d = m.admit()  # 2 streams predict 44 ms: within budget, but above 80 % of it
    assert not d.large and d.reason == "queue" and "recovering" in d.detail
    m.release(b.ticket)
    assert not m.admit().large  # the queue is empty, but the window's p99 (44 ms) is still above 40 ms
    clock.now += 50
    m.record(tpot_s=0.022)
    clock.now += 15  # the first two answers are older than window_s now
    assert m.admit().large and m.downgrades == {"queue": 2, "ttft_p99": 0, "tpot_p99": 1}


def test_sharing_is_the_time_weighted_queue_over_the_answer():
    m, clock = monitor(tpot_budget_s=10.0, window_s=1e6)
    a = m.admit()
    clock.now += 1.0
    b = m.admit()  # a shares the branch for the second half of its time
    clock.now += 1.0
    m.release(a.ticket, tpot_s=0.3)
    clock.now += 2.0
    m.release(b.ticket, tpot_s=0.3)
    assert [round(x.sharing, 6) for x in m._answers] == [1.5, round(1.0 + 1 / 3, 6)]


def test_the_window_empties_with_time_and_the_ttft_signal():
    m, clock = monitor(ttft_budget_s=0.5, window=100, window_s=10)
    m.release(m.admit().ticket, ttft_s=0.9)
    d = m.admit()
    assert not d.large and d.reason == "ttft_p99"
    clock.now += 9.0
    assert not m.admit().large  # the slow answer is still in the window
    clock.now += 2.0  # ... and now older than window_s: nothing says the branch is slow
    assert m.admit().large and m.state()["ttft_p99_s"] is None
    # an answer that did not come from the large branch is not recorded
    m.release(m.admit().ticket)
    assert m.state()["window_answers"] == 0


def test_budgets_come_from_the_settings_else_the_manifest():
    m = load_monitor(DegradeSettings(), {"latency_p99_ms": 40, "ttft_p99_ms": 300})
    assert (m.tpot_budget_s, m.ttft_budget_s) == (0.04, 0.3)
    m = load_monitor(DegradeSettings(tpot_p99_ms=25), {"latency_p99_ms": 40, "ttft_p99_ms": "fast", "memory_gb": 2})
    assert (m.tpot_budget_s, m.ttft_budget_s) == (0.025, None)  # a hostile manifest value is ignored
    with pytest.raises(EdgekitError, match="no budget"):
        load_monitor(DegradeSettings(), {"latency_p99_ms": float("nan"), "ttft_p99_ms": -1})
    with pytest.raises(EdgekitError, match="no budget"):
        R.Router(small_branch(), large_branch(), "degrade")  # a Router of its own has only the settings


@pytest.mark.parametrize("bad", [{"recover": 1.0}, {"window": 0}, {"window_s": 0}, {"protects": "speculative"},
                                 {"protects": "degrade"}, {"tpot_p99_ms": float("inf")}, {"max_large_in_flight": 0},
                                 {"speed": 1}])
def test_degrade_settings_are_strict(bad):
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        RuntimeConfig(policy="degrade", large="http://127.0.0.1:9", degrade=bad)
    with pytest.raises(EdgekitError):
        R.Router(small_branch(), large_branch(), "degrade", degrade=bad)


def test_degrade_needs_the_large_branch_and_the_protected_policys_needs():
    from branch_fakes import Remote

    with pytest.raises(EdgekitError, match="needs a large branch"):
        R.Router(small_branch(), None, "degrade", degrade={"max_large_in_flight": 1})
    with pytest.raises(EdgekitError, match="logits"):  # cascade watches the small branch's confidence
        R.Router(Remote(), large_branch(), "degrade", degrade={"protects": "cascade", "max_large_in_flight": 1})
    with pytest.raises(ValueError, match="needs a large branch"):
        RuntimeConfig(policy="degrade")


# --------------------------------------------------------------------------- the router


def small_branch():
    return Local("small", Model(SMALL_TABLE, eos_bias=-50))


def large_branch(delay=0.0, device=None):
    return Local("large", Model(LARGE_TABLE, eos_bias=-50), delay=delay, device=device)


def test_a_slow_large_branch_under_concurrent_load_sends_later_requests_to_small():
    # 25 ms per forward pass on a device that runs one pass at a time: alone a stream gets
    # ~25 ms per token, n streams ~n x 25 ms. Budget 60 ms: 2 streams fit, a 3rd would not.
    small, large = small_branch(), large_branch(delay=0.025, device=threading.Lock())
    load = LoadMonitor(tpot_budget_s=0.060, window=64, window_s=2.0)
    routers = [R.Router(small, large, "degrade", max_new_tokens=6, load=load) for _ in range(6)]
    warm = routers[0].generate("abc")
    assert warm.branch == "large" and not warm.degraded and warm.policy == "degrade"
    assert load.state()["window_answers"] == 1 and load.in_flight == 0
    results, gate = [None] * 6, threading.Barrier(6)

    def ask(i):
        gate.wait()
        results[i] = routers[i].generate("abc")

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert all(r is not None for r in results)
    on_large = [r for r in results if r.branch == "large"]
    degraded = [r for r in results if r.degraded]
    # the first requests the monitor admitted went to the large branch; the rest were downgraded
    assert 1 <= len(on_large) <= 2 and len(degraded) == 6 - len(on_large)
    assert all(r.branch == "small" and r.degraded_reason == "queue" and not r.fell_back for r in degraded)
    assert all("degraded (queue)" in r.reason for r in degraded)
    # the small branch's answer is its ordinary one
    assert degraded[0].tokens == R.Router(small_branch(), None, "small_only", max_new_tokens=6).generate("abc").tokens
    assert sum(load.downgrades.values()) == len(degraded) == sum(r.counts.get("degraded", 0) for r in routers)
    assert load.in_flight == 0  # every ticket was released
    # load over: once nothing is on the large branch and the window agrees, requests go back to it
    wait_until(lambda: not load.state()["degraded"], timeout=30, what="the monitor to recover")
    back = routers[0].generate("abc")
    assert back.branch == "large" and not back.degraded


def test_an_abandoned_stream_releases_its_place_on_the_large_branch():
    load = LoadMonitor(max_in_flight=1)
    router = R.Router(small_branch(), large_branch(), "degrade", max_new_tokens=8, load=load)
    events = router.stream("abc")
    next(events)  # the large branch is answering
    assert load.in_flight == 1
    events.close()
    assert load.in_flight == 0 and router.generate("abc").branch == "large"


def test_degrade_protecting_a_cascade_streams_its_small_answer_when_degraded():
    load = LoadMonitor(max_in_flight=1)
    held = load.admit()  # someone else holds the only place
    router = R.Router(small_branch(), large_branch(), "degrade", max_new_tokens=8, load=load,
                      degrade={"protects": "cascade"}, thresholds={"confidence": 0.0})
    r = router.generate("abc")
    assert r.degraded and r.branch == "small" and router.active_policy == "small_only"
    load.release(held.ticket)
    r = router.generate("abc")
    assert not r.degraded and r.branch == "small" and r.score is not None and router.active_policy == "cascade"


# --------------------------------------------------------------------------- the server


def test_serve_degrades_under_load_counts_it_and_comes_back(start, remote):  # noqa: F811
    large = remote(text=" from the large model", gated=True)
    server = start(policy="degrade", large=large.url, max_concurrency=3, load=False)
    # only the queue decides here (the gated answers are slow on purpose)
    degrade = DegradeSettings(max_large_in_flight=1, tpot_p99_ms=600_000, ttft_p99_ms=3_600_000)
    server.config = server.config.model_copy(update={"degrade": degrade})
    server.load()
    body = {"prompt": "The for statement", "max_tokens": 6, "temperature": 0}
    slow: dict = {}
    first = threading.Thread(target=lambda: slow.update(answer=post(server.url, "/v1/completions", body)))
    first.start()
    wait_until(lambda: large.received == 1, what="the large branch to be answering")
    m = metrics(server)  # the only place on the large branch is taken: a new request would be downgraded
    assert m.get("edgekit_degraded") == 1 and m.get("edgekit_large_in_flight") == 1
    assert m.get("edgekit_downgrades_total", reason="queue") == 0
    status, _, degraded = post(server.url, "/v1/completions", body)  # one more would exceed max_large_in_flight
    assert status == 200, degraded
    edge = degraded["edgekit"]
    assert edge["branch"] == "small" and edge["degraded"] is True and edge["degraded_reason"] == "queue"
    assert edge["policy"] == "degrade" and edge["fell_back"] is False and degraded["choices"][0]["text"]
    events = stream(server.url, "/v1/completions", body)  # streamed: the same, said in the last chunk
    assert events[-2]["edgekit"]["degraded"] is True and events[-2]["edgekit"]["branch"] == "small"
    m = metrics(server)
    assert m.get("edgekit_downgrades_total", reason="queue") == 2 and m.get("edgekit_degraded") == 1
    assert m.get("edgekit_downgrades_total", reason="tpot_p99") == 0
    assert json.loads(json.dumps(server.health()))["load"]["degraded"] is True
    large.release.set()
    first.join(30)
    status, _, answer = slow["answer"]
    assert status == 200 and answer["edgekit"]["branch"] == "large" and answer["edgekit"]["degraded"] is False
    assert answer["choices"][0]["text"] == " from the large model"
    # the load is gone: back to the large branch
    status, _, back = post(server.url, "/v1/completions", body)
    assert status == 200 and back["edgekit"]["branch"] == "large" and back["edgekit"]["degraded"] is False
    m = metrics(server)
    assert m.get("edgekit_degraded") == 0 and m.get("edgekit_answers_total", branch="large", fell_back="false") == 2
    assert m.get("edgekit_downgrades_total", reason="queue") == 2
