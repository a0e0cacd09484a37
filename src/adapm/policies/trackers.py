"""Low-rank trackers: keep ``L R`` close to the current momentum ``m_t`` at a cost of O(mnr) per step.

* :func:`power_track` (default): one warm-started block power iteration with a Householder QR.
* :func:`gd_track`: the paper's alternating gradient descent on ``||L R - m||_F^2`` with exact block
  Lipschitz step sizes.
* :func:`randomized_factors`: a randomized SVD used to seed the factors at the first step and to
  refresh them every ``refresh_every`` steps. It draws from an explicit generator so that a run is
  reproducible and a resumed run continues bit-identically.

All functions are pure: they return new factors and leave their inputs untouched.
"""

from __future__ import annotations

import torch
from torch import Tensor

TRACKERS = ("power", "gd")

GD_ITERATIONS = 10
"""Alternating gradient steps per optimizer step for the ``gd`` tracker (the paper's value)."""

RSVD_OVERSAMPLING = 8
RSVD_POWER_ITERATIONS = 2


def power_track(m: Tensor, r_prev: Tensor) -> tuple[Tensor, Tensor]:
    """One block power iteration warm-started from ``R_{t-1}``: ``Q = qr(m R^T)``, ``R = Q^T m``.

    ``Q`` has orthonormal columns even when ``m R^T`` is rank-deficient (Householder QR), so a zero
    or rank-deficient momentum never produces NaN.
    """
    q = torch.linalg.qr(m @ r_prev.mT).Q
    return q, q.mT @ m


def _lipschitz(gram: Tensor) -> Tensor:
    """Largest eigenvalue of a symmetric PSD ``r x r`` Gram matrix, floored away from zero."""
    return torch.linalg.eigvalsh(gram)[-1].clamp_min(torch.finfo(gram.dtype).tiny)


def gd_track(m: Tensor, left: Tensor, right: Tensor, iterations: int = GD_ITERATIONS) -> tuple[Tensor, Tensor]:
    """Alternating gradient steps on ``f(L, R) = ||L R - m||_F^2 / 2`` warm-started from ``(L, R)``.

    The step sizes are the exact block Lipschitz constants ``1 / ||R||_2^2`` and ``1 / ||L||_2^2``.
    A zero factor gives a zero gradient for the other one, so the floor on the constants only avoids
    ``0 / 0``; the caller must not start from ``L = R = 0`` (seed with :func:`randomized_factors`).
    """
    for _ in range(iterations):
        rrt = right @ right.mT
        left = left - (left @ rrt - m @ right.mT) / _lipschitz(rrt)
        ltl = left.mT @ left
        right = right - (ltl @ right - left.mT @ m) / _lipschitz(ltl)
    return left, right


def randomized_factors(
    m: Tensor, rank: int, generator: torch.Generator, *, balanced: bool = False
) -> tuple[Tensor, Tensor]:
    """Rank-``rank`` factors of ``m`` from a randomized SVD (Halko et al.), drawn from ``generator``.

    Returns ``(U, U^T m)`` with orthonormal ``U`` (what :func:`power_track` maintains) or, with
    ``balanced=True``, ``(U S^1/2, S^1/2 V^T)`` (better conditioned for :func:`gd_track`).
    """
    rows, cols = m.shape
    width = min(rank + RSVD_OVERSAMPLING, rows, cols)
    omega = torch.randn(cols, width, generator=generator, dtype=m.dtype, device=m.device)
    q = torch.linalg.qr(m @ omega).Q
    for _ in range(RSVD_POWER_ITERATIONS):
        z = torch.linalg.qr(m.mT @ q).Q
        q = torch.linalg.qr(m @ z).Q
    u_small, s, vh = torch.linalg.svd(q.mT @ m, full_matrices=False)
    u = q @ u_small[:, :rank]
    if balanced:
        root = s[:rank].sqrt()
        return u * root, root[:, None] * vh[:rank]
    return u, u.mT @ m
