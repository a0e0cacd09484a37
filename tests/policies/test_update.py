"""The elementwise tail: the compiled (fused) kernel equals the eager reference."""

from __future__ import annotations

import pytest
import torch

import adapm.policies.update as update
from adapm.policies.correction import correction_coefficient
from adapm.policies.momentum import lowrank_momentum
from adapm.policies.trackers import orthonormalize
from adapm.policies.update import (
    _block_moments_body,
    _foreach_body,
    elementwise_update,
    fixed_basis_values,
    fused_block_moments,
    fused_elementwise_update,
    fused_fixed_basis_momentum,
    fused_foreach_update,
    fused_scalars,
)

HYPER = dict(
    beta1=0.9, beta2=0.95, lr=1e-2, decay=1 - 1e-3, eps=1e-8, bias_correction1=0.271, bias_correction2_sqrt=0.31
)


@pytest.mark.parametrize("clip", [None, 0.5])
@pytest.mark.parametrize("second", ["full", "block"])
@pytest.mark.parametrize("momentum", ["full", "given", "none"])
@pytest.mark.parametrize("layout", ["contiguous", "column-slice", "vector"])
def test_fused_tail_equals_eager(momentum: str, second: str, clip: float | None, layout: str) -> None:
    g = torch.Generator().manual_seed(0)

    def tensor(scale: float, positive: bool = False) -> torch.Tensor:
        x = torch.rand(12, 30, generator=g) if positive else torch.randn(12, 30, generator=g)
        x = x * scale
        if layout == "column-slice":  # a Q/K/V segment of a fused c_attn weight: non-contiguous
            return x[:, 10:20]
        return x[0] if layout == "vector" else x

    target, grad, m, num = tensor(1.0), tensor(1e-2), tensor(1e-2), tensor(1e-2)
    v = tensor(1e-4, positive=True)
    denom = (torch.rand(target.shape[0] if target.dim() == 2 else 1, 1, generator=g) * 1e-2 + 1e-3).squeeze(-1)
    if target.dim() == 2:
        denom = denom[:, None]  # one value per row, broadcast over columns (block second moments)
    tensors = {"target": target, "grad": grad, "m": m, "numerator": num, "v": v, "denom": denom}
    use = {
        "v": second == "full",
        "m": momentum == "full",
        "numerator": momentum == "given",
        "denom": second == "block",
    }

    def run(fused: bool) -> dict[str, torch.Tensor]:
        t = {k: x.clone() for k, x in tensors.items()}
        opt = {k: (t[k] if on else None) for k, on in use.items()}
        if fused:
            scalars = fused_scalars(**HYPER, update_clip=clip, device=target.device)
            fused_elementwise_update(t["target"], t["grad"], **opt, scalars=scalars)
        else:
            elementwise_update(t["target"], t["grad"], **opt, **HYPER, update_clip=clip)
        return t

    eager, fused = run(False), run(True)
    assert not torch.equal(fused["target"], target)  # it updated in place
    # The parameter (scale 1) and the EMAs (unused ones stay untouched), to float32 rounding.
    for name, atol in (("target", 1e-7), ("m", 1e-9), ("v", 1e-11)):
        torch.testing.assert_close(fused[name], eager[name], rtol=1e-5, atol=atol)


def test_fused_tail_needs_a_second_moment() -> None:
    x = torch.zeros(3)
    with pytest.raises(ValueError, match="one of v"):
        fused_elementwise_update(x, x, v=None, m=None, numerator=None, denom=None,
                                 scalars=fused_scalars(**HYPER, update_clip=None, device=x.device))  # fmt: skip


@pytest.mark.parametrize("masked", [False, True])
def test_fused_fixed_basis_momentum_equals_the_eager_tracker(masked: bool) -> None:
    """The fixed tracker's batched step as one compiled call: the same corrected momentum and new R as
    ``lowrank_momentum`` to float32 rounding, with a non-finite R entry kept at its old value (host
    check) or a flagged block's R kept whole (device flags); the basis and R inputs untouched."""
    g = torch.Generator().manual_seed(0)
    batch, rows, cols, rank, beta1, step = 3, 12, 10, 2, 0.9, 5
    q = orthonormalize(torch.randn(batch, rows, rank, generator=g))
    right = torch.randn(batch, rank, cols, generator=g)
    grad = torch.randn(batch, rows, cols, generator=g)
    grad[1, 0, 0] = float("inf")  # R_t of block 1 gets non-finite entries
    oks = [torch.tensor(True), torch.tensor(False), torch.tensor(True)]
    mask = torch.stack(oks).view(-1, 1, 1) if masked else True
    q0, right0 = q.clone(), right.clone()
    momentum, _, new_right = lowrank_momentum(
        q, right, grad.clone(), beta1, step, tracker="fixed", correction="unbiased", refresh=False,
        generator=None, guard=mask,
    )  # fmt: skip
    a = (1.0 + correction_coefficient("unbiased", beta1, step)) * (1.0 - beta1)
    out = grad.clone()
    fused_right = fused_fixed_basis_momentum(q, right, out, torch.tensor(fixed_basis_values(beta1, a)),
                                             oks if masked else None)  # fmt: skip
    assert torch.equal(q, q0) and torch.equal(right, right0)
    torch.testing.assert_close(fused_right, new_right, rtol=1e-5, atol=1e-6)
    assert torch.equal(fused_right[1], right0[1]) if masked else torch.isfinite(fused_right).all()
    keep = [0, 2]  # block 1's momentum holds inf either way (its gradient does)
    torch.testing.assert_close(out[keep], momentum[keep], rtol=1e-5, atol=1e-6)


def test_the_compiled_calls_take_buckets_of_same_layout_blocks(monkeypatch) -> None:
    """The grouped fused tails and block moments call their compiled functions once per bucket of at most
    ``_BUCKET`` blocks of one layout (so deeper models reuse the graphs), and give what one uncompiled
    pass over all the blocks in their order gives: each block its own result (the block moments'
    denominators back in the caller's order), a masked block kept as it was."""
    monkeypatch.setattr(update, "_BUCKET", 2)
    calls: list[list[tuple[int, ...]]] = []
    real = update._run_compiled

    def spy(make, flags, *args):
        calls.append([tuple(x.shape) for x in args[0]])
        return real(make, flags, *args)

    monkeypatch.setattr(update, "_run_compiled", spy)
    g = torch.Generator().manual_seed(0)
    shapes = [(4, 6), (3, 5), (4, 6), (4, 6), (3, 5)]  # interleaved layouts, as layers' blocks come
    oks = [torch.tensor(True), torch.tensor(True), torch.tensor(False), torch.tensor(True), torch.tensor(True)]
    scalars = fused_scalars(**HYPER, update_clip=0.5, device=torch.device("cpu"))

    def tensors(positive: bool = False) -> list[torch.Tensor]:
        return [(torch.rand if positive else torch.randn)(shape, generator=g) for shape in shapes]

    targets, grads, ms, vs = tensors(), tensors(), tensors(), tensors(positive=True)
    ours = [[x.clone() for x in xs] for xs in (targets, grads, ms, vs)]
    fused_foreach_update(*ours[:2], vs=ours[3], ms=ours[2], denoms=None, scalars=scalars, oks=oks)
    assert calls == [[(4, 6), (4, 6)], [(4, 6)], [(3, 5), (3, 5)]]
    reference = [[x.clone() for x in xs] for xs in (targets, grads, ms, vs)]
    _foreach_body(True, True, True)(*reference, scalars, oks)  # one eager pass, the blocks in order
    for mine, theirs in zip(ours, reference):
        for a, b in zip(mine, theirs):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert torch.equal(ours[0][2], targets[2]) and torch.equal(ours[2][2], ms[2])  # the masked block

    calls.clear()
    specs = tuple((shape, 0, 1) for shape in shapes)  # one block per row
    moments = [torch.rand(shape[0], generator=g) for shape in shapes]
    rows = [scalars] * len(shapes)
    ours_v = [v.clone() for v in moments]
    denoms = fused_block_moments(ours_v, grads, rows, specs, oks)
    assert calls == [[(4,), (4,)], [(4,)], [(3,), (3,)]]
    reference_v = [v.clone() for v in moments]
    expected = _block_moments_body(True)(reference_v, grads, rows, specs, oks)
    for mine, theirs in zip(denoms + ours_v, expected + reference_v):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-7)
    assert torch.equal(ours_v[2], moments[2]) and not torch.equal(ours_v[0], moments[0])
