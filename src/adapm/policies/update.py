"""The Adam-style update shared by every policy combination (DESIGN.md section 2, "The update")."""

from __future__ import annotations

import torch
from torch import Tensor

from adapm.policies.momentum import full_momentum
from adapm.policies.second_moment import full_second_moment


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


def elementwise_update(
    target: Tensor,
    grad: Tensor,
    *,
    v: Tensor | None,
    m: Tensor | None,
    numerator: Tensor | None,
    denom: Tensor | None,
    beta1: float,
    beta2: float,
    lr: float,
    decay: float,
    bias_correction1: float,
    bias_correction2_sqrt: float,
    eps: float,
    update_clip: float | None,
) -> None:
    """The elementwise tail of a step on one (piece of a) segment, in place.

    ``v``: the full second moment to update (else ``denom``, ``sqrt(vhat) + eps`` broadcastable to
    ``target``, from block second moments). ``m``: the full momentum to update; otherwise the
    ``numerator`` (corrected low-rank momentum) or, if that is None too, the gradient (no momentum).
    ``decay`` is ``1 - lr * weight_decay``. The order of operations is torch.optim.AdamW's.
    """
    if m is not None:
        numerator = full_momentum(m, grad, beta1)
    elif numerator is None:
        numerator = grad
    if decay != 1:
        target.mul_(decay)
    if update_clip is None:  # torch.optim.AdamW's exact sequence of operations
        if v is not None:
            full_second_moment(v, grad, beta2)
            denom = (v.sqrt() / bias_correction2_sqrt).add_(eps)
        assert denom is not None
        apply_update(target, numerator, denom, lr=lr, bias_correction1=bias_correction1, update_clip=None)
        return
    # Clipped update with one division: u = num / ((sqrt(v) / sqrt(bc2) + eps) * bc1), computed in
    # a single temporary.
    if v is not None:
        full_second_moment(v, grad, beta2)
        work = v.sqrt().mul_(bias_correction1 / bias_correction2_sqrt).add_(eps * bias_correction1)
    else:
        assert denom is not None
        work = (denom * bias_correction1).expand_as(numerator).contiguous()
    torch.div(numerator, work, out=work)
    target.add_(work.clamp_(-update_clip, update_clip), alpha=-lr)
