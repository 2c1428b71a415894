"""Threshold calibration (edgekit.runtime.calibration) on the fake branches of branch_fakes:
a fitted threshold sends the target share of unseen prompts to the large branch."""

from __future__ import annotations

import numpy as np
import pytest
from branch_fakes import ByteTok, EOS, large, LARGE_TABLE, Local, Model, small, SMALL_TABLE

from edgekit.errors import EdgekitError
from edgekit.runtime import calibration, router as R


def test_quantile_threshold_ties_are_deterministic():
    assert calibration.quantile_threshold([1, 1, 1, 2, 2, 3], 0.5) == (1.5, 3)
    assert calibration.quantile_threshold([1, 1, 1, 1, 2], 0.5) == (1.5, 1)  # 1 is closer to 2.5 than 5
    assert calibration.quantile_threshold([3, 1, 2], 0.0) == (3.0, 0)
    assert calibration.quantile_threshold([3, 1, 2], 1.0) == (0.0, 3)


def random_prompts(n, seed, model):
    """Prompts from the small model sampled at various temperatures: a spread of NLLs."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        tokens = [int(rng.integers(0, EOS))]
        temp = rng.uniform(0.3, 3.0)
        for _ in range(int(rng.integers(3, 12))):
            p = np.exp((model(tokens)[:EOS] - model(tokens)[:EOS].max()) / temp)
            tokens.append(int(rng.choice(EOS, p=p / p.sum())))
        out.append(tokens)
    return out


def test_calibration_hits_target_rate_on_unseen_prompts():
    s, big = small(), large()
    prompts = random_prompts(2000, 0, s.model)
    cal_prompts, eval_prompts = prompts[:1000], prompts[1000:]
    router = R.Router(s, big, "input_complexity", max_new_tokens=1)
    cal = calibration.calibrate(router, cal_prompts, large_rate=0.3)
    assert cal["policy"] == "input_complexity" and cal["n_prompts"] == 1000 and len(cal["scores"]) == 1000
    assert abs(cal["large_rate_achieved"] - 0.3) < 0.01
    calibration.apply_calibration(router, cal)
    assert router.thresholds.complexity == cal["threshold"]
    rate = calibration.measured_large_rate(router, eval_prompts)
    assert abs(rate - 0.3) <= 0.05, rate


def test_cascade_calibration_hits_target_rate_on_unseen_prompts():
    def scale(tokens):  # confidence varies with the first three prompt tokens
        h = (tokens[0] * 7919 + tokens[min(1, len(tokens) - 1)] * 104729 + tokens[min(2, len(tokens) - 1)] * 1299709) % 1000
        return 0.1 + 1.5 * h / 1000

    s = Local("small", Model(SMALL_TABLE, scale, eos_bias=-50))
    big = Local("large", Model(LARGE_TABLE, eos_bias=-50))
    rng = np.random.default_rng(3)
    prompts = [[int(t) for t in rng.integers(0, EOS, size=int(rng.integers(3, 8)))] for _ in range(1200)]
    router = R.Router(s, big, "cascade", thresholds={"min_tokens": 4}, max_new_tokens=10)
    cal = calibration.calibrate(router, prompts[:600], large_rate=0.3)
    assert cal["rule"] == "escalate when score < threshold" and abs(cal["large_rate_achieved"] - 0.3) < 0.01
    assert sum(sc < cal["threshold"] for sc in cal["scores"]) == round(cal["large_rate_achieved"] * 600)
    calibration.apply_calibration(router, cal)
    rate = calibration.measured_large_rate(router, prompts[600:])
    assert abs(rate - 0.3) <= 0.05, rate
    with pytest.raises(EdgekitError, match="no threshold"):
        calibration.calibrate(router, prompts[:5], policy="speculative")


def test_held_out_prompts_come_from_the_held_out_halves():
    from conftest import python_docs_text

    tok = ByteTok()
    ids = tok(python_docs_text())["input_ids"]
    tail = ids[-8192:]
    first, second = tok.decode(tail[:4096]), tok.decode(tail[4096:])
    cal = calibration.held_out_prompts(tok, n=40, min_tokens=16, max_tokens=64, split="calibration")
    ev = calibration.held_out_prompts(tok, n=40, min_tokens=16, max_tokens=64, split="evaluation")
    assert len(cal) == len(ev) == 40 and not set(cal) & set(ev)
    assert all(p in first for p in cal) and all(p in second for p in ev)
    assert all(10 <= len(p.encode()) <= 64 for p in cal + ev)
    assert cal == calibration.held_out_prompts(tok, n=40, min_tokens=16, max_tokens=64)
    with pytest.raises(EdgekitError, match="max_tokens"):
        calibration.held_out_prompts(tok, n=4, max_tokens=5000, eval_tokens=8192)

