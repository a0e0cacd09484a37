"""Every optimizer of the comparison builds with the paper's settings and trains a real tiny model."""

from __future__ import annotations

import warnings

import pytest
import torch

from adapm.train.config import OPTIMIZER_NAMES, OptimConfig
from adapm.train.models import build_model
from adapm.train.optimizers import build_optimizer
from adapm.train.registry import REGISTRY


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
    # Block-wise variants of AdamW and Adam-mini scale group lrs (the first group is the embedding, x10).
    scale = 10 if name in ("adamw-blr", "adam-mini-blr") else 1
    assert opt.param_groups[0]["lr"] == REGISTRY[name].pretrain_lr * scale
    losses = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        for x in _stream(300, 30):
            loss = model(input_ids=x, labels=x).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.4, (name, losses[0], losses[-1])


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
    for state_dtype in ("bf16", "int8"):
        low = build_optimizer(model, OptimConfig(optimizer=name, lr=1e-3, state_dtype=state_dtype))
        assert {g["state_dtype"] for g in low.param_groups} == {state_dtype}
        variant = build_optimizer(model, OptimConfig(optimizer=f"{name}-{state_dtype}", lr=1e-3))
        assert type(variant) is type(low) and {g["state_dtype"] for g in variant.param_groups} == {state_dtype}


def test_sgd_sai_reproduces_the_authors_package_and_resumes_exactly() -> None:
    import contextlib
    import io

    from sgd_sai import SGD_sai

    from adapm.train.sgd_sai import SGDSaI

    data = _stream(300, 12)

    def run(opt_cls: type, steps: range, model=None, state=None):  # type: ignore[no-untyped-def]
        if model is None:
            torch.manual_seed(0)
            model = build_model("gpt2-1m", 300, 32)
        opt = opt_cls(model.parameters(), lr=1e-2, momentum=0.9, weight_decay=0.1)
        if state is not None:
            opt.load_state_dict(state)
        with contextlib.redirect_stdout(io.StringIO()):  # the package prints on its first step
            for i in steps:
                model(input_ids=data[i], labels=data[i]).loss.backward()
                opt.step()
                opt.zero_grad()
        return model, opt

    theirs, _ = run(SGD_sai, range(12))
    ours, _ = run(SGDSaI, range(12))
    assert all(torch.equal(a, b) for a, b in zip(theirs.parameters(), ours.parameters()))
    half, opt = run(SGDSaI, range(6))
    resumed, _ = run(SGDSaI, range(6, 12), model=half, state=opt.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(ours.parameters(), resumed.parameters()))


def test_block_wise_lr_variants_scale_by_role() -> None:
    model = build_model("llama-1m", 300, 32)
    adamw = build_optimizer(model, OptimConfig(optimizer="adamw-blr", lr=1e-3))
    lrs = sorted({round(g["lr"] / 1e-3, 6) for g in adamw.param_groups})
    assert lrs == [1.0, 4.0, 6.0, 8.0, 10.0]
    mini = build_optimizer(model, OptimConfig(optimizer="adam-mini-blr", lr=1e-3))
    assert sorted({round(g["lr"] / 1e-3, 6) for g in mini.param_groups}) == lrs
    ours = build_optimizer(model, OptimConfig(optimizer="adapm-mini", lr=1e-3, lr_ratios='{"mlp": 3}'))
    assert {g.get("lr_ratio") for g in ours.param_groups if g["role"] == "mlp"} == {3.0}
    with pytest.raises(ValueError, match="unknown role"):
        OptimConfig(optimizer="adamw", lr_ratios='{"ffn": 3}')
    # Without --lr, adamw with block-wise lrs is adamw-blr: the same base lr, so the same lr per tensor.
    plain = build_optimizer(model, OptimConfig(optimizer="adamw", lr_ratios="blockwise"))
    variant = build_optimizer(model, OptimConfig(optimizer="adamw-blr"))
    assert [g["lr"] for g in plain.param_groups] == [g["lr"] for g in variant.param_groups]


def test_galore_projects_the_attention_and_mlp_matrices_the_presets_recognise() -> None:
    """Model knowledge lives in the presets: GaLore's matrices are the partition's attention and MLP
    roles, in any family (T5's SelfAttention.q and DenseReluDense.wi too; no name pattern to miss them)."""
    from transformers import T5Config, T5ForConditionalGeneration

    def projected(model: torch.nn.Module) -> set[str]:
        opt = build_optimizer(model, OptimConfig(optimizer="galore", lr=1e-3))
        ids = {id(p) for g in opt.param_groups if "rank" in g for p in g["params"]}
        return {n for n, p in model.named_parameters() if id(p) in ids}

    torch.manual_seed(0)
    t5 = T5ForConditionalGeneration(T5Config(vocab_size=80, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4))
    names = projected(t5)
    assert "encoder.block.0.layer.0.SelfAttention.q.weight" in names
    assert "decoder.block.0.layer.1.EncDecAttention.o.weight" in names
    assert "encoder.block.0.layer.1.DenseReluDense.wi.weight" in names
    assert not any("embed" in n or "shared" in n or "relative_attention_bias" in n for n in names)
    gpt2 = build_model("gpt2-1m")
    names = projected(gpt2)
    assert names == {n for n, p in gpt2.named_parameters() if p.dim() == 2 and ("attn" in n or "mlp" in n)}


def test_every_optimizer_decays_the_tensors_adapm_decays() -> None:
    """Side by side, weight decay falls on the same tensors whatever the optimizer: matrices, not vectors
    (norms, biases, and Mamba's ``(channels, state)`` ``A_log``, which the presets declare a vector)."""
    from transformers import MambaConfig, MambaForCausalLM

    torch.manual_seed(0)
    model = MambaForCausalLM(MambaConfig(vocab_size=80, hidden_size=32, state_size=8, num_hidden_layers=1,
                                         intermediate_size=64, time_step_rank=4))  # fmt: skip

    def decayed(name: str) -> set[int]:
        opt = build_optimizer(model, OptimConfig(optimizer=name, lr=1e-3))
        return {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}

    ours = decayed("adapm")
    mixer = model.backbone.layers[0].mixer
    assert id(mixer.A_log) not in ours and id(mixer.in_proj.weight) in ours and id(mixer.D) not in ours
    for name in ("adamw", "adamw-blr", "galore", "adafactor", "sgd-sai", "adapm-mini"):
        assert decayed(name) == ours, name


def test_adamw_8bit_is_bitsandbytes_with_8bit_moments() -> None:
    model = build_model("gpt2-1m", 300, 32)
    opt = build_optimizer(model, OptimConfig(optimizer="adamw-8bit"))
    assert type(opt).__module__.startswith("bitsandbytes") and type(opt).__name__ == "AdamW8bit"
    x = _stream(300, 1)[0]
    model(input_ids=x, labels=x).loss.backward()
    opt.step()
    wte = model.transformer.wte.weight
    assert opt.state[wte]["state1"].dtype == torch.uint8 and opt.state[wte]["state2"].dtype == torch.uint8
    assert {g["weight_decay"] for g in opt.param_groups} == {0.1, 0.0}  # decay on matrices only


def test_settings_an_optimizer_does_not_use_warn() -> None:
    from adapm.train.optimizers import BUILDERS, UNUSED

    assert set(UNUSED) == set(BUILDERS)
    model = build_model("gpt2-1m", vocab_size=64, seq_len=16)
    with pytest.warns(UserWarning, match=r"adamw does not use rank_ratio=0.2, tracker='gd'"):
        build_optimizer(model, OptimConfig(optimizer="adamw", rank_ratio=0.2, tracker="gd"))
    with pytest.warns(UserWarning, match=r"sgd-sai does not use beta2=0.9"):
        build_optimizer(model, OptimConfig(optimizer="sgd-sai", beta2=0.9))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the settings it reads, or defaults: no warning
        build_optimizer(model, OptimConfig(optimizer="adapm-mini", rank_ratio=0.2, tracker="gd", beta2=0.9))
        build_optimizer(model, OptimConfig(optimizer="adamw", beta1=0.8, beta2=0.9, weight_decay=0.0))
        build_optimizer(model, OptimConfig(optimizer="adamw-blr"))
