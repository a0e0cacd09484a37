"""Which transformers architectures the partition recognises: every causal language model type and every
image-text-to-text (multimodal) model type the installed transformers knows, built from its default config on the
meta device (nothing allocated, nothing downloaded), and the matrices of each that match no preset or whose fused
layout is kept whole.

    python benchmarks/coverage.py --json docs/benchmarks/coverage.json   # writes coverage.md beside it
    python benchmarks/coverage.py --task causal-lm --model-types llama,qwen3_next   # a few only
    python benchmarks/coverage.py --quick                                 # llama, qwen3_next, xlnet; qwen2_5_vl

A model type whose default config transformers itself cannot build is listed as ``not built`` with the
error, and counted apart.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import warnings
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info, markdown_table

import adapm

TASKS = {"causal-lm": ("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "AutoModelForCausalLM", "causal language model"),
         "image-text-to-text": ("MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES", "AutoModelForImageTextToText",
                                "image-text-to-text model")}  # fmt: skip
"""The kinds of model surveyed: transformers' model-type table of each, its auto class, and what the summary calls
one."""

QUICK = {"causal-lm": ("llama", "qwen3_next", "xlnet"), "image-text-to-text": ("qwen2_5_vl",)}
"""The model types of ``--quick``: one plain, one with fused linear attention and experts, one not recognised; one
multimodal model with a vision tower."""


def model_types(task: str) -> list[str]:
    """Every model type of ``task`` that the installed transformers knows."""
    from transformers.models.auto import modeling_auto

    return sorted(getattr(modeling_auto, TASKS[task][0]))


def survey(model_type: str, task: str = "causal-lm") -> dict[str, Any]:
    """One model type: its parameters, the names (layer indices folded to ``N``) of the matrices the partition
    leaves at AdamW's state, and their share of the parameters."""
    import transformers

    row: dict[str, Any] = {"task": task, "model_type": model_type}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            config = transformers.AutoConfig.for_model(model_type)
            with torch.device("meta"):
                model = getattr(transformers, TASKS[task][1]).from_config(config)
    except Exception as exc:  # transformers' own default config or model code failed: not ours to judge
        return {**row, "built": False, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = adapm.AdaPMMini(model, lr=1e-3, strict=False).partition_report()
    left = sorted({re.sub(r"\.\d+\.", ".N.", n) for n in report.unmatched})
    numel = {n: p.numel() for n, p in model.named_parameters()}
    total = sum(numel.values())
    return {
        **row,
        "built": True,
        "class": type(model).__name__,
        "parameters_m": total / 1e6,
        "unrecognised": len(report.unmatched),
        "unrecognised_pct": 100.0 * sum(numel.get(n, 0) for n in report.unmatched) / total,
        "names": left,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, help="also write this JSON and a .md table beside it")
    parser.add_argument("--task", choices=[*TASKS, "all"], default="all", help="which kinds of model (default: all)")
    parser.add_argument("--model-types", help="comma-separated model types (default: every type of the task)")
    parser.add_argument("--quick", action="store_true",
                        help="only " + "; ".join(", ".join(types) for types in QUICK.values()))  # fmt: skip
    args = parser.parse_args()
    torch.set_num_threads(2)
    tasks = list(TASKS) if args.task == "all" else [args.task]
    chosen = args.model_types.split(",") if args.model_types else None
    if chosen:
        known = {t for task in tasks for t in model_types(task)}
        unknown = [t for t in chosen if t not in known]
        if unknown:
            parser.error(f"--model-types: not {' or '.join(TASKS[t][2] for t in tasks)} types of this transformers: "
                         f"{', '.join(unknown)}")  # fmt: skip
    rows = []
    for task in tasks:
        types = list(QUICK[task]) if args.quick else model_types(task)
        for model_type in types if chosen is None else [t for t in types if t in chosen]:
            row = survey(model_type, task)
            rows.append(row)
            print(json.dumps(row), flush=True)
    summary, parts = {}, []
    for task in tasks:
        task_rows = [r for r in rows if r["task"] == task]
        built = [r for r in task_rows if r["built"]]
        complete = [r for r in built if r["unrecognised"] == 0]
        summary[task] = {"model_types": len(task_rows), "built": len(built), "complete": len(complete),
                         "partial": len(built) - len(complete), "not_built": len(task_rows) - len(built)}  # fmt: skip
        partial = [{**r, "names": ", ".join(r["names"][:4]) + (" ..." if len(r["names"]) > 4 else "")}
                   for r in built if r["unrecognised"]]  # fmt: skip
        table = markdown_table(partial, [("model_type", "{}"), ("parameters_m", "{:,.0f}M"), ("unrecognised", "{}"),
                                         ("unrecognised_pct", "{:.1f}%"), ("names", "{}")])  # fmt: skip
        counts = summary[task]
        parts.append(f"{counts['model_types']} {TASKS[task][2]} types; {counts['built']} built from their default "
                     f"config; every matrix recognised in {counts['complete']}, some left at AdamW's state in "
                     f"{counts['partial']}" + (f":\n\n{table}\n" if partial else ".\n"))  # fmt: skip
    text = "\n".join(parts)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        info = {**machine_info(), "command": " ".join(sys.argv)}
        args.json.write_text(json.dumps({"machine": info, "summary": summary, "rows": rows}, indent=2))
        args.json.with_suffix(".md").write_text(text)


if __name__ == "__main__":
    main()
