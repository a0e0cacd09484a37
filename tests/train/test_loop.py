"""The training loop: run directory contents, exact resume, refusal to overwrite, bf16 and accumulation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from adapm.train.checkpoint import load_checkpoint, save_checkpoint
from adapm.train.loop import WarmupCosine, pretrain

from conftest import tiny_config


def test_pretrain_writes_the_run_directory(play_text: Path, cache_dir: Path, tmp_path: Path) -> None:
    summary = pretrain(tiny_config(play_text, cache_dir, tmp_path / "run"))
    run = tmp_path / "run"
    assert {"config.json", "metrics.jsonl", "checkpoint.pt", "summary.json", "model"} <= {p.name for p in run.iterdir()}
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [2, 4, 6, 8]
    assert {"step", "train_loss", "lr", "tokens_per_s", "state_bytes", "peak_rss_bytes"} <= set(metrics[0])
    assert [m["step"] for m in metrics if "val_loss" in m] == [4, 8]
    assert summary["final_val_loss"] < summary["unigram_val_loss"] + 1.0
    resolved = json.loads((run / "config.json").read_text())
    assert resolved["optim"]["lr"] == 3e-3 and resolved["derived"]["vocab_size"] == 300
    assert (run / "model" / "config.json").exists()
    with pytest.raises(FileExistsError, match="pass --resume"):
        pretrain(tiny_config(play_text, cache_dir, run))


@pytest.mark.parametrize("optimizer", ["adapm", "adamw", "galore"])
def test_resume_continues_exactly(play_text: Path, cache_dir: Path, tmp_path: Path, optimizer: str) -> None:
    straight = tmp_path / "straight"
    pretrain(tiny_config(play_text, cache_dir, straight, optimizer, save_model=False))
    broken = tmp_path / "broken"
    assert pretrain(tiny_config(play_text, cache_dir, broken, optimizer, stop_at=4)) == {"stopped_at": 4}
    pretrain(tiny_config(play_text, cache_dir, broken, optimizer, resume=True, save_model=False))
    a, b = load_checkpoint(straight / "checkpoint.pt"), load_checkpoint(broken / "checkpoint.pt")
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key

    def losses(run: Path) -> list[float]:
        return [json.loads(line)["train_loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]

    assert losses(straight) == losses(broken)


def test_bf16_autocast_and_gradient_accumulation(play_text: Path, cache_dir: Path, tmp_path: Path) -> None:
    summary = pretrain(tiny_config(play_text, cache_dir, tmp_path / "bf16", "adapm-mini", bf16=True, grad_accum=2))
    assert summary["tokens"] == 8 * 2 * 4 * 32
    assert summary["final_val_loss"] < 6.0


def test_checkpoint_writes_are_atomic(tmp_path: Path) -> None:
    path = tmp_path / "c.pt"
    save_checkpoint(path, {"x": torch.ones(3)})

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        save_checkpoint(path, {"x": torch.zeros(3), "bad": Unpicklable()})
    assert torch.equal(load_checkpoint(path)["x"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read checkpoint"):
        load_checkpoint(tmp_path / "junk.pt")


def test_schedule() -> None:
    f = WarmupCosine(warmup=10, total=110, min_ratio=0.1)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.55) and f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)
