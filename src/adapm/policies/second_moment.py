"""Second-moment policies: ``full`` (one value per entry, as Adam) and ``block`` (one per block).

A block layout is ``(block_dim, block_size)``: blocks are runs of ``block_size`` consecutive indices
along ``block_dim`` (each run spanning all other dimensions), so ``(0, 1)`` is one value per row,
``(0, head_dim)`` one value per attention head of an ``nn.Linear`` weight, and ``(None, 1)`` one value for
the whole tensor. Block values are stored as a 1-D tensor of ``block_count`` entries.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from adapm.policies.state import StateSpec, register

if TYPE_CHECKING:
    from adapm.partition.layout import Segment

SECOND_MOMENT: dict[str, Any] = {}
"""The second-moment policies by name (``full``, ``block``)."""


@register(SECOND_MOMENT)
class FullSecondMoment:
    """Adam's EMA of ``g^2``, one value per entry, updated in the elementwise tail."""

    name = "full"
    elementwise = True
    """Whether the state is parameter-shaped and updated entry by entry in the tail (else the policy
    gives each block's ``sqrt(vhat) + eps`` before the tail)."""

    def state(self, seg: Segment) -> dict[str, StateSpec]:
        # A fused parameter keeps one parameter-shaped tensor; each segment updates its view of it.
        return {"exp_avg_sq": StateSpec(seg.shape, 0 if seg.shape else None, "whole", low_precision=True,
                                          nonnegative=True)}

    @staticmethod
    def update(v: Tensor, grad: Tensor, beta2: float) -> Tensor:
        """See :func:`full_second_moment`."""
        return full_second_moment(v, grad, beta2)


@register(SECOND_MOMENT)
class BlockSecondMoment:
    """Adam-mini's block-wise second moment: one value per block (head, neuron, token or tensor)."""

    name = "block"
    elementwise = False

    def state(self, seg: Segment) -> dict[str, StateSpec]:
        return {"exp_avg_sq": StateSpec((seg.n_blocks,), None, "concat", 0)}

    @staticmethod
    def update(v: Tensor, grad: Tensor, beta2: float, block_dim: int | None, block_size: int, **kwargs: Any) -> Tensor:
        """See :func:`block_second_moment`."""
        return block_second_moment(v, grad, beta2, block_dim, block_size, **kwargs)


SECOND_MOMENT_POLICIES = tuple(SECOND_MOMENT)


def _block_shape(shape: tuple[int, ...], block_dim: int | None, block_size: int) -> tuple[int, int, int]:
    """Return ``(pre, n_blocks, post)`` so that a tensor of ``shape`` views as blocks in the middle dim."""
    numel = math.prod(shape)
    if block_dim is None:
        return 1, 1, numel
    size = shape[block_dim]
    if block_size < 1 or size % block_size != 0:
        raise ValueError(
            f"Invalid block_size {block_size} for dimension {block_dim} of size {size}: "
            "the dimension must be a multiple of the block size"
        )
    pre = math.prod(shape[:block_dim])
    post = block_size * math.prod(shape[block_dim + 1 :])
    return pre, size // block_size, post


def block_count(shape: tuple[int, ...], block_dim: int | None, block_size: int) -> int:
    """Number of second-moment values a tensor of ``shape`` needs under the given block layout."""
    return _block_shape(tuple(shape), block_dim, block_size)[1]


def full_second_moment(v: Tensor, grad: Tensor, beta2: float) -> Tensor:
    """``v <- b2 v + (1 - b2) g^2`` in place; returns ``v``."""
    return v.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)


def block_second_moment(
    v: Tensor,
    grad: Tensor,
    beta2: float,
    block_dim: int | None,
    block_size: int,
    workspace: Tensor | None = None,
) -> Tensor:
    """``v[b] <- b2 v[b] + (1 - b2) mean_{i in b} g_i^2`` in place; returns ``v`` (1-D).

    ``workspace``: an optional flat float32 buffer of at least ``grad.numel()`` entries for ``g^2``
    when blocks span a leading dimension (e.g. one value per column); without it a fresh temporary is
    allocated (slow for large tensors: every new page faults). Blocks of whole trailing dimensions
    (rows, or the whole tensor) are reduced in one pass without any temporary.
    """
    pre, n_blocks, post = _block_shape(tuple(grad.shape), block_dim, block_size)
    if pre == 1:  # see needs_square_buffer
        sq_mean = _sum_of_squares(grad.reshape(n_blocks, post), 1).div_(post)
    else:
        if workspace is not None and workspace.numel() >= grad.numel():
            sq = torch.mul(grad, grad, out=workspace[: grad.numel()].view(grad.shape))
        else:
            sq = grad.square()
        sq_mean = sq.reshape(pre, n_blocks, post).mean(dim=(0, 2))
    return v.mul_(beta2).add_(sq_mean, alpha=1.0 - beta2)


def needs_square_buffer(shape: tuple[int, ...], block_dim: int | None, block_size: int) -> bool:
    """Whether :func:`block_second_moment` uses its ``workspace`` for this layout (blocks that span
    a leading dimension, e.g. one value per column or per head of a Conv1D weight)."""
    return _block_shape(tuple(shape), block_dim, block_size)[0] > 1


def _sum_of_squares(x: Tensor, dim: int | tuple[int, ...] | None = None) -> Tensor:
    """``(x * x).sum(dim)`` without a full-size temporary (a reduction kernel reads ``x`` once)."""
    return torch.linalg.vector_norm(x, dim=dim).square_()


def expand_blocks(values: Tensor, shape: tuple[int, ...], block_dim: int | None, block_size: int) -> Tensor:
    """Broadcast per-block ``values`` (1-D) to a dense tensor of ``shape``."""
    pre, n_blocks, post = _block_shape(tuple(shape), block_dim, block_size)
    return values.view(1, n_blocks, 1).expand(pre, n_blocks, post).reshape(shape)


def block_entries(shape: tuple[int, ...], block_dim: int | None, block_size: int) -> int:
    """Entries per block of a tensor of (global) ``shape``."""
    pre, _, post = _block_shape(tuple(shape), block_dim, block_size)
    return pre * post


def local_block_sums(grad: Tensor, block_dim: int | None, block_size: int, n_blocks: int, row_offset: int) -> Tensor:
    """Per-block sums of ``g^2`` over the rows this rank holds (global rows from ``row_offset``).

    Summed over all ranks and divided by :func:`block_entries` this is the block mean of
    :func:`block_second_moment`; blocks along dim 0 may straddle ranks.
    """
    return stacked_local_block_sums(grad.unsqueeze(0), block_dim, block_size, n_blocks, row_offset)[0]


def stacked_local_block_sums(
    g: Tensor, block_dim: int | None, block_size: int, n_blocks: int, row_offset: int
) -> Tensor:
    """:func:`local_block_sums` of each tensor of a stack ``g (B, *shape)``: ``(B, n_blocks)``."""
    batch = g.shape[0]
    if block_dim is None:
        return _sum_of_squares(g.reshape(batch, -1), 1).unsqueeze(1)
    if block_dim == 0:
        rows = g.shape[1]
        ids = torch.div(torch.arange(rows, device=g.device) + row_offset, block_size, rounding_mode="floor")
        sums = torch.zeros(batch, n_blocks, dtype=g.dtype, device=g.device)
        return sums.index_add_(1, ids, _sum_of_squares(g.reshape(batch, rows, -1), 2))
    pre, nb, post = _block_shape(tuple(g.shape[1:]), block_dim, block_size)
    return g.square().reshape(batch, pre, nb, post).sum(dim=(1, 3))  # a strided reduction: square first


def broadcast_blocks(
    values: Tensor, shape: tuple[int, ...], block_dim: int | None, block_size: int, row_offset: int | None = None
) -> Tensor:
    """Per-block ``values`` as a small tensor that broadcasts to ``shape`` (a rank's rows from global row
    ``row_offset`` when given; else the whole tensor)."""
    return stacked_broadcast_blocks(values.unsqueeze(0), shape, block_dim, block_size, row_offset)[0]


def stacked_broadcast_blocks(
    values: Tensor, shape: tuple[int, ...], block_dim: int | None, block_size: int, row_offset: int | None = None
) -> Tensor:
    """:func:`broadcast_blocks` of each row of ``values (B, n_blocks)``: ``(B, *broadcastable shape)``, one
    view (a block's value depends only on the index along ``block_dim``; it spans the trailing dims)."""
    batch, ndim = values.shape[0], len(shape)
    if block_dim is None:
        return values.view(batch, *([1] * ndim))
    if block_dim == 0 and row_offset is not None:  # a rank's rows: blocks may start before them
        ids = torch.div(torch.arange(shape[0], device=values.device) + row_offset, block_size, rounding_mode="floor")
        per_index = values[:, ids]
    else:
        per_index = values if block_size == 1 else values.repeat_interleave(block_size, dim=1)
    view = [1] * ndim
    view[block_dim] = shape[block_dim]
    return per_index.view(batch, *view)
