"""The prepared GPU check: one script, a few minutes on one CUDA GPU, everything written as JSON.

1. the test suite's CUDA-marked tests (``pytest -m cuda``);
2. ops and CUDA kernel launches per ``optimizer.step()`` (GPT-2 124M parameter set);
3. step time against ``torch.optim.AdamW(fused=True)``, median of timed steps after warm-up, on GPT-2
   124M (float32) and a 1.1B Llama shape (bfloat16 parameters, float32 state);
4. peak GPU memory of a whole training step (forward, backward, step) per optimizer, with its
   optimizer-state bytes, on the same two models;
5. the harness's training loop (``adapm pretrain``): tokens/s when it reads the device every step
   (``--log-every 1``) and every 20 steps, as it now does between log steps.

On the GPU machine, from the repository root, with its own torch and transformers:

    PYTHONUNBUFFERED=1 PYTHONPATH=src python3 benchmarks/gpu_check.py --json $OUT/gpu_check.json
    python benchmarks/gpu_check.py --device cpu --quick --json /tmp/g.json     # smoke test of the script (CI)
    python benchmarks/gpu_check.py --from-json docs/benchmarks/gpu_check_h200.json   # its tables
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info, markdown_table
from op_count import kernel_ops, top_level_ops

import adapm

OPTIMIZERS = ("adamw-fused", "adamw-foreach", "adapm", "adapm-mini", "adapm-fixed", "adapm-mini-fixed",
              "adapm-perblock", "adapm-mini-perblock", "adapm-mini-bf16", "adapm-mini-int8")
"""``-fixed``: ``tracker="fixed"``; ``-perblock``: ``foreach=False`` (the single-tensor reference path);
``-bf16``, ``-int8``: ``state_dtype`` (large state in bfloat16, or 8-bit codes with block scales);
``-fused``: ``fused=True`` (compiled tails, timed in a later section); ``-compiled``: stepped with
:func:`adapm.compile_step` (``mode="reduce-overhead"``: the device work as one graph, CUDA graphs on CUDA;
timed in the last section)."""


def make_model(name: str, device: torch.device) -> nn.Module:
    torch.manual_seed(0)
    with torch.device(device):  # built where it runs: a 1B model's CPU init would cost minutes
        return _make_model(name, device)


def _make_model(name: str, device: torch.device) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    if name == "gpt2-124m":
        model: nn.Module = GPT2LMHeadModel(GPT2Config())
    elif name == "llama-1b":
        config = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=16,
                             num_key_value_heads=16, vocab_size=32000)  # fmt: skip
        model = LlamaForCausalLM(config)
    elif name == "tiny":
        model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=256, n_positions=64))
    else:
        raise ValueError(f"unknown model {name!r}")
    model = model.to(device)
    return model.to(torch.bfloat16) if name == "llama-1b" else model


def stepper(name: str, opt: torch.optim.Optimizer) -> Any:
    """What one step of optimizer ``name`` calls: ``opt.step``, or its compiled step (``-compiled``)."""
    return adapm.compile_step(opt, mode="reduce-overhead") if name.endswith("-compiled") else opt.step


def make_optimizer(name: str, model: nn.Module) -> torch.optim.Optimizer:
    name = name.removesuffix("-compiled")
    if name.startswith("adamw-"):
        flag = {"adamw-fused": {"fused": True}, "adamw-foreach": {"foreach": True}}[name]
        return torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95), weight_decay=0.1, **flag)
    cls = adapm.AdaPMMini if name.startswith("adapm-mini") else adapm.AdaPM
    fused = name.endswith("-fused")
    name = name.removesuffix("-fused")
    state_dtype = name.rsplit("-", 1)[-1] if name.endswith(("-bf16", "-int8")) else "fp32"
    return cls(model, lr=1e-5, tracker="fixed" if name.endswith("-fixed") else "power", fused=fused,
               foreach=False if name.endswith("-perblock") else None, state_dtype=state_dtype)  # fmt: skip


def fill_grads(model: nn.Module, seed: int) -> None:
    gen = torch.Generator(device="cpu").manual_seed(seed)
    for p in model.parameters():
        p.grad = (torch.randn(p.shape, generator=gen) * 1e-3).to(device=p.device, dtype=p.dtype)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def step_time(model_name: str, optimizers: list[str], device: torch.device, steps: int) -> list[dict[str, Any]]:
    model = make_model(model_name, device)
    fill_grads(model, 0)
    rows = []
    for name in optimizers:
        if name == "adamw-fused" and model_name == "llama-1b" and device.type == "cpu":
            continue
        opt = make_optimizer(name, model)
        step = stepper(name, opt)
        times = []
        for _ in range(steps + 3):
            sync(device)
            start = time.perf_counter()
            step()
            sync(device)
            times.append(time.perf_counter() - start)
        rows.append({"model": model_name, "optimizer": name, "median_ms": 1e3 * statistics.median(times[3:]),
                     "first_step_s": times[0], "second_step_s": times[1],
                     "state_bytes": adapm.state_bytes(opt)})  # fmt: skip
        del opt
    ref = next((r["median_ms"] for r in rows if r["optimizer"] == "adamw-fused"), None)
    for r in rows:
        r["ratio_to_adamw_fused"] = r["median_ms"] / ref if ref else None
    return rows


def warmed_up(model_name: str, optimizers: list[str], device: torch.device) -> Iterator[tuple[str, Any]]:
    """Each optimizer on one model, after three steps (state allocated, first refreshes done)."""
    model = make_model(model_name, device)
    for name in optimizers:
        opt = make_optimizer(name, model)
        step = stepper(name, opt)
        for seed in range(3):
            fill_grads(model, seed)
            step()
        sync(device)
        yield name, (opt, step)
        del opt


def op_counts(optimizers: list[str], device: torch.device, model_name: str) -> list[dict[str, Any]]:
    from torch.profiler import ProfilerActivity, profile

    rows = []
    for name, (_, step) in warmed_up(model_name, optimizers, device):
        total, top = top_level_ops(step)
        launches = kernel_ms = host_syncs = None
        if device.type == "cuda":
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                step()
                sync(device)
            names = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC")
            launches = sum(1 for e in prof.events() if e.name in names)
            # Time the GPU spent in kernels: against the step's wall time, the launch-bound share.
            kernel_ms = sum(e.self_device_time_total for e in prof.events()
                            if e.device_type == torch.autograd.DeviceType.CUDA) / 1e3  # fmt: skip
            host_syncs = count_host_syncs(step)
        rows.append({"model": model_name, "optimizer": name, "ops_per_step": total,
                     "kernel_ops_per_step": kernel_ops(top), "kernel_launches": launches,
                     "kernel_ms": kernel_ms, "host_syncs": host_syncs,
                     "top_ops": dict(list(top.items())[:12])})  # fmt: skip
    return rows


def kernel_breakdown(model_name: str, optimizers: list[str], device: torch.device) -> list[dict[str, Any]]:
    """Where one step's GPU time goes: the operators with the most device time (self), per optimizer."""
    from torch.profiler import ProfilerActivity, profile

    rows = []
    for name, (_, step) in warmed_up(model_name, optimizers, device):
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                step()
            sync(device)
        table = sorted(prof.key_averages(), key=lambda e: -e.self_device_time_total)
        top = {e.key: round(e.self_device_time_total / 3e3, 3) for e in table[:15] if e.self_device_time_total > 0}
        rows.append({"model": model_name, "optimizer": name, "device_ms_per_step_by_op": top,
                     "device_ms_per_step": sum(e.self_device_time_total for e in table) / 3e3})  # fmt: skip
    return rows


def count_host_syncs(step: Any) -> int:
    """Device-to-host synchronizations in one step, as ``torch.cuda.set_sync_debug_mode`` reports them."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
            torch.cuda.synchronize()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum(1 for w in caught if "synchroniz" in str(w.message))


def peak_memory(model_name: str, optimizers: list[str], device: torch.device) -> list[dict[str, Any]]:
    rows = []
    for name in optimizers:
        model = make_model(model_name, device)
        opt = make_optimizer(name, model)
        batch = 2 if model_name == "llama-1b" else 4
        x = torch.randint(0, 256 if model_name == "tiny" else 32000, (batch, 512 if model_name != "tiny" else 32),
                          device=device)  # fmt: skip
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        for _ in range(2):
            model(input_ids=x, labels=x).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
        rows.append(
            {"model": model_name, "optimizer": name, "peak_bytes": peak, "state_bytes": adapm.state_bytes(opt)}
        )
        del model, opt
    return rows


def harness_loop(device: torch.device, quick: bool, out: Path) -> list[dict[str, Any]]:
    """tokens/s of ``adapm pretrain`` (GPT-2 124M, 8 x 256 tokens, 60 steps; quick: gpt2-1m, 8 steps)
    reading the device every step and every 20 (4) steps, for AdamW and AdaPM-mini. The loop runs on
    CUDA wherever one is present, so this section is CUDA's; the CPU smoke run checks the code path."""
    from adapm.train.config import DataConfig, ModelConfig, OptimConfig, PretrainConfig, TrainConfig
    from adapm.train.data import embedded_corpus_files
    from adapm.train.loop import pretrain

    steps, every = (8, 4) if quick else (60, 20)
    data = DataConfig(data=str(embedded_corpus_files()[0]), vocab_size=300) if quick else DataConfig(seq_len=256)
    rows = []
    for optimizer in ("adamw", "adapm-mini"):
        for log_every in (1, every):
            train = TrainConfig(out_dir=str(out / f"{optimizer}-{log_every}"), steps=steps, batch_size=8,
                                eval_every=steps, eval_batches=1, log_every=log_every, checkpoint_every=steps,
                                progress=False, save_model=False, overwrite=True,
                                threads=torch.get_num_threads())  # fmt: skip
            model = ModelConfig(model="gpt2-1m" if quick else "gpt2-124m")
            summary = pretrain(PretrainConfig(data=data, model=model, optim=OptimConfig(optimizer=optimizer),
                                              train=train))  # fmt: skip
            rows.append({"model": model.model, "optimizer": optimizer, "log_every": log_every, "steps": steps,
                         "device": str(device), "tokens_per_s": summary["tokens_per_s"]})  # fmt: skip
        rows[-1]["speedup"] = rows[-1]["tokens_per_s"] / rows[-2]["tokens_per_s"]
    return rows


def tables(result: dict[str, Any]) -> str:
    """The saved run's sections as Markdown tables (what docs/benchmarks.md shows)."""
    out = [f"{result.get('gpu', result['device'])}, torch {result['torch']}"]
    tests = result.get("cuda_tests")
    if tests:
        lines = tests["tail"].splitlines()
        last = [line for line in lines if " passed" in line or " failed" in line]
        failed = sorted({line.split()[1].split("::")[-1].split("[")[0] for line in lines if line.startswith("FAILED ")})
        summary = last[-1].strip("= ") if last else f"exit code {tests['returncode']}"
        out.append(f"CUDA tests: {summary}" + (f"; failed: {', '.join(failed)}" if failed else ""))
    ref = {r["model"]: r for r in result.get("peak_memory", []) if r["optimizer"] == "adamw-fused"}
    for row in result.get("peak_memory", []):
        base = ref.get(row["model"])
        row["peak_gb"] = row["peak_bytes"] / 1e9 if row["peak_bytes"] else None
        row["state_gb"] = row["state_bytes"] / 1e9
        row["peak_vs_adamw"] = row["peak_bytes"] / base["peak_bytes"] if base and row["peak_bytes"] else None
    sections = [
        ("step_time", "Step time (median after 3 warm-up steps)",
         [("model", "{}"), ("optimizer", "{}"), ("median_ms", "{:.2f}"), ("ratio_to_adamw_fused", "{:.1f}x")]),
        ("op_counts", "Ops and kernel launches per step (GPT-2 124M)",
         [("optimizer", "{}"), ("ops_per_step", "{:,}"), ("kernel_ops_per_step", "{:,}"), ("kernel_launches", "{:,}"),
          ("kernel_ms", "{:.1f}"), ("host_syncs", "{}")]),
        ("peak_memory", "Peak GPU memory of a training step (forward, backward, step)",
         [("model", "{}"), ("optimizer", "{}"), ("peak_gb", "{:.2f}"), ("peak_vs_adamw", "{:.2f}x"),
          ("state_gb", "{:.3f}")]),
        ("harness_loop", "adapm pretrain: tokens/s reading the device every step and every 20 steps",
         [("model", "{}"), ("optimizer", "{}"), ("log_every", "{}"), ("tokens_per_s", "{:,.0f}"),
          ("speedup", "{:.2f}x")]),
        ("fused_step_time", "fused=True (compiled tails): step time and first step (compilation)",
         [("model", "{}"), ("optimizer", "{}"), ("median_ms", "{:.2f}"), ("ratio_to_adamw_fused", "{:.1f}x"),
          ("first_step_s", "{:.1f}")]),
        ("compiled_step_time", "adapm.compile_step (one graph, reduce-overhead): step time and compilation",
         [("model", "{}"), ("optimizer", "{}"), ("median_ms", "{:.2f}"), ("ratio_to_adamw_fused", "{:.1f}x"),
          ("second_step_s", "{:.1f}")]),
        ("compiled_op_counts", "adapm.compile_step: ops and kernel launches per step (GPT-2 124M)",
         [("optimizer", "{}"), ("ops_per_step", "{:,}"), ("kernel_ops_per_step", "{:,}"), ("kernel_launches", "{:,}"),
          ("kernel_ms", "{:.1f}"), ("host_syncs", "{}")]),
    ]  # fmt: skip
    for key, title, columns in sections:
        if result.get(key):
            out.append(f"\n{title}:\n\n" + markdown_table(result[key], columns))
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--from-json", type=Path, help="print the tables of a saved run; nothing is measured")
    parser.add_argument("--quick", action="store_true", help="a tiny GPT-2 only, 3 timed steps")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per optimizer (after 3 warm-up steps)")
    args = parser.parse_args()
    if args.from_json:
        try:
            text = tables(json.loads(args.from_json.read_text()))
        except (OSError, ValueError, KeyError) as err:
            parser.error(f"--from-json {args.from_json}: not a gpu_check.py --json file ({type(err).__name__}: {err})")
        print(text)
        return
    if args.json is None:
        parser.error("--json is required (where the results are written)")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    result: dict[str, Any] = {"torch": torch.__version__, "device": args.device, "command": " ".join(sys.argv),
                              "machine": machine_info()}
    if device.type == "cuda":
        result["gpu"] = torch.cuda.get_device_name()
    models = ["tiny"] if args.quick else ["gpt2-124m", "llama-1b"]
    steps = 3 if args.quick else args.steps

    def save() -> None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))

    if device.type == "cuda":
        root = Path(__file__).resolve().parent.parent
        # In this process, one GPU for one module of tests (and pytest-xdist need not be installed there).
        cmd = [sys.executable, "-m", "pytest", "-o", "addopts=-q", "-m", "cuda", "-rfE", "-p", "no:cacheprovider",
               "tests/test_cuda.py"]  # fmt: skip
        proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, check=False)
        result["cuda_tests"] = {"returncode": proc.returncode, "tail": proc.stdout[-3000:] + proc.stderr[-2000:]}
        print(result["cuda_tests"]["tail"], flush=True)
        save()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result["op_counts"] = op_counts(list(OPTIMIZERS), device, models[0])
        print(json.dumps(result["op_counts"], indent=1), flush=True)
        save()
        result["step_time"] = [r for m in models for r in step_time(m, list(OPTIMIZERS), device, steps)]
        print(json.dumps(result["step_time"], indent=1), flush=True)
        save()
        on_gpu = device.type == "cuda"
        measured = ["adamw-fused", "adapm", "adapm-mini", "adapm-mini-fixed", "adapm-mini-int8"] if on_gpu else [
            "adapm-mini", "adapm-mini-int8"]  # fmt: skip
        result["peak_memory"] = [r for m in models for r in peak_memory(m, measured, device)]
        print(json.dumps(result["peak_memory"], indent=1), flush=True)
        save()
        with tempfile.TemporaryDirectory() as runs:
            result["harness_loop"] = harness_loop(device, args.quick, Path(runs))
        print(json.dumps(result["harness_loop"], indent=1), flush=True)
        save()
        # Last: the compiled tails compile on the first step (one graph per group of blocks), so this
        # section may outlast a short window; everything above is saved by then. CUDA only (the CPU smoke
        # run stays short).
        fused = ["adamw-fused", "adapm-mini-fixed-fused", "adapm-mini-fused", "adapm-fixed-fused"] if on_gpu else []
        for model_name in models if fused else []:
            result.setdefault("fused_step_time", []).extend(step_time(model_name, fused, device, steps))
            print(json.dumps(result["fused_step_time"], indent=1), flush=True)
            save()
        result["fused_op_counts"] = op_counts(fused[1:2], device, models[0]) if fused else []
        print(json.dumps(result["fused_op_counts"], indent=1), flush=True)
        save()
        # The compiled step (one graph, compiled at its second step: minutes on a 1B model).
        compiled = ["adamw-fused", "adapm-compiled", "adapm-mini-compiled"] if on_gpu else []
        for model_name in models if compiled else []:
            result.setdefault("compiled_step_time", []).extend(step_time(model_name, compiled, device, steps))
            print(json.dumps(result["compiled_step_time"], indent=1), flush=True)
            save()
        result["compiled_op_counts"] = op_counts(compiled[1:], device, models[0]) if compiled else []
        print(json.dumps(result["compiled_op_counts"], indent=1), flush=True)
        save()
        if on_gpu:  # where the device time goes (diagnostic)
            chosen = ["adapm", "adapm-mini", "adapm-fixed", "adapm-mini-fixed"]
            result["kernels"] = [r for m in models for r in kernel_breakdown(m, chosen, device)]
            print(json.dumps(result["kernels"], indent=1), flush=True)
            save()


if __name__ == "__main__":
    main()
