"""Construction time of AdaPM and AdaPM-mini (the partition, one param group a parameter, the layouts and the
report's check) beside torch's AdamW, on real-size models built on the meta device (nothing allocated).

It grows with the number of parameter tensors: a LitGPT mixture of experts keeps each expert's matrices apart (18,771
tensors in Qwen3-30B-A3B), a Hugging Face one stacks them. Medians of ``--repeats`` constructions, one thread.

    python benchmarks/construction_time.py --json docs/benchmarks/construction_time.json   # writes the .md beside it
    python benchmarks/construction_time.py --quick                                         # two small models
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info, markdown_table

import adapm

COLUMNS = [("model", "{}"), ("tensors", "{:,}"), ("optimizer", "{}"), ("median_s", "{:.3f}"), ("vs_adamw", "{:.1f}x")]


def _litgpt(name: str, **sizes: int) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        from litgpt import GPT, Config

        return GPT(Config.from_name(name, **sizes))

    return build


def _hf(model_type: str, **sizes: int) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        from transformers import AutoConfig, AutoModelForCausalLM

        return AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **sizes))

    return build


MODELS: dict[str, Callable[[], nn.Module]] = {
    "HF GPT-2 124M": _hf("gpt2"),
    "HF Qwen3-MoE (default config)": _hf("qwen3_moe"),
    "LitGPT Llama-3.1-8B": _litgpt("Llama-3.1-8B"),
    "LitGPT Qwen3-30B-A3B": _litgpt("Qwen3-30B-A3B"),
}
QUICK: dict[str, Callable[[], nn.Module]] = {
    "HF GPT-2 (2 layers)": _hf("gpt2", n_layer=2),
    "LitGPT Qwen3-30B-A3B (2 layers)": _litgpt("Qwen3-30B-A3B", n_layer=2),
}
OPTIMIZERS: dict[str, Callable[[nn.Module], Any]] = {
    "adamw": lambda model: torch.optim.AdamW(model.parameters(), lr=1e-3),
    "adapm": lambda model: adapm.AdaPM(model, lr=1e-3, strict=False),
    "adapm-mini": lambda model: adapm.AdaPMMini(model, lr=1e-3, strict=False),
}


def measure(label: str, build: Callable[[], nn.Module], repeats: int) -> list[dict[str, Any]]:
    """The median construction time of each optimizer on one model, and its ratio to AdamW's."""
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build()
    tensors = sum(1 for _ in model.parameters())
    medians = {}
    for name, make in OPTIMIZERS.items():
        times = []
        for _ in range(repeats):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the partition's notes on what it does not recognise
                start = time.perf_counter()
                make(model)
                times.append(time.perf_counter() - start)
        medians[name] = statistics.median(times)
    return [{"model": label, "tensors": tensors, "optimizer": name, "median_s": seconds,
             "vs_adamw": seconds / max(medians["adamw"], 1e-9)} for name, seconds in medians.items()]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="write the rows here (and a Markdown table beside it)")
    parser.add_argument("--repeats", type=int, default=3, help="constructions per optimizer and model (median)")
    parser.add_argument("--quick", action="store_true", help="two small models, one construction each")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    torch.set_num_threads(1)
    models = QUICK if args.quick else MODELS
    repeats = 1 if args.quick else args.repeats
    rows = [row for label, build in models.items() for row in measure(label, build, repeats)]
    table = markdown_table(rows, COLUMNS)
    print(table)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        result = {"command": " ".join(["python", "benchmarks/construction_time.py", *sys.argv[1:]]),
                  "machine": machine_info(), "threads": 1, "repeats": repeats, "rows": rows}  # fmt: skip
        args.json.write_text(json.dumps(result, indent=2))
        args.json.with_suffix(".md").write_text(table + "\n")


if __name__ == "__main__":
    main()
