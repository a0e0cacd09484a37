"""Peak process memory of full training steps (forward, backward, optimizer step) of GPT-2 124M at a
small batch, one fresh subprocess per optimizer, and whether each saving against AdamW is the
saving in optimizer-state bytes (Adam-mini's users saw savings only in checkpoints; this shows
whether they are real in a running process).

    python benchmarks/peak_memory.py --json runs/bench/peak_memory.json
    python benchmarks/peak_memory.py --quick          # GPT-2 20M shapes, within a minute

Peak RSS of one process moves by tens of MB from run to run (allocator arenas, page timing), so
each optimizer runs ``--repeats`` times, rounds interleaved, and the table shows the median with
the min-max range.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info, markdown_table

from adapm.train.registry import OPTIMIZER_NAMES, PAPER_OPTIMIZERS


def worker(optimizer: str, model_name: str, steps: int, batch: int, seq: int) -> dict[str, float]:
    """Runs in the subprocess: build, train ``steps`` steps, report peak RSS and state bytes."""
    import torch

    import adapm
    from adapm.train.config import OptimConfig
    from adapm.train.loop import peak_rss_bytes
    from adapm.train.models import build_model
    from adapm.train.optimizers import build_optimizer

    torch.manual_seed(0)
    model = build_model(model_name, device="cpu")
    x = torch.randint(0, model.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    model(input_ids=x, labels=x).loss.backward()  # gradients exist before the optimizer: same base for all
    model.zero_grad(set_to_none=True)
    before = peak_rss_bytes()
    opt = build_optimizer(model, OptimConfig(optimizer=optimizer, lr=1e-5))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(steps):
            model(input_ids=x, labels=x).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    return {
        "optimizer": optimizer,
        "peak_rss_bytes": peak_rss_bytes(),  # this process only (ru_maxrss would include the parent)
        "peak_rss_before_optimizer_bytes": before,
        "state_bytes": adapm.state_bytes(opt),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="gpt2-124m")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--optimizers", default=",".join(PAPER_OPTIMIZERS))
    parser.add_argument(
        "--repeats", type=int, default=None, help="fresh processes per optimizer, median (default 3; 1 with --quick)"
    )
    parser.add_argument("--quick", action="store_true", help="GPT-2 20M shapes, 1 step")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.model, args.steps = "gpt2-20m", 1
    if args.repeats is None:
        args.repeats = 1 if args.quick else 3
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    if args.worker:
        import torch

        torch.set_num_threads(args.threads)
        print(json.dumps(worker(args.worker, args.model, args.steps, args.batch, args.seq)))
        return
    names = args.optimizers.split(",")
    for name in names:
        if name not in OPTIMIZER_NAMES:
            parser.error(f"unknown optimizer {name!r}; choose from {', '.join(OPTIMIZER_NAMES)}")
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error"}
    runs: dict[str, list[dict]] = {name: [] for name in names}
    for _ in range(args.repeats):  # rounds interleaved: drift on the machine hits every optimizer alike
        for name in names:
            cmd = [sys.executable, __file__, "--worker", name, "--model", args.model, "--steps", str(args.steps),
                   "--batch", str(args.batch), "--seq", str(args.seq), "--threads", str(args.threads)]  # fmt: skip
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
            if proc.returncode != 0:
                sys.exit(f"peak_memory worker for {name!r} failed:\n{proc.stderr[-3000:]}")
            runs[name].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    rows = []
    for name in names:
        peaks = [r["peak_rss_bytes"] for r in runs[name]]
        row = dict(runs[name][0])
        row.update(
            peak_rss_bytes=statistics.median(peaks),
            peak_rss_min_bytes=min(peaks),
            peak_rss_max_bytes=max(peaks),
            peak_rss_before_optimizer_bytes=statistics.median(r["peak_rss_before_optimizer_bytes"] for r in runs[name]),
            repeats=len(peaks),
        )
        rows.append(row)
    base = next((r for r in rows if r["optimizer"] == "adamw"), None)
    for r in rows:
        if base is not None:
            r["rss_saving_vs_adamw_bytes"] = base["peak_rss_bytes"] - r["peak_rss_bytes"]
            r["state_saving_vs_adamw_bytes"] = base["state_bytes"] - r["state_bytes"]
            state_saving = r["state_saving_vs_adamw_bytes"]
            r["saving_realized"] = r["rss_saving_vs_adamw_bytes"] / state_saving if state_saving > 0 else None
    mb = "{:,.0f} MB"
    for r in rows:
        for key in list(r):
            if key.endswith("_bytes"):
                r[key.replace("_bytes", "_mb")] = r[key] / 1e6
    columns = [
        ("optimizer", "{}"),
        ("peak_rss_mb", mb),
        ("peak_rss_min_mb", "{:,.0f}"),
        ("peak_rss_max_mb", "{:,.0f}"),
        ("state_mb", mb),
        ("rss_saving_vs_adamw_mb", mb),
        ("state_saving_vs_adamw_mb", mb),
        ("saving_realized", "{:.2f}"),
    ]
    print(markdown_table(rows, columns))
    info = machine_info()
    info.update(model=args.model, steps=args.steps, batch=args.batch, seq=args.seq, threads=args.threads,
                repeats=args.repeats, command=" ".join(sys.argv))  # fmt: skip
    print(f"\n{args.model}, batch {args.batch} x {args.seq}, {args.steps} steps, {args.threads} threads, "
          f"median of {args.repeats} processes; "
          f"{info['processor']}, torch {info['torch']}, git {info['git_sha']}")  # fmt: skip
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"machine": info, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
