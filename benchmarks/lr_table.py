"""The swept learning rates the harness uses by default: for each model preset and optimizer, the lr
with the lowest final validation loss on the main job's protocol (``adapm compare``'s defaults: the
embedded Shakespeare, 300 steps of 16 x 128 tokens, warmup 10%, cosine to 10%, seed 0). A grid of 4 lrs
a factor 2 apart, extended by up to two more factors of 2 while the best lr is at its edge.

    python benchmarks/lr_table.py --models gpt2-1m --optimizers adamw,adapm,adapm-mini --write
    python benchmarks/lr_table.py --quick --out /tmp/lrq                  # smoke: 2 runs of 4 steps

Every run is an ``adapm pretrain`` process, recorded in ``OUT/results.jsonl`` when it finishes (a rerun
skips them). ``--write`` merges the winners into ``src/adapm/train/lr_table.json``, which
``adapm pretrain``/``compare`` read when ``--lr`` is not given (the summary says where each lr came
from), and writes ``docs/benchmarks/lr_table.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info, markdown_table
from long_run import train_in_process

from adapm.train.config import DataConfig, ModelConfig, OptimConfig, PretrainConfig, TrainConfig
from adapm.train.data import prepare_data
from adapm.train.registry import LR_TABLE_PATH, get

GRID = (7.5e-4, 1.5e-3, 3e-3, 6e-3)
MAX_EXTENSIONS = 2
BLR_GRID = (1.25e-4, 2.5e-4, 5e-4, 1e-3)


def config(model: str, optimizer: str, lr: float, out: Path, threads: int, steps: int) -> PretrainConfig:
    return PretrainConfig(
        data=DataConfig(),
        model=ModelConfig(model=model),
        optim=OptimConfig(optimizer=optimizer, lr=lr),
        train=TrainConfig(
            out_dir=str(out / "runs" / f"{model}-{optimizer}-lr{lr:g}"),
            steps=steps,
            threads=threads,
            progress=False,
            save_model=False,
            resume=True,
        ),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="gpt2-1m")
    parser.add_argument("--optimizers", default="adamw,adapm,adapm-mini")
    parser.add_argument("--out", type=Path, default=Path("runs/lr_table"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--quick", action="store_true", help="gpt2-1m, adamw at 2 lrs, 4 steps")
    parser.add_argument("--write", action="store_true", help="update src/adapm/train/lr_table.json and the docs")
    args = parser.parse_args()
    models = ["gpt2-1m"] if args.quick else args.models.split(",")
    optimizers = ["adamw"] if args.quick else args.optimizers.split(",")
    for name in optimizers:
        try:
            get(name, "--optimizers")
        except ValueError as err:
            parser.error(str(err))
    steps = 4 if args.quick else args.steps
    prepare_data(DataConfig())
    results_file = args.out / "results.jsonl"
    done = {}
    if results_file.exists():
        done = {r["key"]: r for r in map(json.loads, results_file.read_text().splitlines()) if "error" not in r}
    rows: list[dict[str, Any]] = []

    def run(model: str, opt: str, lr: float) -> dict[str, Any]:
        key = f"{model}/{opt}/{lr:g}/{steps}"
        if key not in done:
            record = {"key": key, "model": model, "optimizer": opt, "lr": lr, "steps": steps,
                      **train_in_process(config(model, opt, lr, args.out, args.threads, steps))}  # fmt: skip
            args.out.mkdir(parents=True, exist_ok=True)
            with open(results_file, "a") as f:
                f.write(json.dumps(record) + "\n")
            done[key] = record
            print(f"{key}: {record.get('final_val_loss', record.get('error'))}", flush=True)
        return done[key]

    for model in models:
        for opt in optimizers:
            grid = list(GRID[1:3] if args.quick else (BLR_GRID if opt.endswith("-blr") else GRID))
            mine = [run(model, opt, lr) for lr in grid]
            # A best lr at the edge of the grid is no optimum: extend the grid by a factor 2 that way.
            for _ in range(0 if args.quick else MAX_EXTENSIONS):
                ok = [r for r in mine if "final_val_loss" in r]
                if not ok:
                    break
                best_lr = min(ok, key=lambda r: r["final_val_loss"])["lr"]
                if best_lr not in (min(grid), max(grid)):
                    break
                grid.append(best_lr * 2 if best_lr == max(grid) else best_lr / 2)
                mine.append(run(model, opt, grid[-1]))
            rows += sorted(mine, key=lambda r: r["lr"])
    best: dict[str, dict[str, float]] = {}
    for row in rows:
        if "final_val_loss" not in row:
            continue
        mine = best.setdefault(row["model"], {})
        current = next((r for r in rows if r["model"] == row["model"] and r["optimizer"] == row["optimizer"]
                        and r["lr"] == mine.get(row["optimizer"])), None)  # fmt: skip
        if current is None or row["final_val_loss"] < current["final_val_loss"]:
            mine[row["optimizer"]] = row["lr"]
    table = [
        {**r, "best": best.get(r["model"], {}).get(r["optimizer"]) == r["lr"]} for r in rows if "final_val_loss" in r
    ]
    columns = [("model", "{}"), ("optimizer", "{}"), ("lr", "{:g}"), ("final_val_loss", "{:.4f}"), ("best", "{}")]
    print(markdown_table(table, columns))
    if args.write:
        info = {**machine_info(), "threads": args.threads, "steps": steps, "command": " ".join(sys.argv)}
        saved = json.loads(LR_TABLE_PATH.read_text()) if LR_TABLE_PATH.exists() else {"lrs": {}}
        for model, lrs in best.items():
            saved["lrs"].setdefault(model, {}).update(lrs)
        saved["source"] = "benchmarks/lr_table.py (docs/benchmarks/lr_table.md)"
        LR_TABLE_PATH.write_text(json.dumps(saved, indent=2) + "\n")
        docs = Path(__file__).resolve().parent.parent / "docs" / "benchmarks"
        (docs / "lr_table.json").write_text(json.dumps({"machine": info, "runs": table}, indent=1))
        (docs / "lr_table.md").write_text(markdown_table(table, columns) + "\n")


if __name__ == "__main__":
    main()
