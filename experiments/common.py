"""Shared machinery of the paper-reproduction experiments: arms (an optimizer plus options), a grid of
seeded pretraining runs executed in parallel worker processes, aggregation over seeds, and outputs
(JSON with every run and the machine, a Markdown table, a PNG).

Every run is a real `adapm pretrain` (:func:`adapm.train.loop.pretrain`) on the embedded Shakespeare
corpus with the same batches, schedule and steps for every arm; only the arm's optimizer options differ.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from adapm.train.compare import machine_info
from adapm.train.config import DataConfig, ModelConfig, OptimConfig, PretrainConfig, TrainConfig
from adapm.train.tables import markdown_table

QKV_MLP_WEIGHTS = r"(\[[QKV]\]$|(q_proj|k_proj|v_proj)\.weight$|mlp\..*weight$)"
"""Query, key, value and MLP matrices of GPT-2 (fused c_attn segments) and Llama."""
VALUE_WEIGHTS = r"(\[V\]$|v_proj\.weight$)"
"""Value matrices of GPT-2 (the V segment of c_attn) and Llama."""


@dataclass(frozen=True)
class Arm:
    """One configuration of an experiment: an optimizer and its options (OptimConfig fields)."""

    name: str
    optimizer: str = "adapm"
    options: dict[str, Any] = field(default_factory=dict)


def optim_config(arm: Arm) -> OptimConfig:
    return OptimConfig(optimizer=arm.optimizer, **arm.options)


def one_run(model: str, arm: Arm, seed: int, steps: int, batch_size: int, threads: int, root: str,
            eval_batches: int = 16) -> dict[str, Any]:
    """One seeded pretraining run of ``arm`` (executed in a worker process)."""
    from adapm.train.loop import METRICS, pretrain, read_metrics

    cfg = PretrainConfig(
        data=DataConfig(),
        model=ModelConfig(model=model),
        optim=optim_config(arm),
        train=TrainConfig(
            out_dir=str(Path(root) / f"{model}-{arm.name}-seed{seed}".replace("/", "_").replace(" ", "_")),
            steps=steps,
            batch_size=batch_size,
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
    curve = read_metrics(Path(cfg.train.out_dir) / METRICS)
    return {
        "model": model,
        "arm": arm.name,
        "optimizer": arm.optimizer,
        "options": arm.options,
        "seed": seed,
        "final_val_loss": summary["final_val_loss"],
        "final_train_loss": summary["final_train_loss"],
        "state_bytes": summary["state_bytes"],
        "parameters": summary["parameters"],
        "tokens": summary["tokens"],
        "lr": summary["lr"],
        "train_seconds": summary["train_seconds"],
        "val_curve": [(m["step"], m["val_loss"]) for m in curve if "val_loss" in m],
    }


def run_grid(arms: list[Arm], settings: dict[str, Any]) -> list[dict[str, Any]]:
    """Every (model, arm, seed) run of ``settings`` (see :func:`settings`), ``jobs`` at a time in spawned worker
    processes."""
    from adapm.train.data import prepare_data

    prepare_data(DataConfig())  # tokenize once, before the workers share the cache
    jobs = settings["jobs"]
    run = (settings["steps"], settings["batch_size"], settings["threads"])
    tasks = [(m, a, s) for m in settings["models"] for s in range(settings["seeds"]) for a in arms]
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as root:
        if jobs == 1:  # in this process (smoke tests): no worker start-up
            for m, a, s in tasks:
                runs.append(one_run(m, a, s, *run, root, settings["eval_batches"]))
                print(f"  {m} {a.name} seed {s}: val {runs[-1]['final_val_loss']:.4f}", flush=True)
            return runs
        ctx = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
            futures = {pool.submit(one_run, m, a, s, *run, root, settings["eval_batches"]): (m, a, s)
                       for m, a, s in tasks}  # fmt: skip
            for fut in concurrent.futures.as_completed(futures):
                r = fut.result()
                runs.append(r)
                print(f"  {r['model']} {r['arm']} seed {r['seed']}: val {r['final_val_loss']:.4f}", flush=True)
    order = {(m, a.name, s): i for i, (m, a, s) in enumerate(tasks)}
    return sorted(runs, key=lambda r: order[(r["model"], r["arm"], r["seed"])])


def aggregate(runs: list[dict[str, Any]], reference_arm: str | None = None) -> list[dict[str, Any]]:
    """Mean and spread over seeds per (model, arm), with the difference to ``reference_arm``."""
    rows: list[dict[str, Any]] = []
    keys = list(dict.fromkeys((r["model"], r["arm"]) for r in runs))
    for model, arm in keys:
        finals = [r["final_val_loss"] for r in runs if r["model"] == model and r["arm"] == arm]
        first = next(r for r in runs if r["model"] == model and r["arm"] == arm)
        rows.append(
            {
                "model": model,
                "arm": arm,
                "mean_val_loss": statistics.mean(finals),
                "std_val_loss": statistics.stdev(finals) if len(finals) > 1 else 0.0,
                "seeds": len(finals),
                "state_bytes": first["state_bytes"],
                "parameters": first["parameters"],
                "tokens": first["tokens"],
            }
        )
    if reference_arm is not None:
        for row in rows:
            ref = next((r for r in rows if r["model"] == row["model"] and r["arm"] == reference_arm), None)
            row["minus_reference"] = row["mean_val_loss"] - ref["mean_val_loss"] if ref else None
    return rows


def markdown(rows: list[dict[str, Any]], columns: list[tuple[str, str, str]]) -> str:
    """A Markdown table: (key, heading, format) columns (see :func:`adapm.train.tables.markdown_table`)."""
    return markdown_table(rows, columns)


def parser(doc: str, name: str, models: str, steps: int = 300, seeds: int = 2) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=models, help=f"comma-separated presets (default: {models})")
    p.add_argument("--steps", type=int, default=steps, help=f"optimizer steps per run (default: {steps})")
    p.add_argument("--seeds", type=int, default=seeds, help=f"seeds per arm (default: {seeds})")
    p.add_argument("--batch-size", type=int, default=16, help="sequences of 128 tokens per step (default: 16)")
    p.add_argument("--jobs", type=int, default=2, help="runs in parallel, one process each (default: 2)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run (default: 1)")
    p.add_argument("--out", type=Path, default=Path("runs/experiments"), help="where NAME.json/.md/.png go")
    p.add_argument("--quick", action="store_true", help="smoke mode: gpt2-1m, 6 steps, batch 4, 1 seed")
    p.add_argument("--replot", action="store_true", help="redraw NAME.png from the NAME.json in --out; no runs")
    p.set_defaults(name=name)
    return p


def saved_payload(args: argparse.Namespace) -> dict[str, Any]:
    """The NAME.json a previous run wrote to ``--out`` (for ``--replot``), with a clear error if absent."""
    path = args.out / f"{args.name}.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise SystemExit(f"--replot: cannot read {path} ({type(err).__name__}); run the experiment first") from None


def curves_with_bands(ax: Any, runs: list[dict[str, Any]], model: str, arms: list[str],
                      styles: dict[str, str] | None = None) -> None:  # fmt: skip
    """Per arm, the mean validation-loss curve over its seeds, with the min-max band of the seeds shaded
    (a single seed: the line alone); the legend outside the axes, integer step ticks."""
    import matplotlib
    from matplotlib.ticker import MaxNLocator

    others = [arm for arm in arms if arm != "adamw"]
    palette = matplotlib.colormaps["tab10" if len(others) <= 10 else "tab20"]
    for arm in arms:
        curves = [r["val_curve"] for r in runs if r["arm"] == arm and r["model"] == model]
        if not curves:
            continue
        steps = [point[0] for point in curves[0]]
        values = [[c[i][1] for c in curves] for i in range(len(steps))]
        mean = [sum(v) / len(v) for v in values]
        color = "black" if arm == "adamw" else palette(others.index(arm))  # the reference stands out
        (line,) = ax.plot(steps, mean, (styles or {}).get(arm, "-"), marker="o", markersize=3, label=arm, color=color)
        if len(curves) > 1:
            ax.fill_between(steps, [min(v) for v in values], [max(v) for v in values], color=line.get_color(),
                            alpha=0.15, linewidth=0)  # fmt: skip
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)


def run_title(runs: list[dict[str, Any]], model: str, settings: dict[str, Any]) -> str:
    """Model, tokens per run and seeds, for a plot title."""
    tokens = next((r.get("tokens") for r in runs if r["model"] == model), None)
    seeds = settings["seeds"]
    what = f"{tokens / 1e6:.2f}M tokens, " if tokens else ""
    return f"{model}, {settings['steps']} steps, {what}{seeds} seed{'s' if seeds > 1 else ''} (mean, min-max band)"


def settings(args: argparse.Namespace) -> dict[str, Any]:
    """The run settings after ``--quick``."""
    if args.quick:  # validation loss on 2 batches, not 16: a smoke test's numbers are not compared
        return {"models": ["gpt2-1m"], "steps": 6, "seeds": 1, "batch_size": 4, "jobs": args.jobs,
                "threads": args.threads, "eval_batches": 2}  # fmt: skip
    return {"models": args.models.split(","), "steps": args.steps, "seeds": args.seeds,
            "batch_size": args.batch_size, "jobs": args.jobs, "threads": args.threads, "eval_batches": 16}  # fmt: skip


def write_outputs(args: argparse.Namespace, payload: dict[str, Any], table: str) -> Path:
    """NAME.json (with machine, command and settings), NAME.md; returns the PNG path to draw."""
    args.out.mkdir(parents=True, exist_ok=True)
    payload = {
        "experiment": args.name,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine_info(),
        **payload,
    }
    (args.out / f"{args.name}.json").write_text(json.dumps(payload, indent=2, default=_jsonable))
    (args.out / f"{args.name}.md").write_text(table + "\n")
    print(table)
    return args.out / f"{args.name}.png"


def _jsonable(value: Any) -> Any:
    if isinstance(value, Arm):
        return asdict(value)
    raise TypeError(f"cannot serialize {type(value).__name__}")


def pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
