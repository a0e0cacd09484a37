"""The Adam-style update shared by every policy combination (DESIGN.md section 2, "The update")."""

from __future__ import annotations

from torch import Tensor


def apply_update(
    target: Tensor,
    numerator: Tensor,
    denominator: Tensor,
    *,
    lr: float,
    bias_correction1: float,
    update_clip: float | None,
) -> None:
    """``W <- W - lr * clamp(numerator / bias_correction1 / denominator, -clip, clip)`` in place.

    ``denominator`` is ``sqrt(vhat) + eps``; ``bias_correction1`` is ``1 - b1^t`` for an EMA momentum
    and ``1`` for ``none``. Without a clip this is exactly ``torch.optim.AdamW``'s ``addcdiv_`` form,
    so that the full/full policy reproduces AdamW to round-off.
    """
    if update_clip is None:
        target.addcdiv_(numerator, denominator, value=-(lr / bias_correction1))
        return
    update = numerator / denominator
    if bias_correction1 != 1.0:
        update.div_(bias_correction1)
    target.add_(update.clamp_(-update_clip, update_clip), alpha=-lr)
