"""The one place where AdaPM communicates: sharded parameters (FSDP2 / DTensor) and their collectives.

Under FSDP2 (``fully_shard``) every parameter is a DTensor sharded on dim 0 of a 1-D device mesh:
each rank holds a contiguous block of rows. The policy math in :mod:`adapm.policies` works on the
local rows; wherever it needs a sum over *all* rows (block second moments whose blocks span ranks,
the r x r Gram matrices and the ``Q^T m`` products of low-rank tracking) it calls a ``reduce``
function, which :class:`ShardInfo` provides: an all-reduce over the mesh for sharded parameters,
nothing for local ones. Replicated DTensors and DDP need no communication at all: every rank holds
the same gradient and takes the same step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

try:
    from torch.distributed.tensor import DTensor, Replicate
    from torch.distributed.tensor import Shard as _Shard
except ImportError:  # pragma: no cover - torch without DTensor
    DTensor = None  # type: ignore[assignment,misc]


def is_dtensor(t: Any) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def local(t: Any) -> Tensor:
    """The local part of a DTensor (in-place updates write through), else ``t``. Without autograd it is
    the DTensor's own local tensor, the same object on every call (``to_local()`` of a parameter would
    be a new view each time, which :class:`adapm.grouped.Views` could not keep)."""
    if not is_dtensor(t):
        return t
    return t._local_tensor if not torch.is_grad_enabled() else t.to_local()


@dataclass(frozen=True)
class ShardInfo:
    """Where this rank's rows of a parameter sit: rows ``[offset, offset + rows)`` of dim 0."""

    offset: int
    rows: int
    global_shape: tuple[int, ...]
    group: Any = None
    """The process group to reduce over; None for parameters held whole by this rank."""
    mesh: Any = None

    @property
    def sharded(self) -> bool:
        return self.group is not None

    def reduce(self, t: Tensor) -> Tensor:
        """Sum ``t`` over the ranks sharing the parameter (in place; identity when not sharded)."""
        if self.group is not None:
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group)
        return t


def shard_info(p: Tensor, name: str) -> ShardInfo:
    """Describe how ``p`` is split across ranks.

    Raises:
        NotImplementedError: for DTensor placements other than ``Shard(0)`` or ``Replicate()`` on a
            1-D mesh (e.g. tensor parallelism), naming the parameter.
    """
    shape = tuple(p.shape)
    if not is_dtensor(p):
        return ShardInfo(0, shape[0] if shape else 1, shape)
    placements = tuple(p.placements)
    if all(isinstance(pl, Replicate) for pl in placements):
        return ShardInfo(0, shape[0] if shape else 1, shape)
    if len(placements) != 1 or not (isinstance(placements[0], _Shard) and placements[0].dim == 0):
        raise NotImplementedError(
            f"AdaPM supports DTensor parameters sharded on dim 0 of a 1-D mesh (FSDP2) or replicated; "
            f"parameter '{name}' has placements {placements}"
        )
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    local_shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    rows = local_shape[0] if local_shape else 1
    return ShardInfo(offset[0] if offset else 0, rows, shape, p.device_mesh.get_group(), p.device_mesh)


def make_state(
    like: Tensor, shape: tuple[int, ...], row_dim: int | None, info: ShardInfo, dtype: torch.dtype = torch.float32
) -> Tensor:
    """A zero state tensor of global ``shape`` (float32 unless the policy declares another ``dtype``).

    For a sharded parameter, state whose dimension ``row_dim`` runs over the parameter's rows is
    allocated locally (this rank's rows only) and wrapped as a DTensor sharded on ``row_dim`` like the
    parameter, so ``torch.distributed.checkpoint`` saves and reshards it; everything else is a plain
    tensor, identical on every rank.
    """
    device = local(like).device
    if not info.sharded or row_dim is None:
        return torch.zeros(shape, dtype=dtype, device=device)
    local_shape = list(shape)
    local_shape[row_dim] = info.rows
    data = torch.zeros(local_shape, dtype=dtype, device=device)
    stride = [math.prod(shape[i + 1 :]) for i in range(len(shape))]
    return DTensor.from_local(
        data, info.mesh, [_Shard(row_dim)], run_check=False, shape=torch.Size(shape), stride=tuple(stride)
    )


def agree_all(flags: Tensor, group: Any) -> Tensor:
    """Elementwise AND of boolean ``flags`` across ``group`` (every rank must decide alike)."""
    if group is None:
        return flags
    as_int = flags.to(torch.int32)
    dist.all_reduce(as_int, op=dist.ReduceOp.MIN, group=group)
    return as_int.bool()
