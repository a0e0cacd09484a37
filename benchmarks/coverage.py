"""Which transformers architectures the partition recognises: every causal language model type the installed
transformers knows, built from its default config on the meta device (nothing allocated, nothing downloaded),
and the matrices of each that match no preset or whose fused layout is kept whole.

    python benchmarks/coverage.py --json docs/benchmarks/coverage.json   # writes coverage.md beside it
    python benchmarks/coverage.py --model-types llama,qwen3_next          # a few only
    python benchmarks/coverage.py --quick                                 # llama, qwen3_next, ctrl

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

QUICK = ("llama", "qwen3_next", "ctrl")
"""The model types of ``--quick``: one plain, one with fused linear attention and experts, one not recognised."""


def survey(model_type: str) -> dict[str, Any]:
    """One model type: its parameters, the names (layer indices folded to ``N``) of the matrices the partition
    leaves at AdamW's state, and their share of the parameters."""
    import transformers

    row: dict[str, Any] = {"model_type": model_type}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            config = transformers.AutoConfig.for_model(model_type)
            with torch.device("meta"):
                model = transformers.AutoModelForCausalLM.from_config(config)
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
    parser.add_argument("--model-types", help="comma-separated model types (default: every causal LM type)")
    parser.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK)}")
    args = parser.parse_args()
    torch.set_num_threads(2)
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    types = args.model_types.split(",") if args.model_types else sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    types = list(QUICK) if args.quick else types
    unknown = [t for t in types if t not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES]
    if unknown:
        parser.error(f"--model-types: not causal language model types of this transformers: {', '.join(unknown)}")
    rows = []
    for model_type in types:
        row = survey(model_type)
        rows.append(row)
        print(json.dumps(row), flush=True)
    built = [r for r in rows if r["built"]]
    complete = [r for r in built if r["unrecognised"] == 0]
    summary = {"model_types": len(rows), "built": len(built), "complete": len(complete),
               "partial": len(built) - len(complete), "not_built": len(rows) - len(built)}  # fmt: skip
    partial = [{**r, "names": ", ".join(r["names"][:4]) + (" ..." if len(r["names"]) > 4 else "")}
               for r in built if r["unrecognised"]]  # fmt: skip
    table = markdown_table(partial, [("model_type", "{}"), ("parameters_m", "{:,.0f}M"), ("unrecognised", "{}"),
                                     ("unrecognised_pct", "{:.1f}%"), ("names", "{}")])  # fmt: skip
    text = (f"{summary['model_types']} causal language model types; {summary['built']} built from their default "
            f"config; every matrix recognised in {summary['complete']}, some left at AdamW's state in "
            f"{summary['partial']}:\n\n{table}\n")  # fmt: skip
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        info = {**machine_info(), "command": " ".join(sys.argv)}
        args.json.write_text(json.dumps({"machine": info, "summary": summary, "rows": rows}, indent=2))
        args.json.with_suffix(".md").write_text(text)


if __name__ == "__main__":
    main()
