"""The long, larger convergence protocol: a short lr sweep per optimizer, then long runs at the swept lr
with several seeds, on three settings (model x corpus), with loss curves and steps to AdamW's loss.

    python benchmarks/long_run.py sweep  --out runs/long --jobs 2 --threads 1   # 200 steps, 4 lrs, seed 0
    python benchmarks/long_run.py long   --out runs/long --jobs 2 --threads 1   # 1500 steps (3.1M tokens), 2 seeds
    python benchmarks/long_run.py bracket --out runs/long --jobs 2 --threads 1  # more lrs around the best long lr
    python benchmarks/long_run.py report --out runs/long --docs docs/benchmarks  # tables, plots, JSON
    python benchmarks/long_run.py sweep  --quick --out /tmp/quick              # smoke: 2 runs of 6 steps

Settings: gpt2-5m and llama-5m on the embedded Shakespeare, llama-5m on the Python documentation
(``--data python-docs``). Every run is an ``adapm pretrain`` process with checkpoints every 100 steps,
recorded in ``OUT/results.jsonl`` when it finishes: an interrupted phase rerun with the same command
skips the finished runs and resumes the unfinished ones from their checkpoints, so nothing is lost.
Batches of 16 x 128 tokens, warmup 10%, cosine to 10%, grad clip 1.0, the same batches for everyone.

Rows: ``adamw``, ``adamw-blr``, ``adapm``, ``adapm-mini``, ``adapm-mini-blr`` on every setting, the update-clip
ablations ``adapm-mini:clip_scope=all`` and ``adapm-mini:update_clip=none`` in the sweep, ``adam-mini`` and
``sgd-sai`` on the first setting. The long phase runs each row at its best sweep lr (seeds 0 and 1) and
AdamW and AdaPM-mini also at their better neighbouring lr (seeds 0 and 1: at 1,500 steps on GPT-2 the
neighbour beat the sweep's pick for both), since the best lr moves with the horizon; the bracket phase
then runs them at the factor-2 neighbours of their best long-run lr until it is bracketed. Never run in CI
(hours of CPU); ``--quick`` is its smoke test.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info, markdown_table
from convergence import parse_spec

from adapm.train.config import DataConfig, ModelConfig, OptimConfig, PretrainConfig, TrainConfig
from adapm.train.data import prepare_data

SETTINGS: dict[str, tuple[str, str]] = {
    "gpt2-shakespeare": ("gpt2-5m", "shakespeare"),
    "llama-shakespeare": ("llama-5m", "shakespeare"),
    "llama-python-docs": ("llama-5m", "python-docs"),
}
CORE = ("adamw", "adamw-blr", "adapm", "adapm-mini", "adapm-mini-blr")
CLIP_ABLATIONS = ("adapm-mini:clip_scope=all", "adapm-mini:update_clip=none")
FIRST_SETTING_ONLY = ("adam-mini", "sgd-sai")
GRIDS: dict[str, tuple[float, ...]] = {
    "default": (3.75e-4, 7.5e-4, 1.5e-3, 3e-3),
    "blr": (9.375e-5, 1.875e-4, 3.75e-4, 7.5e-4),  # the base lr: blocks get 1-10x it
    "sgd-sai": (1e-3, 3e-3, 1e-2, 3e-2),
}
SWEEP_STEPS, LONG_STEPS, LONG_SEEDS, NEIGHBOURS = 200, 1500, (0, 1), ("adamw", "adapm-mini")
BASIN = 0.02
"""An lr is in an optimizer's basin when its loss is within this of the optimizer's best."""


def grid(spec: str) -> tuple[float, ...]:
    name = parse_spec(spec)[0]
    return GRIDS["blr" if name.endswith("-blr") else "sgd-sai" if name == "sgd-sai" else "default"]


@dataclass(frozen=True)
class Task:
    phase: str
    setting: str
    spec: str
    lr: float
    seed: int
    steps: int

    @property
    def key(self) -> str:
        return f"{self.phase}/{self.setting}/{self.spec.replace(':', '_')}/lr{self.lr:g}/seed{self.seed}"


def run_config(task: Task, out: Path, threads: int, quick: bool) -> PretrainConfig:
    model, corpus = SETTINGS[task.setting]
    name, options = parse_spec(task.spec)
    every = max(1, task.steps // 30)
    return PretrainConfig(
        data=DataConfig(data=corpus),
        model=ModelConfig(model="gpt2-1m" if quick else model),
        optim=OptimConfig(optimizer=name, lr=task.lr, **options),
        train=TrainConfig(
            out_dir=str(out / "runs" / task.key),
            steps=task.steps,
            batch_size=16,
            eval_every=max(1, task.steps // 15),
            eval_batches=2 if quick else 16,
            log_every=every,
            checkpoint_every=100,
            seed=task.seed,
            threads=threads,
            progress=False,
            save_model=False,
            resume=True,
        ),
    )


def execute(task: Task, out: Path, threads: int, quick: bool) -> dict[str, Any]:
    """Train one run in its own process (resuming its checkpoint, if any); its record."""
    return {**task.__dict__, "key": task.key, **train_in_process(run_config(task, out, threads, quick))}


def train_in_process(cfg: PretrainConfig) -> dict[str, Any]:
    """Run ``adapm pretrain`` on ``cfg`` in a fresh process; the final numbers and curves, or the error."""
    run_dir = Path(cfg.train.out_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "run.config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    start = time.time()
    proc = subprocess.run(
        [sys.executable, "-m", "adapm.cli", "pretrain", "--config", str(run_dir / "run.config.json")],
        capture_output=True,
        text=True,
        check=False,
    )
    record: dict[str, Any] = {"wall_s": time.time() - start}
    if proc.returncode != 0:
        record["error"] = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return record
    summary = json.loads((run_dir / "summary.json").read_text())
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    record.update(
        final_val_loss=summary["final_val_loss"],
        tokens=summary["tokens"],
        state_bytes=summary["state_bytes"],
        tokens_per_s=summary["tokens_per_s"],
        val_curve=[(m["step"], m["val_loss"]) for m in metrics if "val_loss" in m],
        train_curve=[(m["step"], m["train_loss"]) for m in metrics],
    )
    return record


def load_results(out: Path) -> dict[str, dict[str, Any]]:
    path = out / "results.jsonl"
    if not path.exists():
        return {}
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {r["key"]: r for r in records if "error" not in r}


def sweep_tasks(quick: bool) -> list[Task]:
    if quick:
        return [Task("sweep", "gpt2-shakespeare", spec, 1.5e-3, 0, 6) for spec in ("adamw", "adapm-mini")]
    tasks = []
    for i, setting in enumerate(SETTINGS):
        specs = CORE + CLIP_ABLATIONS + (FIRST_SETTING_ONLY if i == 0 else ())
        tasks += [Task("sweep", setting, s, lr, 0, SWEEP_STEPS) for s in specs for lr in grid(s)]
    return tasks


def best_lrs(results: dict[str, dict[str, Any]], setting: str, spec: str) -> list[float]:
    """Sweep lrs of ``spec`` on ``setting`` from best to worst final validation loss."""
    runs = [r for r in results.values() if r["phase"] == "sweep" and r["setting"] == setting and r["spec"] == spec]
    return [r["lr"] for r in sorted(runs, key=lambda r: r["final_val_loss"])]


def long_tasks(results: dict[str, dict[str, Any]], quick: bool) -> list[Task]:
    if quick:
        return [Task("long", "gpt2-shakespeare", spec, 1.5e-3, 0, 8) for spec in ("adamw", "adapm-mini")]
    tasks = []
    for i, setting in enumerate(SETTINGS):
        for spec in CORE + (FIRST_SETTING_ONLY if i == 0 else ()):
            ranked = best_lrs(results, setting, spec)
            if not ranked:
                raise SystemExit(f"no sweep results for {spec} on {setting}: run the sweep phase first")
            tasks += [Task("long", setting, spec, ranked[0], seed, LONG_STEPS) for seed in LONG_SEEDS]
            if spec in NEIGHBOURS:
                lrs = grid(spec)
                at = lrs.index(ranked[0])
                near = [lrs[j] for j in (at - 1, at + 1) if 0 <= j < len(lrs)]
                neighbour = min(near, key=ranked.index)
                tasks += [Task("long", setting, spec, neighbour, seed, LONG_STEPS) for seed in LONG_SEEDS]
    return tasks


def bracket_tasks(results: dict[str, dict[str, Any]], settings: tuple[str, ...] | None = None) -> list[Task]:
    """Long runs that bracket AdamW's and AdaPM-mini's best long-run lr: the best lr moves with the horizon
    (up on GPT-2, down on Llama here), so the sweep's pick and its better neighbour need not straddle the
    long-run optimum. For each row in ``NEIGHBOURS`` whose long runs are all recorded, the lr with the
    lowest mean over ``LONG_SEEDS`` gets its factor-2 neighbours on both sides (outside the sweep grid
    too), each with every seed, unless already run (an lr with a seed missing gets it); rerun the phase
    until nothing is added. ``settings``: only these (all by default)."""
    planned = long_tasks(results, quick=False)
    tasks = []
    for setting in settings or tuple(SETTINGS):
        for spec in NEIGHBOURS:
            mine = [t for t in planned if (t.setting, t.spec) == (setting, spec)]
            if not mine or any(t.key not in results for t in mine):
                continue  # its long runs first
            finals: dict[float, list[float]] = {}
            for r in results.values():
                if r["phase"] == "long" and (r["setting"], r["spec"]) == (setting, spec):
                    finals.setdefault(r["lr"], []).append(r["final_val_loss"])
            complete = {lr: statistics.mean(v) for lr, v in finals.items() if len(v) == len(LONG_SEEDS)}
            if not complete:
                continue
            best = min(complete, key=complete.__getitem__)
            wanted = [lr for lr in finals if lr not in complete]  # an interrupted bracket: its other seeds
            wanted += [lr for lr in (best / 2, best * 2) if not any(math.isclose(lr, x, rel_tol=1e-9) for x in finals)]
            news = [Task("long", setting, spec, lr, seed, LONG_STEPS) for lr in wanted for seed in LONG_SEEDS]
            tasks += [task for task in news if task.key not in results]
    return tasks


def run_phase(tasks: list[Task], out: Path, jobs: int, threads: int, quick: bool) -> None:
    done = load_results(out)
    todo = [t for t in tasks if t.key not in done]
    print(f"{len(tasks) - len(todo)} of {len(tasks)} runs already recorded; running {len(todo)}", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    for corpus in {SETTINGS[t.setting][1] for t in todo}:
        prepare_data(DataConfig(data=corpus))  # tokenize once, before parallel runs share the cache
    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = {pool.submit(execute, t, out, threads, quick): t for t in todo}
        for fut in concurrent.futures.as_completed(futures):
            record = fut.result()
            with open(out / "results.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            loss = record.get("final_val_loss")
            status = f"val {loss:.4f}" if loss is not None else f"FAILED: {record['error']}"
            print(f"{record['key']}: {status} ({record['wall_s'] / 60:.1f} min)", flush=True)


# ------------------------------------------------------------------------------------------ report


def sweep_summary(results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (setting, spec): loss at every lr, the best lr and the width of the basin (lrs within BASIN
    of the best: how many grid points, and the ratio of the largest to the smallest)."""
    rows = []
    pairs = dict.fromkeys((r["setting"], r["spec"]) for r in results.values() if r["phase"] == "sweep")
    for setting, spec in pairs:
        runs = sorted(
            (r for r in results.values() if r["phase"] == "sweep" and (r["setting"], r["spec"]) == (setting, spec)),
            key=lambda r: r["lr"],
        )
        best = min(r["final_val_loss"] for r in runs)
        basin = [r["lr"] for r in runs if r["final_val_loss"] <= best + BASIN]
        rows.append(
            {
                "setting": setting,
                "optimizer": spec,
                "losses": {f"{r['lr']:g}": round(r["final_val_loss"], 4) for r in runs},
                "best_lr": min(runs, key=lambda r: r["final_val_loss"])["lr"],
                "best_val_loss": best,
                "basin_points": len(basin),
                "basin_width": max(basin) / min(basin),
            }
        )
    return rows


def steps_to(curve: list[list[float]], target: float) -> int | None:
    """The first evaluated step whose validation loss is at or below ``target``."""
    return next((int(step) for step, loss in curve if loss <= target), None)


def long_summary(results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (setting, spec, lr) of the long phase: mean and spread over seeds, the difference to tuned
    AdamW (its long-run lr with the lowest mean among those with the most seeds): of the means, and
    paired by seed (each seed's run against AdamW's run with the same seed, i.e. the same batches and
    initialization), and steps to reach AdamW's mean final loss."""
    longs = [r for r in results.values() if r["phase"] == "long"]
    rows = []
    for setting, spec, lr in dict.fromkeys((r["setting"], r["spec"], r["lr"]) for r in longs):
        runs = [r for r in longs if (r["setting"], r["spec"], r["lr"]) == (setting, spec, lr)]
        finals = {r["seed"]: r["final_val_loss"] for r in runs}
        rows.append(
            {
                "setting": setting,
                "optimizer": spec,
                "lr": lr,
                "seeds": len(finals),
                "mean_val_loss": statistics.mean(finals.values()),
                "spread": max(finals.values()) - min(finals.values()),
                "finals": finals,
                "runs": runs,
                "tokens": runs[0]["tokens"],
                "state_bytes": runs[0]["state_bytes"],
            }
        )
    for row in rows:
        ref = min(
            (r for r in rows if r["setting"] == row["setting"] and r["optimizer"] == "adamw"),
            key=lambda r: (-r["seeds"], r["mean_val_loss"]),
            default=None,
        )
        row["minus_adamw"] = row["steps_to_adamw"] = row["step_ratio"] = row["adamw_lr"] = None
        row["paired_minus_adamw"] = {}
        if ref is None:
            continue
        row["adamw_lr"] = ref["lr"]
        row["minus_adamw"] = row["mean_val_loss"] - ref["mean_val_loss"]
        row["paired_minus_adamw"] = {seed: loss - ref["finals"][seed] for seed, loss in sorted(row["finals"].items())
                                     if seed in ref["finals"]}  # fmt: skip
        hits = [steps_to(r["val_curve"], ref["mean_val_loss"]) for r in row["runs"]]
        if all(h is not None for h in hits):
            row["steps_to_adamw"] = statistics.mean(hits)  # type: ignore[arg-type]
            row["step_ratio"] = row["steps_to_adamw"] / row["runs"][0]["steps"]
    return rows


def plot(rows: list[dict[str, Any]], docs: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for setting in dict.fromkeys(r["setting"] for r in rows):
        fig, ax = plt.subplots(figsize=(8, 4.8))
        mine = [r for r in rows if r["setting"] == setting]
        names = list(dict.fromkeys(r["optimizer"] for r in mine if r["optimizer"] != "adamw"))
        palette = matplotlib.colormaps["tab10"]
        drawn: dict[str, int] = {}
        for row in mine:
            name = row["optimizer"]
            # AdamW, the reference, in black; an optimizer's further lrs dashed, dotted, ... in its colour.
            color = "black" if name == "adamw" else palette(names.index(name) % 10)
            style = ("-", "--", ":", "-.")[min(drawn.get(name, 0), 3)]
            drawn[name] = drawn.get(name, 0) + 1
            curves = [dict((int(s), v) for s, v in r["val_curve"]) for r in row["runs"]]
            steps = sorted(set.intersection(*(set(c) for c in curves)))
            mean = [statistics.mean(c[s] for c in curves) for s in steps]
            lo = [min(c[s] for c in curves) for s in steps]
            hi = [max(c[s] for c in curves) for s in steps]
            (line,) = ax.plot(steps, mean, style, color=color, label=f"{name} (lr {row['lr']:g})")
            ax.fill_between(steps, lo, hi, color=line.get_color(), alpha=0.2)
        model, corpus = SETTINGS.get(setting, (setting, ""))
        tokens = mine[0]["tokens"] if mine else 0
        ax.set_title(f"{model} on {corpus}: validation loss, {tokens / 1e6:.1f}M tokens\nmean and range of seeds",
                     fontsize=10)  # fmt: skip
        ax.set_xlabel("step")
        ax.set_ylabel("validation loss")
        finals = [r["mean_val_loss"] for r in mine]
        if finals:
            ax.set_ylim(min(finals) - 0.1, min(finals) + 1.5)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        fig.tight_layout()
        path = docs / f"long_run_{setting}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def report(out: Path, docs: Path) -> None:
    results = load_results(out)
    sweep = sweep_summary(results)
    longs = long_summary(results)
    docs.mkdir(parents=True, exist_ok=True)
    hours = sum(r["wall_s"] for r in results.values()) / 3600
    info = {**machine_info(), "cpu_hours": hours, "runs": len(results), "command": " ".join(sys.argv)}
    sweep_cols = [("setting", "{}"), ("optimizer", "{}"), ("best_lr", "{:g}"), ("best_val_loss", "{:.4f}"),
                  ("basin_points", "{}"), ("basin_width", "{:.0f}x"), ("losses", "{}")]  # fmt: skip
    long_cols = [("setting", "{}"), ("optimizer", "{}"), ("lr", "{:g}"), ("seeds", "{}"),
                 ("mean_val_loss", "{:.4f}"), ("spread", "{:.4f}"), ("adamw_lr", "{:g}"), ("minus_adamw", "{:+.4f}"),
                 ("paired", "{}"), ("step_ratio", "{:.2f}")]  # fmt: skip
    for row in longs:  # each seed's difference to AdamW's run with the same seed
        row["paired"] = " / ".join(f"{d:+.3f}" for d in row["paired_minus_adamw"].values()) or None
    head = (f"{info['processor']}, {info['cpus']} CPUs, torch {info['torch']}, git {info['git_sha']}; "
            f"{len(results)} runs, {hours:.1f} CPU-hours")  # fmt: skip
    text = [head, "", "Sweep:", "", markdown_table(sweep, sweep_cols)]
    if longs:
        text += ["", "Long runs:", "", markdown_table(longs, long_cols)]
    (docs / "long_run.md").write_text("\n".join(text) + "\n")
    for row in longs:
        row.pop("runs")
    payload = {"machine": info, "sweep": sweep, "long": longs, "runs": list(results.values())}
    (docs / "long_run.json").write_text(json.dumps(payload, indent=1))
    if longs:
        plot(long_summary(results), docs)
    print("\n".join(text))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("phase", choices=("sweep", "long", "bracket", "report"))
    parser.add_argument("--out", type=Path, default=Path("runs/long"), help="run directories and results.jsonl")
    parser.add_argument("--docs", type=Path, default=Path("docs/benchmarks"), help="where report writes")
    parser.add_argument("--jobs", type=int, default=1, help="runs in parallel (each its own process)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--quick", action="store_true", help="smoke test: gpt2-1m, 2 runs of a few steps")
    parser.add_argument("--settings", default="", help="bracket: only these settings (comma-separated)")
    args = parser.parse_args()
    if args.jobs < 1 or args.threads < 1:
        parser.error("--jobs and --threads must be at least 1")
    if args.phase == "report":
        report(args.out, args.docs)
        return
    results = load_results(args.out)
    if args.phase == "sweep":
        tasks = sweep_tasks(args.quick)
    elif args.phase == "long":
        tasks = long_tasks(results, args.quick)
    else:
        settings = tuple(s for s in args.settings.split(",") if s)
        unknown = [s for s in settings if s not in SETTINGS]
        if unknown:
            parser.error(f"--settings: unknown {', '.join(unknown)}; expected some of {', '.join(SETTINGS)}")
        tasks = [] if args.quick else bracket_tasks(results, settings)
    run_phase(tasks, args.out, args.jobs, args.threads, args.quick)


if __name__ == "__main__":
    main()
