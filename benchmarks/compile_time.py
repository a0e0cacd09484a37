"""First-step (compilation) time of AdaPM's ``fused=True`` step, from a cold Inductor cache.

``fused=True`` compiles its kernels on the first step (cached on disk afterwards). This measures that
first step and the next ones on the path an accelerator takes (the grouped step with the device-side
finite check, forced here on CPU), each optimizer in a fresh process with an empty
``TORCHINDUCTOR_CACHE_DIR``, on a model preset's parameters with pre-filled seeded gradients.

    python benchmarks/compile_time.py --json runs/bench/compile_time.json            # GPT-2 124M
    python benchmarks/compile_time.py --models gpt2-124m-4l,gpt2-124m,gpt2-124m-24l  # 4, 12, 24 layers
    python benchmarks/compile_time.py --quick                                        # gpt2-1m, one optimizer
    python benchmarks/compile_time.py --from-json docs/benchmarks/compile_time.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info, markdown_table, saved_rows
from op_count import model_for

import adapm

OPTIMIZERS = ("adapm-fixed-fused", "adapm-mini-fixed-fused")
COLUMNS = [("model", "{}"), ("optimizer", "{}"), ("first_step_s", "{:.1f}"), ("later_step_s", "{:.2f}")]


def one(model_name: str, optimizer: str, steps: int) -> dict[str, Any]:
    """Time ``steps`` steps of one optimizer in this process (the first one compiles)."""
    torch.manual_seed(0)
    model = model_for(model_name)
    params = [p for p in model.parameters() if p.requires_grad]
    cls = adapm.AdaPMMini if optimizer.startswith("adapm-mini") else adapm.AdaPM
    opt = cls(model, lr=1e-4, foreach=True, fused=True, tracker="fixed")
    opt._defer_check = True  # the accelerator path: the finite check stays on the device
    adapm.AdaPM._cpu_row_chunks = False
    gen = torch.Generator().manual_seed(0)
    times = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(steps):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen) * 1e-3
            start = time.perf_counter()
            opt.step()
            times.append(time.perf_counter() - start)
    later = sorted(times[1:])
    return {"model": model_name, "optimizer": optimizer, "first_step_s": times[0],
            "later_step_s": later[len(later) // 2] if later else None, "fused": opt.fused}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="gpt2-124m",
                        help="comma-separated model presets, or gpt2-124m-<N>l (GPT-2 124M's width at depth N)")
    parser.add_argument("--optimizers", default=",".join(OPTIMIZERS))
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="gpt2-1m, adapm-mini-fixed-fused, 2 steps")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--from-json", type=Path, help="print the table of a saved run; no timing")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: time one optimizer (and model) here
    args = parser.parse_args()
    if args.from_json is not None:
        print(markdown_table(saved_rows(parser, args.from_json, "compile_time.py"), COLUMNS))
        return
    if args.steps < 1:
        parser.error(f"--steps must be at least 1 (got {args.steps})")
    torch.set_num_threads(args.threads)
    if args.one:
        print(json.dumps(one(args.models, args.one, args.steps)))
        return
    models, optimizers, steps = args.models.split(","), args.optimizers.split(","), args.steps
    if args.quick:
        models, optimizers, steps = ["gpt2-1m"], ["adapm-mini-fixed-fused"], 2
    unknown = sorted(set(optimizers) - set(OPTIMIZERS))
    if unknown:
        parser.error(f"--optimizers: unknown {unknown}; choose from {list(OPTIMIZERS)}")
    rows = []
    for model, name in ((model, name) for model in models for name in optimizers):
        with tempfile.TemporaryDirectory() as cache:
            env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache, "OMP_NUM_THREADS": str(args.threads)}
            cmd = [sys.executable, __file__, "--models", model, "--one", name, "--steps", str(steps),
                   "--threads", str(args.threads)]  # fmt: skip
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
            if proc.returncode != 0:
                sys.exit(f"compile_time.py: {name} failed:\n{proc.stderr[-3000:]}")
            row = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"{model} {name}: first step {row['first_step_s']:.1f} s", flush=True)
        rows.append(row)
    print(markdown_table(rows, COLUMNS))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        info = {**machine_info(), "threads": args.threads, "steps": steps}
        args.json.write_text(json.dumps({"machine": info, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
