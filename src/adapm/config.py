"""Every AdaPM hyperparameter in one place: its default and its validation.

:class:`AdaPMConfig` is what :class:`adapm.AdaPM` is built from (``AdaPM(model, lr, **fields)``), what the
training harness embeds, and what param groups are checked against. Nothing else restates a default or
a check.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from adapm.policies.correction import CORRECTIONS
from adapm.policies.momentum import MOMENTUM
from adapm.policies.precision import STATE_DTYPES
from adapm.policies.second_moment import SECOND_MOMENT
from adapm.policies.trackers import TRACKER

__all__ = ["BLOCKWISE_LR_RATIOS", "CLIP_SCOPES", "AdaPMConfig", "check_hyperparameters", "resolve_lr_ratios"]

CLIP_SCOPES = ("lowrank", "all")
"""Which blocks ``update_clip`` applies to: the low-rank ones (the paper's Algorithm 1) or every block."""

BLOCKWISE_LR_RATIOS: dict[str, float] = {
    "embedding": 10.0,
    "output": 10.0,
    "query": 8.0,
    "key": 8.0,
    "mlp": 6.0,
    "value": 4.0,
    "attn_out": 4.0,
    "router": 1.0,
    "adapter": 1.0,
    "vector": 1.0,
    "other": 1.0,
}
"""Blockwise LR's multipliers by role (the authors' tuned values; an untied LM head counts as an
embedding)."""


@dataclass(frozen=True)
class AdaPMConfig:
    """AdaPM's hyperparameters (all but the learning rate), validated on construction.

    The fields are :class:`adapm.AdaPM`'s keyword arguments; see its docstring for what each one does.
    ``second_moment=None`` means the optimizer class's own default (``full`` for AdaPM, ``block`` for
    AdaPM-mini).
    """

    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    second_moment: str | None = None
    rank_ratio: float = 0.05
    tracker: str = "power"
    refresh_every: int = 100
    correction: str = "unbiased"
    update_clip: float | None = 1.0
    clip_scope: str = "lowrank"
    state_dtype: str = "fp32"
    lr_ratios: str | Mapping[str, float] | None = None
    fused: bool = False
    foreach: bool | None = None

    def __post_init__(self) -> None:
        if isinstance(self.betas, list):
            object.__setattr__(self, "betas", tuple(self.betas))
        if not isinstance(self.fused, bool):
            raise TypeError(f"Invalid fused: {self.fused!r}; expected True or False")
        if self.foreach is not None and not isinstance(self.foreach, bool):
            raise TypeError(f"Invalid foreach: {self.foreach!r}; expected True, False or None")
        values = self.group_defaults("full" if self.second_moment is None else self.second_moment)
        check_hyperparameters({**values, "lr": 0.0}, "")
        resolve_lr_ratios(self.lr_ratios)

    def group_defaults(self, second_moment: str) -> dict[str, Any]:
        """The param-group keys this config sets (everything a group may override)."""
        values = asdict(self)
        for key in ("lr_ratios", "fused", "foreach"):
            del values[key]
        values["second_moment"] = second_moment
        return values


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def check_hyperparameters(values: Mapping[str, Any], where: str) -> None:
    """torch-style checks of a param group's scalar hyperparameters; ``where`` locates the culprit (e.g.
    ``" in param group 3"``). Keys that are absent are not checked, except the ones every group has."""
    lr = values["lr"]
    if not _is_number(lr):
        raise TypeError(f"lr{where} must be a float, got {type(lr).__name__}")
    if not 0.0 <= lr:
        raise ValueError(f"Invalid learning rate{where}: {lr}")
    betas = values["betas"]
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2 and all(_is_number(b) for b in betas)):
        raise TypeError(f"betas{where} must be a pair of floats, got {betas!r}")
    for i, beta in enumerate(betas):
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"Invalid beta parameter at index {i}{where}: {beta}")
    if not _is_number(values["eps"]) or not 0.0 <= values["eps"]:
        raise ValueError(f"Invalid epsilon value{where}: {values['eps']}")
    if not _is_number(values["weight_decay"]) or not 0.0 <= values["weight_decay"]:
        raise ValueError(f"Invalid weight_decay value{where}: {values['weight_decay']}")
    ratio = values["rank_ratio"]
    if not _is_number(ratio) or not 0.0 < ratio <= 1.0:
        raise ValueError(f"Invalid rank_ratio{where}: {ratio!r}; expected a number in (0, 1]")
    if values.get("momentum", "full") not in (*MOMENTUM, "mixed"):
        raise ValueError(f"Invalid momentum policy{where}: {values['momentum']!r}; expected one of {tuple(MOMENTUM)}")
    if values["second_moment"] not in SECOND_MOMENT:
        raise ValueError(
            f"Invalid second_moment policy{where}: {values['second_moment']!r}; expected one of {tuple(SECOND_MOMENT)}"
        )
    if values["tracker"] not in TRACKER:
        raise ValueError(f"Invalid tracker{where}: {values['tracker']!r}; expected one of {tuple(TRACKER)}")
    if values["correction"] not in CORRECTIONS:
        raise ValueError(f"Invalid correction{where}: {values['correction']!r}; expected one of {CORRECTIONS}")
    refresh = values["refresh_every"]
    if not isinstance(refresh, int) or isinstance(refresh, bool) or refresh < 1:
        raise ValueError(f"Invalid refresh_every{where}: {refresh!r}; expected an integer >= 1")
    clip = values["update_clip"]
    if clip is not None and (not _is_number(clip) or not clip > 0.0):
        raise ValueError(f"Invalid update_clip{where}: {clip!r}; expected a positive float or None")
    if values.get("state_dtype", "fp32") not in STATE_DTYPES:
        raise ValueError(
            f"Invalid state_dtype{where}: {values['state_dtype']!r}; expected one of {tuple(STATE_DTYPES)}"
        )
    if values["clip_scope"] not in CLIP_SCOPES:
        raise ValueError(f"Invalid clip_scope{where}: {values['clip_scope']!r}; expected one of {CLIP_SCOPES}")
    ratio = values.get("lr_ratio", 1.0)
    if not _is_number(ratio) or not 0.0 < ratio < math.inf:
        raise ValueError(f"Invalid lr_ratio{where}: {ratio!r}; expected a positive number")


def resolve_lr_ratios(lr_ratios: str | Mapping[str, float] | None) -> dict[str, float] | None:
    """``"blockwise"``, a dict by role or None -> a complete dict by role (or None).

    Raises:
        ValueError: an unknown name or role, or a ratio that is not a positive number.
    """
    from adapm.partition.presets import ROLES  # the partition imports this module

    if lr_ratios is None:
        return None
    if isinstance(lr_ratios, str):
        if lr_ratios != "blockwise":
            raise ValueError(f"Invalid lr_ratios: {lr_ratios!r}; expected 'blockwise', a dict by role, or None")
        return dict(BLOCKWISE_LR_RATIOS)
    if not isinstance(lr_ratios, Mapping):
        raise TypeError(f"lr_ratios must be 'blockwise', a dict by role or None, got {type(lr_ratios).__name__}")
    unknown = sorted(set(lr_ratios) - set(ROLES))
    if unknown:
        raise ValueError(f"Invalid lr_ratios: unknown role(s) {unknown}; roles are {list(ROLES)}")
    resolved = dict.fromkeys(ROLES, 1.0)
    for role, ratio in lr_ratios.items():
        if not _is_number(ratio) or not 0.0 < ratio < math.inf:
            raise ValueError(f"Invalid lr_ratios[{role!r}]: {ratio!r}; expected a positive number")
        resolved[role] = float(ratio)
    return resolved
