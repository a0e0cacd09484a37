"""Final validation loss at equal steps and tokens: all six optimizers on a GPT-2 and a Llama preset,
each at the learning rate a small recorded sweep picked, then several seeds.

Protocol (docs/benchmarks.md, section 3): for each model and optimizer, train at lr x {1/3, 1, 3} (``--lr-factors``)
of the optimizer's default with seed 0 and keep the lr with the lowest final validation loss; then train
the remaining seeds at that lr. Same data (the embedded Shakespeare corpus), batches, schedule and
steps for everyone. Every run is recorded.

    python benchmarks/convergence.py --json runs/bench/convergence.json      # gpt2-5m and llama-5m, 3 seeds
    python benchmarks/convergence.py --quick                                  # gpt2-1m, 2 optimizers, 20 steps

An optimizer may carry settings after colons, ``name:key=value:...`` with keys of ``OptimConfig``
(``none`` for None), e.g. ``--optimizers adapm-mini,adapm-mini:update_clip=none:rank_ratio=0.1``:
each spec is swept and reported as its own row.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import multiprocessing
import statistics
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info, markdown_table

from adapm.train.config import DataConfig, ModelConfig, OptimConfig, PretrainConfig, TrainConfig
from adapm.train.data import prepare_data
from adapm.train.loop import pretrain
from adapm.train.registry import OPTIMIZER_NAMES, PAPER_OPTIMIZERS, default_lr

_SPEC_FIELDS = {f.name for f in dataclasses.fields(OptimConfig)} - {"optimizer", "lr"}


def parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``"adapm-mini:update_clip=none:rank_ratio=0.1"`` -> ``("adapm-mini", {"update_clip": None,
    "rank_ratio": 0.1})``; raises ValueError naming the bad part."""
    name, *settings = spec.split(":")
    if name not in OPTIMIZER_NAMES:
        raise ValueError(
            f"--optimizers: unknown optimizer {name!r} in {spec!r}; choose from {', '.join(OPTIMIZER_NAMES)}"
        )
    options: dict[str, Any] = {}
    for item in settings:
        key, sep, raw = item.partition("=")
        if not sep or key not in _SPEC_FIELDS:
            raise ValueError(
                f"--optimizers: bad setting {item!r} in {spec!r}; "
                f"write key=value with key one of {', '.join(sorted(_SPEC_FIELDS))}"
            )
        value: Any = raw
        if raw.lower() in ("none", "null"):
            value = None
        elif raw.lower() in ("true", "false"):
            value = raw.lower() == "true"
        else:
            for kind in (int, float):
                try:
                    value = kind(raw)
                    break
                except ValueError:
                    pass
        options[key] = value
    OptimConfig(optimizer=name, **options)  # validates the values, naming the bad one
    return name, options


def one_run(model: str, optimizer: str, lr: float, seed: int, steps: int, threads: int, out: Path,
            eval_batches: int = 16) -> dict[str, Any]:
    name, options = parse_spec(optimizer)
    cfg = PretrainConfig(
        data=DataConfig(),
        model=ModelConfig(model=model),
        optim=OptimConfig(optimizer=name, lr=lr, **options),
        train=TrainConfig(
            out_dir=str(out / f"{model}-{optimizer.replace(':', '_')}-lr{lr:g}-seed{seed}"),
            steps=steps,
            batch_size=16,
            eval_every=max(1, steps // 4),
            eval_batches=eval_batches,
            log_every=max(1, steps // 10),
            checkpoint_every=steps,
            seed=seed,
            threads=threads,
            progress=False,
            save_model=False,
        ),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        summary = pretrain(cfg)
    print(f"{model} {optimizer} lr {lr:g} seed {seed}: val {summary['final_val_loss']:.4f}", flush=True)
    return {**summary, "model": model, "optimizer": optimizer, "lr": lr, "seed": seed}  # the spec, not only the name


def run_many(
    tasks: list[tuple[str, str, float, int]], steps: int, threads: int, jobs: int, out: Path, done: Any,
    eval_batches: int = 16,
) -> list[dict[str, Any]]:
    """Every (model, optimizer, lr, seed) run, ``jobs`` at a time in spawned processes; ``done(run)`` after each."""
    results: list[dict[str, Any]] = []
    if jobs == 1:
        for model, opt, lr, seed in tasks:
            results.append(one_run(model, opt, lr, seed, steps, threads, out, eval_batches))
            done(results[-1])
        return results
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
        futures = [pool.submit(one_run, model, opt, lr, seed, steps, threads, out, eval_batches)
                   for model, opt, lr, seed in tasks]  # fmt: skip
        for fut in concurrent.futures.as_completed(futures):
            results.append(fut.result())
            done(results[-1])
    order = {task: i for i, task in enumerate(tasks)}
    return sorted(results, key=lambda r: order[(r["model"], r["optimizer"], r["lr"], r["seed"])])


def summarize(runs: list[dict[str, Any]], reference: str = "adamw") -> list[dict[str, Any]]:
    """One row per (model, optimizer) from every recorded run: the lr whose seed-0 run has the lowest
    final validation loss, and the mean/std over the seeds run at that lr. ``minus_<reference>`` is the
    difference of means to the reference optimizer (AdamW by default); ``paired_std`` the std of the
    per-seed differences (the same seed means the same initialization and batches for every optimizer,
    so pairing removes that spread)."""
    keys = list(dict.fromkeys((r["model"], r["optimizer"]) for r in runs))
    summary: list[dict[str, Any]] = []
    finals: dict[tuple[str, str], dict[int, float]] = {}
    for m, o in keys:
        mine = [r for r in runs if r["model"] == m and r["optimizer"] == o]
        best = min((r for r in mine if r["seed"] == 0), key=lambda r: r["final_val_loss"])
        by_seed = {r["seed"]: r["final_val_loss"] for r in mine if r["lr"] == best["lr"]}
        finals[m, o] = by_seed
        values = list(by_seed.values())
        summary.append(
            {
                "model": m,
                "optimizer": o,
                "lr": best["lr"],
                "mean_val_loss": statistics.mean(values),
                "std_val_loss": statistics.stdev(values) if len(values) > 1 else 0.0,
                "seeds": len(values),
                "tokens": best["tokens"],
                "state_bytes": best["state_bytes"],
            }
        )
    minus = f"minus_{reference}"
    for row in summary:
        ref = finals.get((row["model"], reference))
        row[minus] = row["paired_std"] = None
        if ref is None:
            continue
        row[minus] = row["mean_val_loss"] - statistics.mean(ref.values())
        mine = finals[row["model"], row["optimizer"]]
        diffs = [mine[s] - ref[s] for s in sorted(mine.keys() & ref.keys())]
        row["paired_std"] = statistics.stdev(diffs) if len(diffs) > 1 else None
    return summary


def print_summary(summary: list[dict[str, Any]], reference: str = "adamw") -> None:
    columns = [
        ("model", "{}"),
        ("optimizer", "{}"),
        ("lr", "{:.2g}"),
        ("mean_val_loss", "{:.4f}"),
        ("std_val_loss", "{:.4f}"),
        (f"minus_{reference}", "{:+.4f}"),
        ("paired_std", "{:.4f}"),
        ("seeds", "{}"),
        ("tokens", "{:,}"),
    ]
    print(markdown_table(summary, columns))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="gpt2-5m,llama-5m")
    parser.add_argument("--optimizers", default=",".join(PAPER_OPTIMIZERS))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="torch threads per run")
    parser.add_argument(
        "--jobs", type=int, default=1, help="runs in parallel (spawned processes); use --threads 1 with --jobs 2"
    )
    parser.add_argument("--lr-factors", default="0.333,1,3", help="multiples of each optimizer's default lr to sweep")
    parser.add_argument("--quick", action="store_true", help="gpt2-1m, adamw and adapm, 20 steps, 1 seed, no sweep")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--reference", default="adamw", help="the optimizer the others are compared with, per seed")
    parser.add_argument(
        "--from-json",
        type=Path,
        nargs="+",
        help="print the summary of runs saved with --json (several: merged); no training",
    )
    args = parser.parse_args()
    if args.from_json:
        runs_saved: list[dict[str, Any]] = []
        for path in args.from_json:
            try:
                runs_saved += json.loads(path.read_text())["runs"]
            except (OSError, ValueError, KeyError) as err:
                parser.error(f"--from-json {path}: not a convergence.py --json file ({type(err).__name__})")
        print_summary(summarize(runs_saved, args.reference), args.reference)
        return
    if args.jobs < 1 or args.threads < 1:
        parser.error("--jobs and --threads must be at least 1")
    models = ["gpt2-1m"] if args.quick else args.models.split(",")
    optimizers = ["adamw", "adapm"] if args.quick else args.optimizers.split(",")
    for opt in optimizers:
        try:
            parse_spec(opt)
        except (ValueError, TypeError) as err:
            parser.error(str(err))
    steps, seeds = (20, 1) if args.quick else (args.steps, args.seeds)
    eval_batches = 2 if args.quick else 16  # a smoke test's validation loss on 2 batches
    factors = (1.0,) if args.quick else tuple(float(f) for f in args.lr_factors.split(","))
    runs: list[dict[str, Any]] = []

    def done(run: dict[str, Any]) -> None:  # keep what was measured if the job is interrupted
        runs.append(run)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({"partial": True, "runs": runs}, indent=2))

    prepare_data(DataConfig())  # tokenize once, before parallel workers share the cache
    with tempfile.TemporaryDirectory() as tmp:
        sweep_tasks = [(m, o, default_lr(parse_spec(o)[0]) * f, 0) for m in models for o in optimizers for f in factors]
        sweep = run_many(sweep_tasks, steps, args.threads, args.jobs, Path(tmp), done, eval_batches)
        best = {
            (m, o): min(
                (r for r in sweep if r["model"] == m and r["optimizer"] == o), key=lambda r: r["final_val_loss"]
            )
            for m in models
            for o in optimizers
        }
        seed_tasks = [(m, o, best[m, o]["lr"], s) for m in models for o in optimizers for s in range(1, seeds)]
        extra = run_many(seed_tasks, steps, args.threads, args.jobs, Path(tmp), done, eval_batches)
    runs = sweep + extra
    summary = summarize(runs, args.reference)
    print_summary(summary, args.reference)
    info = machine_info()
    info.update(
        steps=steps,
        seeds=seeds,
        threads=args.threads,
        jobs=args.jobs,
        lr_factors=list(factors),
        command=" ".join(sys.argv),
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"machine": info, "summary": summary, "runs": runs}, indent=2))


if __name__ == "__main__":
    main()
