"""Low-rank momentum: the device-side guard of the new factors."""

from __future__ import annotations

import pytest
import torch

from adapm.policies.momentum import lowrank_momentum


@pytest.mark.parametrize("tracker", ["power", "fixed"])  # gd: its eigvalsh refuses such input on CPU
@pytest.mark.parametrize("batched", [False, True])
def test_guard_keeps_old_entries_where_new_factors_are_not_finite(tracker: str, batched: bool) -> None:
    """With ``guard=True``, entries of the new factors that are not finite keep their previous values and
    the rest are what the unguarded step gives; without it the non-finite values come through."""
    gen = torch.Generator().manual_seed(0)
    m, n, r = 12, 10, 3
    left = torch.linalg.qr(torch.randn(m, r, generator=gen))[0]
    right = torch.randn(r, n, generator=gen)
    grad = torch.randn(m, n, generator=gen)
    grad[0, 0] = float("inf")  # a gradient the per-step check would have caught: it poisons the factors
    if batched:
        left, right, grad = left.unsqueeze(0), right.unsqueeze(0), grad.unsqueeze(0)
    kwargs = dict(tracker=tracker, correction="unbiased", refresh=False, generator=None)
    _, raw_left, raw_right = lowrank_momentum(left, right, grad, 0.9, 5, **kwargs)
    _, new_left, new_right = lowrank_momentum(left, right, grad, 0.9, 5, guard=True, **kwargs)
    assert not (torch.isfinite(raw_left).all() and torch.isfinite(raw_right).all())
    for raw, new, old in ((raw_left, new_left, left), (raw_right, new_right, right)):
        ok = torch.isfinite(raw)
        assert torch.isfinite(new).all()
        assert torch.equal(new[ok], raw[ok]) and torch.equal(new[~ok], old[~ok])
