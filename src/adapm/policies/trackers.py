"""Low-rank trackers: keep ``L R`` close to the current momentum ``m_t`` at a cost of O(mnr) per step.

* :func:`power_track` (default): one warm-started block power iteration with a Householder QR.
* :func:`gd_track`: the paper's alternating gradient descent on ``||L R - m||_F^2`` with exact block
  Lipschitz step sizes.
* ``fixed``: no tracking between refreshes: the basis from the last randomized SVD is kept and only
  ``R`` is updated (see :func:`adapm.policies.momentum.lowrank_momentum`); half the matmuls of ``power``.
* :func:`randomized_factors`: a randomized SVD used to seed the factors at the first step and to
  refresh them every ``refresh_every`` steps. It draws from an explicit generator so that a run is
  reproducible and a resumed run continues bit-identically.

All functions are pure: they return new factors and leave their inputs untouched. They are also
scale-safe: the subspace of ``m`` does not depend on its scale, so inputs are normalised by powers of
two (exact: in the normal float range the results are bit-identical to unscaled arithmetic) before a QR,
SVD or Gram matrix, and restored after. A huge but finite momentum therefore never overflows into
inf/NaN factors. Each accepts an
optional ``reduce``: then ``m`` and ``L`` are this rank's rows of a row-sharded matrix, the
orthonormalization uses the all-reduced r x r Gram matrix, and ``R`` is all-reduced. Only the span
of ``L`` matters for ``L R`` and for the next step, so the sharded and the whole computation agree to
round-off even though their bases may differ by a rotation.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from adapm.policies.state import register

Reduce = Callable[[Tensor], Tensor]
"""Sums a tensor over the ranks that hold the other rows of a row-sharded matrix (see
:mod:`adapm.distributed`). ``None`` means the matrix is whole on this rank."""

TRACKER: dict[str, Any] = {}
"""The low-rank trackers by name (``power``, ``gd``, ``fixed``). A tracker keeps no state of its own: it
re-fits the low-rank momentum policy's factors ``(L, R)`` to the momentum ``m_t`` each step."""

GD_ITERATIONS = 10
"""Alternating gradient steps per optimizer step for the ``gd`` tracker (the paper's value)."""

RSVD_OVERSAMPLING = 8
RSVD_POWER_ITERATIONS = 2


def unit_scale(x: Tensor, even: bool = False) -> Tensor:
    """A power of two ``s`` (no host sync) with ``max|x| * s`` in ``[0.5, 1)``; 1 for zero.

    For a matrix ``s`` is a 0-d tensor; for a batch of matrices (``x.dim() > 2``) one per matrix, shaped
    ``(..., 1, 1)`` to broadcast. ``even``: ``s`` is an even power of two, so that ``sqrt(s)`` is exact too."""
    # max |x| in one pass, without an |x| temporary (no detach needed: the scale is built from integer
    # exponents, no gradient flows through it)
    peak = torch.linalg.vector_norm(x, math.inf, dim=(-2, -1) if x.dim() > 2 else None, keepdim=x.dim() > 2)
    exponent = torch.frexp(peak).exponent
    if even:
        exponent = exponent - exponent % 2
    return torch.ldexp(torch.ones_like(peak), -exponent)


QR_METHOD: dict[str, str] = {"cpu": "householder"}
"""How a whole matrix (or a batch) is orthonormalized, by device type; any other device: ``cholesky``.
LAPACK's Householder QR is fast on CPU. On CUDA a batched Householder QR runs as several small kernels
per matrix (on an H200 about 40% of AdaPM's step on a 1B Llama was ``linalg_qr``), while Cholesky QR is a
few batched matmuls, one batched Cholesky factorization and one batched triangular solve."""

CHOLESKY_QR_NUDGE = 1e-10
"""Added to the diagonal of the unit-scaled ``Y`` before a Cholesky QR: it gives directions that ``Y``
lacks (a zero or rank-deficient ``Y``) orthonormal columns, as Householder QR does, and is far below
float32 resolution for the directions ``Y`` has."""


def orthonormalize(y: Tensor, reduce: Reduce | None = None, method: str | None = None) -> Tensor:
    """An orthonormal basis of the column span of ``y`` (or of each matrix of a batch; rows possibly
    sharded).

    Whole: Householder QR, or Cholesky QR (``method``; default by device: :data:`QR_METHOD`). Sharded:
    two passes of ``Y V diag(lambda)^-1/2`` from the eigendecomposition of the all-reduced float64 Gram
    matrix ``Y^T Y``; directions with negligible eigenvalues (rank-deficient ``Y``) become zero columns
    instead of NaN.
    """
    if reduce is None:
        method = method or QR_METHOD.get(y.device.type, "cholesky")
        if method == "householder":
            return torch.linalg.qr(y * unit_scale(y)).Q
        if method == "cholesky":
            return cholesky_orthonormalize(y)
        raise ValueError(f"orthonormalize: unknown method {method!r}; use 'householder' or 'cholesky'")
    q = y.double()  # float64 Gram matrices cannot overflow from float32 inputs
    for _ in range(2):
        evals, evecs = torch.linalg.eigh(reduce(q.mT @ q))
        keep = evals > evals.amax(-1, keepdim=True).clamp_min(0) * 1e-10  # relative to each matrix's largest
        scale = torch.where(keep, evals.clamp_min(torch.finfo(evals.dtype).tiny).rsqrt(), torch.zeros_like(evals))
        q = q @ (evecs * scale.unsqueeze(-2))
    return q.to(y.dtype)


def cholesky_orthonormalize(y: Tensor) -> Tensor:
    """Shifted Cholesky QR, twice, in float64 (no host sync, batched): ``Q = Y R^-1`` with ``R^T R`` the
    Cholesky factorization of ``Y^T Y``. In float64 the two passes give columns orthonormal to about
    1e-8 and the span of ``Y`` more accurately than a float32 Householder QR; the first pass's small
    shift (a multiple of the trace) keeps the factorization defined whatever the conditioning, and the
    second pass restores the directions it shrank. See :data:`CHOLESKY_QR_NUDGE` for rank-deficient ``Y``.
    """
    q = (y * unit_scale(y)).double()  # entries in [0.5, 1) at most: the nudge and shift are relative
    q.diagonal(dim1=-2, dim2=-1).add_(CHOLESKY_QR_NUDGE)
    for shift in (1e-12, 0.0):
        gram = q.mT @ q
        if shift:
            diagonal = gram.diagonal(dim1=-2, dim2=-1)
            diagonal.add_(diagonal.sum(-1, keepdim=True), alpha=shift)
        factor = torch.linalg.cholesky_ex(gram).L  # no error check: no host sync
        q = torch.linalg.solve_triangular(factor.mT, q, upper=True, left=False)
    return q.to(y.dtype)


def _project(q: Tensor, m: Tensor, reduce: Reduce | None) -> Tensor:
    """``Q^T m``, summed over ranks when rows are sharded."""
    r = q.mT @ m
    return r if reduce is None else reduce(r)


def power_track(m: Tensor, r_prev: Tensor, reduce: Reduce | None = None) -> tuple[Tensor, Tensor]:
    """One block power iteration warm-started from ``R_{t-1}``: ``Q = qr(m R^T)``, ``R = Q^T m``.

    ``Q`` has orthonormal columns even when ``m R^T`` is rank-deficient (Householder QR), so a zero
    or rank-deficient momentum never produces NaN.
    """
    q = orthonormalize(m @ (r_prev * unit_scale(r_prev)).mT, reduce)
    return q, _project(q, m, reduce)


def _lipschitz(gram: Tensor) -> Tensor:
    """Largest eigenvalue of a symmetric PSD ``r x r`` Gram matrix (or of each in a batch), floored away
    from zero, shaped ``(..., 1, 1)`` to broadcast over the matrices."""
    return torch.linalg.eigvalsh(gram)[..., -1:, None].clamp_min(torch.finfo(gram.dtype).tiny)


def gd_track(
    m: Tensor, left: Tensor, right: Tensor, iterations: int = GD_ITERATIONS, reduce: Reduce | None = None
) -> tuple[Tensor, Tensor]:
    """Alternating gradient steps on ``f(L, R) = ||L R - m||_F^2 / 2`` warm-started from ``(L, R)``.

    The step sizes are the exact block Lipschitz constants ``1 / ||R||_2^2`` and ``1 / ||L||_2^2``.
    A zero factor gives a zero gradient for the other one, so the floor on the constants only avoids
    ``0 / 0``; the caller must not start from ``L = R = 0`` (seed with :func:`randomized_factors`).
    The iteration runs on ``m s``, ``L sqrt(s)``, ``R sqrt(s)`` for a power of two ``s`` that brings
    ``m`` to unit scale (Gram matrices of huge factors would overflow), and is scaled back after.
    """
    s = unit_scale(m, even=True)
    if reduce is not None:  # one scale on every rank: the largest
        s = s.new_ones(()) / reduce_max(1 / s, reduce)
    root = s.sqrt()
    m, left, right = m * s, left * root, right * root
    for _ in range(iterations):
        rrt = right @ right.mT
        left = left - (left @ rrt - m @ right.mT) / _lipschitz(rrt)
        ltl = left.mT @ left if reduce is None else reduce(left.mT @ left)
        right = right - (ltl @ right - _project(left, m, reduce)) / _lipschitz(ltl)
    return left / root, right / root


def reduce_max(x: Tensor, reduce: Reduce) -> Tensor:
    """The maximum over ranks of a positive power of two (of each entry of ``x``: one per matrix of a
    batch), with only a sum-reduce at hand: sum the one-hots of its exponent (no host sync)."""
    exponent = torch.frexp(x).exponent.long().clamp(-160, 160).add_(160).reshape(-1, 1)
    hot = torch.zeros(exponent.shape[0], 321, dtype=torch.float64, device=x.device).scatter_(1, exponent, 1.0)
    present = reduce(hot) > 0
    top = (present * torch.arange(321, device=x.device)).amax(-1)
    return torch.ldexp(torch.ones_like(x), (top - 160 - 1).to(torch.int32).reshape(x.shape))


def randomized_factors(
    m: Tensor, rank: int, generator: torch.Generator, *, balanced: bool = False, reduce: Reduce | None = None,
    global_rows: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Rank-``rank`` factors of ``m`` from a randomized SVD (Halko et al.), drawn from ``generator``.

    Returns ``(U, U^T m)`` with orthonormal ``U`` (what :func:`power_track` maintains) or, with
    ``balanced=True``, ``(U S^1/2, S^1/2 V^T)`` (better conditioned for :func:`gd_track`).
    ``global_rows``: the rows of the whole matrix when ``m`` holds one rank's (else they are summed
    over ranks: an all-reduce and a host sync).
    """
    rows, cols = m.shape
    if global_rows is None:
        global_rows = rows if reduce is None else int(reduce(torch.tensor([rows], device=m.device)).item())
    omega = torch.randn(cols, rsvd_width(rank, global_rows, cols), generator=generator, dtype=m.dtype, device=m.device)
    return factors_from_sketch(m, omega, rank, balanced=balanced, reduce=reduce)


def rsvd_width(rank: int, rows: int, cols: int) -> int:
    """The columns of a randomized SVD's test matrix for a ``rows x cols`` matrix (see
    :func:`randomized_factors`)."""
    return min(rank + RSVD_OVERSAMPLING, rows, cols)


def factors_from_sketch(
    m: Tensor, omega: Tensor, rank: int, *, balanced: bool = False, reduce: Reduce | None = None
) -> tuple[Tensor, Tensor]:
    """:func:`randomized_factors` from a drawn Gaussian test matrix ``omega (cols, width)``; batched too:
    ``m (B, rows, cols)`` with ``omega (B, cols, width)`` gives each matrix what it would get alone."""
    q = orthonormalize(m @ omega, reduce)
    for _ in range(RSVD_POWER_ITERATIONS):
        z = orthonormalize(_project(m, q, reduce))  # (m^T Q): n x width, the same on every rank
        q = orthonormalize(m @ z, reduce)
    small = _project(q, m, reduce)  # the same on every rank
    scale = unit_scale(small, even=True)
    u_small, s, vh = torch.linalg.svd(small * scale, full_matrices=False)
    u = q @ u_small[..., :rank]
    if balanced:
        root = (s[..., :rank] / scale.reshape(*s.shape[:-1], 1)).sqrt()
        return u * root.unsqueeze(-2), root.unsqueeze(-1) * vh[..., :rank, :]
    return u, _project(u, m, reduce)


@register(TRACKER)
class PowerTracker:
    """One warm-started block power iteration (:func:`power_track`); orthonormal ``L``."""

    name = "power"
    keeps_basis = False
    """Whether ``L`` stays fixed between refreshes (then the momentum takes a closed form)."""
    balanced = False
    """Whether a refresh seeds balanced factors ``(U S^1/2, S^1/2 V^T)`` instead of ``(U, U^T m)``."""

    @staticmethod
    def track(m: Tensor, left: Tensor, right: Tensor, reduce: Reduce | None = None) -> tuple[Tensor, Tensor]:
        return power_track(m, right, reduce)


@register(TRACKER)
class GDTracker:
    """The paper's alternating gradient descent (:func:`gd_track`)."""

    name = "gd"
    keeps_basis = False
    balanced = True

    @staticmethod
    def track(m: Tensor, left: Tensor, right: Tensor, reduce: Reduce | None = None) -> tuple[Tensor, Tensor]:
        return gd_track(m, left, right, reduce=reduce)


@register(TRACKER)
class FixedTracker:
    """The basis of the last refresh is kept: ``(L, L^T m)``, half the matmuls of ``power``."""

    name = "fixed"
    keeps_basis = True
    balanced = False

    @staticmethod
    def track(m: Tensor, left: Tensor, right: Tensor, reduce: Reduce | None = None) -> tuple[Tensor, Tensor]:
        return left, _project(left, m, reduce)


TRACKERS = tuple(TRACKER)
