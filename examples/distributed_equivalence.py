"""Run AdaPM under DDP and FSDP2 (2 processes, gloo, CPU) against a single-process run and print the
table in docs/distributed.md. It drives tests/distributed/worker.py, the same code the test suite runs.

    python examples/distributed_equivalence.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

WORKER = Path(__file__).resolve().parent.parent / "tests" / "distributed" / "worker.py"


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "eq.json"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error"}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(WORKER)]
        subprocess.run([*cmd, "equivalence", str(out), "all"], check=True, env=env, capture_output=True)
        rows = [r for r in json.loads(out.read_text()) if "model" in r]
    print("20 steps, global batch 4 x 16 tokens split over 2 ranks; relative differences to one process")
    print("(params: ||a - b|| / ||a|| over all parameters; 'excl.' leaves out GPT-2's fused QKV bias, whose")
    print("key part has an exactly zero true gradient)\n")
    print(
        "| model | optimizer | DDP loss | DDP params | DDP params excl. | FSDP2 loss | FSDP2 params | "
        "FSDP2 params excl. | worst FSDP2 tensor |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        name = r["optimizer"] + (f" ({r['tracker']})" if r["tracker"] in ("gd", "fixed") else "")
        worst, worst_rel = r["fsdp_worst_tensor"]
        print(
            f"| {r['model']} | {name} | {r['ddp_loss_rel']:.1e} | {r['ddp_param_rel']:.1e} | "
            f"{r['ddp_param_rel_excl']:.1e} | {r['fsdp_loss_rel']:.1e} | {r['fsdp_param_rel']:.1e} | "
            f"{r['fsdp_param_rel_excl']:.1e} | {worst} {worst_rel:.1e} |"
        )


if __name__ == "__main__":
    main()
