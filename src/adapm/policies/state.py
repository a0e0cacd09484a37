"""What a policy declares: the state tensors it keeps per segment, and a registry of policies by name.

A policy is a small object with a ``name``, a :meth:`state` declaration and pure functions of tensors.
Everything else is derived from the declarations: the state shapes a parameter allocates (plain or as
an FSDP2 ``DTensor``, sharded along ``row_dim``), the bytes the partition report and ``adapm memory``
count, and the checks ``load_state_dict`` makes. Adding a policy is one class registered with
:func:`register`, plus its tests.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import torch

if TYPE_CHECKING:
    from adapm.partition.layout import Segment


@dataclass(frozen=True)
class StateSpec:
    """One state tensor a policy keeps for one segment of a parameter."""

    shape: tuple[int, ...]
    row_dim: int | None
    """The dimension that runs over the parameter's rows (dim 0), if any: under FSDP2 it is sharded like
    the parameter; the others are replicated."""
    join: str = "stack"
    """How the segments of a fused parameter share the key: ``stack`` (one slice per segment along a
    new leading dimension; segments of unequal shapes get one ``flat`` buffer instead, their parts in
    order), ``concat`` (joined along ``concat_dim``) or ``whole`` (one tensor shaped like the parameter,
    of which each segment's part is the same view as of the parameter)."""
    concat_dim: int = 0
    dtype: torch.dtype = torch.float32
    low_precision: bool = False
    """Whether the tensor may be stored in the group's ``state_dtype`` (see :mod:`adapm.policies.precision`):
    large tensors whose per-step change is a small fraction of their value. Otherwise always ``dtype``."""
    nonnegative: bool = False
    """Whether every value is >= 0 (a second moment): 8-bit storage then spends all its codes on
    magnitudes and never rounds a positive value to zero."""

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


class Policy(Protocol):
    name: str

    def state(self, seg: Segment) -> dict[str, StateSpec]: ...


P = TypeVar("P")


def register(registry: dict[str, Any]) -> Any:
    """A class decorator that puts one instance of the policy class into ``registry`` under its name."""

    def add(cls: type[P]) -> type[P]:
        instance = cls()
        name = instance.name  # type: ignore[attr-defined]
        if name in registry:
            raise ValueError(f"a policy named {name!r} is already registered")
        registry[name] = instance
        return cls

    return add


def join_specs(parts: list[StateSpec], fused: bool, param_shape: tuple[int, ...]) -> StateSpec:
    """The parameter-level spec of a key declared by one or more segments (see :attr:`StateSpec.join`)."""
    first = parts[0]
    if first.join == "whole":
        return replace(first, shape=tuple(param_shape), row_dim=0 if param_shape else None)
    if not fused:
        return first
    if first.join == "stack":
        if any(p.shape != first.shape for p in parts):  # unequal segments: one flat buffer, in order
            return replace(first, shape=(sum(p.numel for p in parts),), row_dim=None, join="flat", concat_dim=0)
        row = None if first.row_dim is None else first.row_dim + 1
        return replace(first, shape=(len(parts), *first.shape), row_dim=row)
    shape = list(first.shape)
    shape[first.concat_dim] = sum(p.shape[first.concat_dim] for p in parts)
    return replace(first, shape=tuple(shape))
