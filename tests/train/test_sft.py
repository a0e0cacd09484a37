"""`adapm sft`: fixed held-out split, padding and labels, token-weighted eval, the run directory with
the eval before training, exact resume, and clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from adapm.train.checkpoint import load_checkpoint
from adapm.train.config import FinetuneModelConfig, OptimConfig, SFTConfig, SFTDataConfig, TrainConfig
from adapm.train.pretrained import load_causal_lm, load_tokenizer, resolve_model_dir
from adapm.train.sft import (
    collate,
    evaluate_sft,
    prepare_sft_data,
    sample_batch,
    sft,
    split_records,
)
from adapm.train.sft_data import IGNORE_INDEX


def sft_config(model_dir: Path, out: Path, optimizers: str = "adapm", **train: object) -> SFTConfig:
    kwargs = dict(steps=6, batch_size=4, eval_every=3, log_every=1, checkpoint_every=3, progress=False, threads=1)
    kwargs.update(train)
    return SFTConfig(
        optimizers=optimizers,
        out=str(out),
        data=SFTDataConfig(max_length=96),
        model=FinetuneModelConfig(model=str(model_dir)),
        optim=OptimConfig(lr=3e-3),
        train=TrainConfig(**kwargs),  # type: ignore[arg-type]
    )


def test_split_is_fixed_and_disjoint() -> None:
    records = list(range(50))
    train, val = split_records(records, 0.1)
    assert (train, val) == split_records(records, 0.1)
    assert len(val) == 5 and sorted(train + val) == records
    assert split_records([1, 2], 0.1) == ([2], [1]) or len(split_records([1, 2], 0.1)[1]) == 1
    with pytest.raises(ValueError, match="at least 2 examples"):
        split_records([1], 0.1)


def test_collate_pads_right_and_ignores_padding() -> None:
    batch = collate([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 6, 7], [8, IGNORE_INDEX, IGNORE_INDEX]]
    examples = list(range(20))
    assert sample_batch(examples, 4, 0, 3, 1) == sample_batch(examples, 4, 0, 3, 1)
    assert sample_batch(examples, 4, 0, 3, 1) != sample_batch(examples, 4, 0, 4, 1)


def test_eval_loss_is_token_weighted_over_responses(tiny_lm_dir: Path) -> None:
    tokenizer = load_tokenizer(tiny_lm_dir)
    model = load_causal_lm(tiny_lm_dir)
    data = prepare_sft_data(SFTDataConfig(max_length=96), tokenizer)
    data.val = data.val[:3]
    batched = evaluate_sft(model, data, batch_size=3)["val_loss"]
    with torch.no_grad():
        sums = [(model(**collate([e], data.pad_id)).loss, sum(t != IGNORE_INDEX for t in e["labels"][1:]))
                for e in data.val]  # fmt: skip
    expected = sum(float(loss) * n for loss, n in sums) / sum(n for _, n in sums)
    assert batched == pytest.approx(expected, rel=1e-5)


def test_sft_run_directory_and_improvement(tiny_lm_dir: Path, tmp_path: Path) -> None:
    rows = sft(sft_config(tiny_lm_dir, tmp_path / "sft"))
    run = tmp_path / "sft" / "adapm"
    assert {"config.json", "metrics.jsonl", "checkpoint.pt", "summary.json", "model"} <= {p.name for p in run.iterdir()}
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert metrics[0]["step"] == 0 and "val_loss" in metrics[0]
    assert [m["step"] for m in metrics if "val_loss" in m] == [0, 3, 6]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["task"] == "sft" and summary["lr"] == 3e-3
    assert summary["final_val_loss"] < summary["initial_val_loss"] - 0.2
    assert summary["final_val_ppl"] == pytest.approx(torch.tensor(summary["final_val_loss"]).exp().item(), rel=1e-5)
    assert rows[0]["optimizer"] == "adapm" and (tmp_path / "sft" / "summary.md").exists()
    # Without an AdamW run, "vs AdamW" is against AdamW's state on this model: two float32 moments per weight.
    weights = sum(p.numel() for p in load_causal_lm(tiny_lm_dir).parameters())
    assert rows[0]["ratio_to_adamw"] == pytest.approx(summary["state_bytes"] / (8 * weights), rel=1e-3)
    assert load_tokenizer(run / "model").eos_token_id is not None  # the fine-tuned model is usable as --model


def test_sft_resume_continues_exactly(tiny_lm_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sft(sft_config(tiny_lm_dir, tmp_path / "a", save_model=False))
    assert sft(sft_config(tiny_lm_dir, tmp_path / "b", save_model=False, stop_at=3)) == []
    assert "stopped before the last step (--stop-at)" in capsys.readouterr().out
    sft(sft_config(tiny_lm_dir, tmp_path / "b", save_model=False, resume=True))
    a = load_checkpoint(tmp_path / "a" / "adapm" / "checkpoint.pt")
    b = load_checkpoint(tmp_path / "b" / "adapm" / "checkpoint.pt")
    for k, v in a["model"].items():
        torch.testing.assert_close(b["model"][k], v, rtol=0, atol=0)
    la = json.loads((tmp_path / "a" / "adapm" / "summary.json").read_text())
    lb = json.loads((tmp_path / "b" / "adapm" / "summary.json").read_text())
    assert la["final_val_loss"] == lb["final_val_loss"] and la["initial_val_loss"] == lb["initial_val_loss"]


def test_user_jsonl_and_errors(tiny_lm_dir: Path, tmp_path: Path) -> None:
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Say {w}.", "response": w}) + "\n" for w in ("yes", "no", "maybe")))
    tokenizer = load_tokenizer(tiny_lm_dir)
    prepared = prepare_sft_data(SFTDataConfig(data=str(data), max_length=32, val_fraction=0.3), tokenizer)
    assert (len(prepared.train), len(prepared.val)) == (2, 1) and "qa.jsonl" in prepared.source
    with pytest.raises(ValueError, match="raise --max-length"):
        prepare_sft_data(SFTDataConfig(data=str(data), max_length=8, val_fraction=0.3), tokenizer)
    with pytest.raises(FileNotFoundError, match=r"--model: .* \(no config\.json\)"):
        resolve_model_dir(str(tmp_path))
    with pytest.raises(ValueError, match="Invalid optimizers: 'sgd'"):
        SFTConfig(optimizers="adamw,sgd")
    # Side by side, a missing or too small file is one error before any run starts (not one per run).
    (tmp_path / "one.jsonl").write_text(json.dumps({"prompt": "Say yes.", "response": "yes"}) + "\n")
    for bad, error, match in (("missing.jsonl", FileNotFoundError, "--data: no such file"),
                              ("one.jsonl", ValueError, "--data: need at least 2 examples")):  # fmt: skip
        cfg = sft_config(tiny_lm_dir, tmp_path / "side", optimizers="adamw,adapm")
        cfg.data = SFTDataConfig(data=str(tmp_path / bad))
        with pytest.raises(error, match=match):
            sft(cfg)
        assert not (tmp_path / "side").exists()
