"""Every optimizer of the comparison builds with the paper's settings and trains a real tiny model."""

from __future__ import annotations

import warnings

import pytest
import torch

from adapm.train.config import OPTIMIZER_NAMES, OptimConfig
from adapm.train.models import build_model
from adapm.train.optimizers import DEFAULT_LR, build_optimizer


def _stream(vocab: int, n: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        start = torch.randint(0, vocab, (4, 1), generator=g)
        out.append((start + torch.arange(24)) % vocab)
    return out


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
@pytest.mark.parametrize("family", ["gpt2-1m", "llama-1m"])
def test_optimizer_trains(name: str, family: str) -> None:
    torch.manual_seed(0)
    model = build_model(family, 300, 32)
    opt = build_optimizer(model, OptimConfig(optimizer=name))
    assert opt.param_groups[0]["lr"] == DEFAULT_LR[name]
    losses = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        for x in _stream(300, 30):
            loss = model(input_ids=x, labels=x).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5, (name, losses[0], losses[-1])


def test_galore_and_adafactor_use_the_paper_settings() -> None:
    model = build_model("gpt2-1m", 300, 32)
    galore = build_optimizer(model, OptimConfig(optimizer="galore"))
    group = next(g for g in galore.param_groups if "rank" in g)
    assert (group["rank"], group["update_proj_gap"], group["scale"]) == (80, 200, 0.25)
    assert len(group["params"]) == 4 * 2  # c_attn, attn.c_proj, c_fc, mlp.c_proj per layer
    adafactor = build_optimizer(model, OptimConfig(optimizer="adafactor"))
    g = adafactor.param_groups[0]
    assert (g["beta1"], g["clip_threshold"], g["decay_rate"], g["eps"]) == (0.9, 1.0, -0.8, (1e-30, 1e-3))
    assert g["relative_step"] is False


@pytest.mark.parametrize("name", ["adapm", "adapm-mini"])
def test_adapm_options_reach_the_optimizer(name: str) -> None:
    model = build_model("gpt2-1m", vocab_size=64, seq_len=16)
    opt = build_optimizer(model, OptimConfig(optimizer=name, lr=1e-3, tracker="fixed", fused=True))
    assert opt.fused and {g["tracker"] for g in opt.param_groups} == {"fixed"}
    assert not build_optimizer(model, OptimConfig(optimizer=name, lr=1e-3)).fused
