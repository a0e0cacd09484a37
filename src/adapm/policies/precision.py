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
"""

from __future__ import annotations

import torch
from torch import Tensor

STATE_DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16}
"""``state_dtype`` names and the dtype each stores the declared low-precision state in."""


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

