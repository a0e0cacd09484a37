"""The one list of optimizers the harness knows: name -> family, default learning rates, settings.

Everything that names an optimizer (the configs, the CLI, ``adapm memory``, the side-by-side runners,
the benchmarks and experiments) reads this module; :func:`adapm.train.optimizers.build_optimizer` has
one builder per *family* and refuses a name without one. A variant (e.g. ``adamw-blr``) is a family
plus settings of :class:`adapm.train.config.OptimConfig`.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

LR_TABLE_PATH = Path(__file__).with_name("lr_table.json")
"""Swept pretraining lrs by model preset and optimizer, written by ``benchmarks/lr_table.py``."""


@dataclass(frozen=True)
class OptimizerSpec:
    """One optimizer of the harness."""

    name: str
    family: str
    """The builder: adamw, adamw-8bit, adam-mini, adafactor, galore, sgd-sai, adapm or adapm-mini."""
    pretrain_lr: float
    """Default peak lr for pretraining the small CPU presets."""
    finetune_lr: float
    """Default peak lr for fine-tuning a pretrained model (`adapm sft`, `adapm rlhf`)."""
    summary: str
    settings: dict[str, Any] = field(default_factory=dict)
    """OptimConfig values this variant fixes (e.g. ``lr_ratios="blockwise"``)."""
    extra: str | None = None
    """The pip package the family needs beyond torch and transformers, if any."""
    lr_of: str | None = None
    """A variant that trains at another name's swept lr (e.g. bf16 state at its fp32 form's lr)."""


_BLR = {"lr_ratios": "blockwise"}
_BF16 = {"state_dtype": "bf16"}
_INT8 = {"state_dtype": "int8"}

_SPECS = (
    OptimizerSpec("adamw", "adamw", 3e-3, 2e-5, "torch.optim.AdamW, decay on matrices only"),
    OptimizerSpec("adam-mini", "adam-mini", 3e-3, 2e-5, "the official Adam-mini", extra="adam-mini"),
    OptimizerSpec("adamw-8bit", "adamw-8bit", 3e-3, 2e-5, "bitsandbytes' AdamW8bit: block-wise 8-bit moments",
                  extra="bitsandbytes", lr_of="adamw"),
    OptimizerSpec("adafactor", "adafactor", 1e-2, 1e-4, "transformers' Adafactor with momentum 0.9"),
    OptimizerSpec("galore", "galore", 1e-2, 1e-4, "GaLore AdamW (rank dim/2, gap 200)", extra="galore-torch"),
    OptimizerSpec("adapm", "adapm", 3e-3, 2e-5, "AdaPM: partial momentum, full second moment"),
    OptimizerSpec("adapm-mini", "adapm-mini", 3e-3, 2e-5, "AdaPM-mini: partial momentum, block second moments"),
    OptimizerSpec("sgd-sai", "sgd-sai", 3e-3, 2e-5, "SGD-SaI: momentum SGD, per-tensor lr scaled once by the g-SNR"),
    OptimizerSpec("adamw-blr", "adamw", 5e-4, 5e-6, "AdamW with block-wise learning rates", settings=_BLR),
    OptimizerSpec("adam-mini-blr", "adam-mini", 5e-4, 5e-6, "Adam-mini with block-wise learning rates",
                  settings=_BLR, extra="adam-mini"),
    OptimizerSpec("adapm-blr", "adapm", 5e-4, 5e-6, "AdaPM with block-wise learning rates", settings=_BLR),
    OptimizerSpec("adapm-mini-blr", "adapm-mini", 5e-4, 5e-6, "AdaPM-mini with block-wise learning rates",
                  settings=_BLR),
    OptimizerSpec("adapm-bf16", "adapm", 3e-3, 2e-5, "AdaPM with its large state stored in bf16", settings=_BF16,
                  lr_of="adapm"),
    OptimizerSpec("adapm-mini-bf16", "adapm-mini", 3e-3, 2e-5, "AdaPM-mini with its large state stored in bf16",
                  settings=_BF16, lr_of="adapm-mini"),
    OptimizerSpec("adapm-int8", "adapm", 3e-3, 2e-5, "AdaPM with its large state stored in 8 bits", settings=_INT8,
                  lr_of="adapm"),
    OptimizerSpec("adapm-mini-int8", "adapm-mini", 3e-3, 2e-5, "AdaPM-mini with its large state stored in 8 bits",
                  settings=_INT8, lr_of="adapm-mini"),
)

REGISTRY: dict[str, OptimizerSpec] = {spec.name: spec for spec in _SPECS}
OPTIMIZER_NAMES: tuple[str, ...] = tuple(REGISTRY)
"""Every optimizer name, in the order tables list them."""
BLOCKWISE_LR_FAMILIES: tuple[str, ...] = ("adamw", "adam-mini", "adapm", "adapm-mini")
"""The families whose builders take block-wise learning rates (``lr_ratios``)."""
PAPER_OPTIMIZERS: tuple[str, ...] = ("adamw", "adam-mini", "adafactor", "galore", "adapm", "adapm-mini")
"""The optimizers of the paper's comparison (the default set of benchmarks and `adapm memory`)."""


def get(name: str, flag: str = "optimizer") -> OptimizerSpec:
    """The spec of ``name``; an unknown name is a ``ValueError`` naming ``flag`` and the choices."""
    spec = REGISTRY.get(name)
    if spec is None:
        raise ValueError(f"Invalid {flag}: {name!r}; expected one of {', '.join(OPTIMIZER_NAMES)}")
    return spec


def missing_package(name: str) -> str | None:
    """The pip package that optimizer ``name`` needs and that is not installed (None if nothing is missing)."""
    extra = get(name).extra
    if extra is None or importlib.util.find_spec(extra.replace("-", "_")) is not None:
        return None
    return extra


def require(name: str, flag: str = "optimizer") -> None:
    """A ``ValueError`` naming ``flag`` and the pip package when ``name`` needs one that is not installed."""
    extra = missing_package(name)
    if extra is not None:
        raise ValueError(
            f"Invalid {flag}: {name} needs the {extra} package, which is not installed: "
            f"pip install 'adapm[baselines]' (or pip install {extra})"
        )


def parse_names(text: str, flag: str = "optimizers") -> list[str]:
    """A comma-separated list of known names (at least one, each once), whose packages are installed."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise ValueError(f"Invalid {flag}: {text!r}; expected at least one name")
    for i, name in enumerate(names):
        get(name, flag)
        require(name, flag)
        if name in names[:i]:
            raise ValueError(f"Invalid {flag}: {text!r}; {name} is listed twice (each run needs its own name)")
    return names


@cache
def swept() -> dict[str, dict[str, float]]:
    """The lr table: the best lr of a sweep, by model preset and optimizer (empty if it is missing)."""
    return json.loads(LR_TABLE_PATH.read_text())["lrs"] if LR_TABLE_PATH.exists() else {}


def lr_with_source(
    name: str, finetune: bool = False, model: str | None = None, blockwise: bool = False
) -> tuple[float, str]:
    """The default peak lr of ``name`` and where it comes from: for pretraining a preset the lr table
    swept it for, that lr ("swept"); else the registry's default ("default"). ``blockwise``: the run
    sets block-wise lrs itself (``lr_ratios``), so a plain name takes the base lr of its family's
    ``-blr`` variant, which the multipliers (up to x10) were tuned with."""
    spec = get(name)
    if blockwise and "lr_ratios" not in spec.settings:
        spec = REGISTRY.get(f"{spec.family}-blr", spec)
    if finetune:
        return spec.finetune_lr, "default"
    best = swept().get(model or "", {}).get(spec.lr_of or spec.name)
    if best is not None:
        return float(best), f"swept for {model}"
    return spec.pretrain_lr, "default"


def default_lr(name: str, finetune: bool = False, model: str | None = None, blockwise: bool = False) -> float:
    """The default peak lr of ``name`` for pretraining ``model`` (or fine-tuning): see :func:`lr_with_source`."""
    return lr_with_source(name, finetune, model, blockwise)[0]
