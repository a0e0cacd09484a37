"""The residual correction: only the 'unbiased' coefficient reaches the noise floor on a stationary
stream; the paper's printed Algorithm 1 line 8 and no correction are biased (docs/algorithm.md)."""

from __future__ import annotations

import pytest
import torch

from adapm.policies import correction_coefficient, lowrank_momentum, randomized_factors


def _relative_bias(correction: str, steps: int = 2500, burn_in: int = 300) -> float:
    """||mean_t (mc_t - mfull_t)|| / ||(I - P) G|| for g_t = G + noise with a stable top-r subspace."""
    gen = torch.Generator().manual_seed(0)
    rows, cols, rank, beta1 = 32, 24, 4, 0.9
    u, _ = torch.linalg.qr(torch.randn(rows, rows, generator=gen))
    v, _ = torch.linalg.qr(torch.randn(cols, cols, generator=gen))
    spectrum = torch.cat([torch.tensor([12.0, 10.0, 9.0, 8.0]), torch.ones(cols - rank)])
    mean_grad = u[:, :cols] @ torch.diag(spectrum) @ v.T
    projector_out = torch.eye(rows) - u[:, :rank] @ u[:, :rank].T
    left, right = randomized_factors((1 - beta1) * mean_grad, rank, gen)
    m_full = torch.zeros(rows, cols)
    gap_sum = torch.zeros(rows, cols)
    for t in range(1, steps + 1):
        g = mean_grad + 0.5 * torch.randn(rows, cols, generator=gen)
        m_full.lerp_(g, 1 - beta1)
        corrected, left, right = lowrank_momentum(
            left, right, g, beta1, t, tracker="power", correction=correction, refresh=False, generator=None
        )
        if t > burn_in:
            gap_sum += (corrected - m_full) / (1 - beta1**t)
    gap = gap_sum / (steps - burn_in)
    return float(gap.norm() / (projector_out @ mean_grad).norm())


def test_unbiased_correction_reaches_noise_floor_while_paper_formula_does_not() -> None:
    unbiased = _relative_bias("unbiased")
    paper = _relative_bias("paper")
    none = _relative_bias("none")
    assert unbiased < 0.1, unbiased
    # Theory: -(1 + b1) = -1.9 times the residual for the paper's line 8, -b1 = -0.9 without correction.
    assert paper == pytest.approx(1.9, rel=0.1)
    assert none == pytest.approx(0.9, rel=0.1)


def test_coefficients() -> None:
    assert correction_coefficient("unbiased", 0.9, 1) == 0.0
    assert correction_coefficient("unbiased", 0.9, 10_000) == pytest.approx(9.0)
    assert correction_coefficient("none", 0.9, 5) == 0.0
    assert correction_coefficient("paper", 0.9, 5) == pytest.approx(-10.0)
    with pytest.raises(ValueError, match="Invalid correction: 'bogus'"):
        correction_coefficient("bogus", 0.9, 1)
