"""Optimizer-state bytes at paper scale, counted on the meta device without allocating anything.

Every optimizer is built by :func:`adapm.train.optimizers.build_optimizer`, exactly as for training,
on a meta-device model with meta gradients; its state is then created by its own code (one ``step()``
for the baselines, :meth:`adapm.AdaPM.init_state` for AdaPM) and counted with
:func:`adapm.state_bytes`. Nothing is allocated, so GPT-2 1.5B and Llama 7B take seconds.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

import adapm
from adapm.train.config import OptimConfig
from adapm.train.models import MODEL_PRESETS, build_model
from adapm.train.optimizers import build_optimizer
from adapm.train.registry import PAPER_OPTIMIZERS

PAPER_TABLE2: dict[str, dict[str, float]] = {
    "llama-350m": {"adamw": 2.72e9, "adam-mini": 1.36e9, "adapm": 1.48e9, "adapm-mini": 0.12e9},
    "gpt2-1.5b": {"adamw": 12.48e9, "adam-mini": 6.24e9, "adapm": 6.98e9, "adapm-mini": 0.74e9},
}
"""The paper's Table 2 (float32 states, 1G = 1e9 bytes); its 'Adam' column is our adamw."""


@dataclass(frozen=True)
class MemoryRow:
    """One optimizer's state bytes for one model."""

    optimizer: str
    state_bytes: int
    ratio_to_adamw: float
    paper_bytes: float | None = None


def meta_model(name: str) -> nn.Module:
    """A preset (paper vocabulary) or a local HF config directory, built on the meta device."""
    if name in MODEL_PRESETS:
        return build_model(name, device="meta")
    path = Path(name).expanduser()
    if (path / "config.json").is_file():
        from transformers import AutoConfig, AutoModelForCausalLM

        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(path), local_files_only=True))
    raise ValueError(
        f"Invalid model: {name!r}; expected a preset {sorted(MODEL_PRESETS)} or a local HF model directory"
    )


def count_state_bytes(model: nn.Module, optimizer: str, cfg: OptimConfig | None = None) -> int:
    """State bytes of ``optimizer`` on ``model`` through the optimizer's own allocation code.

    ``model`` may live on the meta device (nothing is allocated) or be real (then a real, zero-gradient
    step is taken on a copy-free basis: gradients are set to zeros and parameters are restored).
    """
    cfg = cfg or OptimConfig(optimizer=optimizer)
    if cfg.optimizer != optimizer:
        cfg = OptimConfig(**{**cfg.__dict__, "optimizer": optimizer})
    params = [p for p in model.parameters() if p.requires_grad]
    saved = [p.detach().clone() for p in params] if not params[0].is_meta else None
    for p in params:
        p.grad = torch.zeros_like(p)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = build_optimizer(model, cfg)
        if isinstance(opt, adapm.AdaPM):
            opt.init_state()
        else:
            opt.step()
    nbytes = adapm.state_bytes(opt)
    with torch.no_grad():
        for i, p in enumerate(params):
            p.grad = None
            if saved is not None:
                p.copy_(saved[i])
    return nbytes


def memory_table(name: str, optimizers: tuple[str, ...] = PAPER_OPTIMIZERS) -> list[MemoryRow]:
    """State bytes of each optimizer for model ``name``, with the paper's Table 2 value where it has one."""
    model = meta_model(name)
    counts = {opt: count_state_bytes(model, opt) for opt in optimizers}
    adamw = counts["adamw"] if "adamw" in counts else count_state_bytes(model, "adamw")
    paper = PAPER_TABLE2.get(name, {})
    return [MemoryRow(opt, n, n / adamw, paper.get(opt)) for opt, n in counts.items()]


def format_memory_table(name: str, rows: list[MemoryRow]) -> str:
    """A Markdown table of :func:`memory_table` rows."""
    params = sum(p.numel() for p in meta_model(name).parameters())
    has_paper = any(r.paper_bytes is not None for r in rows)
    head = "| optimizer | state (ours) | vs AdamW |" + (" paper Table 2 | ours / paper |" if has_paper else "")
    sep = "|---|---:|---:|" + ("---:|---:|" if has_paper else "")
    lines = [f"{name}: {params / 1e6:,.1f}M parameters, float32 state, 1 GB = 1e9 bytes", "", head, sep]
    for r in rows:
        line = f"| {r.optimizer} | {r.state_bytes / 1e9:.3f} GB | {100 * r.ratio_to_adamw:.1f}% |"
        if has_paper:
            line += (
                f" {r.paper_bytes / 1e9:.2f} GB | {r.state_bytes / r.paper_bytes:.2f} |"
                if r.paper_bytes
                else " - | - |"
            )
        lines.append(line)
    return "\n".join(lines)
