"""One builder per optimizer family of :mod:`adapm.train.registry`, with the paper's settings.

* ``adamw``: ``torch.optim.AdamW``, decay on matrices only.
* ``adamw-8bit``: bitsandbytes' ``AdamW8bit`` (block-wise 8-bit moments with dynamic quantization
  maps; tensors under 4,096 entries keep 32-bit state), decay on matrices only. bitsandbytes rather
  than torchao because it runs eagerly on CPU and is already installed with GaLore.
* ``adam-mini``: the official ``adam-mini`` package.
* ``adafactor``: transformers' Adafactor with momentum b1 = 0.9, clip threshold 1.0, eps (1e-30, 1e-3),
  decay rate -0.8, fixed learning rate (torch.optim.Adafactor has no momentum).
* ``galore``: ``galore_torch.GaLoreAdamW``, rank 0.5 x hidden size, update gap 200, scale 0.25, on the
  attention and MLP matrices.
* ``sgd-sai``: :class:`adapm.train.sgd_sai.SGDSaI` (momentum 0.9), decay on matrices only.
* ``adapm`` / ``adapm-mini``: this package.

``lr_ratios`` (block-wise learning rates) reaches AdamW and Adam-mini through AdaPM's own role
partition: each tensor's group lr is multiplied by its role's ratio (a fused tensor whose segments have
different ratios, such as GPT-2's ``c_attn``, takes the smallest, the safe side).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import adapm
from adapm.partition.rules import ATTENTION_AND_MLP_ROLES, model_dims
from adapm.train import registry
from adapm.train.config import OptimConfig


def _hidden_size(model: nn.Module) -> int:
    hidden = model_dims(model).hidden
    return hidden if hidden else max(min(p.shape) for p in model.parameters() if p.dim() == 2)


def _roles(model: nn.Module) -> dict[int, str]:
    """Each trainable tensor's role (by id) as the partition's presets see it ("fused" for a split weight)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # unknown matrices are "other"
        groups = adapm.partition(model.named_parameters(remove_duplicate=False), model=model)
    return {id(g["params"][0]): g["role"] for g in groups}


def _decays(p: torch.Tensor, roles: dict[int, str]) -> bool:
    """Weight decay where AdaPM applies it, so that every optimizer decays the same tensors: matrices, not
    vectors (1-D, or declared vectors such as Mamba's ``A_log`` and an expert stack's biases)."""
    return roles.get(id(p), "vector") != "vector"


def _decay_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    params, roles = [p for p in model.parameters() if p.requires_grad], _roles(model)
    return [
        {"params": [p for p in params if _decays(p, roles)], "weight_decay": weight_decay},
        {"params": [p for p in params if not _decays(p, roles)], "weight_decay": 0.0},
    ]


def lr_ratios_of(cfg: OptimConfig) -> str | dict[str, float] | None:
    """``cfg.lr_ratios`` as AdaPM takes it: None, ``"blockwise"`` or a dict parsed from JSON."""
    text = cfg.lr_ratios
    if text is None or text == "blockwise":
        return text
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"Invalid lr_ratios: {text!r}; expected 'blockwise' or a JSON object by role") from exc
    if not isinstance(value, dict):
        raise ValueError(f"Invalid lr_ratios: {text!r}; expected 'blockwise' or a JSON object by role")
    return value


def _ratio_by_param(model: nn.Module, cfg: OptimConfig) -> dict[int, float]:
    """Each tensor's lr multiplier from AdaPM's role partition (fused tensors: the smallest)."""
    ratios = adapm.resolve_lr_ratios(lr_ratios_of(cfg))
    if ratios is None:
        return {}
    out = {}
    for group in adapm.partition(model.named_parameters(remove_duplicate=False), model=model, lr_ratios=ratios):
        segments = group.get("segments") or [group]
        out[id(group["params"][0])] = min(float(seg.get("lr_ratio", 1.0)) for seg in segments)
    return out


def _scale_group_lrs(opt: torch.optim.Optimizer, ratios: dict[int, float]) -> torch.optim.Optimizer:
    for group in opt.param_groups:
        scales = {ratios.get(id(p), 1.0) for p in group["params"]}
        if len(scales) > 1:
            raise ValueError("block-wise learning rates need one parameter tensor per group")
        group["lr"] *= scales.pop() if scales else 1.0
    return opt


def _build_adamw(model: nn.Module, cfg: OptimConfig, lr: float) -> torch.optim.Optimizer:
    ratios = _ratio_by_param(model, cfg)
    betas = (cfg.beta1, cfg.beta2)
    if not ratios:
        return torch.optim.AdamW(_decay_groups(model, cfg.weight_decay), lr=lr, betas=betas)
    roles = _roles(model)
    groups = [
        {"params": [p], "weight_decay": cfg.weight_decay if _decays(p, roles) else 0.0}
        for p in model.parameters()
        if p.requires_grad
    ]
    return _scale_group_lrs(torch.optim.AdamW(groups, lr=lr, betas=betas), ratios)


def _build_adapm(model: nn.Module, cfg: OptimConfig, lr: float, cls: type[adapm.AdaPM]) -> torch.optim.Optimizer:
    settings = {f.name: getattr(cfg.adapm_config(), f.name) for f in dataclasses.fields(adapm.AdaPMConfig)}
    rules = [tuple(r) for r in cfg.rules] if cfg.rules else None
    return cls(model, lr=lr, rules=rules, **settings)


def _build_adamw_8bit(model: nn.Module, cfg: OptimConfig, lr: float) -> torch.optim.Optimizer:
    bnb = import_quiet("bitsandbytes")
    return bnb.optim.AdamW8bit(_decay_groups(model, cfg.weight_decay), lr=lr, betas=(cfg.beta1, cfg.beta2))


def _build_adam_mini(model: nn.Module, cfg: OptimConfig, lr: float) -> torch.optim.Optimizer:
    from adam_mini import Adam_mini

    dims = model_dims(model)
    if dims.heads is None:
        raise ValueError("adam-mini needs the model's attention head count in model.config")
    opt = Adam_mini(
        model.named_parameters(),
        lr=lr,
        betas=(cfg.beta1, cfg.beta2),
        weight_decay=cfg.weight_decay,
        dim=_hidden_size(model),
        n_heads=dims.heads,
        n_kv_heads=dims.kv_heads,
        verbose=False,
    )
    return _scale_group_lrs(opt, _ratio_by_param(model, cfg))


def _build_adafactor(model: nn.Module, cfg: OptimConfig, lr: float) -> torch.optim.Optimizer:
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


def _build_galore(model: nn.Module, cfg: OptimConfig, lr: float) -> torch.optim.Optimizer:
    GaLoreAdamW = import_galore().GaLoreAdamW

    rank = max(1, _hidden_size(model) // 2)
    roles = _roles(model)
    galore, decay, no_decay = [], [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        if p.dim() == 2 and roles.get(id(p)) in ATTENTION_AND_MLP_ROLES:
            galore.append(p)
        elif _decays(p, roles):
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
    betas = (cfg.beta1, cfg.beta2)
    return GaLoreAdamW([g for g in groups if g["params"]], lr=lr, betas=betas, no_deprecation_warning=True)


def _build_sgd_sai(model: nn.Module, cfg: OptimConfig, lr: float) -> torch.optim.Optimizer:
    from adapm.train.sgd_sai import SGDSaI

    return SGDSaI(_decay_groups(model, cfg.weight_decay), lr=lr, momentum=cfg.beta1)


BUILDERS: dict[str, Callable[[nn.Module, OptimConfig, float], torch.optim.Optimizer]] = {
    "adamw": _build_adamw,
    "adamw-8bit": _build_adamw_8bit,
    "adam-mini": _build_adam_mini,
    "adafactor": _build_adafactor,
    "galore": _build_galore,
    "sgd-sai": _build_sgd_sai,
    "adapm": lambda model, cfg, lr: _build_adapm(model, cfg, lr, adapm.AdaPM),
    "adapm-mini": lambda model, cfg, lr: _build_adapm(model, cfg, lr, adapm.AdaPMMini),
}
"""One builder per family of the registry."""

_ADAPM_ONLY = ("rank_ratio", "refresh_every", "tracker", "correction", "update_clip", "clip_scope", "state_dtype",
               "rules", "fused")  # fmt: skip
UNUSED: dict[str, tuple[str, ...]] = {
    "adamw": _ADAPM_ONLY,
    "adamw-8bit": _ADAPM_ONLY,
    "adam-mini": _ADAPM_ONLY,
    "adafactor": ("beta2", *_ADAPM_ONLY),
    "galore": _ADAPM_ONLY,
    "sgd-sai": ("beta2", *_ADAPM_ONLY),
    "adapm": (),
    "adapm-mini": (),
}
"""The :class:`~adapm.train.config.OptimConfig` settings each family's builder does not read."""


def unused_settings(cfg: OptimConfig) -> list[str]:
    """The settings of ``cfg`` changed from their defaults that its optimizer does not use, as
    ``name=value``."""
    defaults = OptimConfig()
    unused = UNUSED.get(registry.get(cfg.optimizer).family, ())
    return [f"{k}={getattr(cfg, k)!r}" for k in unused if getattr(cfg, k) != getattr(defaults, k)]


def resolved_config(cfg: OptimConfig) -> OptimConfig:
    """``cfg`` with the settings its registry variant fixes (where ``cfg`` left them at the default)."""
    spec = registry.get(cfg.optimizer)
    defaults = OptimConfig()
    fixed = {k: v for k, v in spec.settings.items() if getattr(cfg, k) == getattr(defaults, k)}
    return dataclasses.replace(cfg, **fixed) if fixed else cfg


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """The optimizer ``cfg.optimizer`` for ``model`` (lr: ``cfg.lr`` or the optimizer's default).

    Raises:
        ValueError: an unknown optimizer name, one without a builder, or one whose package is not installed.

    Warns:
        UserWarning: ``cfg`` changes settings the optimizer does not use (see :func:`unused_settings`).
    """
    spec = registry.get(cfg.optimizer)
    registry.require(cfg.optimizer)
    builder = BUILDERS.get(spec.family)
    if builder is None:
        raise ValueError(f"Invalid optimizer: {cfg.optimizer!r} has no builder for family {spec.family!r}")
    unused = unused_settings(cfg)
    if unused:
        warnings.warn(
            f"{cfg.optimizer} does not use {', '.join(unused)}: they have no effect on its run (the AdaPM settings "
            "apply to adapm optimizers only; adafactor and sgd-sai have no beta2)",
            stacklevel=2,
        )
    cfg = resolved_config(cfg)
    lr = cfg.lr if cfg.lr is not None else registry.default_lr(cfg.optimizer, blockwise=cfg.lr_ratios is not None)
    return builder(model, cfg, lr)


def import_quiet(module: str) -> Any:
    """``module`` (``galore_torch`` or ``bitsandbytes``), imported with bitsandbytes' import-time warnings
    (about 4-bit CPU kernels neither uses) silenced."""
    import importlib
    import logging

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    return importlib.import_module(module)


def import_galore() -> Any:
    """``galore_torch``, imported quietly (see :func:`import_quiet`)."""
    return import_quiet("galore_torch")


def optimizer_safe_globals(load_galore: bool = False) -> list[Any]:
    """Classes that optimizer states hold besides tensors (GaLore keeps projector objects). GaLore is
    only imported where it already is (a GaLore run built its optimizer first) or ``load_galore`` asks."""
    if "galore_torch" not in sys.modules and not load_galore:
        return []
    try:
        import_galore()
        from galore_torch.galore_projector import GaLoreProjector
    except ImportError:
        return []
    return [GaLoreProjector]
