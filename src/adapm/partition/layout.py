"""Resolve a param group's policy keys into a concrete per-parameter layout and its state shapes.

The optimizer allocates state from :meth:`ParamLayout.state_shapes`, and the partition report and the
meta-device memory count read the same method, so the counted bytes are the allocated bytes.

Group keys read here (all optional except ``params``): ``momentum`` (``full``, ``lowrank``, ``none``, or
``mixed`` with ``segments``), ``second_moment`` (``full`` or ``block``), ``rank_ratio``, ``block``
(``"auto"``, ``"tensor"`` or ``(dim, size)``), and for fused weights ``split_dim`` plus ``segments``, a
list of dicts with ``name``, ``momentum``, ``block`` and optionally ``role``, ``rank_ratio``, ``lr_ratio``
and ``segment_clip`` (an update clip for that segment alone, whatever the clip scope). ``lr_ratio``
(default 1) scales the group's learning rate (block-wise learning rates).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from adapm.policies.momentum import MOMENTUM
from adapm.policies.precision import STATE_DTYPES, quantizable, scale_key, scale_shape
from adapm.policies.second_moment import SECOND_MOMENT, block_count
from adapm.policies.state import StateSpec, join_specs

BlockLayout = tuple[int | None, int]


@dataclass(frozen=True)
class Segment:
    """One independently-treated slice of a parameter (the whole parameter unless it is fused)."""

    name: str
    role: str
    dim: int | None
    start: int
    length: int
    shape: tuple[int, ...]
    momentum: str
    block: BlockLayout
    rank: int
    slot: int
    """Index of this segment in the stacked state of its momentum policy (fused parameters only)."""
    block_offset: int
    n_blocks: int
    lr_ratio: float = 1.0
    """This segment's learning rate as a multiple of its group's (block-wise learning rates)."""
    clip_set: bool = False
    """Whether a rule or group set this segment's update clip explicitly (then ``clip`` applies
    whatever the clip scope)."""
    clip: float | None = None
    index: int | None = None
    """For a stack of expert matrices (a 3-D mixture-of-experts weight): the expert this segment belongs
    to. The segment is then a part of ``tensor[index]``, and ``dim`` counts in that matrix."""
    groups: int = 1
    """Interleaved layouts (e.g. per-head ``[q, k, v]``): the segment is ``groups`` runs of ``length``
    indices along ``dim``, one run every ``period`` indices, starting at ``start``; its matrix ``shape``
    has ``groups * length`` there, in that order."""
    period: int = 0

    @property
    def view_shape(self) -> tuple[int, ...]:
        """The shape of :meth:`view`: ``shape``, except for an interleaved segment, whose ``dim`` is split
        into ``(groups, length)``."""
        if self.groups == 1 or self.dim is None:
            return self.shape
        return (*self.shape[: self.dim], self.groups, self.length, *self.shape[self.dim + 1 :])

    def matrix(self, x: torch.Tensor) -> torch.Tensor:
        """A :meth:`view` (or any tensor of ``view_shape``) as a tensor of the matrix ``shape`` (a copy
        only for an interleaved segment)."""
        return x if self.groups == 1 else x.reshape(self.shape)

    def as_view(self, x: torch.Tensor) -> torch.Tensor:
        """A tensor of the matrix ``shape``, or one that broadcasts to it, shaped to match :meth:`view`."""
        if self.groups == 1 or self.dim is None:
            return x
        if x.shape[self.dim] == 1:
            return x.unsqueeze(self.dim)
        return x.unflatten(self.dim, (self.groups, self.length))

    @property
    def policy(self) -> Any:
        """This segment's momentum policy object (see :mod:`adapm.policies.momentum`)."""
        return MOMENTUM[self.momentum]

    def view(self, tensor: torch.Tensor) -> torch.Tensor:
        """The part of ``tensor`` (shaped like the parameter) that belongs to this segment (a view)."""
        if self.index is not None:
            tensor = tensor.select(0, self.index)
        if self.dim is None:
            return tensor
        if self.groups == 1:
            return tensor.narrow(self.dim, self.start, self.length)
        return tensor.unflatten(self.dim, (self.groups, self.period)).narrow(self.dim + 1, self.start, self.length)


@dataclass(frozen=True)
class ParamLayout:
    """How one parameter is optimized: its segments, second-moment policy and state shapes."""

    name: str
    shape: tuple[int, ...]
    second_moment: str
    segments: tuple[Segment, ...]
    fused: bool
    state_dtype: str = "fp32"
    """How the policies' low-precision state is stored (see :mod:`adapm.policies.precision`)."""

    @property
    def second_policy(self) -> Any:
        """This parameter's second-moment policy object (see :mod:`adapm.policies.second_moment`)."""
        return SECOND_MOMENT[self.second_moment]

    def views(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Every segment's :meth:`Segment.view` of ``tensor`` (shaped like the parameter): one ``split``
        where the segments tile one dimension in order (e.g. a fused q/k/v projection), so the views
        cost one op rather than one per segment."""
        if self._tiling is None:
            return [seg.view(tensor) for seg in self.segments]
        dim, sizes = self._tiling
        return list(tensor.split_with_sizes(sizes, dim))

    @functools.cached_property
    def _tiling(self) -> tuple[int, list[int]] | None:
        """``(dim, sizes)`` if the segments are plain ranges that tile ``dim`` in order, else None."""
        segs = self.segments
        dim = segs[0].dim
        if len(segs) < 2 or dim is None or any(s.index is not None or s.groups != 1 or s.dim != dim for s in segs):
            return None
        if [s.start for s in segs] != [sum(s.length for s in segs[:i]) for i in range(len(segs))]:
            return None
        if sum(s.length for s in segs) != self.shape[dim]:
            return None
        return dim, [s.length for s in segs]

    def state_specs(self) -> dict[str, StateSpec]:
        """See :meth:`_specs` (computed once per layout)."""
        return self._specs

    @functools.cached_property
    def _specs(self) -> dict[str, StateSpec]:
        """Every state tensor this parameter needs, derived from its policies' declarations: each
        segment's momentum and second-moment policy declare their tensors, and a fused parameter's
        segments join them (see :class:`adapm.policies.state.StateSpec`). Keys in a fixed order."""
        parts: dict[str, list[StateSpec]] = {}
        for seg in self.segments:
            for policy in (self.second_policy, seg.policy):
                for key, spec in policy.state(seg).items():
                    parts.setdefault(key, []).append(spec)
        specs = {"step": StateSpec((), None)}
        for key in sorted(parts, key=lambda k: (STATE_ORDER.index(k) if k in STATE_ORDER else len(STATE_ORDER), k)):
            specs.update(self.stored(key, join_specs(parts[key], self.fused, self.shape)))
        return specs

    @functools.cached_property
    def low_precision_keys(self) -> tuple[str, ...]:
        """The state keys stored in a lower precision than the float32 the step computes in (none at
        ``state_dtype="fp32"``): the step works on float32 copies of these and writes them back (an
        8-bit key's block scales, under :func:`~adapm.policies.precision.scale_key`, go with it)."""
        return tuple(k for k, spec in self._specs.items() if spec.dtype != torch.float32)

    def stored(self, key: str, spec: StateSpec) -> dict[str, StateSpec]:
        """The tensors that store state ``key`` declared as ``spec``: itself in ``state_dtype`` if the policy
        declared it low-precision, and at ``int8`` 8-bit codes plus its block scales (see
        :mod:`adapm.policies.precision`; a tensor that cannot be quantized stays float32)."""
        if not spec.low_precision or self.state_dtype == "fp32":
            return {key: spec}
        if self.state_dtype != "int8":
            return {key: replace(spec, dtype=STATE_DTYPES[self.state_dtype])}
        if not quantizable(spec):
            return {key: spec}
        scales = replace(spec, shape=scale_shape(spec.shape), dtype=torch.float32, low_precision=False)
        return {key: replace(spec, dtype=torch.uint8), scale_key(key): scales}

    def part(self, state: torch.Tensor, key: str, seg: Segment) -> torch.Tensor:
        """Segment ``seg``'s part of this parameter's state tensor ``key`` (a view), as its policy declared
        it: its slice of a stack, its range of a concatenation or flat buffer, or its view of a whole
        parameter-shaped tensor."""
        join, where, spec = self._parts[key, seg.name]
        if join == "whole":
            return seg.view(state)
        if join == "own":
            return state
        if join == "stack":
            return state[where]
        if join == "flat":
            return state.narrow(0, where, spec.numel).view(spec.shape)
        return state.narrow(spec.concat_dim, where, spec.shape[spec.concat_dim])

    @functools.cached_property
    def _parts(self) -> dict[tuple[str, str], tuple[str, int, StateSpec]]:
        """``(key, segment name) -> (how to take the part, index or offset, the segment's spec)``."""
        specs = self.state_specs()
        parts: dict[tuple[str, str], tuple[str, int, StateSpec]] = {}
        seen: dict[str, int] = {}
        for seg in self.segments:
            declared = {**self.second_policy.state(seg), **seg.policy.state(seg)}
            for key, mine in declared.items():
                join = specs[key].join
                count = seen.get(key, 0)
                if join in ("flat", "concat"):
                    size = mine.numel if join == "flat" else mine.shape[mine.concat_dim]
                    parts[key, seg.name] = (join, count, mine)
                    seen[key] = count + size
                    continue
                parts[key, seg.name] = (join if join == "whole" or self.fused else "own", count, mine)
                seen[key] = count + 1
        return parts

    def state_shapes(self) -> dict[str, tuple[int, ...]]:
        """Shapes of every state tensor this parameter needs (keys as in the optimizer state)."""
        return {key: spec.shape for key, spec in self.state_specs().items()}

    def state_row_dims(self) -> dict[str, int | None]:
        """For each state key, the dimension that runs over the parameter's rows (dim 0), if any.

        Under FSDP2 these dimensions are sharded like the parameter; the others are replicated.
        """
        return {key: spec.row_dim for key, spec in self.state_specs().items()}

    def state_bytes(self) -> int:
        """Bytes of this parameter's state."""
        return sum(spec.nbytes for spec in self.state_specs().values())

    def segment_state_bytes(self, segment: Segment) -> int:
        """Bytes of the state attributable to one segment (the shared step counter goes to the first):
        of each key its segments share, a share in proportion to the entries the segment declared
        (the shares add up to the parameter's bytes exactly)."""
        total = StateSpec((), None).nbytes if segment is self.segments[0] else 0
        index = [s.name for s in self.segments].index(segment.name)
        for nbytes, counts in self._byte_shares.values():
            before, mine, whole = sum(counts[:index]), counts[index], sum(counts)
            if mine:
                total += nbytes * (before + mine) // whole - nbytes * before // whole
        return total

    @functools.cached_property
    def _byte_shares(self) -> dict[str, tuple[int, list[int]]]:
        """``key -> (bytes of the tensors storing it, entries each segment declared)``."""
        specs = self.state_specs()
        shares: dict[str, tuple[int, list[int]]] = {}
        for i, seg in enumerate(self.segments):
            declared = {**self.second_policy.state(seg), **seg.policy.state(seg)}
            for key, spec in declared.items():
                if key not in shares:
                    nbytes = specs[key].nbytes + (specs[scale_key(key)].nbytes if scale_key(key) in specs else 0)
                    shares[key] = (nbytes, [0] * len(self.segments))
                shares[key][1][i] = spec.numel
        return shares


STATE_ORDER = ("step", "exp_avg_sq", "exp_avg", "lowrank_L", "lowrank_R")
"""The order of the built-in state keys in a parameter's state (new policies' keys follow, sorted)."""


def lowrank_rank(shape: Sequence[int], rank_ratio: float) -> int:
    """``r = max(1, ceil(rank_ratio * min(m, n)))``."""
    return max(1, math.ceil(rank_ratio * min(shape[0], shape[1]) - 1e-9))


def resolve_block(block: Any, shape: tuple[int, ...], what: str) -> BlockLayout:
    """Turn a ``block`` group value into ``(dim, size)``; ``"auto"`` is per row for matrices."""
    if block == "auto":
        return (0, 1) if len(shape) >= 2 else (None, 1)
    if block == "tensor" or block is None:
        return (None, 1)
    if isinstance(block, (tuple, list)) and len(block) == 2:
        dim, size = block
        dim_ok = dim is None or (isinstance(dim, int) and 0 <= dim < len(shape))
        if dim_ok and isinstance(size, int) and size >= 1 and (dim is None or shape[dim] % size == 0):
            return (dim, size)
    raise ValueError(
        f"Invalid block for {what} of shape {tuple(shape)}: {block!r}; expected 'auto', 'tensor' or "
        "(dim, size) with size dividing shape[dim]"
    )


def _check_momentum(momentum: Any, shape: tuple[int, ...], what: str) -> str:
    if momentum not in MOMENTUM:
        raise ValueError(f"Invalid momentum policy for {what}: {momentum!r}; expected one of {tuple(MOMENTUM)}")
    if MOMENTUM[momentum].needs_matrix and len(shape) != 2:
        raise ValueError(
            f"momentum={momentum!r} needs a matrix, but {what} has shape {tuple(shape)}; use 'full' or 'none' for it"
        )
    return momentum


def check_rank_ratio(rank_ratio: Any, what: str) -> float:
    """Validate ``rank_ratio`` in (0, 1]."""
    if isinstance(rank_ratio, bool) or not isinstance(rank_ratio, (int, float)) or not 0.0 < rank_ratio <= 1.0:
        raise ValueError(f"Invalid rank_ratio for {what}: {rank_ratio!r}; expected a number in (0, 1]")
    return float(rank_ratio)


def check_lr_ratio(ratio: Any, what: str) -> float:
    """Validate a learning-rate ratio: a positive finite number."""
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 < ratio < math.inf:
        raise ValueError(f"Invalid lr_ratio for {what}: {ratio!r}; expected a positive number")
    return float(ratio)


def check_clip(clip: Any, what: str) -> float | None:
    """Validate an update clip: a positive number or None."""
    if clip is not None and (isinstance(clip, bool) or not isinstance(clip, (int, float)) or not clip > 0.0):
        raise ValueError(f"Invalid update_clip for {what}: {clip!r}; expected a positive float or None")
    return None if clip is None else float(clip)


def _clip_override(spec: Mapping[str, Any], what: str) -> tuple[bool, float | None]:
    if "segment_clip" not in spec:
        return False, None
    return True, check_clip(spec["segment_clip"], what)


def build_layout(name: str, shape: Sequence[int], group: Mapping[str, Any]) -> ParamLayout:
    """Resolve ``group``'s policy keys for one parameter of ``shape`` (errors name the parameter)."""
    shape = tuple(int(s) for s in shape)
    what = f"parameter '{name}'"
    group_ratio = check_lr_ratio(group.get("lr_ratio", 1.0), what)
    second_moment = group["second_moment"]
    if second_moment not in SECOND_MOMENT:
        raise ValueError(
            f"Invalid second_moment policy for {what}: {second_moment!r}; expected one of {tuple(SECOND_MOMENT)}"
        )
    rank_ratio = check_rank_ratio(group["rank_ratio"], what)
    state_dtype = group.get("state_dtype", "fp32")
    if state_dtype not in STATE_DTYPES:
        raise ValueError(f"Invalid state_dtype for {what}: {state_dtype!r}; expected one of {tuple(STATE_DTYPES)}")
    seg_specs = group.get("segments")
    if not seg_specs:
        momentum = _check_momentum(group["momentum"], shape, what)
        block = resolve_block(group.get("block", "auto"), shape, what)
        rank = lowrank_rank(shape, rank_ratio) if MOMENTUM[momentum].needs_matrix else 0
        seg = Segment(
            name=name,
            role=str(group.get("role", "")),
            dim=None,
            start=0,
            length=shape[0] if shape else 1,
            shape=shape,
            momentum=momentum,
            block=block,
            rank=rank,
            slot=0,
            block_offset=0,
            n_blocks=block_count(shape, *block),
            lr_ratio=group_ratio,
        )
        return ParamLayout(name, shape, second_moment, (seg,), fused=False, state_dtype=state_dtype)

    if group.get("momentum") != "mixed":
        raise ValueError(f"A group with 'segments' must have momentum='mixed' ({what})")
    experts = bool(group.get("experts", False))
    matrix = shape[1:] if experts else shape  # experts: segments are parts of one expert's matrix
    if experts and len(shape) != 3:
        raise ValueError(f"experts=True needs a 3-D (experts, rows, cols) weight, but {what} has shape {shape}")
    per_expert = len(seg_specs) // shape[0] if experts else len(seg_specs)
    if experts and per_expert * shape[0] != len(seg_specs):
        raise ValueError(f"Fused {what}: {len(seg_specs)} segments do not divide among {shape[0]} experts")
    dim = group.get("split_dim")
    if experts and per_expert == 1:
        dim = None  # one segment per expert: its whole matrix
    elif not isinstance(dim, int) or not 0 <= dim < len(matrix):
        raise ValueError(f"Invalid split_dim for fused {what} of shape {shape}: {dim!r}")
    count = per_expert
    explicit = all("length" in spec for spec in seg_specs)  # declared geometry instead of equal parts
    if dim is not None and not explicit and matrix[dim] % count != 0:
        raise ValueError(
            f"Fused {what}: dimension {dim} of size {matrix[dim]} does not split into {count} equal segments"
        )
    length = matrix[dim] // count if dim is not None else (matrix[0] if matrix else 1)
    seg_shape = tuple(length if i == dim else s for i, s in enumerate(matrix))
    segments = []
    slots: dict[str, int] = {}
    block_offset = 0
    covered = 0
    for i, spec in enumerate(seg_specs):
        seg_name = f"{name}[{spec['name']}]"
        seg_what = f"segment '{seg_name}'"
        start, groups, period = (i % count) * length, 1, 0
        seg_length = length
        if "length" in spec:  # explicit geometry: unequal or interleaved parts
            start, seg_length = int(spec["start"]), int(spec["length"])
            groups, period = int(spec.get("groups", 1)), int(spec.get("period", 0))
            assert dim is not None
            span = period if groups > 1 else matrix[dim]
            tiles = groups == 1 or groups * period == matrix[dim]
            if seg_length < 1 or start < 0 or start + seg_length > span or not tiles:
                raise ValueError(
                    f"Invalid geometry for {seg_what}: start {start}, length {seg_length}, groups {groups}, "
                    f"period {period} in dimension {dim} of size {matrix[dim]}"
                )
            seg_shape = tuple(groups * seg_length if j == dim else m for j, m in enumerate(matrix))
        covered += groups * seg_length
        momentum = _check_momentum(spec["momentum"], seg_shape, seg_what)
        block = resolve_block(spec.get("block", "auto"), seg_shape, seg_what)
        ratio = check_rank_ratio(spec.get("rank_ratio", rank_ratio), seg_what)
        n_blocks = block_count(seg_shape, *block)
        segments.append(
            Segment(
                name=seg_name,
                role=str(spec.get("role", "")),
                dim=dim,
                start=start,
                length=seg_length,
                shape=seg_shape,
                momentum=momentum,
                block=block,
                rank=lowrank_rank(seg_shape, ratio) if MOMENTUM[momentum].needs_matrix else 0,
                slot=slots.get(momentum, 0),
                block_offset=block_offset,
                n_blocks=n_blocks,
                lr_ratio=check_lr_ratio(spec.get("lr_ratio", group_ratio), seg_what),
                clip_set=_clip_override(spec, seg_what)[0],
                clip=_clip_override(spec, seg_what)[1],
                index=i // count if experts else None,
                groups=groups,
                period=period,
            )
        )
        slots[momentum] = slots.get(momentum, 0) + 1
        block_offset += n_blocks
    if dim is not None and covered != matrix[dim] * (shape[0] if experts else 1):
        raise ValueError(f"Fused {what}: its segments cover {covered} of the {matrix[dim]} indices of dimension {dim}")
    return ParamLayout(name, shape, second_moment, tuple(segments), fused=True, state_dtype=state_dtype)
