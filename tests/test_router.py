"""The Router's policies, streaming and fallbacks (edgekit.runtime.router) on the fake
branches of branch_fakes."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from branch_fakes import BranchUnavailable, EOS, greedy, large, LARGE_TABLE, Local, Model, Remote, small, SMALL_TABLE, Tok

from edgekit.errors import EdgekitError
from edgekit.runtime import router as R, scores
from edgekit.runtime.config import Thresholds


def test_small_only_large_only_and_speculative_policy():
    s, big = small(), large()
    r = R.Router(s, big, "small_only", max_new_tokens=12).generate("abc")
    assert r.branch == "small" and not r.fell_back and r.tokens == greedy(s.model, [0, 1, 2], 12, EOS)
    assert r.text == Tok().decode(r.tokens) and len(r.confidences) >= len(r.tokens) and r.prompt_tokens == 3
    assert big.feed_calls == 0 and r.ttft_s is not None and r.ttft_s >= 0
    r = R.Router(s, big, "large_only", max_new_tokens=12).generate([0, 1, 2])
    assert r.branch == "large" and r.answered_by == "large" and r.tokens == greedy(big.model, [0, 1, 2], 12, EOS)
    router = R.Router(small(), large(), "speculative", max_new_tokens=30, draft_tokens=3)
    r = router.generate("hello")
    assert r.branch == "speculative" and r.tokens == greedy(big.model, Tok().encode("hello"), 30, EOS)
    assert r.speculative["large_calls"] < len(r.tokens) and 0 <= r.acceptance_rate <= 1
    assert router.counts["speculative"] == 1 and router.latency_summary()["ttft"]["count"] == 1


def test_stream_pieces_add_up():
    router = R.Router(small(), large(), "large_only", max_new_tokens=10)
    events = list(router.stream("abc"))
    assert [e.kind for e in events[:-1]] == ["text"] * (len(events) - 1) and events[-1].kind == "done"
    assert "".join(e.text for e in events[:-1]) == events[-1].result.text


def confident_first(tokens):  # first prompt token even: peaked logits; odd: nearly flat
    return 2.0 if tokens[0] % 2 == 0 else 0.05


def cascade_pair():
    return Local("small", Model(SMALL_TABLE, confident_first, eos_bias=-50)), Local("large", Model(LARGE_TABLE, eos_bias=-50))


@pytest.mark.parametrize("check", ["incremental", "end"])
def test_cascade_escalates_only_when_unsure(check):
    s, big = cascade_pair()
    router = R.Router(s, big, "cascade", thresholds={"confidence": 0.3, "min_tokens": 4, "check": check}, max_new_tokens=16)
    sure = router.generate("ace")
    assert sure.branch == "small" and not sure.escalated and sure.score >= 0.3 and big.feed_calls == 0
    events = list(router.stream("bce"))
    unsure = events[-1].result
    assert unsure.branch == "large" and unsure.escalated and unsure.score < 0.3 and not unsure.fell_back
    assert unsure.tokens == greedy(big.model, Tok().encode("bce"), 16)
    assert len(unsure.small_confidences) == (4 if check == "incremental" else 16)
    kinds = [e.kind for e in events]
    assert kinds.count("reset") == 1 and "escalated" in events[kinds.index("reset")].reason
    after = "".join(e.text for e in events[kinds.index("reset") + 1 : -1])
    assert after == unsure.text
    assert router.counts == {"small": 1, "large": 1, "speculative": 0, "fell_back": 0, "escalated": 1}



def test_input_complexity_routes_by_score():
    s, big = small(), large()
    easy = [3] + greedy(s.model, [3], 9)  # the small model's own continuation: low NLL
    hard, tokens = [3], [3]
    for _ in range(9):  # the small model's least likely tokens: high NLL
        hard.append(int(np.argmin(s.model(hard)[:EOS])))
    router = R.Router(s, big, "input_complexity", max_new_tokens=5)
    e, h = router.prompt_score(easy), router.prompt_score(hard)
    logits = np.stack([s.model(easy[: i + 1]) for i in range(len(easy))])
    manual = np.mean([np.log(np.exp(logits[i]).sum()) - logits[i][easy[i + 1]] for i in range(len(easy) - 1)])
    assert e == pytest.approx(manual) and e < h
    router.thresholds = Thresholds(complexity=(e + h) / 2)
    s.sessions.clear()
    r = router.generate(easy)
    assert r.branch == "small" and r.score == pytest.approx(e) and r.threshold == (e + h) / 2
    assert len(s.sessions) == 1 and s.sessions[0].tokens[: len(easy)] == easy  # one prefill, reused
    assert r.tokens == greedy(s.model, easy, 5, EOS)
    r = router.generate(hard)
    assert r.branch == "large" and r.score == pytest.approx(h) and ">" in r.reason
    # the large branch is down: the small answers from the prefill it scored with
    s.sessions.clear()
    router.large = Local("large", Model(LARGE_TABLE), fail_after=0)
    r = router.generate(hard)
    assert r.branch == "small" and r.fell_back and len(s.sessions) == 1 and r.tokens == greedy(s.model, hard, 5, EOS)
    weighted = scores.complexity_score(logits, easy, length_weight=0.5)[0]
    assert weighted == pytest.approx(manual + 0.5 * np.log1p(len(easy)))
    assert scores.complexity_score(logits[:1], easy[:1])[0] == 0.0


def test_fallbacks():
    # a failing local large branch: the small one answers
    down = Local("large", Model(LARGE_TABLE), fail_after=0)
    r = R.Router(small(), down, "large_only", max_new_tokens=5).generate("abc")
    assert r.branch == "small" and r.fell_back and "large is down" in r.reason
    assert [a["ok"] for a in r.attempts] == [False, True]
    # the large branch fails mid-answer after some text was streamed: reset, then the small answer
    half = Local("large", Model(LARGE_TABLE), fail_after=4)
    events = list(R.Router(small(), half, "large_only", max_new_tokens=10).stream("abc"))
    kinds = [e.kind for e in events]
    assert kinds.count("reset") == 1 and events[-1].result.fell_back and events[-1].result.branch == "small"
    assert "".join(e.text for e in events[kinds.index("reset") + 1 : -1]) == events[-1].result.text
    # escalated cascade whose large branch is down: the small answer resumes where it stopped
    s, _ = cascade_pair()
    down = Local("large", Model(LARGE_TABLE), fail_after=0)
    router = R.Router(s, down, "cascade", thresholds={"confidence": 0.3, "min_tokens": 4}, max_new_tokens=16)
    r = router.generate("bce")
    assert r.branch == "small" and r.fell_back and r.escalated is False and "escalated" in r.reason
    assert r.tokens == greedy(s.model, Tok().encode("bce"), 16, EOS) and len(s.sessions) == 1
    # speculative with a failing large branch: the small one answers alone
    r = R.Router(small(), Local("large", Model(LARGE_TABLE), fail_after=1), "speculative", max_new_tokens=8).generate("abc")
    assert r.branch == "small" and r.fell_back and r.tokens == greedy(small().model, [0, 1, 2], 8, EOS)
    # a local branch past the timeout (checked between forward passes) is unavailable too
    slow = Local("large", Model(LARGE_TABLE), delay=0.03)
    r = R.Router(small(), slow, "large_only", max_new_tokens=50, timeout_s=0.1).generate("abc")
    assert r.branch == "small" and r.fell_back and "timed out after 0.1 s" in r.reason and slow.feed_calls < 10
    # a local exception that is not "unavailable" is a bug: it propagates
    buggy = Local("large", Model(LARGE_TABLE), fail_after=0, error=ValueError("shape bug"))
    with pytest.raises(ValueError, match="shape bug"):
        R.Router(small(), buggy, "large_only").generate("abc")
    # both down
    with pytest.raises(EdgekitError, match="both branches"):
        R.Router(Local("small", Model(SMALL_TABLE), fail_after=0), down, "small_only").generate("abc")


def test_remote_large_branch():
    remote = Remote()
    s = small()
    r = R.Router(s, remote, "large_only", max_new_tokens=7).generate([0, 1, 2])
    assert r.branch == "large" and r.text == "remote says hi" and r.tokens == [] and r.answered_by == "remote"
    assert remote.calls[-1] == {"prompt": "abc", "max_new_tokens": 7, "temperature": 0.0}
    router = R.Router(s, remote, "input_complexity", thresholds={"complexity": -1.0})
    assert router.generate("abcd").branch == "large"
    sc, _ = cascade_pair()
    r = R.Router(sc, remote, "cascade", thresholds={"confidence": 0.3, "min_tokens": 4}).generate("bce")
    assert r.branch == "large" and r.escalated and r.text == "remote says hi"
    # an endpoint that errors, and one that hangs past the router's timeout
    r = R.Router(small(), Remote(error=ConnectionRefusedError("refused")), "large_only", max_new_tokens=4).generate("abc")
    assert r.branch == "small" and r.fell_back and "refused" in r.reason
    r = R.Router(small(), Remote(error=BranchUnavailable("HTTP 503")), "large_only", max_new_tokens=4).generate("abc")
    assert r.fell_back and "HTTP 503" in r.reason
    gate = threading.Event()
    try:
        start = time.perf_counter()
        r = R.Router(small(), Remote(block=gate), "large_only", max_new_tokens=4, timeout_s=0.2).generate("abc")
        assert time.perf_counter() - start < 3
        assert r.branch == "small" and r.fell_back and "no answer within 0.2 s" in r.reason
    finally:
        gate.set()
    for policy in ("cascade", "input_complexity"):
        with pytest.raises(EdgekitError, match="logits"):
            R.Router(Remote(), large(), policy)


def test_bad_configuration():
    with pytest.raises(EdgekitError, match="unknown routing policy"):
        R.Router(small(), large(), "random")
    with pytest.raises(EdgekitError, match="unknown threshold"):
        R.Router(small(), large(), "cascade", thresholds={"confidnce": 0.1})
    with pytest.raises(EdgekitError, match="check"):
        R.Router(small(), large(), "cascade", thresholds={"check": "sometimes"})
    with pytest.raises(EdgekitError, match="top_p"):
        R.Router(small(), large(), "cascade", sampler_params={"top_p": 2.0})
    with pytest.raises(EdgekitError, match="empty"):
        R.Router(small(), large(), "small_only").generate("")
    with pytest.raises(EdgekitError, match="draft_min_confidence"):
        R.Router(small(), large(), "speculative", draft_min_confidence=1.0)


@pytest.mark.parametrize("bad", [{"draft_tokens": 33}, {"max_new_tokens": 0}, {"timeout_s": 0}, {"draft_min_confidence": -0.1}])
def test_router_refuses_what_runtime_json_refuses(bad):
    from pydantic import ValidationError

    from edgekit.runtime.config import RuntimeConfig

    with pytest.raises(ValidationError):
        RuntimeConfig(**bad)
    with pytest.raises(EdgekitError, match=next(iter(bad))):
        R.Router(small(), large(), "small_only", **bad)


# --------------------------------------------------------------------------- stop sequences


def assert_never_shown_then_cut(events):
    """The streamed text only grows, is at every point a prefix of the final (cut) answer, and
    adds up to it: nothing shown was later cut."""
    result, shown = events[-1].result, ""
    for event in events[:-1]:
        assert event.kind == "text", event
        shown += event.text
        assert result.text.startswith(shown)
    assert shown == result.text


def sure_pair():
    return Local("small", Model(SMALL_TABLE, eos_bias=-50)), Local("large", Model(LARGE_TABLE, eos_bias=-50))


@pytest.mark.parametrize("policy", ["small_only", "large_only", "speculative"])
def test_stop_sequences_end_the_answer_in_the_router(policy):
    full = R.Router(*sure_pair(), policy, max_new_tokens=30).generate("hello")
    assert len(full.text) == 30 and full.finish_reason == "length"
    stop = full.text[10:13]  # one character per token: spans three tokens
    cut = full.text.find(stop)
    s, big = sure_pair()
    router = R.Router(s, big, policy, max_new_tokens=30)
    events = list(router.stream("hello", stop=["zzzzzzzz", stop]))
    r = events[-1].result
    assert r.text == full.text[:cut] and r.finish_reason == "stop" and r.branch == full.branch
    # generation stopped at the token that completed the stop sequence
    assert r.tokens == full.tokens[: cut + len(stop)]
    assert_never_shown_then_cut(events)
    assert all(sess.closed for sess in s.sessions + big.sessions)
    # a stop sequence that never appears changes nothing; a string is one stop sequence
    assert router.generate("hello", stop="zzzzzzzz").text == full.text
    assert router.generate("hello", stop=full.text[:2]).text == ""


def test_stop_sequences_in_a_cascade_and_on_a_remote_branch():
    s, big = cascade_pair()
    router = R.Router(s, big, "cascade", thresholds={"confidence": 0.3, "min_tokens": 4}, max_new_tokens=16)
    sure, unsure = router.generate("ace"), router.generate("bce")
    assert sure.branch == "small" and unsure.branch == "large" and unsure.escalated
    for prompt, whole in (("ace", sure), ("bce", unsure)):
        stop = whole.text[6:8]
        events = list(router.stream(prompt, stop=[stop]))
        r = events[-1].result
        assert r.text == whole.text[: whole.text.find(stop)] and r.finish_reason == "stop" and r.branch == whole.branch
        kinds = [e.kind for e in events]
        after = kinds.index("reset") + 1 if "reset" in kinds else 0  # an escalation restarts the text
        assert "".join(e.text for e in events[after:-1]) == r.text and stop not in "".join(e.text for e in events)
    remote = Remote()
    events = list(R.Router(small(), remote, "large_only", max_new_tokens=7).stream("abc", stop=[" says", "hi"]))
    r = events[-1].result
    assert r.text == "remote" and r.finish_reason == "stop" and r.branch == "large"
    assert_never_shown_then_cut(events)


@pytest.mark.parametrize("bad", [[""], [1], ["a"] * 17, ["x" * 257], 5])
def test_bad_stop_sequences_are_refused(bad):
    with pytest.raises(EdgekitError, match="stop"):
        R.Router(small(), large(), "small_only").generate("abc", stop=bad)
