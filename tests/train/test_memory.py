"""Memory accounting: the meta-device count is the real count; paper-scale tables."""

from __future__ import annotations

import warnings

import pytest
import torch

import adapm
from adapm.train.config import OPTIMIZER_NAMES, OptimConfig
from adapm.train.memory import count_state_bytes, format_memory_table, memory_table
from adapm.train.models import build_model
from adapm.train.optimizers import build_optimizer


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
@pytest.mark.parametrize("preset", ["gpt2-1m", "llama-1m"])
def test_meta_count_equals_real_state_after_a_step(name: str, preset: str) -> None:
    meta = build_model(preset, 300, 32, device="meta")
    counted = count_state_bytes(meta, name)
    torch.manual_seed(0)
    real = build_model(preset, 300, 32)
    opt = build_optimizer(real, OptimConfig(optimizer=name))
    x = torch.randint(0, 300, (2, 16))
    real(input_ids=x, labels=x).loss.backward()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt.step()
    assert counted == adapm.state_bytes(opt) > 0


def test_paper_scale_table_beside_table2() -> None:
    rows = {r.optimizer: r for r in memory_table("gpt2-1.5b")}
    assert rows["adamw"].paper_bytes == 12.48e9
    assert rows["adamw"].state_bytes == pytest.approx(12.48e9, rel=0.01)
    assert rows["adam-mini"].ratio_to_adamw == pytest.approx(0.5, abs=0.01)
    assert rows["adapm-mini"].ratio_to_adamw < 0.08
    assert rows["adapm"].state_bytes == pytest.approx(rows["adapm"].paper_bytes, rel=0.05)
    text = format_memory_table("gpt2-1.5b", list(rows.values()))
    assert "paper Table 2" in text and "| adapm-mini |" in text


def test_training_memory_adds_weights_gradients_state_and_activations(capsys: pytest.CaptureFixture[str]) -> None:
    from adapm.cli import main
    from adapm.train.memory import meta_model, training_memory

    rows = training_memory("gpt2-124m", ("adamw", "adapm-mini"), 4, 512, "bf16")
    params = sum(p.numel() for p in meta_model("gpt2-124m").parameters())
    adamw, mini = rows
    assert adamw.weights == adamw.gradients == 2 * params  # bf16
    assert adamw.optimizer_state == 2 * 2 * params + 4 * 148  # torch keeps bf16 moments and a float32 step
    assert mini.optimizer_state < adamw.optimizer_state / 10  # float32 state, but 5% of it
    assert adamw.activations_estimate == mini.activations_estimate > 0
    assert adamw.total == adamw.weights + adamw.gradients + adamw.optimizer_state + adamw.activations_estimate
    assert main(["memory", "--model", "gpt2-124m", "--batch-size", "4", "--seq-len", "512", "--dtype", "bf16",
                 "--optimizers", "adamw,adapm-mini"]) == 0  # fmt: skip
    assert "activations (est.)" in capsys.readouterr().out
    with pytest.raises(ValueError, match="Invalid --dtype: 'int4'"):
        training_memory("gpt2-124m", ("adamw",), 1, 8, "int4")
