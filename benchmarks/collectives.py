"""All-reduces and ops per optimizer step under FSDP2: the per-block step against the grouped step.

Two processes (gloo, CPU, 1 thread each) shard GPT-2 124M (12 and 24 layers) and Llama 350M with
``fully_shard`` per transformer block; gradients are pre-filled (sharded like the parameters), three
warm-up steps run (state allocation, first refreshes), then one step is profiled on rank 0: the
all-reduces it issues (``c10d::allreduce_``), the blocks refreshed in it (a randomized SVD each, about one
block in ``refresh_every`` per step, 10 all-reduces each) and its top-level aten ops (as
``op_count.py`` counts them; the per-block step without its CPU row chunks, as on an accelerator). On
the per-block step (``foreach=False``) each sharded low-rank segment and each block second-moment
parameter reduces on its own, so the count grows with depth; the grouped step (``foreach=True``, the
default off CPU) reduces once per stack of same-shape blocks.

    python benchmarks/collectives.py --json runs/bench/collectives.json
    python benchmarks/collectives.py --quick                             # gpt2-1m and llama-1m
    python benchmarks/collectives.py --from-json docs/benchmarks/collectives.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info, markdown_table, saved_rows

MODELS = ("gpt2-124m", "gpt2-124m-24l", "llama-350m")
OPTIMIZERS = ("adapm", "adapm-mini")
COLUMNS = [("model", "{}"), ("optimizer", "{}"), ("step", "{}"), ("all_reduces_per_step", "{:,}"),
           ("refreshes", "{}"), ("ops_per_step", "{:,}")]  # fmt: skip


def _count(model_name: str, optimizer: str, grouped: bool) -> dict[str, Any]:
    """One row, run on every rank (the collectives must match); rank 0's counts."""
    import torch.distributed as dist
    from op_count import model_for, top_level_ops
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor
    from torch.profiler import ProfilerActivity, profile

    import adapm

    torch.manual_seed(0)
    model = model_for(model_name)
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    layers = model.transformer.h if hasattr(model, "transformer") else model.model.layers
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    cls = adapm.AdaPMMini if optimizer == "adapm-mini" else adapm.AdaPM
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = cls(model, lr=1e-3, foreach=grouped)
    gen = torch.Generator().manual_seed(dist.get_rank())
    params = [p for p in model.parameters() if p.requires_grad]

    def fill() -> None:
        for p in params:
            piece = torch.randn(p.to_local().shape, generator=gen) * 1e-3
            p.grad = DTensor.from_local(piece, p.device_mesh, p.placements, shape=p.shape, stride=p.stride())

    for _ in range(3):
        fill()
        opt.step()
    fill()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        opt.step()
    reduces = sum(1 for e in prof.events() if e.name == "c10d::allreduce_")
    refreshes = sum(1 for e in prof.events() if e.name == "aten::linalg_svd")  # one randomized SVD each
    fill()
    ops = top_level_ops(opt.step)[0]
    return {"model": model_name, "optimizer": optimizer, "step": "grouped" if grouped else "per-block",
            "all_reduces_per_step": reduces, "refreshes": refreshes, "ops_per_step": ops}  # fmt: skip


def worker(models: list[str], optimizers: list[str], out: Path) -> None:
    import torch.distributed as dist

    import adapm

    torch.set_num_threads(1)
    adapm.AdaPM._cpu_row_chunks = False  # the per-block step as on an accelerator (no CPU row chunks)
    dist.init_process_group("gloo")
    try:
        rows = []
        for model_name in models:
            for optimizer in optimizers:
                for grouped in (False, True):
                    rows.append(_count(model_name, optimizer, grouped))
                    if dist.get_rank() == 0:
                        print(f"{model_name} {optimizer} {rows[-1]['step']}: {rows[-1]['all_reduces_per_step']} "
                              f"all-reduces, {rows[-1]['ops_per_step']:,} ops", flush=True)  # fmt: skip
        if dist.get_rank() == 0:
            out.write_text(json.dumps(rows))
        dist.barrier()  # no rank leaves while another's collectives are pending (gloo aborts at exit)
    finally:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--optimizers", default=",".join(OPTIMIZERS))
    parser.add_argument("--quick", action="store_true", help="gpt2-1m and llama-1m")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--from-json", type=Path, help="print the table of a saved run; no counting")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)  # set when run under torchrun
    args = parser.parse_args()
    if args.quick:
        args.models = "gpt2-1m,llama-1m"
    models, optimizers = args.models.split(","), args.optimizers.split(",")
    if args.worker:
        worker(models, optimizers, args.worker)
        return
    if args.from_json:
        print(markdown_table(saved_rows(parser, args.from_json, "collectives.py"), COLUMNS))
        return
    for name in optimizers:
        if name not in OPTIMIZERS:
            parser.error(f"--optimizers: unknown optimizer {name!r}; choose from {', '.join(OPTIMIZERS)}")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rows.json"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error"}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__,
               "--models", args.models, "--optimizers", args.optimizers, "--worker", str(out)]  # fmt: skip
        subprocess.run(cmd, check=True, env=env)
        rows = json.loads(out.read_text())
    print(markdown_table(rows, COLUMNS))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        info = {**machine_info(), "processes": 2, "threads": 1, "command": " ".join(sys.argv)}
        args.json.write_text(json.dumps({"machine": info, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
