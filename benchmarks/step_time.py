"""Time of ``optimizer.step()`` alone on realistic parameter sets, every optimizer side by side.

Gradients are pre-filled (seeded, N(0, 1e-3^2)); every optimizer updates the same parameters in
interleaved rounds in one process (a warm-up round first, not timed: state allocation, GaLore's first
SVD). Reports the median and IQR per optimizer, the ratio to ``adamw-fused`` (the fastest AdamW torch
offers on CPU) measured in the same rounds, each optimizer's lower bound on this machine
(max(bytes moved / measured bandwidth, low-rank flops / measured skinny-matmul throughput)), and the
optimizer step's share of a forward+backward pass of the model at batch 4 x 512 tokens.

    python benchmarks/step_time.py --json runs/bench/step_time.json      # GPT-2 124M and Llama 350M, 1 and 2 threads
    python benchmarks/step_time.py --quick                                # a small model, within a minute
    python benchmarks/step_time.py --cost-model                           # the cost model only, no timing
    python benchmarks/step_time.py --from-json runs/bench/step_time.json   # the tables of a saved run

Two ratios: ``ratio_to_adamw`` against ``adamw-fused`` and ``ratio_to_adamw_foreach`` against
``torch.optim.AdamW(foreach=True)`` (torch's default on GPUs), both from the same rounds. Where
a group of optimizers was timed without ``adamw-foreach`` (Llama 350M is timed in groups to fit in
memory), the foreach ratio is chained through the ``adamw-fused`` row every group has and flagged
``foreach_ratio_chained``.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info, markdown_table

import adapm
from adapm.train.config import OptimConfig
from adapm.train.models import build_model
from adapm.train.optimizers import build_optimizer

OPTIMIZERS = (
    "adamw-fused",
    "adamw-foreach",
    "adamw-loop",
    "adam-mini",
    "adafactor",
    "galore",
    "adapm",
    "adapm-mini",
    "adapm-fixed",
    "adapm-mini-fixed",
    "adapm-fused",
    "adapm-mini-fused",
    "adapm-fixed-fused",
    "adapm-mini-fixed-fused",
    "adapm-foreach",
    "adapm-mini-foreach",
    "adapm-fixed-fused-foreach",
    "adapm-mini-fixed-fused-foreach",
    "adapm-bf16",
    "adapm-mini-bf16",
    "adapm-int8",
    "adapm-mini-int8",
    "adamw-8bit",
    "adapm-compiled",
    "adapm-mini-compiled",
    "adapm-mini-fixed-compiled",
)
"""``*-bf16``, ``*-int8``: ``state_dtype="bf16"`` or ``"int8"`` (large state stored in bfloat16, or as 8-bit
codes with block scales; float32 math on working copies); ``adamw-8bit``: bitsandbytes' AdamW8bit;
``*-fixed``: AdaPM with ``tracker="fixed"`` (two skinny matmuls per low-rank block instead of four);
``*-fused``: with ``fused=True`` (the elementwise tail as one compiled kernel); ``*-foreach``: the grouped
step (the default off CPU) timed on CPU (``*-fixed-fused-foreach``: the fast configuration on that step,
with the finite check read on the host as on CPU); ``*-compiled``: stepped with :func:`adapm.compile_step`
(the step's device work as one Inductor graph, built in the warm-up: its second step)."""
MODELS = {"gpt2-124m": "gpt2-124m", "llama-350m": "llama-350m", "quick": "gpt2-20m"}


def make_optimizer(name: str, model: nn.Module) -> torch.optim.Optimizer:
    compiled = name.endswith("-compiled")
    name = name.removesuffix("-compiled")
    if compiled:  # the grouped step's state layout (the compiled step's first step is opt.step())
        name += "-foreach"
    lr = 1e-6  # tiny: the parameters barely move over the rounds
    if name.startswith("adamw-") and name != "adamw-8bit":
        flags = {
            "adamw-fused": dict(fused=True),
            "adamw-foreach": dict(foreach=True),
            "adamw-loop": dict(foreach=False),
        }
        return torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1, **flags[name])
    grouped = name.endswith("-foreach")  # AdaPM's grouped step, the default off CPU, timed here on CPU
    name = name.removesuffix("-foreach")
    fused = name.endswith("-fused")
    name = name.removesuffix("-fused")
    fixed = name.endswith("-fixed")
    name = name.removesuffix("-fixed")
    opt = build_optimizer(model, OptimConfig(optimizer=name, lr=lr, tracker="fixed" if fixed else "power", fused=fused))
    if grouped:
        opt.foreach = True  # type: ignore[attr-defined]
    return opt


def measure_bandwidth(threads: int) -> float:
    """Bytes/s of ``a += b`` on 256 MB tensors (read 2, write 1), median of 5."""
    torch.set_num_threads(threads)
    a, b = torch.ones(1 << 26), torch.ones(1 << 26)
    times = []
    for _ in range(6):
        t = time.perf_counter()
        a.add_(b)
        times.append(time.perf_counter() - t)
    return 3 * 4 * a.numel() / statistics.median(times[1:])


def measure_matmul(threads: int, rank: int = 39) -> float:
    """FLOP/s of a 768 x 3072 matrix times a rank-``rank`` factor, median of 9: rank 39 is low-rank
    tracking's skinny matmul, rank 384 GaLore's projection."""
    torch.set_num_threads(threads)
    m, r = torch.randn(768, 3072), torch.randn(rank, 3072)
    times = []
    for _ in range(10):
        t = time.perf_counter()
        m @ r.T
        times.append(time.perf_counter() - t)
    return 2 * 768 * 3072 * rank / statistics.median(times[1:])


def cost_model(name: str, model: nn.Module, opt: torch.optim.Optimizer) -> tuple[float, float]:
    """(bytes moved, flops) of one step: float32 reads and writes of parameters, gradients and dense
    state; the skinny matmuls of low-rank momentum (4 per block and step: L R, m R^T, Q^T m and the
    corrected momentum) and GaLore's projections (2 per matrix)."""
    n = sum(p.numel() for p in model.parameters())
    if name == "adamw-8bit":  # 8-bit moments: 1 byte each, read and written
        return 16.0 * n, 0.0
    if name.startswith("adamw"):
        return 28.0 * n, 0.0
    if name in ("adam-mini", "adafactor"):
        return 20.0 * n, 0.0
    if name == "galore":
        flops, total = 0.0, 0.0
        for group in opt.param_groups:
            for p in group["params"]:
                if "rank" in group:
                    rows, cols = p.shape
                    flops += 2 * 2 * rows * cols * group["rank"]
                total += 28.0 * p.numel()
        return total, flops
    assert isinstance(opt, adapm.AdaPM)
    total, flops = 0.0, 0.0
    for group in opt.param_groups:
        for p in group["params"]:
            layout = opt.layout(p)
            stored = {"fp32": 1.0, "bf16": 0.5, "int8": 0.25}[group["state_dtype"]]  # of float32's bytes
            for seg in layout.segments:
                numel = seg.shape[0] * (seg.shape[1] if len(seg.shape) > 1 else 1)
                per = 12.0  # read p, g; write p
                per += 8.0 * stored if layout.second_moment == "full" else 0.0
                per += {"full": 8.0 * stored, "none": 0.0, "lowrank": 8.0}[seg.momentum]  # m, or the transient buffer
                total += per * numel
                if seg.momentum == "lowrank":
                    flops += (2 if group["tracker"] == "fixed" else 4) * 2 * numel * seg.rank
    return total, flops


def forward_backward_seconds(model: nn.Module, threads: int, repeats: int) -> float:
    torch.set_num_threads(threads)
    x = torch.randint(0, model.config.vocab_size, (4, 512), generator=torch.Generator().manual_seed(0))
    times = []
    for _ in range(repeats + 1):
        t = time.perf_counter()
        model(input_ids=x, labels=x).loss.backward()
        times.append(time.perf_counter() - t)
    return statistics.median(times[1:])


def run(model_name: str, threads_list: list[int], rounds: int, optimizers: list[str]) -> list[dict[str, Any]]:
    torch.manual_seed(0)
    model = build_model(MODELS[model_name], device="cpu")
    gen = torch.Generator().manual_seed(0)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen) * 1e-3
    opts = {name: make_optimizer(name, model) for name in optimizers}
    steps = {name: adapm.compile_step(opt) if name.endswith("-compiled") else opt.step for name, opt in opts.items()}
    warmup: dict[str, float] = {}
    torch.set_num_threads(threads_list[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, step in steps.items():
            if name.endswith("-compiled"):
                step()  # the first step runs opt.step(); the second builds the graph (its time is reported)
            t = time.perf_counter()
            step()
            warmup[name] = time.perf_counter() - t
    rows = []
    for threads in threads_list:
        torch.set_num_threads(threads)
        bandwidth, matmul = measure_bandwidth(threads), measure_matmul(threads)
        wide = measure_matmul(threads, rank=384)
        torch.set_num_threads(threads)
        if threads != threads_list[0]:  # compiled kernels are built per thread count: not timed
            for name, step in steps.items():
                if name.endswith(("-fused", "-compiled")):
                    step()
        times: dict[str, list[float]] = {name: [] for name in opts}
        for _ in range(rounds):
            for name, step in steps.items():
                t = time.perf_counter()
                step()
                times[name].append(time.perf_counter() - t)
        fwd_bwd = forward_backward_seconds(model, threads, repeats=2 if rounds < 5 else 3)
        for p in model.parameters():  # forward/backward overwrote the gradients: restore them
            p.grad = torch.randn(p.shape, generator=gen) * 1e-3
        fused_median = statistics.median(times[optimizers[0]]) if optimizers[0] == "adamw-fused" else None
        for name, ts in times.items():
            q = statistics.quantiles(ts, n=4) if len(ts) >= 2 else [ts[0], ts[0], ts[0]]
            med = statistics.median(ts)
            nbytes, flops = cost_model(name.removesuffix("-compiled"), model, opts[name])
            bound = max(nbytes / bandwidth, flops / (wide if name == "galore" else matmul))
            rows.append(
                {
                    "optimizer": name,
                    "model": model_name,
                    "threads": threads,
                    "median_ms": 1000 * med,
                    "iqr_ms": 1000 * (q[2] - q[0]),
                    "ratio_to_adamw": med / fused_median if fused_median else None,
                    "lower_bound_ms": 1000 * bound,
                    "percent_of_lower_bound": 100 * bound / med,
                    "step_share_of_fwd_bwd": med / fwd_bwd,
                    "fwd_bwd_ms": 1000 * fwd_bwd,
                    "first_step_ms": 1000 * warmup[name],
                    "bandwidth_gb_s": bandwidth / 1e9,
                    "matmul_gflop_s": matmul / 1e9,
                    "wide_matmul_gflop_s": wide / 1e9,
                    "rounds": rounds,
                    "state_bytes": adapm.state_bytes(opts[name]),
                }
            )
    del opts, steps, model
    gc.collect()
    return rows


def add_foreach_ratios(rows: list[dict[str, Any]]) -> None:
    """Set ``ratio_to_adamw_foreach`` on every row. Rows come in blocks (one timed group at one thread
    count) that each start with ``adamw-fused``; inside a block with ``adamw-foreach`` the ratio is
    direct, elsewhere it is ``ratio_to_adamw`` times fused/foreach of a block of the same model and
    thread count that has both."""
    blocks: list[list[dict[str, Any]]] = []
    for r in rows:
        if r["optimizer"] == "adamw-fused" or not blocks:
            blocks.append([])
        blocks[-1].append(r)
    fused_over_foreach: dict[tuple[str, int], float] = {}
    for block in blocks:
        names = {r["optimizer"]: r for r in block}
        if "adamw-fused" in names and "adamw-foreach" in names:
            key = (block[0]["model"], block[0]["threads"])
            fused_over_foreach.setdefault(key, names["adamw-fused"]["median_ms"] / names["adamw-foreach"]["median_ms"])
    for block in blocks:
        foreach = next((r for r in block if r["optimizer"] == "adamw-foreach"), None)
        link = fused_over_foreach.get((block[0]["model"], block[0]["threads"]))
        for r in block:
            if foreach is not None:
                r["ratio_to_adamw_foreach"], r["foreach_ratio_chained"] = r["median_ms"] / foreach["median_ms"], False
            elif link is not None and r.get("ratio_to_adamw") is not None:
                r["ratio_to_adamw_foreach"], r["foreach_ratio_chained"] = r["ratio_to_adamw"] * link, True
            else:
                r["ratio_to_adamw_foreach"], r["foreach_ratio_chained"] = None, False


def print_tables(rows: list[dict[str, Any]], info: dict[str, Any]) -> None:
    """The Markdown table of a run (as in docs/benchmarks.md) and its measured machine rates."""
    add_foreach_ratios(rows)
    shown = [
        {**r, "ratio_to_adamw_foreach": None if r["ratio_to_adamw_foreach"] is None
         else f"{r['ratio_to_adamw_foreach']:.2f}" + ("*" if r["foreach_ratio_chained"] else "")}
        for r in rows
    ]  # fmt: skip
    columns = [
        ("model", "{}"),
        ("threads", "{}"),
        ("optimizer", "{}"),
        ("median_ms", "{:.0f}"),
        ("iqr_ms", "{:.0f}"),
        ("ratio_to_adamw", "{:.2f}"),
        ("ratio_to_adamw_foreach", "{}"),
        ("lower_bound_ms", "{:.0f}"),
        ("percent_of_lower_bound", "{:.0f}%"),
        ("step_share_of_fwd_bwd", "{:.3f}"),
        ("first_step_ms", "{:.0f}"),
    ]
    print(markdown_table(shown, columns))
    if any(r["foreach_ratio_chained"] for r in rows):
        print("* chained through adamw-fused: this group was timed without adamw-foreach")
    for threads in sorted({r["threads"] for r in rows}):
        sub = [r for r in rows if r["threads"] == threads]
        print(
            f"{threads} thread(s), medians over the run: bandwidth "
            f"{statistics.median(r['bandwidth_gb_s'] for r in sub):.0f} GB/s, skinny matmul "
            f"{statistics.median(r['matmul_gflop_s'] for r in sub):.0f} GFLOP/s, GaLore-sized matmul "
            f"{statistics.median(r['wide_matmul_gflop_s'] for r in sub):.0f} GFLOP/s"
        )
    print(f"machine: {info['processor']}, {info['cpus']} CPUs, torch {info['torch']}, git {info['git_sha']}")


def cost_table(model_name: str) -> dict[str, Any]:
    """The static cost of AdaPM's low-rank work on ``model_name`` (built on the meta device): the share
    of parameters in low-rank blocks, the ranks, and the matmul flops per step of each tracker against
    AdamW's bytes per step."""
    model = build_model(MODELS[model_name], device="meta")
    row: dict[str, Any] = {"model": model_name, "parameters": sum(p.numel() for p in model.parameters())}
    for tracker in ("power", "fixed"):
        opt = adapm.AdaPM(model, lr=1e-3, tracker=tracker)
        _, flops = cost_model("adapm", model, opt)
        row[f"gflop_per_step_{tracker}"] = flops / 1e9
        row[f"flops_per_parameter_{tracker}"] = flops / row["parameters"]
    lowrank, shapes = 0, set()
    for p in model.parameters():
        for seg in opt.layout(p).segments:
            if seg.momentum == "lowrank":
                lowrank += seg.shape[0] * seg.shape[1]
                shapes.add(f"{seg.shape[0]}x{seg.shape[1]} r{seg.rank}")
    row["lowrank_share"] = lowrank / row["parameters"]
    row["lowrank_shapes"] = ", ".join(sorted(shapes))
    row["adamw_bytes_per_step"] = cost_model("adamw-fused", model, opt)[0]
    return row


def optimizer_groups(model: str, optimizers: list[str], group_size: int | None) -> list[list[str]]:
    """Split the optimizers into groups that are timed together, each with ``adamw-fused`` as the
    reference, so that every optimizer's state fits in memory at once (Llama 350M: 8 AdamW-sized
    states do not fit in 24 GiB)."""
    size = group_size or (len(optimizers) if model != "llama-350m" else 3)
    others = [o for o in optimizers if o != "adamw-fused"]
    head = ["adamw-fused"] if "adamw-fused" in optimizers else []
    if len(others) <= size:
        return [head + others]
    return [head + others[i : i + size] for i in range(0, len(others), size)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="gpt2-124m,llama-350m", help="comma-separated: gpt2-124m, llama-350m")
    parser.add_argument("--threads", default="1,2", help="comma-separated torch thread counts")
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds per thread count")
    parser.add_argument("--optimizers", default=",".join(OPTIMIZERS))
    parser.add_argument("--quick", action="store_true", help="GPT-2 20M shapes, 1 thread, 3 rounds (smoke test)")
    parser.add_argument(
        "--group-size",
        type=int,
        help="optimizers timed together besides adamw-fused (default: all; 3 for llama-350m, to fit in memory)",
    )
    parser.add_argument("--cost-model", action="store_true", help="print the low-rank cost of each model; no timing")
    parser.add_argument("--from-json", type=Path, help="print the tables of a run saved with --json; no timing")
    parser.add_argument("--json", type=Path, help="write the rows (and machine info) here")
    args = parser.parse_args()
    if args.from_json:
        try:
            saved = json.loads(args.from_json.read_text())
            print_tables(saved["rows"], saved["machine"])
        except (OSError, ValueError, KeyError) as err:
            parser.error(f"--from-json {args.from_json}: not a step_time.py --json file ({type(err).__name__}: {err})")
        return
    if args.cost_model:
        cost_rows = [cost_table(m) for m in (["quick"] if args.quick else args.models.split(","))]
        print(markdown_table(cost_rows, [
            ("model", "{}"), ("parameters", "{:,}"), ("lowrank_share", "{:.1%}"), ("lowrank_shapes", "{}"),
            ("gflop_per_step_power", "{:.1f}"), ("gflop_per_step_fixed", "{:.1f}"),
            ("flops_per_parameter_fixed", "{:.0f}"), ("adamw_bytes_per_step", "{:,.0f}"),
        ]))  # fmt: skip
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({"machine": machine_info(), "rows": cost_rows}, indent=2))
        return
    models = ["quick"] if args.quick else args.models.split(",")
    threads = [1] if args.quick else [int(t) for t in args.threads.split(",")]
    rounds = 3 if args.quick else args.rounds
    optimizers = args.optimizers.split(",")
    for name in optimizers:
        if name not in OPTIMIZERS:
            parser.error(f"unknown optimizer {name!r}; choose from {OPTIMIZERS}")
    rows = []
    for model in models:
        if model not in MODELS:
            parser.error(f"unknown model {model!r}; choose from {sorted(MODELS)}")
        for group in optimizer_groups(model, optimizers, args.group_size):
            rows += run(model, threads, rounds, group)
            if args.json:  # keep what is done if a later model fails
                args.json.parent.mkdir(parents=True, exist_ok=True)
                args.json.write_text(json.dumps({"partial": True, "rows": rows}, indent=2))
    info = machine_info()
    info.update(seed=0, rounds=rounds, command=" ".join(sys.argv))
    print_tables(rows, info)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"machine": info, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
