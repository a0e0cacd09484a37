"""Smoke tests: every benchmark script runs in its --quick mode and writes the promised JSON."""

from __future__ import annotations

import importlib
import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def _run(script: str, out: Path, *extra: str) -> dict:
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error"}
    cmd = [sys.executable, str(BENCH / script), "--quick", "--json", str(out), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "|" in proc.stdout  # the Markdown table
    return json.loads(out.read_text())


def test_step_time_quick_and_its_json_read_back(tmp_path: Path) -> None:
    saved = tmp_path / "st.json"
    result = _run("step_time.py", saved, "--optimizers", "adamw-fused,adamw-foreach,adapm,adapm-mini")
    rows = result["rows"]
    assert {r["optimizer"] for r in rows} == {"adamw-fused", "adamw-foreach", "adapm", "adapm-mini"}
    for r in rows:
        assert {"optimizer", "model", "threads", "median_ms", "ratio_to_adamw", "ratio_to_adamw_foreach"} <= set(r)
        assert r["median_ms"] > 0 and r["lower_bound_ms"] > 0
    assert next(r for r in rows if r["optimizer"] == "adamw-fused")["ratio_to_adamw"] == 1.0
    assert next(r for r in rows if r["optimizer"] == "adamw-foreach")["ratio_to_adamw_foreach"] == 1.0
    assert result["machine"]["torch"]
    # --from-json prints the table of a saved run again (and refuses another file)
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error"}
    proc = subprocess.run([sys.executable, str(BENCH / "step_time.py"), "--from-json", str(saved)],
                          capture_output=True, text=True, env=env, timeout=300, check=True)  # fmt: skip
    assert "ratio_to_adamw_foreach" in proc.stdout and "| quick | 1 | adamw-foreach |" in proc.stdout
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    proc = subprocess.run([sys.executable, str(BENCH / "step_time.py"), "--from-json", str(bad)],
                          capture_output=True, text=True, env=env, timeout=300, check=False)  # fmt: skip
    assert proc.returncode != 0 and f"--from-json {bad}" in proc.stderr


def test_data_prep_quick(tmp_path: Path) -> None:
    """Streamed and whole-at-once data preparation give the same tokens for both corpus shapes."""
    rows = _run("data_prep.py", tmp_path / "dp.json")["rows"]
    assert {(r["shape"], r["mode"]) for r in rows} == {(s, m) for s in ("documents", "one-file")
                                                       for m in ("streamed", "whole")}  # fmt: skip
    assert all(r["same_tokens_as_whole"] is True and r["tokens"] > 500_000 and r["peak_rss_bytes"] > 0 for r in rows)


def test_peak_memory_quick(tmp_path: Path) -> None:
    rows = _run("peak_memory.py", tmp_path / "pm.json", "--optimizers", "adamw,adapm-mini", "--repeats", "2")["rows"]
    mini = next(r for r in rows if r["optimizer"] == "adapm-mini")
    assert mini["state_saving_vs_adamw_bytes"] > 0 and mini["peak_rss_bytes"] > 0
    for r in rows:
        assert r["repeats"] == 2
        assert r["peak_rss_min_bytes"] <= r["peak_rss_bytes"] <= r["peak_rss_max_bytes"]


def test_peak_memory_rejects_bad_repeats(tmp_path: Path) -> None:
    cmd = [sys.executable, str(BENCH / "peak_memory.py"), "--quick", "--repeats", "0"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode != 0 and "--repeats must be at least 1" in proc.stderr


def test_convergence_parallel_equals_sequential(tmp_path: Path) -> None:
    """The quick protocol runs sequentially and in spawned workers, with the same seeded losses."""
    one = _run("convergence.py", tmp_path / "a.json", "--jobs", "1", "--threads", "1")["summary"]
    assert [r["optimizer"] for r in one] == ["adamw", "adapm"]
    two = _run("convergence.py", tmp_path / "b.json", "--jobs", "2", "--threads", "1")["summary"]
    assert [r["mean_val_loss"] for r in one] == pytest.approx([r["mean_val_loss"] for r in two], abs=1e-6)


def _bench_module(name: str) -> Any:
    """Import a benchmark script (``benchmarks/`` is not a package) to test its functions directly."""
    sys.path.insert(0, str(BENCH))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(BENCH))


def test_convergence_optimizer_spec_parsing() -> None:
    conv = _bench_module("convergence")
    assert conv.parse_spec("adamw") == ("adamw", {})
    assert conv.parse_spec("adapm-mini:update_clip=none:rank_ratio=0.1:tracker=fixed:fused=false") == (
        "adapm-mini",
        {"update_clip": None, "rank_ratio": 0.1, "tracker": "fixed", "fused": False},
    )
    with pytest.raises(ValueError, match="unknown optimizer 'adamx'"):
        conv.parse_spec("adamx:rank_ratio=0.1")
    with pytest.raises(ValueError, match=r"bad setting 'rank=0\.1'.*rank_ratio"):
        conv.parse_spec("adapm:rank=0.1")
    with pytest.raises(ValueError, match="Invalid rank_ratio: 2"):
        conv.parse_spec("adapm:rank_ratio=2")


def test_convergence_spec_reaches_the_run(tmp_path: Path) -> None:
    """A spec's settings are what the run trains with (read back from the run's config.json)."""
    conv = _bench_module("convergence")
    run = conv.one_run("gpt2-1m", "adapm-mini:update_clip=none:tracker=fixed", 3e-3, 0, 4, 1, tmp_path, 2)
    assert run["optimizer"] == "adapm-mini:update_clip=none:tracker=fixed" and run["final_val_loss"] > 0
    (config,) = tmp_path.glob("*/config.json")
    optim = json.loads(config.read_text())["optim"]
    assert optim["optimizer"] == "adapm-mini" and optim["update_clip"] is None and optim["tracker"] == "fixed"


def test_convergence_rejects_bad_spec() -> None:
    cmd = [sys.executable, str(BENCH / "convergence.py"), "--optimizers", "adapm:beta9=1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode != 0 and "bad setting 'beta9=1'" in proc.stderr


def test_convergence_from_json_rejects_other_files(tmp_path: Path) -> None:
    bad = tmp_path / "peak.json"
    bad.write_text('{"rows": []}')
    cmd = [sys.executable, str(BENCH / "convergence.py"), "--from-json", str(bad)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode != 0 and f"--from-json {bad}: not a convergence.py --json file" in proc.stderr


def test_step_time_cost_model(tmp_path: Path) -> None:
    """The cost model (no timing): fixed does half of power's matmul flops; AdamW moves 28 bytes/param."""
    (row,) = _run("step_time.py", tmp_path / "cost.json", "--cost-model")["rows"]
    assert row["model"] == "quick" and 0 < row["lowrank_share"] < 1
    assert row["gflop_per_step_power"] == pytest.approx(2 * row["gflop_per_step_fixed"])
    assert row["adamw_bytes_per_step"] == 28 * row["parameters"]


def test_foreach_ratios_direct_and_chained() -> None:
    """In a group with adamw-foreach the ratio is direct; other groups chain through adamw-fused."""
    st = _bench_module("step_time")

    def row(name: str, ms: float, fused_ms: float) -> dict:
        return {"model": "m", "threads": 1, "optimizer": name, "median_ms": ms, "ratio_to_adamw": ms / fused_ms}

    rows = [row("adamw-fused", 10, 10), row("adamw-foreach", 40, 10), row("adapm", 80, 10)]
    rows += [row("adamw-fused", 20, 20), row("adafactor", 60, 20)]  # a slower group: same fused/foreach link
    st.add_foreach_ratios(rows)
    assert [r["ratio_to_adamw_foreach"] for r in rows] == pytest.approx([0.25, 1.0, 2.0, 0.25, 0.75])
    assert [r["foreach_ratio_chained"] for r in rows] == [False, False, False, True, True]


def test_profile_step_quick(tmp_path: Path) -> None:
    """The profile's parts add up to the profiled step, and the low-rank matmuls show up as matmuls."""
    result = _run("profile_step.py", tmp_path / "prof.json", "--optimizer", "adapm-fixed")
    parts = {p["part"]: p["ms_per_step"] for p in result["parts"]}
    assert sum(parts.values()) == pytest.approx(result["profiled_ms_per_step"])
    assert parts["matmuls"] > 0 and result["median_ms"] > 0
    assert sum(p["share"] for p in result["parts"]) == pytest.approx(1.0)


def test_convergence_summary_picks_lr_and_pairs_seeds() -> None:
    conv = _bench_module("convergence")

    def run(opt: str, lr: float, seed: int, loss: float) -> dict:
        return {"model": "m", "optimizer": opt, "lr": lr, "seed": seed, "final_val_loss": loss, "tokens": 1,
                "state_bytes": 1}  # fmt: skip

    runs = [run("adamw", 1.0, 0, 4.0), run("adamw", 3.0, 0, 4.2), run("adamw", 1.0, 1, 4.4)]
    runs += [run("adapm", 1.0, 0, 4.3), run("adapm", 3.0, 0, 4.1), run("adapm", 3.0, 1, 4.6)]
    adamw, adapm = conv.summarize(runs)
    assert (adamw["lr"], adapm["lr"]) == (1.0, 3.0)  # the lr of the best seed-0 run
    assert adamw["mean_val_loss"] == pytest.approx(4.2) and adapm["mean_val_loss"] == pytest.approx(4.35)
    assert adapm["minus_adamw"] == pytest.approx(0.15)
    assert adapm["paired_std"] == pytest.approx(statistics.stdev([0.1, 0.2]))  # per-seed differences
    assert adamw["seeds"] == adapm["seeds"] == 2
    # Against another reference (e.g. bf16 state against its float32 form): the same pairing.
    adamw, adapm = conv.summarize(runs, reference="adapm")
    assert adamw["minus_adapm"] == pytest.approx(-0.15) and adapm["minus_adapm"] == 0.0
    assert adamw["paired_std"] == pytest.approx(statistics.stdev([-0.1, -0.2]))


def test_long_run_quick_phases_resume_and_report(tmp_path: Path) -> None:
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error"}

    def phase(*args: str) -> str:
        cmd = [sys.executable, str(BENCH / "long_run.py"), *args, "--out", str(tmp_path / "runs")]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900, check=False)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        return proc.stdout

    assert "0 of 2 runs already recorded" in phase("sweep", "--quick")
    assert "2 of 2 runs already recorded; running 0" in phase("sweep", "--quick")  # finished runs are kept
    phase("long", "--quick")
    table = phase("report", "--docs", str(tmp_path / "docs"))
    assert "| gpt2-shakespeare | adapm-mini |" in table
    report = json.loads((tmp_path / "docs" / "long_run.json").read_text())
    assert {r["optimizer"] for r in report["long"]} == {"adamw", "adapm-mini"}
    adamw = next(r for r in report["long"] if r["optimizer"] == "adamw")
    assert adamw["minus_adamw"] == 0.0 and adamw["step_ratio"] == 1.0
    assert (tmp_path / "docs" / "long_run_gpt2-shakespeare.png").read_bytes()[:4] == b"\x89PNG"


def test_long_run_bracket_runs_the_neighbours_of_the_best_long_lr_until_it_is_bracketed() -> None:
    lr_mod = _bench_module("long_run")
    results: dict[str, dict[str, Any]] = {}

    def record(phase: str, setting: str, spec: str, lr: float, seed: int, loss: float) -> None:
        task = lr_mod.Task(phase, setting, spec, lr, seed, 1)
        results[task.key] = {**task.__dict__, "key": task.key, "final_val_loss": loss}

    def long_loss(lr: float, seed: int) -> float:  # the long horizon's optimum: 1.5e-3, two grid steps away
        return 3.0 + abs(math.log2(lr / 1.5e-3)) + 0.01 * seed

    for i, setting in enumerate(lr_mod.SETTINGS):
        for spec in lr_mod.CORE + (lr_mod.FIRST_SETTING_ONLY if i == 0 else ()):
            for lr, loss in zip(lr_mod.grid(spec), (5.1, 5.0, 5.2, 5.3)):  # the sweep: 2nd best, then 1st
                record("sweep", setting, spec, lr, 0, loss)
    assert lr_mod.bracket_tasks(results) == []  # the long runs first
    for task in lr_mod.long_tasks(results, quick=False):
        record("long", task.setting, task.spec, task.lr, task.seed, long_loss(task.lr, task.seed))
    mine = ("llama-python-docs",)
    # The long runs ran 7.5e-4 (the sweep's pick) and 3.75e-4 (its better neighbour): the best, 7.5e-4,
    # gets 1.5e-3 (both seeds), for AdamW and AdaPM-mini only; then 1.5e-3 gets 3e-3; then nothing.
    for want in (1.5e-3, 3e-3):
        tasks = lr_mod.bracket_tasks(results, mine)
        assert [(t.setting, t.spec, t.seed) for t in tasks] == [
            (mine[0], spec, seed) for spec in lr_mod.NEIGHBOURS for seed in lr_mod.LONG_SEEDS
        ]
        assert all(t.lr == pytest.approx(want) and t.steps == lr_mod.LONG_STEPS for t in tasks)
        for task in tasks[:-1]:  # interrupted before the last: that run is scheduled again, alone of its lr
            record("long", task.setting, task.spec, task.lr, task.seed, long_loss(task.lr, task.seed))
        again = [t for t in lr_mod.bracket_tasks(results, mine) if t.spec == tasks[-1].spec]
        assert [t.key for t in again] == [tasks[-1].key]
        record("long", tasks[-1].setting, tasks[-1].spec, tasks[-1].lr, tasks[-1].seed, long_loss(tasks[-1].lr, 1))
    assert lr_mod.bracket_tasks(results, mine) == []  # 1.5e-3 is the best, with 7.5e-4 and 3e-3 run
    assert len(lr_mod.bracket_tasks(results)) == 2 * 2 * len(lr_mod.LONG_SEEDS)  # the other two settings


def test_op_count_quick(tmp_path: Path) -> None:
    rows = _run("op_count.py", tmp_path / "oc.json")["rows"]
    by_name = {r["optimizer"]: r for r in rows}
    assert set(by_name) == {"adamw-foreach", "adapm", "adapm-mini"}
    assert by_name["adamw-foreach"]["vs_adamw_foreach"] == 1.0
    for name in ("adapm", "adapm-mini"):
        # The accelerator path (grouped, no row chunks) dispatches fewer ops than the CPU default.
        assert 0 < by_name[name]["ops_per_step"] < by_name[name]["cpu_ops_per_step"]


def test_op_count_counts_calls_into_compiled_code() -> None:
    """``compiled_calls_per_step``: each call of ``torch.compile``d code in the profiled step, none for eager ops."""
    op_count = _bench_module("op_count")
    import torch

    double = torch.compile(lambda x: x * 2 + 1, dynamic=True)
    x = torch.ones(3)
    double(x)  # compiled here, outside the count
    assert op_count.compiled_calls(lambda: (double(x), double(x), x + 1)) == 2
    assert op_count.compiled_calls(lambda: x + 1) == 0


def test_compile_time_quick(tmp_path: Path) -> None:
    """The fused step's first-step time, measured in a fresh process with an empty Inductor cache."""
    (row,) = _run("compile_time.py", tmp_path / "ct.json")["rows"]
    assert row["optimizer"] == "adapm-mini-fixed-fused" and row["fused"]  # compiled, no fallback to eager
    assert row["first_step_s"] > row["later_step_s"] > 0  # the first step compiles


def test_construction_time_quick(tmp_path: Path) -> None:
    """Construction times of AdaPM and AdaPM-mini beside AdamW's, on models built on the meta device; the LitGPT
    mixture keeps each expert's matrices apart (hundreds of tensors in two layers)."""
    pytest.importorskip("litgpt")
    result = _run("construction_time.py", tmp_path / "c.json")
    rows = result["rows"]
    assert [(r["model"].split()[0], r["optimizer"]) for r in rows] == [
        (m, o) for m in ("HF", "LitGPT") for o in ("adamw", "adapm", "adapm-mini")]
    assert all(r["median_s"] > 0 and r["vs_adamw"] > 0 for r in rows)
    assert rows[3]["tensors"] > 500 and result["threads"] == 1 and (tmp_path / "c.md").exists()


def test_gpu_check_script_runs_its_cpu_smoke_mode(tmp_path: Path) -> None:
    """The prepared GPU script is exercised here on CPU so that a GPU window is spent measuring."""
    out = tmp_path / "g.json"
    cmd = [sys.executable, str(BENCH / "gpu_check.py"), "--device", "cpu", "--quick", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert {r["optimizer"] for r in result["op_counts"]} >= {"adamw-fused", "adapm", "adapm-mini"}
    assert all(r["median_ms"] > 0 for r in result["step_time"])
    assert result["peak_memory"][0]["state_bytes"] > 0
    assert [(r["optimizer"], r["log_every"]) for r in result["harness_loop"]] == [
        ("adamw", 1), ("adamw", 4), ("adapm-mini", 1), ("adapm-mini", 4)]
    assert all(r["tokens_per_s"] > 0 for r in result["harness_loop"])


def test_lr_table_quick(tmp_path: Path) -> None:
    cmd = [sys.executable, str(BENCH / "lr_table.py"), "--quick", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    runs = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [(r["optimizer"], r["lr"]) for r in runs] == [("adamw", 0.0015), ("adamw", 0.003)]
    assert proc.stdout.count("| True |") == 1  # one winner per (model, optimizer)


def test_families_table_quick(tmp_path: Path) -> None:
    """The preset table's script: every family's matrices recognised, every fused weight split, and
    AdaPM-mini's share."""
    rows = {r["family"]: r for r in _run("families.py", tmp_path / "families.json")["rows"]}
    assert all(r["unknown"] == 0 and r["kept_whole"] == 0 for r in rows.values())
    assert rows["mixtral"]["tiny_adapm_mini_pct"] < 8.0
    assert (tmp_path / "families.md").read_text().startswith("| family |")


def test_coverage_quick(tmp_path: Path) -> None:
    """The coverage survey: Llama and Qwen3-Next (linear attention, experts) complete at real size on the
    meta device; XLNet's attention (3-D weights, heads on their own axis) named as left at AdamW's state;
    Qwen2.5-VL, vision tower and language model, complete."""
    result = _run("coverage.py", tmp_path / "coverage.json")
    rows = {r["model_type"]: r for r in result["rows"]}
    assert rows["llama"]["unrecognised"] == 0 and rows["qwen3_next"]["unrecognised"] == 0
    assert rows["qwen3_next"]["parameters_m"] > 70_000
    assert "transformer.layer.N.rel_attn.q" in rows["xlnet"]["names"]
    assert rows["qwen2_5_vl"]["task"] == "image-text-to-text" and rows["qwen2_5_vl"]["unrecognised"] == 0
    assert rows["qwen2_5_vl"]["parameters_m"] > 7_000
    assert result["summary"] == {
        "causal-lm": {"model_types": 3, "built": 3, "complete": 2, "partial": 1, "not_built": 0},
        "image-text-to-text": {"model_types": 1, "built": 1, "complete": 1, "partial": 0, "not_built": 0},
    }
    assert (tmp_path / "coverage.md").read_text().splitlines()[-1] == (
        "1 image-text-to-text model types; 1 built from their default config; every matrix recognised in 1, some "
        "left at AdamW's state in 0.")


def test_collectives_quick(tmp_path: Path) -> None:
    rows = _run("collectives.py", tmp_path / "co.json")["rows"]
    assert len(rows) == 8  # {gpt2-1m, llama-1m} x {adapm, adapm-mini} x {per-block, grouped}
    for per_block, grouped in zip(rows[::2], rows[1::2]):
        assert (per_block["step"], grouped["step"]) == ("per-block", "grouped")
        assert per_block["refreshes"] == grouped["refreshes"]  # the same schedule on both paths
        # Sharded parameters take the grouped step: one all-reduce per stack, not per block.
        assert 0 < grouped["all_reduces_per_step"] < per_block["all_reduces_per_step"], (per_block, grouped)
        assert grouped["ops_per_step"] < per_block["ops_per_step"]


def test_peft_state_quick(tmp_path: Path) -> None:
    """PEFT's state at real size: LoRA alone is AdamW's state for both optimizers; with the embeddings and the head
    trained whole, AdaPM-mini keeps what LoRA alone keeps, a small share of AdamW's."""
    rows = {r["setup"]: r for r in _run("peft_state.py", tmp_path / "peft.json")["rows"]}
    lora, whole = rows["LoRA r=16, all linear layers"], rows["LoRA r=16 + embeddings and head trained"]
    assert lora["adapm_pct"] == lora["adapm_mini_pct"] == 100.0
    assert whole["trained_m"] > 7 * lora["trained_m"] and whole["adapm_mini_pct"] < 15.0
    assert abs(whole["adapm_mini_gib"] - lora["adamw_gib"]) < 0.01
