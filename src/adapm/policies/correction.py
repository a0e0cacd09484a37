"""The residual correction of low-rank momentum (docs/algorithm.md, "The correction coefficient").

The corrected momentum is ``mc_t = m_t + c_t * res_t`` with ``res_t = m_t - L_t R_t``. Only the
coefficient differs between the options:

* ``"unbiased"``: ``c_t = b1 (1 - b1^(t-1)) / (1 - b1)``. With ``e_t = mfull_t - m_t`` one has exactly
  ``e_t = b1 (e_{t-1} + res_{t-1})``; for stationary residuals with mean ``rho`` the expected gap is
  ``b1 (1 - b1^(t-1)) rho / (1 - b1)``, which this coefficient cancels at every step.
* ``"none"``: ``c_t = 0``: the update uses ``m_t = L_t R_t + res_t`` with no extra term.
* ``"paper"``: ``c_t = -1 / (1 - b1)``, Algorithm 1 line 8 of the paper as printed. Its bias is
  ``-(1 + b1) rho / (1 - b1)``, worse than no correction. Kept only so the ablation can be reproduced.
"""

from __future__ import annotations

CORRECTIONS = ("unbiased", "none", "paper")


def correction_coefficient(kind: str, beta1: float, step: int) -> float:
    """Return ``c_t`` such that the corrected momentum is ``m_t + c_t * res_t``.

    Args:
        kind: one of :data:`CORRECTIONS`.
        beta1: momentum decay, in ``[0, 1)``.
        step: the 1-based step count ``t``.
    """
    if kind == "unbiased":
        return beta1 * (1.0 - beta1 ** (step - 1)) / (1.0 - beta1)
    if kind == "none":
        return 0.0
    if kind == "paper":
        return -1.0 / (1.0 - beta1)
    raise ValueError(f"Invalid correction: {kind!r}; expected one of {CORRECTIONS}")
