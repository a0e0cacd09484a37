"""`adapm compare` end to end on a tiny config: one fresh process per optimizer, summary and plots."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from adapm.train.compare import compare, summarize
from adapm.train.config import CompareConfig, DataConfig, ModelConfig

from conftest import tiny_config


def test_compare_two_optimizers(play_text: Path, cache_dir: Path, tmp_path: Path) -> None:
    base = tiny_config(play_text, cache_dir, tmp_path / "unused", steps=6)
    cfg = CompareConfig(
        optimizers="adamw,adapm-mini",
        out=str(tmp_path / "cmp"),
        data=base.data,
        model=base.model,
        train=dataclasses.replace(base.train, save_model=False),
    )
    rows = compare(cfg)
    out = tmp_path / "cmp"
    saved = json.loads((out / "summary.json").read_text())
    assert saved == rows
    assert [r["optimizer"] for r in rows] == ["adamw", "adapm-mini"]
    for r in rows:
        assert {
            "optimizer",
            "final_val_loss",
            "tokens_per_s",
            "state_bytes",
            "ratio_to_adamw",
            "peak_rss_bytes",
        } <= set(r)
        assert r["peak_rss_bytes"] > 0 and r["tokens_per_s"] > 0
    assert rows[0]["ratio_to_adamw"] == 1.0 and rows[1]["ratio_to_adamw"] < 0.1
    assert {r["lr_source"] for r in rows} <= {"default", "swept for gpt2-1m"}
    assert "| adapm-mini |" in (out / "summary.md").read_text()
    for png in ("loss_vs_step.png", "loss_vs_time.png", "state_bytes.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    # Summarized without AdamW's run, the ratio comes from AdamW's meta-device state count: the same.
    alone = summarize(dataclasses.replace(cfg, optimizers="adapm-mini"))
    assert [r["optimizer"] for r in alone] == ["adapm-mini"]
    assert alone[0]["ratio_to_adamw"] == rows[1]["ratio_to_adamw"]


def test_a_comparison_stopped_with_stop_at_says_how_to_continue(
    play_text: Path, cache_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = tiny_config(play_text, cache_dir, tmp_path / "unused", steps=6, stop_at=3, save_model=False)
    cfg = CompareConfig(optimizers="adapm-mini", out=str(tmp_path / "cmp"), data=base.data, model=base.model,
                        train=base.train)  # fmt: skip
    assert compare(cfg) == []
    assert "adapm-mini stopped before the last step (--stop-at)" in capsys.readouterr().out
    resumed = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, stop_at=None, resume=True))
    assert [r["optimizer"] for r in compare(resumed)] == ["adapm-mini"]
    assert "stopped before" not in capsys.readouterr().out


def test_bad_inputs_fail_before_a_run_directory_is_made(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A missing --data or --init-from is one error before anything is written (no dated directory, no
    runs/compare/latest pointing at an empty one), not one error per optimizer's process."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="--data: no such file or directory"):
        compare(CompareConfig(data=DataConfig(data=str(tmp_path / "missing.txt"))))
    with pytest.raises(FileNotFoundError, match=r"--init-from: .* \(no config\.json\)"):
        compare(CompareConfig(model=ModelConfig(init_from=str(tmp_path))))
    assert list(tmp_path.iterdir()) == []
