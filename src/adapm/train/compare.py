"""Side-by-side comparison: the same data, model and seed for several optimizers, each trained in a
fresh process (so peak memory is honest), then one table, ``summary.json``/``summary.md`` and plots."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from adapm.train.config import CompareConfig, PretrainConfig
from adapm.train.data import prepare_data
from adapm.train.loop import CHECKPOINT, METRICS, SUMMARY, Terminated, read_metrics
from adapm.train.models import checkpoint_dir
from adapm.train.tables import markdown_table

DEFAULT_COMPARE_ROOT = Path("runs/compare")
LATEST = "latest"


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
    """The pretraining config of one arm of the comparison (``cfg.out`` must be resolved)."""
    optim = cfg.optim.for_optimizer(optimizer)
    train = dataclasses.replace(cfg.train, out_dir=str(Path(str(cfg.out)) / optimizer))
    return PretrainConfig(data=cfg.data, model=cfg.model, optim=optim, train=train)


def new_run_dir(root: Path) -> Path:
    """A fresh ``root/<date-time>`` directory, and ``root/latest`` pointing at it (replaced atomically)."""
    root.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out, n = root / stamp, 1
    while True:
        try:
            out.mkdir()
            break
        except FileExistsError:
            n += 1
            out = root / f"{stamp}-{n}"
    tmp = root / f".{LATEST}.tmp{os.getpid()}"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(out.name)
    os.replace(tmp, root / LATEST)
    return out


def resolve_out(cfg: CompareConfig) -> CompareConfig:
    """``cfg`` with its output directory decided: a new dated one by default, the latest one to resume.

    Raises:
        FileNotFoundError: ``--resume`` without ``--out`` and no earlier run to resume.
        FileExistsError: an explicit ``--out`` already holds runs, without ``--resume`` or ``--overwrite``.
    """
    if cfg.out is None:
        if cfg.train.resume:
            latest = DEFAULT_COMPARE_ROOT / LATEST
            if not latest.exists():
                raise FileNotFoundError(
                    f"--resume: no earlier comparison to resume ({latest} does not exist); pass --out DIR"
                )
            return dataclasses.replace(cfg, out=str(latest.resolve()))
        return dataclasses.replace(cfg, out=str(new_run_dir(DEFAULT_COMPARE_ROOT)))
    if not (cfg.train.resume or cfg.train.overwrite):
        taken = [n for n in cfg.optimizer_list() if (Path(cfg.out) / n / CHECKPOINT).exists()]
        if taken:
            raise FileExistsError(
                f"{cfg.out} already holds runs of {', '.join(taken)}: pass --resume to continue them, --overwrite "
                "to delete them and start over, or leave out --out to get a new run directory (nothing was changed)"
            )
    return cfg


def compare(cfg: CompareConfig) -> list[dict[str, Any]]:
    """Run every optimizer of ``cfg`` in its own process, then write and print the summary.

    Returns the summary rows (one dict per optimizer with at least ``optimizer``, ``final_val_loss``,
    ``tokens_per_s``, ``state_bytes``, ``ratio_to_adamw`` and ``peak_rss_bytes``). A ``--resume`` of a
    comparison whose runs are all finished prints the existing summary and changes no file.

    Raises:
        RuntimeError: if any run failed (the others still ran and are summarised).
    """
    # Bad data or --init-from is one error here, before a run directory is made, not one per run; and the
    # runs then share the token cache instead of racing to write it.
    if cfg.model.init_from is not None:
        checkpoint_dir(cfg.model.init_from)
    prepare_data(cfg.data)
    cfg = resolve_out(cfg)
    out = Path(str(cfg.out))
    if cfg.train.resume and _finished(out, cfg.optimizer_list(), cfg.train.steps):
        print((out / "summary.md").read_text(), end="")
        return json.loads((out / "summary.json").read_text())
    out.mkdir(parents=True, exist_ok=True)
    configs = {name: run_config(cfg, name).to_dict() for name in cfg.optimizer_list()}
    return side_by_side(out, "pretrain", configs, reference=lambda: _adamw_reference(cfg))


def _finished(out: Path, names: list[str], steps: int) -> bool:
    """Whether every run in ``out`` finished its ``steps`` and the side-by-side summary was written."""
    if not ((out / "summary.json").exists() and (out / "summary.md").exists()):
        return False
    for name in names:
        try:
            if json.loads((out / name / SUMMARY).read_text()).get("steps") != steps:
                return False
        except (OSError, ValueError):
            return False
    return True


CHILD_RUN_ENV = "ADAPM_SIDE_BY_SIDE_RUN"
"""Set for the processes :func:`side_by_side` starts, so that a fine-tuning run does not summarize
itself (the parent writes the summary of all runs once)."""


def side_by_side(
    out: Path, command: str, configs: dict[str, dict[str, Any]], reference: Any = None
) -> list[dict[str, Any]]:
    """Run ``adapm COMMAND --config FILE`` once per optimizer (each in a fresh process, so peak memory
    is the run's own), then summarize the run directories ``out/NAME`` (see :func:`summarize_runs`).

    Raises:
        RuntimeError: if any run failed (the others still ran and are summarised).
    """
    out.mkdir(parents=True, exist_ok=True)
    failed = []
    for name, run_cfg in configs.items():
        cfg_file = out / f"{name}.config.json"
        cfg_file.write_text(json.dumps(run_cfg, indent=2))
        print(f"== {name}: training in a fresh process ({cfg_file})", flush=True)
        env = {**os.environ, CHILD_RUN_ENV: "1"}  # the child trains; this process writes the one summary
        proc = subprocess.Popen([sys.executable, "-m", "adapm.cli", command, "--config", str(cfg_file)], env=env)
        try:
            returncode = proc.wait()
        except KeyboardInterrupt as exc:  # Ctrl-C reached the run too: let it stop cleanly and say so, then stop
            if isinstance(exc, Terminated):  # SIGTERM may have been sent to this process alone: pass it on
                proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
            raise
        if returncode != 0:
            failed.append(name)
        if returncode < 0:  # a signal: the run could not say why itself
            why = " (the system's out-of-memory killer sends it)" if -returncode == signal.SIGKILL else ""
            print(f"== {name}: killed by {_signal_name(-returncode)}{why}", file=sys.stderr, flush=True)
    rows = summarize_runs(out, list(configs), reference)
    if failed:
        resumable = [name for name in failed if (out / name / CHECKPOINT).exists()]
        hint = (f"; {', '.join(resumable)} kept a checkpoint: run the same command again with --resume to continue"
                if resumable else "")  # fmt: skip
        raise RuntimeError(
            f"these runs failed: {', '.join(failed)} (see their output above; the rest are in {out}){hint}"
        )
    _say_stopped(out, list(configs))
    return rows


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _say_stopped(out: Path, names: list[str]) -> None:
    """Name the runs that stopped at ``--stop-at`` (a checkpoint, no summary yet) and how to continue."""
    stopped = [name for name in names if not (out / name / SUMMARY).exists()]
    if stopped:
        print(f"\n{', '.join(stopped)} stopped before the last step (--stop-at), with checkpoints in {out}: run "
              "the same command again with --resume to continue", flush=True)


def finetune_one(cfg: Any, build_task: Any) -> dict[str, Any]:
    """One fine-tuning run (SFT or RLHF) with the single optimizer of ``cfg.optimizers``, into
    ``cfg.out/NAME``: ``build_task(cfg, model_dir, par)`` makes its :class:`~adapm.train.loop.Task`.
    Under torchrun every rank calls this; rank 0 prepares the default model first."""
    from adapm.train.loop import launch
    from adapm.train.pretrained import resolve_model_dir

    (name,) = cfg.optimizer_list()
    cfg = dataclasses.replace(
        cfg,
        optim=cfg.optim.for_optimizer(name),
        train=dataclasses.replace(cfg.train, out_dir=str(Path(cfg.out) / name)),
    )

    def task_of(par: Any) -> Any:
        return build_task(cfg, resolve_model_dir(cfg.model.model, cfg.model.cache_dir), par)

    return launch(task_of, cfg.optim, cfg.train)


def finetune_side_by_side(cfg: Any, command: str, build_task: Any) -> list[dict[str, Any]]:
    """`adapm sft` / `adapm rlhf`: one run per optimizer of ``cfg.optimizers`` (several: side by side,
    each in a fresh process running ``adapm COMMAND``), then the summary. ``build_task`` as in
    :func:`finetune_one`."""
    from adapm.train import parallel
    from adapm.train.pretrained import resolve_model_dir

    names = cfg.optimizer_list()

    def reference() -> int:  # AdamW's state on this model, for "vs AdamW" when AdamW is not among the runs
        from adapm.train.memory import count_state_bytes, meta_model

        return count_state_bytes(meta_model(str(resolve_model_dir(cfg.model.model, cfg.model.cache_dir))), "adamw")

    if parallel.launched_by_torchrun():
        if len(names) > 1:
            raise ValueError("--optimizers: under torchrun give one optimizer (run the others one after another)")
        finetune_one(cfg, build_task)
        if parallel.rank_from_env() != 0:
            return []
        rows = summarize_runs(Path(cfg.out), names, reference)
        _say_stopped(Path(cfg.out), names)
        return rows
    resolve_model_dir(cfg.model.model, cfg.model.cache_dir)  # convert the default model once, up front
    if len(names) == 1:
        finetune_one(cfg, build_task)
        if os.environ.get(CHILD_RUN_ENV) == "1":  # one run of a side-by-side comparison: no one-row table
            return []
        rows = summarize_runs(Path(cfg.out), names, reference)
        _say_stopped(Path(cfg.out), names)
        return rows
    configs = {name: dataclasses.replace(cfg, optimizers=name).to_dict() for name in names}
    return side_by_side(Path(cfg.out), command, configs, reference)


def summarize(cfg: CompareConfig) -> list[dict[str, Any]]:
    """Collect the runs of a pretraining comparison (see :func:`summarize_runs`); ``cfg.out`` must be set."""
    if cfg.out is None:
        raise ValueError("summarize: set out to the comparison's directory")
    return summarize_runs(Path(cfg.out), cfg.optimizer_list(), lambda: _adamw_reference(cfg))


def summarize_runs(out: Path, names: list[str], reference: Any = None) -> list[dict[str, Any]]:
    """Collect the summaries of the runs ``out/NAME`` into summary.json, summary.md and plots, and print
    the table. ``reference()`` gives AdamW's state bytes when AdamW was not among the runs."""
    runs = {}
    for name in names:
        path = out / name / SUMMARY
        if path.exists():
            runs[name] = (json.loads(path.read_text()), read_metrics(out / name / METRICS))
    if not runs:
        return []
    adamw_bytes = None
    if "adamw" in runs:
        adamw_bytes = runs["adamw"][0]["state_bytes"]
    elif reference is not None:
        adamw_bytes = reference()
    columns = COLUMNS[next(iter(runs.values()))[0].get("task", "pretrain")]
    rows = []
    for name, (summary, _) in runs.items():
        row: dict[str, Any] = {"optimizer": name}
        row.update({key: summary.get(key) for key, _, _ in columns})
        row["ratio_to_adamw"] = summary["state_bytes"] / adamw_bytes if adamw_bytes else None
        row["peak_rss_bytes"] = summary["peak_rss_bytes"]
        row["train_seconds"] = summary["train_seconds"]
        rows.append(row)
    first = next(iter(runs.values()))[0]
    header = {
        "task": first.get("task", "pretrain"),
        "model": first["model"],
        "parameters": first["parameters"],
        "steps": first["steps"],
        "tokens": first["tokens"],
        "threads": first["threads"],
        "machine": machine_info(),
    }
    for key in ("unigram_val_loss", "initial_val_loss", "initial_val_reward"):
        if key in first:
            header[key] = first[key]
    (out / "summary.json").write_text(json.dumps(rows, indent=2))
    (out / "run_info.json").write_text(json.dumps(header, indent=2))
    table = format_table(rows, header)
    (out / "summary.md").write_text(table + "\n")
    plots = _plot(out, runs, first.get("primary", "val_loss"), rows)
    print(table)
    print(f"\nwrote {out}/summary.json, summary.md, {', '.join(plots)}")
    return rows


def _adamw_reference(cfg: CompareConfig) -> int:
    from adapm.train.memory import count_state_bytes
    from adapm.train.models import build_model

    data = prepare_data(cfg.data)
    model = build_model(cfg.model.model, data.vocab_size, cfg.data.seq_len, device="meta")
    return count_state_bytes(model, "adamw")


_COMMON_TAIL = [
    ("tokens_per_s", "tokens/s", "{:,.0f}"),
    ("state_bytes", "state", "bytes"),
]
COLUMNS: dict[str, list[tuple[str, str, str]]] = {
    "pretrain": [
        ("lr", "lr", "{:g}"),
        ("lr_source", "lr from", "{}"),
        ("final_val_loss", "final val loss", "{:.3f}"),
        ("final_train_loss", "final train loss", "{:.3f}"),
        *_COMMON_TAIL,
    ],
    "sft": [
        ("lr", "lr", "{:g}"),
        ("final_val_loss", "eval loss", "{:.4f}"),
        ("final_val_ppl", "eval perplexity", "{:.3f}"),
        ("final_train_loss", "final train loss", "{:.3f}"),
        *_COMMON_TAIL,
    ],
    "rlhf": [
        ("lr", "lr", "{:g}"),
        ("final_val_reward", "eval reward (greedy)", "{:.3f}"),
        ("final_val_sample_reward", "eval reward (sampled)", "{:.3f}"),
        ("final_val_kl", "eval KL", "{:.3f}"),
        ("final_val_length", "eval length", "{:.1f}"),
        *_COMMON_TAIL,
    ],
}
"""Summary columns per task: (summary key, heading, format; "bytes" = human-readable bytes)."""


def format_table(rows: list[dict[str, Any]], header: dict[str, Any]) -> str:
    """The Markdown summary table with a line saying what was run where."""
    m = header["machine"]
    baseline = ""
    if "unigram_val_loss" in header:
        baseline = f"; unigram baseline val loss {header['unigram_val_loss']:.3f}"
    if "initial_val_loss" in header:
        baseline = f"; eval loss before fine-tuning {header['initial_val_loss']:.4f}"
    if "initial_val_reward" in header:
        baseline = f"; eval reward before RLHF {header['initial_val_reward']:.3f}"
    columns = [(key, heading, fmt) for key, heading, fmt in COLUMNS[header.get("task", "pretrain")]]
    table_rows = [
        {**r, "vs_adamw": None if r.get("ratio_to_adamw") is None else 100 * r["ratio_to_adamw"]} for r in rows
    ]
    columns += [("vs_adamw", "vs AdamW", "{:.1f}%"), ("peak_rss_bytes", "peak RSS", "bytes")]
    head = (
        f"{header['model']} ({header['parameters'] / 1e6:.2f}M parameters), {header['steps']} steps, "
        f"{header['tokens']:,} tokens per run{baseline}; "
        f"{m['cpus']} CPUs ({m['processor']}), {header['threads']} threads, torch {m['torch']}, git {m['git_sha']}"
    )
    return head + "\n\n" + markdown_table(table_rows, [("optimizer", "optimizer", "{}"), *columns])


def smooth(values: list[float], weight: float = 0.6) -> list[float]:
    """An exponential moving average (as TensorBoard's smoothing), debiased at the start."""
    out, avg = [], 0.0
    for i, value in enumerate(values, 1):
        avg = weight * avg + (1 - weight) * value
        out.append(avg / (1 - weight**i))
    return out


def _plot(
    out: Path, runs: dict[str, tuple[dict[str, Any], list[dict[str, Any]]]], primary: str, rows: list[dict[str, Any]]
) -> list[str]:
    """Loss (or reward) against steps and against time, and the optimizer state of each row as a bar
    chart in % of AdamW's (as the table: from AdamW's run, or its meta-device count without one).
    Returns the file names written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    first = next(iter(runs.values()))[0]
    title = (
        f"{first['model']} ({first['parameters'] / 1e6:.2f}M parameters), {first['tokens']:,} tokens per run, "
        f"seed {first.get('seed', 0)}"
    )
    train_key, ylabel = ("reward", "reward") if primary == "val_reward" else ("train_loss", "loss")
    for xkey, fname, xlabel in (
        ("step", f"{ylabel}_vs_step.png", "step"),
        ("elapsed_s", f"{ylabel}_vs_time.png", "seconds of training"),
    ):
        fig, ax = plt.subplots(figsize=(9, 4.5))
        for name, (_, metrics) in runs.items():
            train = [(m[xkey], m[train_key]) for m in metrics if train_key in m]
            val = [(m[xkey], m[primary]) for m in metrics if primary in m]
            color = None
            if train:
                xs, ys = zip(*train)
                (raw,) = ax.plot(xs, ys, alpha=0.2, linewidth=1)
                color = raw.get_color()
                ax.plot(xs, smooth(list(ys)), color=color, label=f"{name} train (smoothed)")
            if val:
                ax.plot(*zip(*val), "o-", color=color, markersize=4, label=f"{name} {primary.replace('_', ' ')}")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=9)
        if xkey == "step":
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / fname, dpi=120)
        plt.close(fig)
    fig, ax = plt.subplots(figsize=(7, 4))
    values = [row["state_bytes"] / 1e6 for row in rows]
    ax.bar([row["optimizer"] for row in rows], values, color="tab:blue")
    for i, row in enumerate(rows):
        share = f" ({100 * row['ratio_to_adamw']:.0f}% of AdamW)" if row["ratio_to_adamw"] else ""
        ax.text(i, values[i], f"{values[i]:.2f} MB{share}", ha="center", va="bottom", fontsize=8)
    ax.margins(y=0.12)  # room for the labels above the bars
    ax.set_ylabel("optimizer state (MB)")
    ax.set_title(f"Optimizer state, {first['model']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "state_bytes.png", dpi=120)
    plt.close(fig)
    return [f"{ylabel}_vs_step.png", f"{ylabel}_vs_time.png", "state_bytes.png"]
