"""Every optimizer of the comparison, by name, with the paper's settings (DESIGN.md section 5).

* ``adamw``: ``torch.optim.AdamW``, decay on matrices only.
* ``adam-mini``: the official ``adam-mini`` package.
* ``adafactor``: transformers' Adafactor with momentum b1 = 0.9, clip threshold 1.0, eps (1e-30, 1e-3),
  decay rate -0.8, fixed learning rate (torch.optim.Adafactor has no momentum).
* ``galore``: ``galore_torch.GaLoreAdamW``, rank 0.5 x hidden size, update gap 200, scale 0.25, on the
  attention and MLP matrices.
* ``adapm`` / ``adapm-mini``: this package.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

import adapm
from adapm.train.config import OPTIMIZER_NAMES, OptimConfig

DEFAULT_LR: dict[str, float] = {
    "adamw": 3e-3,
    "adam-mini": 3e-3,
    "adafactor": 1e-2,
    "galore": 1e-2,
    "adapm": 3e-3,
    "adapm-mini": 3e-3,
}
"""Default peak learning rates for the tiny CPU presets (the paper's Adafactor lr is 0.01; GaLore's
scale 0.25 shrinks its steps, so it gets a larger lr as in the GaLore paper)."""

FINETUNE_LR: dict[str, float] = {
    "adamw": 2e-5,
    "adam-mini": 2e-5,
    "adafactor": 1e-4,
    "galore": 1e-4,
    "adapm": 2e-5,
    "adapm-mini": 2e-5,
}
"""Default peak learning rates for fine-tuning a pretrained model (`adapm sft`, `adapm rlhf`)."""

GALORE_MATRIX_PATTERN = r"(attn|attention|mlp)"
"""GaLore applies to 2-D parameters whose name matches this (attention and MLP matrices)."""


def _hidden_size(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    for key in ("hidden_size", "n_embd", "d_model"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    return max(min(p.shape) for p in model.parameters() if p.dim() == 2)


def _decay_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """The optimizer ``cfg.optimizer`` for ``model`` (lr: ``cfg.lr`` or the optimizer's default)."""
    name = cfg.optimizer
    if name not in OPTIMIZER_NAMES:
        raise ValueError(f"Invalid optimizer: {name!r}; expected one of {OPTIMIZER_NAMES}")
    lr = cfg.lr if cfg.lr is not None else DEFAULT_LR[name]
    betas = (cfg.beta1, cfg.beta2)
    if name == "adamw":
        return torch.optim.AdamW(_decay_groups(model, cfg.weight_decay), lr=lr, betas=betas)
    if name in ("adapm", "adapm-mini"):
        cls = adapm.AdaPMMini if name == "adapm-mini" else adapm.AdaPM
        return cls(
            model,
            lr=lr,
            betas=betas,
            weight_decay=cfg.weight_decay,
            rank_ratio=cfg.rank_ratio,
            tracker=cfg.tracker,
            refresh_every=cfg.refresh_every,
            correction=cfg.correction,
            update_clip=cfg.update_clip,
            rules=[tuple(r) for r in cfg.rules] if cfg.rules else None,
            fused=cfg.fused,
        )
    if name == "adam-mini":
        from adam_mini import Adam_mini

        config = model.config  # type: ignore[attr-defined]
        heads = getattr(config, "num_attention_heads", None) or config.n_head
        return Adam_mini(
            model.named_parameters(),
            lr=lr,
            betas=betas,
            weight_decay=cfg.weight_decay,
            dim=_hidden_size(model),
            n_heads=heads,
            n_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            verbose=False,
        )
    if name == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(
            _decay_groups(model, cfg.weight_decay),
            lr=lr,
            beta1=cfg.beta1,
            eps=(1e-30, 1e-3),
            clip_threshold=1.0,
            decay_rate=-0.8,
            relative_step=False,
            scale_parameter=False,
            warmup_init=False,
        )
    from galore_torch import GaLoreAdamW

    rank = max(1, _hidden_size(model) // 2)
    galore, decay, no_decay = [], [], []
    for pname, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.dim() == 2 and re.search(GALORE_MATRIX_PATTERN, pname):
            galore.append(p)
        elif p.dim() >= 2:
            decay.append(p)
        else:
            no_decay.append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
        {
            "params": galore,
            "weight_decay": cfg.weight_decay,
            "rank": rank,
            "update_proj_gap": 200,
            "scale": 0.25,
            "proj_type": "std",
        },
    ]
    return GaLoreAdamW([g for g in groups if g["params"]], lr=lr, betas=betas, no_deprecation_warning=True)


def optimizer_safe_globals() -> list[Any]:
    """Classes that optimizer states hold besides tensors (GaLore keeps projector objects)."""
    try:
        from galore_torch.galore_projector import GaLoreProjector
    except ImportError:
        return []
    return [GaLoreProjector]
