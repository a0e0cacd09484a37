"""Momentum policies: ``full`` (an EMA, as Adam), ``none`` (the raw gradient) and ``lowrank``.

``lowrank`` keeps only factors ``L (m x r)`` and ``R (r x n)`` between steps. Each step it rebuilds the
momentum ``m_t = b1 L R + (1 - b1) g_t`` in a transient buffer, re-fits the factors to it with a
tracker, and returns the residual-corrected momentum ``m_t + c_t (m_t - L_t R_t)``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from adapm.policies.correction import correction_coefficient
from adapm.policies.state import StateSpec, register
from adapm.policies.trackers import TRACKER, Reduce, randomized_factors

if TYPE_CHECKING:
    from adapm.partition.layout import Segment

MOMENTUM: dict[str, Any] = {}
"""The momentum policies by name (``full``, ``lowrank``, ``none``)."""


@register(MOMENTUM)
class FullMomentum:
    """Adam's EMA of the gradient, one value per entry."""

    name = "full"
    source = "ema"
    """The update's numerator: ``ema`` (the momentum state, updated in the elementwise tail), ``given``
    (computed before the tail, e.g. the corrected low-rank momentum) or ``grad`` (the raw gradient)."""
    bias_correction = True
    """Whether the numerator is divided by ``1 - b1^t``."""
    in_clip_scope = False
    """Whether ``clip_scope="lowrank"`` (the default) clips this policy's update."""
    needs_matrix = False

    def state(self, seg: Segment) -> dict[str, StateSpec]:
        return {"exp_avg": StateSpec(seg.shape, 0 if seg.shape else None, low_precision=True)}

    @staticmethod
    def update(m: Tensor, grad: Tensor, beta1: float) -> Tensor:
        """See :func:`full_momentum`."""
        return full_momentum(m, grad, beta1)


@register(MOMENTUM)
class LowRankMomentum:
    """Rank-``r`` factors ``L (m x r)``, ``R (r x n)`` with a residual correction (a matrix only)."""

    name = "lowrank"
    source = "given"
    bias_correction = True
    in_clip_scope = True
    needs_matrix = True

    def state(self, seg: Segment) -> dict[str, StateSpec]:
        rows, cols = seg.shape
        return {"lowrank_L": StateSpec((rows, seg.rank), 0, low_precision=True),
                "lowrank_R": StateSpec((seg.rank, cols), None, low_precision=True)}  # fmt: skip

    @staticmethod
    def update(left: Tensor, right: Tensor, grad: Tensor, beta1: float, step: int, **kwargs: Any) -> tuple[Tensor, ...]:
        """See :func:`lowrank_momentum`."""
        return lowrank_momentum(left, right, grad, beta1, step, **kwargs)


@register(MOMENTUM)
class NoMomentum:
    """No momentum state: the update's numerator is the gradient."""

    name = "none"
    source = "grad"
    bias_correction = False
    in_clip_scope = False
    needs_matrix = False

    def state(self, seg: Segment) -> dict[str, StateSpec]:
        return {}


MOMENTUM_POLICIES = tuple(MOMENTUM)


def full_momentum(m: Tensor, grad: Tensor, beta1: float) -> Tensor:
    """``m <- b1 m + (1 - b1) g`` in place; returns ``m``."""
    return m.lerp_(grad, 1.0 - beta1)


def lowrank_momentum(
    left: Tensor,
    right: Tensor,
    grad: Tensor,
    beta1: float,
    step: int,
    *,
    tracker: str,
    correction: str,
    refresh: bool,
    generator: torch.Generator | None,
    reduce: Reduce | None = None,
    out: Tensor | None = None,
    guard: bool | Tensor = False,
    global_rows: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """One low-rank momentum step. Returns ``(corrected momentum, L_t, R_t)``; inputs are untouched
    (except ``out``, which may be ``grad`` itself: the result then overwrites the gradient).

    Batched: ``left (B, m, r)``, ``right (B, r, n)``, ``grad (B, m, n)`` step ``B`` same-shape blocks at
    once with batched matmuls and QR (``tracker`` ``power``, ``gd`` or ``fixed``; no refresh), each
    block scaled on its own, so every block gets what it would get alone, to float32 rounding.

    Args:
        left, right: the factors ``L_{t-1}``, ``R_{t-1}``.
        grad: the gradient ``g_t`` (float32, same shape as ``L @ R``).
        beta1: momentum decay.
        step: the 1-based step ``t``.
        tracker: a name in :data:`adapm.policies.trackers.TRACKER` (``power``, ``gd``, ``fixed``).
        correction: ``"unbiased"``, ``"none"`` or ``"paper"`` (see :mod:`adapm.policies.correction`).
        refresh: re-seed the factors from a randomized SVD of ``m_t`` instead of tracking.
        generator: the random source for the refresh (required when ``refresh``).
        reduce: for a row-sharded matrix, the sum over ranks (see :mod:`adapm.policies.trackers`).
        out: a reusable buffer shaped like ``grad`` for the transient momentum; the result is then
            computed in it (large fresh allocations are slow: every new page faults).
        guard: keep the previous value of any entry of the new factors that is not finite (without a
            host sync; the momentum is then corrected against the guarded factors). Finite inputs give
            finite factors (the trackers are scale-safe), so this only guards the unforeseen. A boolean
            tensor instead (``(B, 1, 1)`` for a batch, 0-d for one matrix) keeps the previous factors of
            the blocks where it is False, whole: the device-side skip of a step whose gradient was not
            finite (see :class:`adapm.AdaPM`'s deferred check).
        global_rows: for a row-sharded matrix, its rows on all ranks (a refresh needs them).
    """
    policy = TRACKER.get(tracker)
    if policy is None:
        raise ValueError(f"Invalid tracker: {tracker!r}; expected one of {tuple(TRACKER)}")
    if policy.keeps_basis and not refresh:
        return _fixed_basis_momentum(left, right, grad, beta1, correction_coefficient(correction, beta1, step),
                                     reduce, out, guard)  # fmt: skip
    m = _addmm_(_into(out, grad), left, right, beta=1.0 - beta1, alpha=beta1)
    rank = left.shape[-1]
    previous = (left, right)
    if refresh:
        if grad.dim() != 2:
            raise ValueError("lowrank_momentum: a refresh takes one matrix, not a batch")
        if generator is None:
            raise ValueError("lowrank_momentum: a generator is required when refresh=True")
        left, right = randomized_factors(m, rank, generator, balanced=policy.balanced, reduce=reduce,
                                         global_rows=global_rows)  # fmt: skip
    else:
        left, right = policy.track(m, left, right, reduce)
    left, right = _guarded(left, previous[0], guard), _guarded(right, previous[1], guard)
    c = correction_coefficient(correction, beta1, step)
    if c == 0.0:
        return m, left, right
    # m + c (m - L R) without materializing the residual.
    return _addmm_(m, left, right, beta=1.0 + c, alpha=-c), left, right


def _guarded(new: Tensor, old: Tensor, guard: bool | Tensor) -> Tensor:
    """``new`` where ``guard`` (a mask) is True, else ``old``; with ``guard=True``, ``new`` where it is
    finite; with False, ``new`` (no host sync in any case)."""
    if isinstance(guard, Tensor):
        return torch.where(guard, new, old)
    return torch.where(torch.isfinite(new), new, old) if guard else new


def _into(out: Tensor | None, grad: Tensor) -> Tensor:
    """The buffer to compute in: a copy of ``grad`` (in ``out`` if given; ``out`` may be ``grad``)."""
    if out is None:
        return grad.clone()
    return out if out is grad else out.copy_(grad)


def _addmm_(x: Tensor, a: Tensor, b: Tensor, *, beta: float, alpha: float) -> Tensor:
    """``x <- beta x + alpha a @ b`` in place, for a matrix or a batch of matrices."""
    if x.dim() == 2:
        return x.addmm_(a, b, beta=beta, alpha=alpha)
    return x.baddbmm_(a, b, beta=beta, alpha=alpha)


def _fixed_basis_momentum(
    q: Tensor, right: Tensor, grad: Tensor, beta1: float, c: float, reduce: Reduce | None, out: Tensor | None,
    guard: bool | Tensor = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """The ``fixed`` tracker between refreshes: the basis ``Q = L`` (orthonormal columns, from the
    last randomized SVD) is kept, so ``L_t R_t = Q Q^T m_t`` needs only ``P = Q^T g``:

    ``R_t = b1 R_{t-1} + (1 - b1) P`` and ``m_t - Q R_t = (1 - b1)(g - Q P)``, hence the corrected
    momentum ``m_t + c (m_t - Q R_t) = a g + Q (R_t - a P)`` with ``a = (1 + c)(1 - b1)``: two skinny
    matmuls instead of the power tracker's four. (For ``unbiased``, ``a -> 1``: the gradient outside
    the subspace plus the momentum inside it.)
    """
    p = q.mT @ grad
    if reduce is not None:
        p = reduce(p)
    right_t = _guarded(torch.lerp(right, p, 1.0 - beta1), right, guard)
    a = (1.0 + c) * (1.0 - beta1)
    coef = torch.add(right_t, p, alpha=-a)
    return _addmm_(_into(out, grad), q, coef, beta=a, alpha=1.0), q, right_t
