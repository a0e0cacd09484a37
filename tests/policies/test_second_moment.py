"""Second-moment policies: block means, block layouts, expansion."""

from __future__ import annotations

import pytest
import torch

from adapm.policies import block_count, block_second_moment, expand_blocks, full_second_moment


def test_full_second_moment_is_adam() -> None:
    g = torch.randn(5, 4)
    v = torch.zeros(5, 4)
    full_second_moment(v, g, 0.95)
    assert torch.allclose(v, 0.05 * g * g)


@pytest.mark.parametrize(
    ("block", "expected"),
    [((0, 1), 6), ((1, 1), 8), ((0, 3), 2), ((1, 4), 2), ((None, 1), 1)],
)
def test_block_counts_and_means(block: tuple[int | None, int], expected: int) -> None:
    g = torch.randn(6, 8, generator=torch.Generator().manual_seed(0))
    assert block_count((6, 8), *block) == expected
    v = torch.zeros(expected)
    block_second_moment(v, g, 0.0, *block)
    dense = expand_blocks(v, (6, 8), *block)
    dim, size = block
    if dim is None:
        assert torch.allclose(dense, (g * g).mean().expand(6, 8))
    elif dim == 0:
        means = (g * g).reshape(6 // size, size * 8).mean(1)
        assert torch.allclose(dense, means.repeat_interleave(size)[:, None].expand(6, 8))
    else:
        means = (g * g).reshape(6, 8 // size, size).mean((0, 2))
        assert torch.allclose(dense, means.repeat_interleave(size)[None, :].expand(6, 8))


def test_block_second_moment_on_non_contiguous_view() -> None:
    g = torch.randn(4, 12)
    view = g[:, 4:8]
    v = torch.zeros(4)
    block_second_moment(v, view, 0.0, 1, 1)
    assert torch.allclose(v, (view * view).mean(0))


def test_block_size_must_divide() -> None:
    with pytest.raises(ValueError, match="multiple of the block size"):
        block_count((6, 8), 0, 4)


@pytest.mark.parametrize("block", [(0, 1), (0, 3), (1, 2), (None, 1)])
def test_local_block_sums_over_row_shards_equal_the_block_mean(block: tuple[int | None, int]) -> None:
    from adapm.policies.second_moment import block_entries, broadcast_blocks, local_block_sums

    g = torch.randn(9, 4, generator=torch.Generator().manual_seed(1))
    n = block_count((9, 4), *block)
    expected = torch.zeros(n)
    block_second_moment(expected, g, 0.0, *block)
    parts = [(0, g[:5]), (5, g[5:])]  # 5 + 4 rows: the 3-row blocks straddle the split
    total = sum(local_block_sums(part, *block, n, offset) for offset, part in parts)
    assert torch.allclose(total / block_entries((9, 4), *block), expected)
    dense = expand_blocks(expected, (9, 4), *block)
    for offset, part in parts:
        local = broadcast_blocks(expected, tuple(part.shape), *block, offset).expand(part.shape)
        assert torch.equal(local, dense[offset : offset + part.shape[0]])
