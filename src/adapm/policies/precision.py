"""Low-precision storage of optimizer state: which dtypes a state may be stored in, and how a float32
result is written back into it.

The math always runs in float32: a step reads each low-precision state tensor into a float32 working
copy, updates that, and writes it back with **stochastic rounding** (round up with probability equal to
the distance to the lower neighbour), so that an EMA's small increments are not lost to rounding, as
they would be with round-to-nearest (an EMA with ``beta2=0.999`` adds 0.1% per step, below bfloat16's
0.4% resolution). The rounding draws from a generator seeded by the parameter, the state key and the
step, so a resumed run continues bit-identically.

Which tensors may be stored so is declared by the policies (:attr:`StateSpec.low_precision`): the full
momentum, the low-rank factors and the full second moment. Block second moments (a few numbers per
matrix) and the step counter stay float32.

``state_dtype="int8"`` stores each such tensor as one byte per entry: a code into a fixed table of 255
(signed) or 256 (non-negative) values in ``[-1, 1]``, times a float32 scale per block of entries (the
block's largest magnitude, kept under the key ``<key>_absmax``). Blocks are runs of at most
``QUANT_BLOCK`` entries along the tensor's last dimension (:func:`quant_block`), so a row never shares a
block with another row and the scales shard with their codes under FSDP2. The tables are logarithmic,
a float with 3 mantissa bits (8 steps per power of two: 7-12.5% apart), so small entries of a block
keep their relative precision, as in 8-bit Adam's dynamic code: the signed table spans 16 powers of
two below the block's scale, the non-negative one (second moments, which square the range) 32. Writes
round stochastically between the two neighbouring codes, so the stored value is unbiased, and a
non-negative entry is never rounded to zero (a second moment of zero would turn a small momentum
into a huge step). Tensors whose last dimension is the one FSDP2 shards (1-D state of a row-sharded
parameter: biases, norms) stay float32; they are a negligible share of the bytes.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import torch
from torch import Tensor

if TYPE_CHECKING:
    from adapm.policies.state import StateSpec

STATE_DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "int8": torch.uint8}
"""``state_dtype`` names and the dtype each stores the declared low-precision state in (``int8``: 8-bit
codes, with a float32 scale per block)."""

QUANT_BLOCK = 256
"""Most entries of a state tensor's row that share one 8-bit scale."""

SCALE_SUFFIX = "_absmax"
"""The key of a quantized state tensor's block scales is the tensor's key plus this suffix."""


def scale_key(key: str) -> str:
    """The state key holding the block scales of quantized state ``key``."""
    return key + SCALE_SUFFIX


def is_scale_key(key: str) -> bool:
    return key.endswith(SCALE_SUFFIX)


def quant_block(last: int) -> int:
    """Entries per 8-bit block of a tensor whose last dimension has ``last`` entries: the whole row up
    to ``QUANT_BLOCK``, else the largest divisor of ``last`` from ``QUANT_BLOCK // 8`` to ``QUANT_BLOCK``
    (every block of a tensor then has the same length), else the whole row."""
    if last <= QUANT_BLOCK:
        return max(last, 1)
    for b in range(QUANT_BLOCK, QUANT_BLOCK // 8 - 1, -1):
        if last % b == 0:
            return b
    return last


def quantizable(spec: StateSpec) -> bool:
    """Whether ``state_dtype="int8"`` stores ``spec`` quantized: tensors of one or more dimensions whose
    last dimension is not the one FSDP2 shards (so no block straddles two ranks' shards)."""
    return len(spec.shape) >= 1 and spec.row_dim != len(spec.shape) - 1 and spec.numel > 0


def scale_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Shape of the block scales of a quantized tensor of ``shape``."""
    return (*shape[:-1], shape[-1] // quant_block(shape[-1]))


_GRID_TOP = {False: 126, True: 254}
"""Index of the largest magnitude of each table's grid (signed, non-negative): the grid's point ``k`` is
``(1 + (k % 8) / 8) * 2^(k // 8)``, a float with 3 mantissa bits; its top ``(1 + 6/8) 2^15`` (signed) or
``(1 + 6/8) 2^31`` (non-negative) stands for a block's scale."""


def _grid_scale(nonnegative: bool) -> float:
    top = _GRID_TOP[nonnegative]
    return (1 + (top % 8) / 8) * 2.0 ** (top // 8)


@functools.cache
def code_table(nonnegative: bool, device: torch.device) -> Tensor:
    """The sorted values an 8-bit code stands for (times its block's scale): 0 and 255 magnitudes from
    about ``2^-31`` to 1 for non-negative state (code ``k + 1`` is grid point ``k``), else 0 (code 127)
    and +-127 magnitudes from about ``2^-15`` to 1 (codes ``128 + k`` and ``126 - k``)."""
    top, scale = _GRID_TOP[nonnegative], _grid_scale(nonnegative)
    magnitudes = [(1 + (k % 8) / 8) * 2.0 ** (k // 8) / scale for k in range(top + 1)]
    values = [0.0, *magnitudes] if nonnegative else [-m for m in reversed(magnitudes)] + [0.0] + magnitudes
    return torch.tensor(values, dtype=torch.float32, device=device)


def dequantize(codes: Tensor, scales: Tensor, nonnegative: bool) -> Tensor:
    """The float32 values of 8-bit ``codes`` (``(blocks, block)``) with per-block ``scales`` (``(blocks,)``)."""
    table = code_table(nonnegative, codes.device)
    values = table.index_select(0, codes.view(-1).int()).view(codes.shape)  # on CPU 20x a [] gather
    return values.mul_(scales.unsqueeze(-1))


_DROPPED = 20
"""float32 mantissa bits below the grid's 3."""


def quantize_(
    codes: Tensor, scales: Tensor, values: Tensor, nonnegative: bool, generator: torch.Generator | None
) -> None:
    """Store float32 ``values`` (``(blocks, block)``, finite) as 8-bit ``codes`` and per-block ``scales``:
    each magnitude divided by its block's largest and rounded to a neighbouring grid point,
    stochastically from ``generator`` (unbiased) or to the nearest when it is None. The grid is a float
    with 3 mantissa bits, so the rounding is the bfloat16 trick on 20 bits instead of 16: add a random
    carry below the kept bits and truncate; the kept exponent and mantissa bits are the code. Below
    the grid's smallest point a magnitude rounds to it or to zero; a positive value of a non-negative
    tensor never rounds to zero."""
    top = _GRID_TOP[nonnegative]
    absmax = values.abs().amax(dim=-1)
    scales.copy_(absmax)
    multiplier = torch.where(absmax > 0, absmax.reciprocal(), 0.0).mul_(_grid_scale(nonnegative))
    z = values.abs().mul_(multiplier.unsqueeze(-1))  # in [0, the grid's top]
    if generator is None:
        carry = torch.full_like(z, 1 << (_DROPPED - 1), dtype=torch.int32)
    else:
        carry = torch.randint(0, 1 << _DROPPED, z.shape, dtype=torch.int32, device=z.device, generator=generator)
    index = (z.view(torch.int32) + carry).bitwise_right_shift_(_DROPPED).sub_(127 << 3).clamp_(max=top)
    below = z < 1  # under the grid's point 0: round to it or to zero (index -1)
    up = z > 0 if nonnegative else carry.float().mul_(2.0**-_DROPPED) < z
    index = torch.where(below, up.to(torch.int32).sub_(1), index)
    if nonnegative:
        codes.copy_(index.add_(1))
    else:
        codes.copy_(torch.where(values < 0, 126 - index, index + 128))


def stochastic_round_(dst: Tensor, src: Tensor, generator: torch.Generator) -> Tensor:
    """``dst <- src`` (float32) rounded stochastically to ``dst``'s bfloat16: the 16 bits bfloat16
    drops are replaced by a uniform random carry before truncation, so ``E[dst] = src``. Infinities and
    NaN stay what they are."""
    if dst.dtype == torch.float32:
        return dst.copy_(src)
    if dst.dtype != torch.bfloat16:
        raise TypeError(f"stochastic_round_: cannot store state as {dst.dtype}; expected bfloat16 or float32")
    bits = src.contiguous().view(torch.int32)
    noise = torch.randint(0, 1 << 16, src.shape, dtype=torch.int32, device=src.device, generator=generator)
    rounded = noise.add_(bits).bitwise_and_(-65536).view(torch.float32)  # in place; -65536 == 0xFFFF0000
    rounded = torch.where(torch.isfinite(src), rounded, src)  # no carry into inf/NaN patterns
    return dst.copy_(rounded)  # exact: the low 16 bits are zero


# --------------------------------------------------------------- working copies of stored state


@dataclass(frozen=True)
class Stored:
    """One state tensor stored in low precision: bfloat16 values, or 8-bit codes and their block scales."""

    tensor: Tensor
    scales: Tensor | None
    nonnegative: bool

    @property
    def kind(self) -> tuple[torch.dtype, int, bool]:
        """Tensors of one kind are read and written together: the same storage, block and table."""
        if self.scales is None:
            return (self.tensor.dtype, 0, False)
        return (self.tensor.dtype, quant_block(self.tensor.shape[-1]), self.nonnegative)

    def decode(self) -> Tensor:
        """The float32 values (a new tensor)."""
        if self.scales is None:
            return self.tensor.float()
        block = quant_block(self.tensor.shape[-1])
        codes, scales = self.tensor.reshape(-1, block), self.scales.reshape(-1)
        return dequantize(codes, scales, self.nonnegative).view(self.tensor.shape)

    def encode_(self, values: Tensor, generator: torch.Generator | None) -> None:
        """Store float32 ``values``, rounded stochastically from ``generator`` or to nearest if None."""
        if self.scales is None:
            if generator is None:
                self.tensor.copy_(values)
            else:
                stochastic_round_(self.tensor, values, generator)
            return
        block = quant_block(self.tensor.shape[-1])
        values = values.reshape(-1, block)
        quantize_(self.tensor.view(-1, block), self.scales.view(-1), values, self.nonnegative, generator)


@dataclass
class Run:
    """Stored tensors of one kind whose working copies are one contiguous range of the float32 buffer."""

    kind: tuple[torch.dtype, int, bool]
    start: int
    end: int
    parts: list[tuple[int, Stored, int, int]]
    """``(index in the input, stored tensor, start, end)`` of each tensor's range of the buffer."""


def read_working(stored: list[Stored]) -> tuple[list[Tensor], list[Run], Tensor | None]:
    """Float32 working copies of ``stored`` (views of one buffer, in input order), read with one copy
    (bfloat16) or one decode (8-bit) per kind, so the ops do not grow with the number of tensors.
    Returns the views, the runs to pass to :func:`write_working`, and the buffer (None if ``stored`` is
    empty)."""
    if not stored:
        return [], [], None
    order = sorted(range(len(stored)), key=lambda i: _kind_order(stored[i].kind))
    runs: list[Run] = []
    size = 0
    for i in order:
        s = stored[i]
        if not runs or runs[-1].kind != s.kind:
            runs.append(Run(s.kind, size, size, []))
        runs[-1].parts.append((i, s, size, size + s.tensor.numel()))
        size += s.tensor.numel()
        runs[-1].end = size
    flat = torch.empty(size, dtype=torch.float32, device=stored[0].tensor.device)
    views: list[Tensor] = [flat] * len(stored)
    for run in runs:
        for i, s, a, b in run.parts:
            views[i] = flat[a:b].view(s.tensor.shape)
        if run.kind[0] != torch.uint8:
            torch._foreach_copy_([views[i] for i, _, _, _ in run.parts], [s.tensor for _, s, _, _ in run.parts])
            continue
        codes, scales = _joined(run)
        block = run.kind[1]
        flat[run.start : run.end].view(-1, block).copy_(dequantize(codes.view(-1, block), scales, run.kind[2]))
    return views, runs, flat


def write_working(
    runs: list[Run], flat: Tensor, keep: set[int] | None, generator: Callable[[int], torch.Generator | None]
) -> None:
    """Store the working copies back: each run rounded once (stochastically from ``generator(run index)``,
    or to nearest if it gives None) and copied into the stored tensors whose input index is in ``keep``
    (all if None)."""
    for r, run in enumerate(runs):
        parts = [part for part in run.parts if keep is None or part[0] in keep]
        if not parts:
            continue
        values = flat[run.start : run.end]
        if run.kind[0] != torch.uint8:
            rounded = torch.empty(values.shape, dtype=run.kind[0], device=values.device)
            gen = generator(r)
            if gen is None:
                rounded.copy_(values)
            else:
                stochastic_round_(rounded, values, gen)
            sources = [rounded[a - run.start : b - run.start].view(s.tensor.shape) for _, s, a, b in parts]
            torch._foreach_copy_([s.tensor for _, s, _, _ in parts], sources)
            continue
        block = run.kind[1]
        codes = torch.empty(values.shape, dtype=torch.uint8, device=values.device)
        scales = torch.empty(values.numel() // block, dtype=torch.float32, device=values.device)
        quantize_(codes.view(-1, block), scales, values.view(-1, block), run.kind[2], generator(r))
        targets: list[Tensor] = []
        pieces: list[Tensor] = []
        for _, s, a, b in parts:
            a, b, block_scales = a - run.start, b - run.start, cast(Tensor, s.scales)
            targets += [s.tensor, block_scales]
            pieces += [codes[a:b].view(s.tensor.shape), scales[a // block : b // block].view(block_scales.shape)]
        torch._foreach_copy_(targets, pieces)


def _kind_order(kind: tuple[torch.dtype, int, bool]) -> tuple[str, int, bool]:
    return (str(kind[0]), kind[1], kind[2])


def _joined(run: Run) -> tuple[Tensor, Tensor]:
    """A run's codes and scales, each as one flat tensor (no copy for a run of one tensor)."""
    if len(run.parts) == 1:  # stored state is contiguous: views, no per-tensor op
        s = run.parts[0][1]
        return s.tensor.view(-1), cast(Tensor, s.scales).view(-1)
    codes = torch.cat([s.tensor.view(-1) for _, s, _, _ in run.parts])
    scales = torch.cat([cast(Tensor, s.scales).view(-1) for _, s, _, _ in run.parts])
    return codes, scales
