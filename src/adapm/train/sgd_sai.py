"""SGD-SaI: SGD with momentum and learning rates Scaled at Initialization, a baseline.

Xu, Xiang, Cai, Wen, "No More Adam: Learning Rate Scaling at Initialization is All You Need"
(arXiv 2412.11768). At the first step each parameter tensor gets a constant gain, its gradient
signal-to-noise ratio ``gsnr = ||g||_2 / (std(g) + eps)``; then every step

    m_t = mu m_{t-1} + (1 - mu) g_t      (m_1 = g_1)
    W_t = W_{t-1} (1 - lr wd) - lr gsnr m_t

Half of AdamW's state (the momentum) plus one number per tensor. This follows the authors' ``sgd-sai``
package (1.0.3) step for step (tested against it), with two differences a training harness needs: the
g-SNR lives in the optimizer state, so a resumed run keeps it instead of recomputing it from the
resumed step's gradient, and nothing is printed.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch.optim import Optimizer


class SGDSaI(Optimizer):
    """SGD-SaI (see the module docstring). ``params`` and groups as in ``torch.optim.SGD``."""

    def __init__(
        self, params: Iterable[Any], lr: float, momentum: float = 0.9, eps: float = 1e-8, weight_decay: float = 1e-2
    ) -> None:
        if not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"Invalid momentum value: {momentum}")
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        super().__init__(params, dict(lr=lr, momentum=momentum, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        """One step (the first one also fixes each tensor's g-SNR)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, mu = group["lr"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                state = self.state[p]
                if "gsnr" not in state:
                    # std of a single entry is NaN: count it as zero noise, as the package does.
                    state["gsnr"] = grad.norm() / (grad.std().nan_to_num() + group["eps"])
                    state["momentum_buffer"] = grad.detach().clone()
                else:
                    state["momentum_buffer"].mul_(mu).add_(grad, alpha=1.0 - mu)
                p.mul_(1.0 - lr * group["weight_decay"])
                # The step size lr * gsnr stays a tensor (no host sync); same rounding as the package.
                p.addcmul_(state["momentum_buffer"], state["gsnr"] * -lr)
        return loss
