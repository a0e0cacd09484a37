"""Optimizer state of PEFT fine-tuning at real size: LoRA on every linear layer, alone and with the embeddings and
the LM head trained whole (``modules_to_save``, as when tokens are added). AdamW's state, and AdaPM's and
AdaPM-mini's in % of it, counted on the meta device through each optimizer's own allocation (nothing downloaded,
nothing allocated); the models' shapes are those of ``benchmarks/families.py``.

    python benchmarks/peft_state.py --json docs/benchmarks/peft_state.json   # writes peft_state.md beside it
    python benchmarks/peft_state.py --quick                                  # one model
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info, markdown_table
from families import FAMILIES

from adapm.train.memory import count_state_bytes, model_from_config

MODELS = ("llama", "mistral", "qwen2")
"""Families whose real-size shape is counted (:data:`families.FAMILIES`)."""

SETUPS: dict[str, dict[str, Any]] = {
    "LoRA r=16, all linear layers": {"r": 16, "target_modules": "all-linear"},
    "LoRA r=16 + embeddings and head trained": {"r": 16, "target_modules": "all-linear",
                                                "modules_to_save": ["embed_tokens", "lm_head"]},
}  # fmt: skip
"""PEFT configurations (``peft.LoraConfig`` keyword arguments)."""

COLUMNS = [("checkpoint", "{}"), ("setup", "{}"), ("trained_m", "{:,.1f}M"), ("adamw_gib", "{:.2f} GiB"),
           ("adapm_pct", "{:.1f}%"), ("adapm_mini_pct", "{:.1f}%"), ("adapm_mini_gib", "{:.2f} GiB")]  # fmt: skip


def measure(family: str, setup: str) -> dict[str, Any]:
    """One model under one PEFT setup: trained parameters and each optimizer's state."""
    import peft
    from transformers import AutoConfig

    checkpoint, full, _ = FAMILIES[family]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(model_from_config(AutoConfig.for_model(**full), device="meta"),
                                    peft.LoraConfig(**SETUPS[setup]))  # fmt: skip
    state = {name: count_state_bytes(model, name) for name in ("adamw", "adapm", "adapm-mini")}
    return {
        "family": family,
        "checkpoint": checkpoint,
        "setup": setup,
        "trained_m": sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6,
        "adamw_gib": state["adamw"] / 2**30,
        "adapm_pct": 100.0 * state["adapm"] / state["adamw"],
        "adapm_mini_pct": 100.0 * state["adapm-mini"] / state["adamw"],
        "adapm_mini_gib": state["adapm-mini"] / 2**30,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, help="also write this JSON and a .md table beside it")
    parser.add_argument("--quick", action="store_true", help="one model (Llama-2 7B)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    rows = [measure(family, setup) for family in MODELS[: 1 if args.quick else None] for setup in SETUPS]
    table = markdown_table(rows, COLUMNS)
    print(table)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        command = " ".join(["python", "benchmarks/peft_state.py", *sys.argv[1:]])
        args.json.write_text(json.dumps({"command": command, "machine": machine_info(), "rows": rows}, indent=2))
        args.json.with_suffix(".md").write_text(table + "\n")


if __name__ == "__main__":
    main()
