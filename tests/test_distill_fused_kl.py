"""The fused KL losses the training loop runs (edgekit/distill/losses.py, ``TRAINING_LOSSES``)
against the reference formulas (``DISTRIBUTION_LOSSES``): same value, same gradient, chunk
boundaries, half-precision logits, extreme logits, and the loop's use of them."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")


def _logits(shape, scale=3.0, seed=0, dtype=None):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=generator) * scale
    return x.to(dtype) if dtype is not None else x


@pytest.mark.parametrize("loss", ["forward_kl", "reverse_kl"])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_kl_has_the_reference_value_and_gradient(loss, temperature, dtype):
    from edgekit.distill.losses import CHUNK_ROWS, DISTRIBUTION_LOSSES, TRAINING_LOSSES

    # rows not a multiple of the chunk, so the last chunk is partial
    shape = (3, CHUNK_ROWS // 2 + 7, 300)
    teacher = _logits(shape, seed=1, dtype=dtype)
    reference_in = _logits(shape, seed=2, dtype=dtype).requires_grad_(True)
    fused_in = reference_in.detach().clone().requires_grad_(True)

    reference = DISTRIBUTION_LOSSES[loss](reference_in, teacher, temperature)
    fused = TRAINING_LOSSES[loss](fused_in, teacher, temperature)
    assert fused.dtype == torch.float32
    assert float(fused.detach()) == pytest.approx(float(reference.detach()), rel=1e-6)
    (reference * 0.7).backward()
    (fused * 0.7).backward()  # the upstream gradient scales the saved one
    assert fused_in.grad.dtype == dtype and fused_in.grad.shape == fused_in.shape
    # bfloat16 gradients: within one unit in the last place (2**-7 relative), from the order of rounding
    rtol, atol = (1e-4, 1e-7) if dtype == torch.float32 else (2.0**-7, 1e-12)
    assert torch.allclose(fused_in.grad.float(), reference_in.grad.float(), rtol=rtol, atol=atol)


def test_fused_kl_is_zero_for_equal_logits_and_finite_for_extreme_ones():
    from edgekit.distill.losses import TRAINING_LOSSES

    logits = _logits((2, 5, 40))
    for name in ("forward_kl", "reverse_kl"):
        assert float(TRAINING_LOSSES[name](logits, logits.clone())) == pytest.approx(0.0, abs=1e-6), name
        # almost no mass on most tokens in either distribution
        student = (_logits((2, 5, 40), seed=3) * 40).requires_grad_(True)
        value = TRAINING_LOSSES[name](student, logits * 40)
        value.backward()
        assert torch.isfinite(value) and torch.isfinite(student.grad).all() and float(student.grad.abs().sum()) > 0, name


def test_fused_kl_gives_the_teacher_no_gradient_and_jsd_stays_the_reference():
    from edgekit.distill.config import DistillConfig
    from edgekit.distill.losses import DISTRIBUTION_LOSSES, TRAINING_LOSSES, jensen_shannon_divergence

    assert set(TRAINING_LOSSES) == set(DISTRIBUTION_LOSSES) == set(DistillConfig.model_fields["loss"].annotation.__args__)

    student = _logits((1, 4, 20)).requires_grad_(True)
    teacher = _logits((1, 4, 20), seed=1).requires_grad_(True)
    TRAINING_LOSSES["forward_kl"](student, teacher).backward()
    assert teacher.grad is None and student.grad is not None
    assert TRAINING_LOSSES["jsd"] is jensen_shannon_divergence


def test_fused_kl_ignores_autocast():
    """The loop calls the loss inside accelerate's autocast: the chunks still compute in float32."""
    from edgekit.distill.losses import DISTRIBUTION_LOSSES, TRAINING_LOSSES

    student, teacher = _logits((2, 9, 64), dtype=torch.bfloat16), _logits((2, 9, 64), seed=4, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = TRAINING_LOSSES["forward_kl"](student, teacher)
    assert fused.dtype == torch.float32
    assert float(fused) == pytest.approx(float(DISTRIBUTION_LOSSES["forward_kl"](student, teacher)), rel=1e-6)
