"""Where one optimizer's step spends its time: the torch profiler's operator table for ``optimizer.step()``
on the parameter sets of ``step_time.py`` (gradients pre-filled, seeded), plus the step's median.

    python benchmarks/profile_step.py --optimizer adapm-fixed-fused --threads 2
    python benchmarks/profile_step.py --quick          # GPT-2 20M shapes, a few seconds

The table groups operators into what the cost model of ``step_time.py`` counts (matmuls, the compiled
elementwise kernels, the rest) and prints the per-step milliseconds of each group.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch.profiler import profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info, markdown_table
from step_time import MODELS, OPTIMIZERS, make_optimizer

from adapm.train.models import build_model

GROUPS = (
    ("matmuls", ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::matmul")),
    ("compiled elementwise kernels", ("## Call CompiledFxGraph",)),
    (
        "norms, squares, sums (finite check, block second moments)",
        ("aten::linalg_vector_norm", "aten::_foreach_norm", "aten::mul", "aten::sum"),
    ),
    ("copies", ("aten::copy_", "aten::_to_copy")),
    ("QR / SVD (refreshes)", ("aten::linalg_qr", "aten::_linalg_svd", "aten::linalg_svd")),
)


def group_of(name: str) -> str:
    for label, prefixes in GROUPS:
        if any(name == p or (p.startswith("##") and name.startswith(p)) for p in prefixes):
            return label
    return "everything else (Python, dispatch, small ops)"


def profile_step(model_name: str, optimizer: str, threads: int, steps: int) -> dict[str, Any]:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = build_model(MODELS[model_name], device="cpu")
    gen = torch.Generator().manual_seed(0)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen) * 1e-3
    opt = make_optimizer(optimizer, model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(2):  # state allocation, compilation
            opt.step()
        times = []
        for _ in range(steps):
            t = time.perf_counter()
            opt.step()
            times.append(time.perf_counter() - t)
        with profile() as prof:
            for _ in range(steps):
                opt.step()
    per_group: dict[str, float] = {}
    total = 0.0
    for evt in prof.key_averages():  # self times: each microsecond counted once
        per_group[group_of(evt.key)] = per_group.get(group_of(evt.key), 0.0) + evt.self_cpu_time_total
        total += evt.self_cpu_time_total
    rows = [{"part": k, "ms_per_step": v / 1000 / steps, "share": v / total} for k, v in per_group.items()]
    rows.sort(key=lambda r: -r["ms_per_step"])
    return {
        "model": model_name,
        "optimizer": optimizer,
        "threads": threads,
        "median_ms": 1000 * statistics.median(times),
        "profiled_ms_per_step": total / 1000 / steps,
        "parts": rows,
        "operators": prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="gpt2-124m", help="gpt2-124m or llama-350m")
    parser.add_argument("--optimizer", default="adapm-fixed-fused", help=f"one of {', '.join(OPTIMIZERS)}")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=5, help="timed steps, then as many profiled steps")
    parser.add_argument("--operators", action="store_true", help="also print the profiler's operator table")
    parser.add_argument("--quick", action="store_true", help="GPT-2 20M shapes, 2 steps")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.optimizer not in OPTIMIZERS:
        parser.error(f"--optimizer: unknown optimizer {args.optimizer!r}; choose from {', '.join(OPTIMIZERS)}")
    if args.model not in MODELS:
        parser.error(f"--model: unknown model {args.model!r}; choose from {', '.join(sorted(MODELS))}")
    if args.threads < 1 or args.steps < 1:
        parser.error("--threads and --steps must be at least 1")
    model, steps = ("quick", 2) if args.quick else (args.model, args.steps)
    result = profile_step(model, args.optimizer, args.threads, steps)
    print(markdown_table(result["parts"], [("part", "{}"), ("ms_per_step", "{:.1f}"), ("share", "{:.0%}")]))
    info = machine_info()
    info.update(command=" ".join(sys.argv))
    print(
        f"\n{model}, {args.optimizer}, {args.threads} thread(s): median step {result['median_ms']:.0f} ms "
        f"({steps} steps), profiled {result['profiled_ms_per_step']:.0f} ms per step; "
        f"{info['processor']}, torch {info['torch']}, git {info['git_sha']}"
    )
    if args.operators:
        print(result["operators"])
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"machine": info, **result}, indent=2))


if __name__ == "__main__":
    main()
