"""The grouped (multi-tensor) step: blocks that share their policies, shapes and scalars step together.

torch.optim's ``foreach`` form, carried over to AdaPM's three kinds of work:

* **Low-rank tracking.** Same-shape low-rank blocks (e.g. every layer's query and key, every MLP matrix
  of one shape) are stacked into one ``(B, m, n)`` buffer; the momentum, the tracker's matmuls and QR,
  and the residual correction then run as batched ops (``baddbmm``, a batched QR) on the whole
  stack. Blocks due for a refresh (a randomized SVD, about one block in ``refresh_every`` per step) are
  refreshed alone and overwrite their slot of the stack's momenta, so every tensor the tails see keeps
  its shape from step to step (compiled tails are built once). The factors of a stack are packed into
  one buffer at the first step (each parameter's state tensor a view of it: :func:`factor_stack`), so
  later steps read and write them in place. Stacks are cut at ``GROUP_ELEMENTS``
  entries (at parameter boundaries), which bounds the transient memory. The stored factors are checked
  finite with the gradients (the step's one host sync); entries of the new factors that are not finite
  keep their old values, on the device.
* **Block second moments** (AdaPM-mini). Same-shape blocks with the same block layout get their block
  means of ``g^2`` from one reduction over their stacked gradients (the low-rank stacks are reused);
  with ``fused=True`` and the device-side finite check, all of them (means, EMA, denominators) are one
  compiled call instead.
* **The elementwise tail** (momentum EMA, second-moment EMA, the update) runs as one ``torch._foreach_*``
  op per arithmetic step for all blocks that share their policies and scalars, or with ``fused=True``
  as compiled calls for them, one per bucket of same-layout blocks (one pass over each block's memory;
  the buckets keep the graphs the same whatever the model's depth).
* **Orthonormalization** of the tracked bases is a batched Cholesky QR off CPU (see
  :func:`adapm.policies.trackers.orthonormalize`).
* **Sharded parameters** (FSDP2, rows split across ranks) stack their local rows like whole blocks:
  every rank holds the same rows of every parameter of one shape, so all ranks build the same stacks,
  and the sums over ranks a stack needs (Gram matrices, projections, block sums of ``g^2``) are one
  all-reduce each for the whole stack.

So ops per step grow with the number of distinct (policy, shape) groups, not with the number of
parameters or layers. :meth:`adapm.AdaPM._step_param` is the single-tensor reference this path is tested
against (equal to float32 rounding: batched and single matmuls may round differently).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar, cast

import torch
from torch import Tensor

from adapm.distributed import ShardInfo, local
from adapm.partition.layout import ParamLayout, Segment
from adapm.policies.correction import correction_coefficient
from adapm.policies.momentum import lowrank_momentum
from adapm.policies.second_moment import (
    _block_shape,
    _sum_of_squares,
    block_entries,
    stacked_broadcast_blocks,
    stacked_local_block_sums,
)
from adapm.policies.trackers import TRACKER
from adapm.policies.update import (
    fixed_basis_values,
    foreach_elementwise_update,
    fused_block_moments,
    fused_fixed_basis_momentum,
    fused_foreach_update,
    scalar_values,
)

T = TypeVar("T")

GROUP_ELEMENTS = 1 << 27
"""Most entries stacked into one batched buffer (512 MB of float32); a larger group is stepped in several
stacks. A single block larger than this is stepped alone."""


class Views:
    """Views of persistent tensors (parameters, float32 state), made once and reused across steps, so the
    grouped step does not dispatch a ``narrow``/``select`` per segment and tensor on every step (those
    would make its op count grow with depth). A view is reused only while its base is the same tensor
    with the same storage (``p.data = ...``, a moved model or a loaded state dict make new views; the
    optimizer starts a new ``Views`` on ``load_state_dict``)."""

    def __init__(self) -> None:
        self._views: dict[tuple[int, str, str], tuple[Tensor, int, Tensor]] = {}
        self._stacks: dict[tuple[int, int, tuple[int, ...], torch.dtype], Tensor] = {}

    def get(self, base: Tensor, key: str, name: str, make: Callable[[], Tensor]) -> Tensor:
        """The view ``make()`` gives of ``base`` (``key``: which state; ``name``: which segment), kept."""
        hit = self._views.get((id(base), key, name))
        pointer = local(base).data_ptr()
        if hit is not None and hit[0] is base and hit[1] == pointer:
            return hit[2]
        view = make()
        self._views[id(base), key, name] = (base, pointer, view)
        return view

    def forget(self, bases: Sequence[Tensor]) -> None:
        """Drop the views kept of ``bases`` (they are being replaced: the views would keep them alive)."""
        gone = {id(base) for base in bases}
        self._views = {k: v for k, v in self._views.items() if k[0] not in gone}

    def stack(self, parts: Sequence[Tensor]) -> Tensor | None:
        """``parts`` as one ``(B, ...)`` view, when they are consecutive same-shape slices of one buffer
        (factors packed by :func:`factor_stack`): the view kept from the step that packed them. None
        otherwise. Checked on the host (addresses and strides: no op is dispatched)."""
        first = parts[0]
        size, start = first.numel() * first.element_size(), first.data_ptr()
        for i, part in enumerate(parts):
            if part.shape != first.shape or not part.is_contiguous() or part.data_ptr() != start + i * size:
                return None
        hit = self._stacks.get((start, len(parts), tuple(first.shape), first.dtype))
        return hit if hit is not None and hit.data_ptr() == start else None

    def keep_stack(self, stack: Tensor, replaced: Sequence[Tensor]) -> None:
        """Keep ``stack`` (a packed buffer, see :meth:`stack`), and drop the kept stacks of the storages of
        the ``replaced`` tensors (they would keep old buffers alive)."""
        gone = {x.untyped_storage().data_ptr() for x in replaced}
        self._stacks = {k: v for k, v in self._stacks.items() if v.untyped_storage().data_ptr() not in gone}
        self._stacks[stack.data_ptr(), len(stack), tuple(stack.shape[1:]), stack.dtype] = stack


@dataclass
class Block:
    """One segment of one parameter, stepped this time."""

    p: Tensor
    group: dict[str, Any]
    layout: ParamLayout
    seg: Segment
    t: int
    target: Tensor
    """The float32 values to update (a view of the parameter, or of its float32 working copy)."""
    grad: Tensor
    """The float32 gradient of this segment."""
    state: dict[str, Any]
    numerator: Tensor | None = None
    """The corrected low-rank momentum, once tracked."""
    sq_mean: Tensor | None = None
    """This block's per-block means of ``g^2`` (AdaPM-mini), once reduced."""
    views: Views | None = None
    """Where views of persistent state are kept between steps (None: made afresh)."""
    shard: ShardInfo | None = None
    """Which rows of a parameter sharded across ranks (FSDP2) this rank holds; None when held whole.
    ``target``, ``grad`` and ``state`` are then this rank's local tensors."""
    ok: Tensor | None = None
    """With the deferred finite check (:class:`adapm.AdaPM`), a 0-d boolean on the device: False when this
    parameter's gradient or stored factors are not finite, and then the step leaves its values and state
    as they were (masked on the device, no host sync). None: the check was done on the host before."""

    @property
    def shard_key(self) -> tuple[Any, ...] | None:
        """What blocks stacked together must share beyond their shapes: their rows and process group
        (one all-reduce per stack)."""
        info = self.shard
        return None if info is None else (info.offset, info.rows, info.group)

    @property
    def reduce(self) -> Callable[[Tensor], Tensor] | None:
        """The sum over ranks of a sharded block (see :class:`adapm.distributed.ShardInfo`), else None."""
        return None if self.shard is None else self.shard.reduce

    @property
    def lowrank(self) -> bool:
        """Whether the momentum is computed before the tail (low-rank tracking)."""
        return self.seg.policy.source == "given"

    def part(self, key: str, shaped: bool = False) -> Tensor:
        """This segment's part of state ``key`` (a view; ``shaped``: as :meth:`Segment.as_view` shapes it),
        reused from :attr:`views` unless the state is a low-precision working copy (fresh every step)."""
        base, seg = self.state[key], self.seg

        def make() -> Tensor:
            part = self.layout.part(base, key, seg)
            return seg.as_view(part) if shaped else part

        if self.views is None or key in self.layout.low_precision_keys:
            return make()
        return self.views.get(base, f"{key}:shaped" if shaped else key, seg.name, make)

    def factors(self) -> tuple[Tensor, Tensor]:
        return self.part("lowrank_L"), self.part("lowrank_R")

    def second_moment(self) -> Tensor:
        """This segment's second-moment state: a view of the parameter-shaped ``v`` or its block values."""
        return self.part("exp_avg_sq")


RefreshFn = Callable[[Block], "torch.Generator | None"]


class Fused(Protocol):
    """Who decides whether the tails run compiled (the optimizer): ``fused``, switched off for good by
    ``disable_fused`` when ``torch.compile`` cannot build the kernel here."""

    fused: bool

    def disable_fused(self, err: Exception) -> None: ...


def stacks(blocks: Sequence[Block], limit: int | None = None) -> list[list[Block]]:
    """Cut a group into stacks of at most ``limit`` entries (default :data:`GROUP_ELEMENTS`), never
    between two segments of one parameter (a parameter is stepped or skipped as a whole)."""
    limit = GROUP_ELEMENTS if limit is None else limit
    # Sizes of the global segments: ranks that hold different numbers of rows of a sharded parameter
    # must cut their stacks alike (one all-reduce per stack, on every rank).
    per_param: dict[int, int] = {}
    for block in blocks:
        per_param[id(block.p)] = per_param.get(id(block.p), 0) + math.prod(block.seg.shape)
    out: list[list[Block]] = []
    current: list[Block] = []
    size = 0
    for i, block in enumerate(blocks):
        starts = i == 0 or blocks[i - 1].p is not block.p
        if starts and current and size + per_param[id(block.p)] > limit:  # all of the parameter must fit
            out.append(current)
            current, size = [], 0
        current.append(block)
        size += math.prod(block.seg.shape)
    if current:
        out.append(current)
    return out


def copy_chunks(items: Sequence[T], cost: Callable[[T], int], limit: int | None = None) -> list[list[T]]:
    """Cut ``items`` (in order) so that each chunk's float32 working copies (``cost`` entries per item:
    of parameters and gradients that are not float32, and of low-precision state) hold at most ``limit``
    entries (default :data:`GROUP_ELEMENTS`); a model whose parameters, gradients and state are all
    float32 needs no copy and stays one chunk."""
    limit = GROUP_ELEMENTS if limit is None else limit
    out: list[list[T]] = []
    current: list[T] = []
    size = 0
    for item in items:
        n = cost(item)
        if current and n and size + n > limit:
            out.append(current)
            current, size = [], 0
        current.append(item)
        size += n
    if current:
        out.append(current)
    return out


def stacked(tensors: Sequence[Tensor]) -> Tensor:
    """The tensors as one ``(B, ...)`` tensor: a view for a single one, else one copy."""
    return tensors[0].unsqueeze(0) if len(tensors) == 1 else torch.stack(list(tensors))


def stack_mask(blocks: Sequence[Block], dims: int) -> Tensor | None:
    """The blocks' :attr:`Block.ok` flags as one ``(B, 1, ..., 1)`` mask (``dims`` dimensions in all), or
    None when the step checked finiteness on the host."""
    if blocks[0].ok is None:
        return None
    return torch.stack([cast(Tensor, b.ok) for b in blocks]).view(-1, *([1] * (dims - 1)))


def stacked_matrices(blocks: Sequence[Block]) -> Tensor:
    """The blocks' gradients as one ``(B, *matrix shape)`` tensor (interleaved segments are gathered)."""
    return as_matrices(stacked([b.grad for b in blocks]), blocks[0].seg)


def as_matrices(g: Tensor, seg: Segment) -> Tensor:
    """A stack of segment views ``g`` as ``(B, *matrix shape)``: a copy only for interleaved segments
    (never sharded: their rows would straddle ranks), which :meth:`Segment.matrix` gathers."""
    return g if seg.groups == 1 else g.reshape(len(g), *seg.shape)


def block_sq_means(g: Tensor, block: tuple[int | None, int], shard: ShardInfo | None = None,
                   shape: tuple[int, ...] = ()) -> Tensor:  # fmt: skip
    """Per-block means of ``g^2`` for a stack ``g (B, *shape)`` of same-shape gradients: ``(B, n_blocks)``.

    For blocks sharded across ranks (``shard``; ``g`` holds this rank's rows of matrices of global
    ``shape``) the per-block sums of every rank are added with one all-reduce for the stack."""
    batch, local_shape = g.shape[0], tuple(g.shape[1:])
    if shard is not None:
        sums = stacked_local_block_sums(g, *block, _block_shape(shape, *block)[1], shard.offset)
        return shard.reduce(sums).div_(block_entries(shape, *block))
    pre, n_blocks, post = _block_shape(local_shape, *block)
    if pre == 1:  # blocks of whole trailing dimensions: one reduction pass, no temporary
        return _sum_of_squares(g.reshape(batch, n_blocks, post), 2).div_(post)
    return g.square().reshape(batch, pre, n_blocks, post).mean(dim=(1, 3))


def step_lowrank(
    blocks: list[Block], refresh: RefreshFn, fused: Fused | None = None, scalars: ScalarRows | None = None
) -> None:
    """Track every low-rank block and step it, one stack at a time: a stack's corrected momenta (and, for
    block second moments, its ``g^2`` block means) feed its elementwise tail and are freed before the next
    stack is built, so the step's transient memory is one stack, not all low-rank blocks. Blocks due for
    a refresh are tracked alone but stay in their stack's tail, so a stack's tail takes the same list
    every step (a compiled tail is not rebuilt as refreshes move through the stack). No host sync: the
    stored factors were checked with the gradients, and the new ones are guarded on the device."""
    groups: dict[tuple[Any, ...], list[Block]] = {}
    for b in blocks:
        g = b.group
        key = (b.seg.shape, b.seg.view_shape, b.seg.rank, g["tracker"], g["correction"], g["betas"][0], b.t,
               b.layout.second_moment, b.seg.block, b.shard_key, b.target.device)  # fmt: skip
        groups.setdefault(key, []).append(b)
    for members in groups.values():
        for chunk in stacks(members):
            due = [(b, generator) for b in chunk if (generator := refresh(b)) is not None]
            _track_stack(chunk, due, fused, scalars)
            elementwise_tails(chunk, second_moment_denominators(chunk, fused, scalars), fused, scalars)
            for b in chunk:
                b.numerator = None  # free the stack's momenta


def factor_stack(chunk: Sequence[Block], key: str) -> tuple[list[Tensor], Tensor, bool]:
    """The chunk's low-rank factors ``key``: each block's part, all of them as one ``(B, ...)`` tensor, and
    whether that tensor is their storage (writing it writes the state).

    Packed factors: the first step stacks them (one copy, as every step did before) and, where it can,
    makes each parameter's state tensor a view of that stack (:func:`_repoint`), so later steps take the
    stack as a view and write the new factors back with one ``copy_`` instead of a ``stack``, an
    ``unbind`` and a ``_foreach_copy_`` per factor and stack. A checkpoint saves each stack once (shared
    storage), and views of it load back as they were saved. Not for sharded (FSDP2) or low-precision
    factors, nor when the chunk's blocks do not cover their parameters' factors in order (e.g. a
    parameter with no gradient this step): those are stacked each step, as before."""
    parts = [b.part(key) for b in chunk]
    views = chunk[0].views
    if views is not None:
        packed = views.stack(parts)
        if packed is not None:
            return parts, packed, True
    stack = torch.stack(parts)
    if views is not None and _repoint(chunk, key, stack):
        views.keep_stack(stack, parts)
        return parts, stack, True
    return parts, stack, False


def _repoint(chunk: Sequence[Block], key: str, stack: Tensor) -> bool:
    """Make each chunk parameter's state ``key`` a view of ``stack`` (which holds their values), if every
    parameter's blocks in the chunk are consecutive and are its whole state tensor, in order; else
    change nothing and return False."""
    plans: list[tuple[Block, Tensor]] = []
    i = 0
    while i < len(chunk):
        b = chunk[i]
        j = i
        while j < len(chunk) and chunk[j].p is b.p:
            j += 1
        old = b.state.get(key)
        if (b.shard is not None or key in b.layout.low_precision_keys or not isinstance(old, Tensor)
                or old.dtype != stack.dtype or not old.is_contiguous()):  # fmt: skip
            return False
        whole = stack[i:j] if old.shape == stack[i:j].shape else stack[i] if j == i + 1 else None
        if whole is None or whole.shape != old.shape:
            return False
        size = stack[0].numel() * stack.element_size()
        if any(chunk[k].part(key).data_ptr() != old.data_ptr() + (k - i) * size for k in range(i, j)):
            return False
        plans.append((b, whole))
        i = j
    views = chunk[0].views
    if views is not None:
        views.forget([b.state[key] for b, _ in plans])
    for b, whole in plans:
        b.state[key] = whole
    return True


def _track_stack(
    chunk: list[Block], due: list[tuple[Block, torch.Generator]], fused: Fused | None = None,
    scalars: ScalarRows | None = None,
) -> None:  # fmt: skip
    """Track the stack with batched ops and set each block's :attr:`Block.numerator`. The blocks in ``due``
    refresh instead (:func:`_track_single`, from their old factors), overwriting their slots of the
    stack's momenta and new factors. Tracking the whole stack anyway keeps the momentum buffer, whose
    views the tails take, the same shape on every step (dynamo guards on a view's base: a compiled tail
    would be rebuilt as refreshes move through). At the first step every block is due and the factors
    are zero: what the trackers make of them is discarded (non-finite entries are guarded anyway)."""
    first = chunk[0]
    group = first.group
    g = as_matrices(torch.stack([b.grad for b in chunk]), first.seg)  # (a view here: g is fresh)
    # Block second moments: their g^2 means from the stack, except where the compiled call reduces them
    # from the gradients itself (the deferred check's, unsharded: see second_moment_denominators).
    if not first.layout.second_policy.elementwise and (first.ok is None or first.shard is not None):
        sq = block_sq_means(g, first.seg.block, first.shard, first.seg.shape)
        for b, row in zip(chunk, sq.unbind(0)):
            b.sq_mean = row
    lefts, left_stack, left_packed = factor_stack(chunk, "lowrank_L")
    rights, right_stack, right_packed = factor_stack(chunk, "lowrank_R")
    # The stored factors were checked finite with the gradients (on the host, one sync per step, in
    # AdaPM._finite_items); entries of the new ones that are not finite keep their old values, on the
    # device (no host sync per stack). With the deferred check, skipped blocks keep their factors whole.
    tracked = None
    if fused is not None and fused.fused and scalars is not None and first.reduce is None \
            and TRACKER[group["tracker"]].keeps_basis:  # fmt: skip
        try:  # the fixed tracker between refreshes as one compiled call (the flags stacked in it)
            oks = None if first.ok is None else [cast(Tensor, b.ok) for b in chunk]
            new_right = fused_fixed_basis_momentum(left_stack, right_stack, g, scalars.rows[track_key(first)], oks)
            tracked = g, left_stack, new_right  # the momentum overwrote g
        except Exception as err:  # compilation failures surface as many exception types
            fused.disable_fused(err)
    if tracked is None:
        mask = stack_mask(chunk, 3)
        tracked = lowrank_momentum(
            left_stack, right_stack, g, group["betas"][0], first.t,
            tracker=group["tracker"], correction=group["correction"], refresh=False, generator=None, out=g,
            guard=True if mask is None else mask, reduce=first.reduce,
        )  # fmt: skip
    momentum, new_left, new_right = tracked
    position = {id(b): i for i, b in enumerate(chunk)}
    for b, generator in due:  # from the old factors (still in the state), into the stacks' slots
        i = position[id(b)]
        _track_single(b, generator, momentum[i], new_left[i], new_right[i])
    for parts, stack, packed, new in ((lefts, left_stack, left_packed, new_left),
                                      (rights, right_stack, right_packed, new_right)):  # fmt: skip
        if new is stack:  # a kept basis (the fixed tracker's L): only refreshed slots changed
            if not packed and due:
                torch._foreach_copy_([parts[position[id(b)]] for b, _ in due], [new[position[id(b)]] for b, _ in due])
        elif packed:
            stack.copy_(new)
        else:
            torch._foreach_copy_(parts, list(new.unbind(0)))
    for b, m in zip(chunk, momentum.unbind(0)):
        b.numerator = b.seg.as_view(m)


def _track_single(b: Block, generator: torch.Generator, out: Tensor, left_out: Tensor, right_out: Tensor) -> None:
    """A block due for a refresh (a randomized SVD drawn from ``generator``): the single-matrix path, its
    momentum computed into ``out`` (its slot of the stack's momenta, which its tail already reads) and
    its new factors written to ``left_out`` and ``right_out`` (its slots of the stack's new factors)."""
    group = b.group
    left, right = b.factors()
    inputs = (left, right, b.seg.matrix(b.grad))
    if b.ok is not None:  # a skipped block's inputs may be non-finite, which the SVD refuses: zeros instead
        inputs = tuple(torch.where(b.ok, x, 0.0) for x in inputs)
    _, new_left, new_right = lowrank_momentum(
        *inputs, group["betas"][0], b.t, tracker=group["tracker"], correction=group["correction"], refresh=True,
        generator=generator, out=out, guard=b.ok is None, reduce=b.reduce, global_rows=b.seg.shape[0],
    )  # fmt: skip
    if b.ok is not None:  # a skipped block keeps its factors
        new_left, new_right = torch.where(b.ok, new_left, left), torch.where(b.ok, new_right, right)
    left_out.copy_(new_left)
    right_out.copy_(new_right)


def second_moment_denominators(
    blocks: list[Block], fused: Fused | None = None, scalars: ScalarRows | None = None
) -> dict[int, Tensor]:
    """Update the block second moments of every ``block``-policy segment; return ``id(block) ->
    sqrt(vhat) + eps`` (broadcastable over the segment).

    With the deferred finite check (blocks with :attr:`Block.ok`, which only ``fused`` steps have) and no
    sharded block, everything is compiled (one call per bucket of same-layout blocks, its scalars from
    ``scalars``), masked: the block means of ``g^2`` of each block's gradient (the low-rank tracking left them
    to it), the EMA, and the denominators shaped to broadcast; a block whose flag is False keeps its moments.
    Otherwise (and if that call cannot be built) the means of ``g^2`` are reduced per stack of same-shape,
    same-layout blocks, the moments' EMA and the denominators run as ``foreach`` ops over the blocks of every
    stack at once (the block vectors are small and of any length), and each stack's denominators are shaped with
    one view. (Not compiled off the deferred path: the call takes a while to compile, minutes on GPT-2 124M on a
    2-core CPU, and there is no mask to fold in.)"""
    mine = [b for b in blocks if not b.layout.second_policy.elementwise]
    if not mine:
        return {}
    if mine[0].ok is not None and fused is not None and fused.fused and scalars is not None \
            and all(b.shard is None for b in mine):  # fmt: skip
        specs = tuple((b.seg.shape, *b.seg.block) for b in mine)
        try:
            denoms = fused_block_moments(
                [b.second_moment() for b in mine], [b.grad for b in mine],
                [scalars.rows[b.target.device, tail_key(b)[2:]] for b in mine], specs,
                [cast(Tensor, b.ok) for b in mine],
            )  # fmt: skip
            return {id(b): b.seg.as_view(denom) for b, denom in zip(mine, denoms)}
        except Exception as err:  # compilation failures surface as many exception types
            fused.disable_fused(err)
    return _stacked_block_moments(mine)


def _stacked_block_moments(mine: list[Block]) -> dict[int, Tensor]:
    """:func:`second_moment_denominators` with the means of ``g^2`` reduced per stack, and ``foreach`` ops."""
    groups: dict[tuple[Any, ...], list[Block]] = {}
    for b in mine:
        key = (b.seg.shape, b.seg.view_shape, b.seg.block, b.group["betas"][1], b.group["eps"], b.t,
               b.sq_mean is None, b.shard_key, b.target.device)  # fmt: skip
        groups.setdefault(key, []).append(b)
    chunks: list[tuple[list[Block], tuple[int, ...], tuple[int | None, int], int | None]] = []
    ordered: list[Block] = []
    rows: list[Tensor] = []
    for (shape, _view, block, _beta2, _eps, _t, fresh, _shard, _device), members in groups.items():
        shard = members[0].shard
        for chunk in stacks(members):
            if fresh:
                rows += list(block_sq_means(stacked_matrices(chunk), block, shard, shape).unbind(0))
            else:
                rows += [cast(Tensor, b.sq_mean) for b in chunk]
            local_shape = shape if shard is None else tuple(chunk[0].seg.matrix(chunk[0].grad).shape)
            chunks.append((chunk, local_shape, block, None if shard is None else shard.offset))
            ordered += chunk
    values = _eager_block_moments(ordered, [b.second_moment() for b in ordered], rows)
    out: dict[int, Tensor] = {}
    start = 0
    for chunk, shape, block, offset in chunks:
        part = values[start : start + len(chunk)]
        start += len(chunk)
        for b, denom in zip(chunk, stacked_broadcast_blocks(stacked(part), shape, *block, offset).unbind(0)):
            out[id(b)] = b.seg.as_view(denom)
    return out


def _eager_block_moments(blocks: list[Block], vs: list[Tensor], rows: list[Tensor]) -> list[Tensor]:
    """The block moments' EMA and denominators of :func:`second_moment_denominators` as ``foreach`` ops. A
    skipped block's (:attr:`Block.ok` False) row is first replaced by its moment, one op per block: that
    only happens when the compiled call could not be built."""
    masked = blocks[0].ok is not None
    if masked:
        rows = [torch.where(cast(Tensor, b.ok), row, v) for b, v, row in zip(blocks, vs, rows)]
    by_beta2: dict[float, tuple[list[Tensor], list[Tensor]]] = {}
    for b, v, row in zip(blocks, vs, rows):
        ema = by_beta2.setdefault(b.group["betas"][1], ([], []))
        ema[0].append(v)
        ema[1].append(row)
    for beta2, (moments, rows) in by_beta2.items():  # v <- b2 v + (1 - b2) mean(g^2), per block
        if masked:  # a skipped block's row is its v: the lerp leaves it exactly as it was
            torch._foreach_lerp_(moments, rows, 1.0 - beta2)
        else:
            torch._foreach_mul_(moments, beta2)
            torch._foreach_add_(moments, rows, alpha=1.0 - beta2)
    values = torch._foreach_sqrt(vs)  # sqrt(v) / sqrt(1 - b2^t) + eps
    torch._foreach_div_(values, [math.sqrt(1 - b.group["betas"][1] ** b.t) for b in blocks])
    torch._foreach_add_(values, [b.group["eps"] for b in blocks])
    return list(values)


def tail_key(b: Block) -> tuple[Any, ...]:
    """What a block's elementwise tail is grouped by: its numerator's source, whether its second moment
    is elementwise, then its scalars (beta1, beta2, lr, decay, bias corrections, eps, update clip)."""
    return (b.seg.policy.source, b.layout.second_policy.elementwise, *tail_values(b.group, b.seg, b.t))


def tail_values(group: dict[str, Any], seg: Segment, t: int) -> tuple[Any, ...]:
    """The scalars of segment ``seg``'s elementwise tail at step ``t``: ``(beta1, beta2, lr, decay,
    bias correction 1, sqrt(bias correction 2), eps, update clip or None)``."""
    beta1, beta2 = group["betas"]
    lr = group["lr"] * seg.lr_ratio if seg.lr_ratio != 1.0 else group["lr"]
    policy = seg.policy
    every_block = group["clip_scope"] == "all"
    clip = seg.clip if seg.clip_set else (group["update_clip"] if every_block or policy.in_clip_scope else None)
    bc1 = 1 - beta1**t if policy.bias_correction else 1.0
    return (beta1, beta2, lr, 1 - lr * group["weight_decay"], bc1, math.sqrt(1 - beta2**t), group["eps"], clip)


def track_key(b: Block) -> tuple[Any, ...]:
    """The key of a low-rank block's row of fixed-basis scalars in :class:`ScalarRows` (device, then
    ``("fixed", beta1, (1 + c_t)(1 - beta1))``), for :func:`fused_fixed_basis_momentum`."""
    beta1 = b.group["betas"][0]
    a = (1.0 + correction_coefficient(b.group["correction"], beta1, b.t)) * (1.0 - beta1)
    return b.target.device, ("fixed", beta1, a)


class ScalarRows:
    """The compiled tails' scalars: one small float32 tensor per distinct set of scalars, each its own
    tensor kept between steps (dynamo would tell apart views of one table by their storage offsets and
    recompile for each), rewritten each step from one host-to-device copy and one ``_foreach_copy_``
    for every block of the step (:meth:`write`), instead of a table and a copy per stack."""

    def __init__(self) -> None:
        self._pool: dict[torch.device, list[Tensor]] = {}
        self.rows: dict[tuple[torch.device, tuple[Any, ...]], Tensor] = {}

    def write(self, blocks: Sequence[Block]) -> None:
        """Make :attr:`rows` hold the scalars of every block's tail (by device and :func:`tail_key` scalars)
        and of every fixed-basis low-rank stack's tracking (by :func:`track_key`)."""
        self.rows = {}
        wanted: dict[torch.device, list[tuple[Any, ...]]] = {}
        keys = [(b.target.device, tail_key(b)[2:]) for b in blocks]
        keys += [track_key(b) for b in blocks if b.lowrank and TRACKER[b.group["tracker"]].keeps_basis]
        for key in dict.fromkeys(keys):
            wanted.setdefault(key[0], []).append(key[1])
        for device, keys in wanted.items():
            values = [fixed_basis_values(k[1], k[2]) if k[0] == "fixed" else
                      scalar_values(beta1=k[0], beta2=k[1], lr=k[2], decay=k[3], bias_correction1=k[4],
                                    bias_correction2_sqrt=k[5], eps=k[6], update_clip=k[7]) for k in keys]  # fmt: skip
            pool = self._pool.setdefault(device, [])
            while len(pool) < len(keys):
                pool.append(torch.empty(len(values[0]), dtype=torch.float32, device=device))
            source = host_to_device(values, device)
            torch._foreach_copy_(pool[: len(keys)], list(source.unbind(0)))
            self.rows.update(((device, key), row) for key, row in zip(keys, pool))


def host_to_device(values: Any, device: torch.device, dtype: torch.dtype = torch.float32) -> Tensor:
    """``values`` as a tensor on ``device``; to a CUDA device from pinned memory without blocking (a copy
    from pageable memory would synchronize the host with the device)."""
    tensor = torch.tensor(values, dtype=dtype)
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def elementwise_tails(
    blocks: list[Block], denominators: dict[int, Tensor], fused: Fused | None = None, scalars: ScalarRows | None = None
) -> None:
    """The elementwise tail of every block, one foreach op per arithmetic step per (policies, scalars),
    or, where ``fused`` says so, one compiled call per bucket of same-layout blocks of each (policies,
    scalars) (its scalars from ``scalars``, written for these blocks; else made here)."""
    groups: dict[tuple[torch.device, tuple[Any, ...]], list[tuple[Tensor, ...]]] = {}
    for b in blocks:
        key = tail_key(b)
        policy, full = b.seg.policy, key[1]
        if policy.source == "ema":
            source = b.part("exp_avg", shaped=True)
        elif policy.source == "given":
            source = b.numerator
        else:
            source = b.grad
        second = b.second_moment() if full else denominators[id(b)]
        groups.setdefault((b.target.device, key), []).append((b.target, b.grad, source, second, b.ok))
    if fused is not None and fused.fused and groups and scalars is None:
        scalars = ScalarRows()
        scalars.write(blocks)
    for (_device, key), rows in groups.items():
        source, full, beta1, beta2, lr, decay, bc1, bc2s, eps, clip = key
        targets, grads, sources, seconds, oks = (list(column) for column in zip(*rows))
        masked = oks[0] is not None
        lists: dict[str, Any] = dict(
            vs=seconds if full else None,
            ms=sources if source == "ema" else None,
            numerators=sources if source == "given" else None,
            denoms=None if full else seconds,
        )
        if fused is not None and fused.fused and scalars is not None:
            try:
                fused_foreach_update(targets, grads, **lists, scalars=scalars.rows[targets[0].device, key[2:]],
                                     oks=oks if masked else None)  # fmt: skip
                continue
            except Exception as err:  # compilation failures surface as many exception types
                fused.disable_fused(err)
        if masked:  # the eager fallback of a deferred check (compilation failed): read the flags here
            keep = [bool(ok) for ok in oks]
            targets, grads = [x for x, k in zip(targets, keep) if k], [x for x, k in zip(grads, keep) if k]
            lists = {name: None if xs is None else [x for x, k in zip(xs, keep) if k] for name, xs in lists.items()}
            if not targets:
                continue
        foreach_elementwise_update(
            targets, grads, **lists,
            beta1=beta1, beta2=beta2, lr=lr, decay=decay, bias_correction1=bc1, bias_correction2_sqrt=bc2s,
            eps=eps, update_clip=clip,
        )  # fmt: skip
