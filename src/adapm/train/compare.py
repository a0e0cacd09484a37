"""Side-by-side comparison: the same data, model and seed for several optimizers, each trained in a
fresh process (so peak memory is honest), then one table, ``summary.json``/``summary.md`` and plots."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

from adapm.partition.report import format_bytes
from adapm.train.config import CompareConfig, PretrainConfig
from adapm.train.data import prepare_data
from adapm.train.loop import METRICS, SUMMARY


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on."""
    import torch

    sha = None
    with contextlib.suppress(OSError):
        sha = (
            subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"],
                capture_output=True,
                text=True,
                cwd=Path(__file__).parent,
                check=False,
            ).stdout.strip()
            or None
        )
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "platform": platform.platform(),
        "processor": cpu,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "git_sha": sha,
    }


def run_config(cfg: CompareConfig, optimizer: str) -> PretrainConfig:
    """The pretraining config of one arm of the comparison."""
    optim = dataclasses.replace(cfg.optim, optimizer=optimizer)
    train = dataclasses.replace(cfg.train, out_dir=str(Path(cfg.out) / optimizer))
    return PretrainConfig(data=cfg.data, model=cfg.model, optim=optim, train=train)


def _read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def compare(cfg: CompareConfig) -> list[dict[str, Any]]:
    """Run every optimizer of ``cfg`` in its own process, then write and print the summary.

    Returns the summary rows (one dict per optimizer with at least ``optimizer``, ``final_val_loss``,
    ``tokens_per_s``, ``state_bytes``, ``ratio_to_adamw`` and ``peak_rss_bytes``).

    Raises:
        RuntimeError: if any run failed (the others still ran and are summarised).
    """
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    prepare_data(cfg.data)  # tokenize once here, so the runs share the cache instead of racing for it
    failed = []
    for name in cfg.optimizer_list():
        run_cfg = run_config(cfg, name)
        cfg_file = out / f"{name}.config.json"
        cfg_file.write_text(json.dumps(run_cfg.to_dict(), indent=2))
        print(f"== {name}: training in a fresh process ({cfg_file})", flush=True)
        proc = subprocess.run([sys.executable, "-m", "adapm.cli", "pretrain", "--config", str(cfg_file)], check=False)
        if proc.returncode != 0:
            failed.append(name)
    rows = summarize(cfg)
    if failed:
        raise RuntimeError(f"these runs failed: {', '.join(failed)} (see their output above; the rest are in {out})")
    return rows


def summarize(cfg: CompareConfig) -> list[dict[str, Any]]:
    """Collect the runs' summaries into summary.json, summary.md and plots; print the table."""
    out = Path(cfg.out)
    runs = {}
    for name in cfg.optimizer_list():
        path = out / name / SUMMARY
        if path.exists():
            runs[name] = (json.loads(path.read_text()), _read_metrics(out / name / METRICS))
    if not runs:
        return []
    adamw_bytes = runs["adamw"][0]["state_bytes"] if "adamw" in runs else _adamw_reference(cfg)
    rows = []
    for name, (summary, _) in runs.items():
        rows.append(
            {
                "optimizer": name,
                "final_val_loss": summary["final_val_loss"],
                "final_train_loss": summary["final_train_loss"],
                "tokens_per_s": summary["tokens_per_s"],
                "state_bytes": summary["state_bytes"],
                "ratio_to_adamw": summary["state_bytes"] / adamw_bytes,
                "peak_rss_bytes": summary["peak_rss_bytes"],
                "lr": summary["lr"],
                "train_seconds": summary["train_seconds"],
            }
        )
    first = next(iter(runs.values()))[0]
    header = {
        "model": first["model"],
        "parameters": first["parameters"],
        "steps": first["steps"],
        "tokens": first["tokens"],
        "unigram_val_loss": first["unigram_val_loss"],
        "threads": first["threads"],
        "machine": machine_info(),
    }
    (out / "summary.json").write_text(json.dumps(rows, indent=2))
    (out / "run_info.json").write_text(json.dumps(header, indent=2))
    table = format_table(rows, header)
    (out / "summary.md").write_text(table + "\n")
    _plot(out, runs)
    print(table)
    return rows


def _adamw_reference(cfg: CompareConfig) -> int:
    from adapm.train.memory import count_state_bytes
    from adapm.train.models import build_model

    data = prepare_data(cfg.data)
    model = build_model(cfg.model.model, data.vocab_size, cfg.data.seq_len, device="meta")
    return count_state_bytes(model, "adamw")


def format_table(rows: list[dict[str, Any]], header: dict[str, Any]) -> str:
    """The Markdown summary table with a line saying what was run where."""
    m = header["machine"]
    lines = [
        f"{header['model']} ({header['parameters'] / 1e6:.2f}M parameters), {header['steps']} steps, "
        f"{header['tokens']:,} tokens per run; unigram baseline val loss {header['unigram_val_loss']:.3f}; "
        f"{m['cpus']} CPUs ({m['processor']}), {header['threads']} threads, torch {m['torch']}, git {m['git_sha']}",
        "",
        "| optimizer | lr | final val loss | final train loss | tokens/s | state | vs AdamW | peak RSS |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['optimizer']} | {r['lr']:g} | {r['final_val_loss']:.3f} | {r['final_train_loss']:.3f} | "
            f"{r['tokens_per_s']:,.0f} | {format_bytes(r['state_bytes'])} | {100 * r['ratio_to_adamw']:.1f}% | "
            f"{format_bytes(r['peak_rss_bytes'])} |"
        )
    return "\n".join(lines)


def _plot(out: Path, runs: dict[str, tuple[dict[str, Any], list[dict[str, Any]]]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for xkey, fname, xlabel in (("step", "loss_vs_step.png", "step"), ("elapsed_s", "loss_vs_time.png", "seconds")):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for name, (_, metrics) in runs.items():
            train = [(m[xkey], m["train_loss"]) for m in metrics]
            val = [(m[xkey], m["val_loss"]) for m in metrics if "val_loss" in m]
            (line,) = ax.plot(*zip(*train), alpha=0.5, label=f"{name} train")
            if val:
                ax.plot(*zip(*val), "o-", color=line.get_color(), label=f"{name} val")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("loss")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / fname, dpi=120)
        plt.close(fig)
    fig, ax = plt.subplots(figsize=(7, 4))
    names = list(runs)
    values = [runs[n][0]["state_bytes"] / 1e6 for n in names]
    ax.bar(names, values, color="tab:blue")
    for i, v in enumerate(values):
        ax.text(i, v, f"{v:.2f}", ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("optimizer state (MB)")
    fig.tight_layout()
    fig.savefig(out / "state_bytes.png", dpi=120)
    plt.close(fig)
