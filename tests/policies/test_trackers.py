"""Low-rank trackers: accuracy against the best rank-r approximation, robustness, determinism."""

from __future__ import annotations

import pytest
import torch

from adapm.policies import correction_coefficient, gd_track, lowrank_momentum, power_track, randomized_factors
from adapm.policies.trackers import QR_METHOD, orthonormalize


@pytest.fixture(params=["householder", "cholesky"])
def qr_method(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test with each orthonormalization: Householder (CPU's default) and Cholesky QR (CUDA's)."""
    monkeypatch.setitem(QR_METHOD, "cpu", request.param)
    return request.param


def _rotating_stream(steps: int, rows: int = 64, cols: int = 48, rank: int = 4, seed: int = 0):
    """M_t = U_t S V^T + noise, with U_t rotating slowly (a fixed skew-symmetric generator)."""
    gen = torch.Generator().manual_seed(seed)
    u0, _ = torch.linalg.qr(torch.randn(rows, rank, generator=gen))
    v, _ = torch.linalg.qr(torch.randn(cols, rank, generator=gen))
    skew = torch.randn(rows, rows, generator=gen)
    rotation = torch.linalg.matrix_exp(0.01 * (skew - skew.T))
    s = torch.diag(torch.tensor([10.0, 8.0, 6.0, 5.0]))
    u = u0
    for _ in range(steps):
        u = rotation @ u
        yield u @ s @ v.T + 0.1 * torch.randn(rows, cols, generator=gen)


def _best_error(m: torch.Tensor, rank: int) -> float:
    s = torch.linalg.svdvals(m.double())
    return float(s[rank:].square().sum().sqrt())


def test_power_tracker_within_one_percent_of_best_rank_r(qr_method: str) -> None:
    rank = 4
    stream = _rotating_stream(200)
    first = next(stream)
    left, right = randomized_factors(first, rank, torch.Generator().manual_seed(1))
    worst = 0.0
    for m in stream:
        left, right = power_track(m, right)
        err = float((m - left @ right).norm())
        worst = max(worst, err / _best_error(m, rank))
        assert torch.allclose(left.T @ left, torch.eye(rank), atol=1e-5)
    assert worst < 1.01, worst


def test_gd_tracker_close_to_best_rank_r() -> None:
    rank = 4
    stream = _rotating_stream(100)
    left, right = randomized_factors(next(stream), rank, torch.Generator().manual_seed(1), balanced=True)
    ratios = []
    for m in stream:
        left, right = gd_track(m, left, right)
        ratios.append(float((m - left @ right).norm()) / _best_error(m, rank))
    assert max(ratios) < 1.05, max(ratios)


def test_trackers_never_nan_on_zero_or_rank_deficient_momenta(qr_method: str) -> None:
    gen = torch.Generator().manual_seed(0)
    zero = torch.zeros(20, 12)
    for balanced in (False, True):
        left, right = randomized_factors(zero, 3, gen, balanced=balanced)
        assert torch.isfinite(left).all() and torch.isfinite(right).all()
    left, right = power_track(zero, torch.zeros(3, 12))
    assert torch.isfinite(left).all() and torch.isfinite(right).all()
    left, right = gd_track(zero, torch.zeros(20, 3), torch.zeros(3, 12))
    assert torch.isfinite(left).all() and torch.isfinite(right).all()
    # Embedding-like gradient: only two rows ever receive gradient (rank 2 < r = 3).
    grad = torch.zeros(20, 12)
    grad[[3, 7]] = torch.randn(2, 12, generator=gen)
    for tracker in ("power", "gd", "fixed"):
        left, right = torch.zeros(20, 3), torch.zeros(3, 12)
        for t in range(1, 30):
            g = grad if t % 3 else torch.zeros_like(grad)
            out, left, right = lowrank_momentum(
                left, right, g, 0.9, t, tracker=tracker, correction="unbiased", refresh=t in (1, 10), generator=gen
            )
            assert torch.isfinite(out).all() and torch.isfinite(left).all() and torch.isfinite(right).all()
        # Rows that never had a gradient keep zero momentum.
        assert out[0].abs().max() < 1e-5


def test_randomized_factors_are_seeded() -> None:
    m = torch.randn(30, 20, generator=torch.Generator().manual_seed(3))
    a = randomized_factors(m, 4, torch.Generator().manual_seed(7))
    b = randomized_factors(m, 4, torch.Generator().manual_seed(7))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    best = _best_error(m, 4)
    assert float((m - a[0] @ a[1]).norm()) / best < 1.01


@pytest.mark.parametrize("correction", ["unbiased", "none", "paper"])
def test_fixed_tracker_is_the_exact_projection_with_two_matmuls(correction: str) -> None:
    """Between refreshes the fixed tracker keeps L = Q and sets L R_t = Q Q^T m_t; its corrected
    momentum must equal m_t + c_t (m_t - Q Q^T m_t) computed the long way."""
    gen = torch.Generator().manual_seed(5)
    q, right = randomized_factors(torch.randn(40, 24, generator=gen), 4, gen)
    beta1 = 0.9
    for t in (2, 7, 50):
        g = torch.randn(40, 24, generator=gen)
        m = beta1 * q @ right + (1 - beta1) * g
        expected = m + correction_coefficient(correction, beta1, t) * (m - q @ (q.T @ m))
        out, left, new_right = lowrank_momentum(
            q, right, g, beta1, t, tracker="fixed", correction=correction, refresh=False, generator=None,
            out=torch.empty_like(g),
        )  # fmt: skip
        assert left is q
        torch.testing.assert_close(new_right, q.T @ m, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)  # c = -10 for "paper"
        right = new_right


@pytest.mark.parametrize("scale", [1e-30, 1e30])
def test_trackers_are_scale_safe(scale: float, qr_method: str) -> None:
    """A huge (or tiny) but finite momentum gives finite factors spanning the same subspace as at unit
    scale; at powers of two the results are bit-identical (the normalisation is exact)."""
    g = torch.Generator().manual_seed(0)
    m = torch.randn(40, 3, generator=g) @ torch.randn(3, 30, generator=g) + 0.01 * torch.randn(40, 30, generator=g)
    left, right = randomized_factors(m, 4, torch.Generator().manual_seed(1))
    big = m * scale
    for name, (q, r) in {
        "rsvd": randomized_factors(big, 4, torch.Generator().manual_seed(1)),
        "rsvd-balanced": randomized_factors(big, 4, torch.Generator().manual_seed(1), balanced=True),
        "power": power_track(big, right * scale),
        "gd": gd_track(big, left * scale**0.5, right * scale**0.5),
    }.items():
        assert torch.isfinite(q).all() and torch.isfinite(r).all(), name
        approx = (q.double() @ r.double()) / scale
        assert torch.linalg.norm(approx - m.double()) / torch.linalg.norm(m.double()) < 0.05, name
    two = 2.0**90
    q1, r1 = power_track(m, right)
    q2, r2 = power_track(m * two, right * two)
    assert torch.equal(q1, q2) and torch.equal(r1 * two, r2)


@pytest.mark.parametrize("tracker", ["power", "gd", "fixed"])
def test_batched_lowrank_momentum_equals_each_block_alone(tracker: str, qr_method: str) -> None:
    """A stack of same-shape blocks (the grouped step) gets what each block gets alone, to float32
    rounding, with each block scaled on its own: a tiny, a unit and a huge block side by side."""
    gen = torch.Generator().manual_seed(0)
    scales = (1e-30, 1.0, 1e30)
    grads = torch.stack([torch.randn(40, 30, generator=gen) * s for s in scales])
    pairs = [randomized_factors(g, 4, torch.Generator().manual_seed(1)) for g in grads]
    left, right = torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
    batched = lowrank_momentum(
        left, right, grads.clone(), 0.9, 5, tracker=tracker, correction="unbiased", refresh=False, generator=None
    )
    for i, scale in enumerate(scales):
        alone = lowrank_momentum(
            left[i], right[i], grads[i], 0.9, 5, tracker=tracker, correction="unbiased", refresh=False, generator=None
        )
        for got, expected in zip(batched, alone):
            assert torch.isfinite(got[i]).all()
            torch.testing.assert_close(got[i] / scale, expected / scale, rtol=1e-4, atol=1e-5)
    # In place: the gradient stack itself becomes the corrected momentum.
    stack = grads.clone()
    out = lowrank_momentum(left, right, stack, 0.9, 5, tracker=tracker, correction="unbiased", refresh=False,
                           generator=None, out=stack)[0]  # fmt: skip
    assert out.data_ptr() == stack.data_ptr()
    torch.testing.assert_close(out, batched[0])
    with pytest.raises(ValueError, match="one matrix, not a batch"):
        lowrank_momentum(left, right, grads, 0.9, 5, tracker=tracker, correction="unbiased", refresh=True,
                         generator=torch.Generator())  # fmt: skip


@pytest.mark.parametrize("shape", [(96, 12), (700, 64)])
def test_cholesky_qr_is_orthonormal_and_keeps_the_span(shape: tuple[int, int]) -> None:
    """Cholesky QR (float64, two passes): orthonormal columns and the span of ``Y`` at least as accurately
    as a float32 Householder QR, for well- and ill-conditioned, rank-deficient, zero and batched ``Y``."""
    rows, cols = shape
    gen = torch.Generator().manual_seed(0)
    u = torch.linalg.qr(torch.randn(rows, cols, generator=gen, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(cols, cols, generator=gen, dtype=torch.float64)).Q
    zero_column = torch.randn(rows, cols, generator=gen)
    zero_column[:, 3] = 0
    cases = {
        "random": torch.randn(rows, cols, generator=gen),
        "ill-conditioned": ((u * torch.logspace(0, -7, cols, dtype=torch.float64)) @ v.T).float() * 1e20,
        "rank 5": torch.randn(rows, 5, generator=gen) @ torch.randn(5, cols, generator=gen),
        "zero column": zero_column,
        "zero": torch.zeros(rows, cols),
    }
    eye = torch.eye(cols, dtype=torch.float64)
    for name, y in cases.items():
        q32 = orthonormalize(y, method="cholesky")
        assert q32.dtype == torch.float32 and torch.isfinite(q32).all(), name
        q = q32.double()
        assert (q.mT @ q - eye).abs().max() < 1e-6, name
        y64 = y.double()
        residual = (y64 - q @ (q.mT @ y64)).norm() / y64.norm().clamp_min(1e-300)
        house = orthonormalize(y, method="householder").double()
        residual_house = (y64 - house @ (house.mT @ y64)).norm() / y64.norm().clamp_min(1e-300)
        assert residual <= max(residual_house, 1e-7), (name, residual, residual_house)
    batch = torch.stack(list(cases.values()))
    together = orthonormalize(batch, method="cholesky")
    for i, y in enumerate(cases.values()):
        torch.testing.assert_close(together[i], orthonormalize(y, method="cholesky"), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="unknown method 'gram'"):
        orthonormalize(batch, method="gram")


def test_sharded_orthonormalize_and_reduce_max_treat_each_matrix_of_a_batch_alone() -> None:
    # With one rank the all-reduce is the identity: a batch must give what each matrix gives alone (the
    # grouped step stacks the sharded blocks of FSDP2). The batch mixes scales 1e-6 and 1e3: a threshold
    # shared by the batch would drop the small matrix's directions.
    from adapm.policies.trackers import reduce_max

    gen = torch.Generator().manual_seed(0)
    batch = torch.stack([torch.randn(12, 4, generator=gen) * scale for scale in (1e-6, 1.0, 1e3)])
    together = orthonormalize(batch, reduce=lambda t: t)
    for i in range(len(batch)):
        alone = orthonormalize(batch[i], reduce=lambda t: t)
        # The same span (columns may differ in sign: eigenvectors do, batched or not).
        torch.testing.assert_close(together[i] @ together[i].mT, alone @ alone.mT, rtol=1e-5, atol=1e-6)
        assert (alone.mT @ alone - torch.eye(4)).abs().max() < 1e-5
    powers = torch.tensor([2.0**-30, 1.0, 2.0**20]).view(3, 1, 1)
    assert torch.equal(reduce_max(powers, lambda t: t), powers)
    assert torch.equal(reduce_max(torch.tensor(2.0**-7), lambda t: t), torch.tensor(2.0**-7))
    # Two "ranks" (each row's one-hot summed with the other row's): each entry gets the larger of the pair.
    pair = torch.tensor([2.0**-3, 2.0**5])
    assert torch.equal(reduce_max(pair, lambda hot: hot + hot.flip(0)), torch.tensor([2.0**5, 2.0**5]))
