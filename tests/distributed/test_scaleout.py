"""AdaPM under real torch.distributed (gloo, CPU, 2 processes via torchrun): DDP and FSDP2 against a
single-process run, and torch.distributed.checkpoint resume and resharding."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("worker.py")
LOW_PRECISION = ("adapm-mini-bf16", "adapm-int8", "adapm-mini-bf16-grouped")
"""Rows with stochastically rounded state (see the tolerance below)."""


def _torchrun(nproc: int, *args: str, script: tuple[str, ...] = (str(WORKER),)) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *script]
    proc = subprocess.run([*cmd, *args], capture_output=True, text=True, env=env, timeout=600, check=False)
    # The head of stderr holds what the ranks printed (the worker's "leaving" lines say how far each got);
    # its tail holds torchrun's summary.
    err = proc.stderr if len(proc.stderr) <= 6000 else proc.stderr[:3000] + "\n[...]\n" + proc.stderr[-3000:]
    assert proc.returncode == 0, proc.stdout[-3000:] + err
    return proc.stdout


@pytest.fixture(scope="module")
def equivalence(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    out = tmp_path_factory.mktemp("eq") / "eq.json"
    _torchrun(2, "equivalence", str(out))
    return json.loads(out.read_text())


def test_ddp_and_fsdp2_match_a_single_process(equivalence: list[dict]) -> None:
    rows = [r for r in equivalence if "model" in r]
    # {gpt2, llama} x {adamw, adapm, adapm-mini, adapm-mini +blr, adapm +int8, and the grouped step (stacked
    # blocks, one all-reduce per stack) for adapm and adapm-mini}; the gd and fixed trackers and bf16 state
    # once on each step path (per parameter, grouped), split between the two models
    assert len(rows) == 20
    for row in rows:  # sharded parameters take the grouped step where asked (not the per-parameter one)
        assert row.get("fsdp_grouped_step", False) == row["optimizer"].endswith("-grouped"), row
    for row in [r for r in rows if r["optimizer"] in LOW_PRECISION]:
        # Low-precision state is stochastically rounded: all-reduce round-off in the gradients (1e-7)
        # flips some rounding decisions under DDP, and an FSDP2 rank draws its own noise for its shard,
        # so the runs agree with one process to the storage's rounding, not float32's (measured, bf16 on
        # both steps: losses 4e-7 to 1.3e-4 apart, parameters 7.5e-5 to 8.5e-4; int8, whose codes are 7-12% apart
        # where bf16's are 0.4-0.8%: losses 3e-6 to 6.8e-4, parameters 3.2e-4 to 9.2e-3).
        loss_tol, param_tol = (2e-3, 3e-2) if row["optimizer"] == "adapm-int8" else (1e-3, 5e-3)
        for mode in ("ddp", "fsdp"):
            assert row[f"{mode}_loss_rel"] < loss_tol and row[f"{mode}_param_rel"] < param_tol, (row, mode)
        if row["optimizer"] == "adapm-int8":  # the scales are sharded with their codes: a quarter of fp32 state
            fp32 = next(r for r in rows if r["model"] == row["model"] and r["optimizer"] == "adapm"
                        and r["tracker"] == "power")  # fmt: skip
            assert row["fsdp_state_bytes_this_rank"] < 0.4 * fp32["fsdp_state_bytes_this_rank"], (row, fp32)
    rows = [r for r in rows if r["optimizer"] not in LOW_PRECISION]
    for row in rows:
        for mode in ("ddp", "fsdp"):
            assert row[f"{mode}_loss_rel"] < 1e-5, (row, mode)
            assert row[f"{mode}_param_rel_excl"] < 1e-5, (row, mode)
        if row["model"] == "llama":
            assert row["fsdp_param_rel"] < 1e-5 and row["fsdp_worst_tensor"][1] < 1e-5, row


def test_adapm_is_as_exact_as_adamw_under_sharding(equivalence: list[dict]) -> None:
    rows = [r for r in equivalence if "model" in r and r["optimizer"] not in LOW_PRECISION]
    adamw = {r["model"]: r for r in rows if r["optimizer"] == "adamw"}
    for row in rows:
        ref = adamw[row["model"]]
        for mode in ("ddp", "fsdp"):
            assert row[f"{mode}_param_rel"] <= 3 * ref[f"{mode}_param_rel"] + 1e-6, (row, mode)


def test_a_fused_weight_fsdp2_shards_along_its_parts_is_kept_whole_with_a_warning_and_trains(
    equivalence: list[dict],
) -> None:
    """FSDP2 cuts the rows that nanoGPT's c_attn, GPT-NeoX's interleaved query_key_value and Mixtral's
    expert stacks are split along: each is kept whole (full state), named in the construction warning,
    and the step runs."""
    found = equivalence[-1]
    for key, names in (("unsupported", ["attn.c_attn.weight"]),
                       ("unsupported_neox", ["gpt_neox.layers.0.attention.query_key_value.weight"]),
                       ("unsupported_experts", ["model.layers.0.mlp.experts.gate_up_proj",
                                                "model.layers.0.mlp.experts.down_proj"])):  # fmt: skip
        row = found[key]
        assert row["whole"] == names and row["finite"], (key, row)
        assert "kept whole because FSDP2 shards" in row["warning"] and names[0] in row["warning"], row["warning"]


@pytest.mark.parametrize("optimizer", ["adapm-mini", "adapm-int8", "adapm-mini-grouped"])
def test_dcp_resume_is_exact_and_reshards_to_one_process(optimizer: str, tmp_path: Path) -> None:
    """A DCP checkpoint of FSDP2-sharded state (8-bit codes with their block scales, sharded alike)
    resumes bit-exactly on 2 ranks and reshards to one process."""
    ckpt = tmp_path / "dcp"
    _torchrun(2, "checkpoint", str(tmp_path / "ck.json"), str(ckpt), optimizer)
    result = json.loads((tmp_path / "ck.json").read_text())
    assert result["resume_bit_identical"], result
    assert result["resume_losses"] == result["straight_losses"]
    _torchrun(1, "reshard", str(tmp_path / "rs.json"), str(ckpt), optimizer)
    reshard = json.loads((tmp_path / "rs.json").read_text())
    # 8-bit state: one process draws other rounding noise than the two ranks did after the reload.
    assert reshard["world_size"] == 1 and reshard["reshard_param_rel"] < (5e-3 if optimizer == "adapm-int8" else 1e-5)


def test_accelerate_fsdp2_prepare_after_the_optimizer_matches_building_it_after_fully_shard(tmp_path: Path) -> None:
    """Accelerate's FSDP2 prepare (and Trainer with FSDP2) takes an optimizer built on the whole model and
    swaps its parameters for the sharded ones: AdaPM follows them, and trains exactly as when built after
    fully_shard, holding the same state, with the same fused weights kept whole (and a warning naming them);
    Accelerate's save_state / load_state resume it exactly."""
    _torchrun(2, "accelerate", str(tmp_path / "acc.json"))
    rows = {row["model"]: row for row in json.loads((tmp_path / "acc.json").read_text())}
    assert set(rows) == {"llama", "gpt2", "neox", "mixtral", "llama-ac"}
    for kind, row in rows.items():
        assert row["swapped"], row  # Accelerate did shard the model and swap every parameter
        assert row["renamed"] == (kind == "llama-ac"), row  # activation checkpointing wraps each block
        assert row["loss_rel"] == 0.0 and row["param_rel"] == 0.0, row
        assert row["state_bytes"] == row["ref_state_bytes"], row
        assert row["whole"] == row["ref_whole"], row
        kept = {"neox": 2, "mixtral": 4}.get(kind, 0)
        assert len(row["whole"]) == kept, row
        assert len(row["warnings"]) == (1 if kept else 0), row
        if kept:
            assert f"{kept} fused weights kept whole" in row["warnings"][0], row
    assert "strict=True makes this an error" in rows["neox"]["strict_error"] and rows["neox"]["strict_unchanged"]
    for kind in ("llama", "neox"):  # Accelerate's save_state after 3 steps, load_state into a new prepare
        row = rows[kind]
        assert row["resume_losses_equal"] and row["resume_param_rel"] == 0.0 and row["resume_steps"] == [6], row


def test_zero_redundancy_optimizer_runs_adapm_without_the_partition(tmp_path: Path) -> None:
    """torch's ZeroRedundancyOptimizer(optimizer_class=AdaPM) hands each rank bare parameters: the steps
    match one process on the same bare parameters, the state is split between the ranks, and the warning
    says that the partition cannot apply (docs/distributed.md points to FSDP2 instead)."""
    _torchrun(2, "zero", str(tmp_path / "zero.json"))
    result = json.loads((tmp_path / "zero.json").read_text())
    assert result["loss_rel"] < 1e-5 and result["param_rel"] < 1e-5, result
    per_rank = result["state_bytes_per_rank"]
    assert sum(per_rank) == result["ref_state_bytes"] and min(per_rank) > 0, result
    assert any("parameters without names" in w for w in result["warnings"]), result["warnings"]


def _pretrain_args(play_text: Path, cache_dir: Path, out: Path, *extra: str) -> list[str]:
    return [
        "pretrain", "--data", str(play_text), "--vocab-size", "300", "--seq-len", "32", "--cache-dir", str(cache_dir),
        "--model", "llama-1m", "--steps", "8", "--batch-size", "2", "--eval-every", "4", "--eval-batches", "2",
        "--log-every", "2", "--checkpoint-every", "4", "--no-progress", "--out-dir", str(out), *extra,
    ]  # fmt: skip


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_adapm_pretrain_under_torchrun_resumes_exactly(
    mode: str, play_text: Path, cache_dir: Path, tmp_path: Path
) -> None:
    cli = ("-m", "adapm.cli")
    flags = ("--fsdp",) if mode == "fsdp" else ()
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    stdout = _torchrun(2, *_pretrain_args(play_text, cache_dir, straight, *flags), script=cli)
    assert stdout.count("final val loss") == 1  # only rank 0 reports
    _torchrun(2, *_pretrain_args(play_text, cache_dir, broken, *flags, "--stop-at", "4"), script=cli)
    _torchrun(2, *_pretrain_args(play_text, cache_dir, broken, *flags, "--resume"), script=cli)
    a = json.loads((straight / "summary.json").read_text())
    b = json.loads((broken / "summary.json").read_text())
    assert a["parallel"] == ("fsdp2" if mode == "fsdp" else "ddp") and a["world_size"] == 2
    assert a["final_val_loss"] == b["final_val_loss"]
    losses = [[json.loads(line)["train_loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
              for run in (straight, broken)]  # fmt: skip
    assert losses[0] == losses[1] and len(losses[0]) == 4
    assert ((straight / "checkpoint_dcp") if mode == "fsdp" else (straight / "checkpoint.pt")).exists()

    from adapm.train.models import load_pretrained

    model = load_pretrained(straight / "model")  # the gathered full model loads in one process
    assert sum(p.numel() for p in model.parameters()) == a["parameters"]


@pytest.mark.parametrize("command", ["sft", "rlhf"])
def test_finetuning_under_torchrun_fsdp2_resumes_exactly(command: str, tiny_lm_dir: Path, tmp_path: Path) -> None:
    """`adapm sft` and `adapm rlhf` on the shared loop: FSDP2 over 2 ranks (RLHF generation on the
    sharded model), stopped and resumed from the DCP checkpoint, ends where the uninterrupted run does."""
    common = ["--model", str(tiny_lm_dir), "--optimizers", "adapm", "--steps", "4", "--batch-size", "2",
              "--eval-every", "2", "--checkpoint-every", "2", "--fsdp", "--no-progress", "--no-save-model"]  # fmt: skip
    common += ["--max-length", "96"] if command == "sft" else ["--max-new-tokens", "6", "--val-prompts", "2"]
    cli = ("-m", "adapm.cli", command)
    _torchrun(2, *common, "--out", str(tmp_path / "a"), script=cli)
    _torchrun(2, *common, "--out", str(tmp_path / "b"), "--stop-at", "2", script=cli)
    _torchrun(2, *common, "--out", str(tmp_path / "b"), "--resume", script=cli)
    a = json.loads((tmp_path / "a" / "adapm" / "summary.json").read_text())
    b = json.loads((tmp_path / "b" / "adapm" / "summary.json").read_text())
    assert a["parallel"] == "fsdp2" and a["world_size"] == 2 and a["task"] == command
    primary = a["primary"]
    assert a[f"final_{primary}"] == b[f"final_{primary}"] and a[f"initial_{primary}"] == b[f"initial_{primary}"]
    assert a["final_train_loss"] == b["final_train_loss"]
