"""Low-precision state storage: stochastic rounding to bfloat16."""

from __future__ import annotations

import pytest
import torch

from adapm.policies.precision import code_table, dequantize, quant_block, quantize_, stochastic_round_


def _neighbours(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The bfloat16 values just below and just above each float32 value (by magnitude)."""
    bits = x.view(torch.int32)
    down = bits.bitwise_and(-65536).view(torch.float32)
    up = (bits.bitwise_and(-65536) + 65536).view(torch.float32)
    return down, up


def test_rounds_to_a_neighbour_and_is_unbiased() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, generator=gen) * torch.logspace(-20, 20, 64)
    down, up = _neighbours(x)
    total = torch.zeros(64, dtype=torch.float64)
    draws = 4000
    for i in range(draws):
        out = torch.empty(64, dtype=torch.bfloat16)
        stochastic_round_(out, x, torch.Generator().manual_seed(i))
        got = out.float()
        assert bool(((got == down) | (got == up)).all())
        total += got.double()
    # E[round(x)] = x: the mean of the draws is within 4 standard errors of x (relative to the bf16 gap).
    gap = (up - down).double().abs()
    assert bool(((total / draws - x.double()).abs() <= 4 * gap / (2 * draws**0.5)).all())


def test_round_to_nearest_would_stall_an_ema_that_stochastic_rounding_keeps_moving() -> None:
    """An EMA with beta = 0.999 adds 0.1% per step, below bfloat16's resolution: stored with round-to-
    nearest it never moves, with stochastic rounding it tracks the float32 EMA."""
    target, beta, steps = torch.full((256,), 2.0), 0.999, 2000
    exact = torch.ones(256)
    nearest = torch.ones(256, dtype=torch.bfloat16)
    stochastic = torch.ones(256, dtype=torch.bfloat16)
    for t in range(steps):
        exact.mul_(beta).add_(target, alpha=1 - beta)
        nearest = (nearest.float() * beta + target * (1 - beta)).to(torch.bfloat16)
        work = stochastic.float().mul_(beta).add_(target, alpha=1 - beta)
        stochastic_round_(stochastic, work, torch.Generator().manual_seed(t))
    assert bool((nearest.float() == 1.0).all())  # stalled
    assert abs(stochastic.float().mean().item() - exact.mean().item()) < 0.01, (stochastic.float().mean(), exact.mean())


def test_special_values_seeds_and_dtypes() -> None:
    x = torch.tensor([float("inf"), -float("inf"), float("nan"), 0.0, -0.0, 3.4e38])
    out = torch.empty(6, dtype=torch.bfloat16)
    stochastic_round_(out, x, torch.Generator().manual_seed(0))
    assert out[0] == float("inf") and out[1] == -float("inf") and torch.isnan(out[2]) and out[3] == 0 and out[4] == 0
    y = torch.randn(1000, generator=torch.Generator().manual_seed(1))
    a, b = torch.empty(1000, dtype=torch.bfloat16), torch.empty(1000, dtype=torch.bfloat16)
    stochastic_round_(a, y, torch.Generator().manual_seed(5))
    stochastic_round_(b, y, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)  # seeded: a resumed run rounds the same way
    same = torch.empty(1000)
    assert torch.equal(stochastic_round_(same, y, torch.Generator()), y)  # float32 state: a plain copy
    with pytest.raises(TypeError, match=r"cannot store state as torch\.float16"):
        stochastic_round_(torch.empty(3, dtype=torch.float16), torch.zeros(3), torch.Generator())


# ------------------------------------------------------------------------------- 8-bit state


def test_code_tables_are_sorted_logarithmic_and_hold_zero_and_one() -> None:
    signed, nonneg = code_table(False, torch.device("cpu")), code_table(True, torch.device("cpu"))
    assert signed.numel() == 255 and nonneg.numel() == 256  # 8-bit codes
    for table in (signed, nonneg):
        assert bool((table[1:] > table[:-1]).all()) and table[-1] == 1.0 and bool((table == 0).any())
    assert torch.equal(signed, -signed.flip(0))  # symmetric
    assert signed[128] == pytest.approx(2.0**-15 / 1.75) and signed[127] == 0
    assert nonneg[1] == pytest.approx(2.0**-31 / 1.75) and nonneg[0] == 0
    positive = signed[signed > 0]
    ratio = positive[1:] / positive[:-1]
    assert float(ratio.max()) <= 1.125 + 1e-6 and float(ratio.min()) >= 1 + 1 / 15 - 1e-6


@pytest.mark.parametrize("last, block", [(16, 16), (256, 256), (768, 256), (1000, 250), (3 * 97, 97), (263, 263)])
def test_blocks_divide_the_row(last: int, block: int) -> None:
    assert quant_block(last) == block and last % block == 0


@pytest.mark.parametrize("nonnegative", [False, True])
def test_quantize_rounds_to_a_neighbouring_code_unbiased(nonnegative: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(8, 256, generator=gen) * torch.logspace(-3, 3, 8)[:, None]
    x = x.abs() if nonnegative else x
    table = code_table(nonnegative, x.device)
    codes, scales = torch.empty(8, 256, dtype=torch.uint8), torch.empty(8)
    quantize_(codes, scales, x, nonnegative, None)
    assert torch.equal(scales, x.abs().amax(-1))  # the block's largest magnitude, exactly
    nearest = dequantize(codes, scales, nonnegative)
    y = x / scales[:, None]
    below = table[(torch.bucketize(y, table) - 1).clamp(min=0)] * scales[:, None]
    above = table[torch.bucketize(y, table)] * scales[:, None]
    total = torch.zeros_like(x, dtype=torch.float64)
    draws = 1000
    for i in range(draws):
        quantize_(codes, scales, x, nonnegative, torch.Generator().manual_seed(i))
        got = dequantize(codes, scales, nonnegative)
        assert bool(((got == below) | (got == above) | (got == x)).all())
        total += got.double()
    gap = (above - below).double()
    # E[decode] = x, within 4 standard errors; nearest rounding is at most half a gap off.
    assert bool(((total / draws - x.double()).abs() <= 4 * gap / (2 * draws**0.5) + 1e-6 * x.abs().double()).all())
    assert bool(((nearest - x).abs() <= gap.float() / 2 + 1e-6 * x.abs()).all())


def test_zero_blocks_and_tiny_second_moments() -> None:
    x = torch.zeros(2, 4)
    x[1] = torch.tensor([1.0, 1e-20, 0.0, 1e-3])  # 1e-20 is below the non-negative table's smallest code
    codes, scales = torch.empty(2, 4, dtype=torch.uint8), torch.empty(2)
    for nonnegative in (False, True):
        for seed in range(20):
            quantize_(codes, scales, x, nonnegative, torch.Generator().manual_seed(seed))
            got = dequantize(codes, scales, nonnegative)
            assert torch.equal(got[0], torch.zeros(4)) and got[1, 0] == 1.0 and got[1, 2] == 0.0
            if nonnegative:  # a positive second moment never becomes zero (it would divide a momentum by eps)
                assert got[1, 1] > 0
