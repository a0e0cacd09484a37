"""Ops per optimizer step: the top-level aten ops one ``optimizer.step()`` dispatches, a device-independent
proxy for a GPU's launch cost (every op is at least one kernel launch of ~5-10 us there).

Counted with ``torch.profiler`` on CPU on the GPT-2 124M and Llama 350M parameter sets with pre-filled
gradients, after three warm-up steps (state allocation, first refreshes; refreshes are spread over the
period, so a few blocks refresh on any step). An op is top-level when no aten op encloses it. AdaPM is
counted on the path an accelerator takes (``foreach=True``, no CPU row chunks: ``ops_per_step``) and on
its CPU default (``cpu_ops_per_step``). ``*-compiled`` rows count :func:`adapm.compile_step` (the step's
device work as one Inductor graph: what the graph dispatches as aten ops, i.e. its extern calls such as
batched matmuls and factorizations, plus the host side's table copy and refresh draws; the seconds its
first compiled step took are in ``compile_s``, and each low-rank stack's refresh slots in ``refresh_slots``).
Also counts GPT-2 at 24 layers (same width) to show whether the
count grows with depth.

    python benchmarks/op_count.py --json runs/bench/op_count.json     # GPT-2 124M (12 and 24 layers), Llama 350M
    python benchmarks/op_count.py --quick                              # gpt2-1m, a few optimizers
    python benchmarks/op_count.py --from-json docs/benchmarks/op_count.json
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info, markdown_table, saved_rows
from step_time import make_optimizer

import adapm
from adapm.train.models import build_model

OPTIMIZERS = (
    "adamw-fused",
    "adamw-foreach",
    "adamw-loop",
    "adam-mini",
    "adapm",
    "adapm-mini",
    "adapm-fixed-fused",
    "adapm-mini-fixed-fused",
    "adapm-compiled",
    "adapm-mini-compiled",
)
MODELS = ("gpt2-124m", "gpt2-124m-24l", "llama-350m")


def model_for(name: str) -> nn.Module:
    """A model preset, or ``gpt2-124m-<N>l``: GPT-2 124M's width at depth N."""
    depth = re.fullmatch(r"gpt2-124m-(\d+)l", name)
    if depth is not None:
        from transformers import GPT2Config, GPT2LMHeadModel

        return GPT2LMHeadModel(GPT2Config(n_layer=int(depth.group(1)), n_embd=768, n_head=12, vocab_size=50257))
    return build_model(name)


NO_KERNEL_OPS = frozenset(
    {"aten::narrow", "aten::select", "aten::slice", "aten::view", "aten::unbind", "aten::detach", "aten::detach_",
     "aten::unsqueeze", "aten::expand", "aten::t", "aten::transpose", "aten::alias", "aten::lift_fresh",
     "aten::as_strided", "aten::split", "aten::split_with_sizes", "aten::unflatten", "aten::item",
     "aten::_local_scalar_dense", "aten::mT", "aten::resolve_conj", "aten::resolve_neg"}
)  # fmt: skip
"""Top-level ops that launch no device work: views (``mT``; ``resolve_conj``/``resolve_neg`` return a real
tensor itself), and host reads of CPU scalars (torch AdamW's step counters). ``kernel_ops_per_step``
leaves them out; ``reshape``, ``to`` and ``empty`` stay in (they may copy or allocate)."""


def kernel_ops(top: dict[str, int]) -> int:
    """The ops of a full name -> count table that launch device work."""
    return sum(n for name, n in top.items() if name not in NO_KERNEL_OPS)


def top_level_ops(step: Any) -> tuple[int, dict[str, int]]:
    """Run ``step()`` under the profiler; the number of aten ops not nested in another aten op, and
    their counts by name (most frequent first)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    counts: dict[str, int] = {}
    for event in prof.events():
        if not event.name.startswith("aten::"):
            continue
        parent = event.cpu_parent
        while parent is not None and not parent.name.startswith("aten::"):
            parent = parent.cpu_parent
        if parent is None:
            counts[event.name] = counts.get(event.name, 0) + 1
    return sum(counts.values()), dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def compiled_calls(step: Any) -> int:
    """Run ``step()`` under the profiler; the calls of ``torch.compile``d code it made (each a guard check
    and a call into the compiled graph on the host)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    return sum(event.name.startswith("Torch-Compiled Region") for event in prof.events())


def count(model_name: str, optimizer: str) -> dict[str, Any]:
    torch._dynamo.reset()  # each row as in its own process: compiled variants of other rows count against limits
    torch.manual_seed(0)
    model = model_for(model_name)
    gen = torch.Generator().manual_seed(0)
    params = [p for p in model.parameters() if p.requires_grad]
    row: dict[str, Any] = {"model": model_name, "optimizer": optimizer, "tensors": len(params)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled = optimizer.endswith("-compiled")
        opt = make_optimizer(optimizer.removesuffix("-compiled"), model)
        step = opt.step
        if compiled:
            opt.foreach = True  # type: ignore[attr-defined]
            step = adapm.compile_step(opt)
        for i in range(3):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen) * 1e-3
            start = time.perf_counter()
            step()
            if compiled and i == 1:
                row["compile_s"] = round(time.perf_counter() - start, 1)
        if compiled:
            row["ops_per_step"], ops = top_level_ops(step)
            row["compiled_calls_per_step"] = compiled_calls(step)
            # Refreshes each stack's graph runs per step (the most of its blocks that fall due together)
            row["refresh_slots"] = [s.slots for plan in step._plans.values() for s in plan.stacks]
        elif isinstance(opt, adapm.AdaPM):
            row["cpu_ops_per_step"] = top_level_ops(opt.step)[0]
            opt.foreach = True
            opt._defer_check = True  # as on an accelerator: with fused=True the finite check is read a step later
            adapm.AdaPM._cpu_row_chunks = False
            try:
                for _ in range(2):  # warm-up on this path: with fused=True its compiled calls are built, and
                    opt.step()  # the first step packs the low-rank factors (their views are made at the next)
                row["ops_per_step"], ops = top_level_ops(opt.step)
                if opt.fused:
                    row["compiled_calls_per_step"] = compiled_calls(opt.step)
            finally:
                adapm.AdaPM._cpu_row_chunks = True
        else:
            row["ops_per_step"], ops = top_level_ops(opt.step)
    row["kernel_ops_per_step"] = kernel_ops(ops)
    row["top_ops"] = dict(list(ops.items())[:12])
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--optimizers", default=",".join(OPTIMIZERS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="gpt2-1m; adamw-foreach, adapm and adapm-mini")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--from-json", type=Path, help="print the table of a saved run; no counting")
    args = parser.parse_args()
    columns = [("model", "{}"), ("optimizer", "{}"), ("tensors", "{}"), ("ops_per_step", "{:,}"),
               ("vs_adamw_foreach", "{:.1f}x"), ("kernel_ops_per_step", "{:,}"), ("kernel_vs_adamw_foreach", "{:.1f}x"),
               ("cpu_ops_per_step", "{:,}"), ("compiled_calls_per_step", "{:,}")]  # fmt: skip
    if args.from_json:
        print(markdown_table(saved_rows(parser, args.from_json, "op_count.py"), columns))
        return
    torch.set_num_threads(args.threads)
    models = ["gpt2-1m"] if args.quick else args.models.split(",")
    optimizers = ["adamw-foreach", "adapm", "adapm-mini"] if args.quick else args.optimizers.split(",")
    for name in models:
        if name not in MODELS and name != "gpt2-1m":
            parser.error(f"--models: unknown model {name!r}; choose from {', '.join(MODELS)}")
    rows = []
    for model_name in models:
        mine = []
        for opt in optimizers:
            mine.append(count(model_name, opt))
            print(f"{model_name} {opt}: {mine[-1]['ops_per_step']:,} ops", flush=True)
        ref = next((r for r in mine if r["optimizer"] == "adamw-foreach"), None)
        for row in mine:
            row["vs_adamw_foreach"] = row["ops_per_step"] / ref["ops_per_step"] if ref else None
            row["kernel_vs_adamw_foreach"] = row["kernel_ops_per_step"] / ref["kernel_ops_per_step"] if ref else None
        rows += mine
    print(markdown_table(rows, columns))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        info = {**machine_info(), "threads": args.threads, "command": " ".join(sys.argv)}
        args.json.write_text(json.dumps({"machine": info, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
