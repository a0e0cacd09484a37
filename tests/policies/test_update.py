"""The elementwise tail: the compiled (fused) kernel equals the eager reference."""

from __future__ import annotations

import pytest
import torch

from adapm.policies.update import elementwise_update, fused_elementwise_update, fused_scalars

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
