"""Partition presets for every supported family, built from real transformers configs (no downloads)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import adapm

from conftest import tiny_gpt2


def _rows(opt: adapm.AdaPM) -> dict[str, adapm.partition.ReportRow]:
    return {row.name: row for row in opt.partition_report().rows}


def _group(opt: adapm.AdaPM, name: str) -> dict:
    return next(g for g in opt.param_groups if g["names"][0] == name)


def test_hf_gpt2_fused_qkv_is_split_into_columns() -> None:
    model = tiny_gpt2(n_embd=32, n_head=4)
    opt = adapm.AdaPMMini(model, lr=1e-3)
    rows = _rows(opt)
    prefix = "transformer.h.0.attn.c_attn.weight"
    assert [rows[f"{prefix}[{s}]"].momentum for s in "QKV"] == ["lowrank", "lowrank", "full"]
    group = _group(opt, prefix)
    assert group["split_dim"] == 1  # Conv1D stores (in, out): Q|K|V are column segments
    layout = opt.layout(model.transformer.h[0].attn.c_attn.weight)
    assert [s.block for s in layout.segments] == [(1, 8), (1, 8), (1, 1)]  # per head, per head, per neuron
    assert layout.state_shapes()["lowrank_L"] == (2, 32, 2)
    assert layout.state_shapes()["exp_avg"] == (1, 32, 32)
    assert rows["transformer.wte.weight"].momentum == "none"
    assert rows["transformer.wpe.weight"].momentum == "none"
    assert rows["transformer.h.0.attn.c_proj.weight"].momentum == "none"
    assert rows["transformer.h.0.mlp.c_fc.weight"].momentum == "lowrank"
    assert rows["transformer.h.0.mlp.c_proj.weight"].momentum == "lowrank"
    assert rows["transformer.h.0.ln_1.weight"].momentum == "full"
    assert rows["transformer.h.0.attn.c_attn.bias"].momentum == "full"
    assert opt.partition_report().unmatched == []


def test_tied_embeddings_counted_once() -> None:
    model = tiny_gpt2()
    assert model.lm_head.weight is model.transformer.wte.weight
    opt = adapm.AdaPM(model, lr=1e-3)
    names = [row.name for row in opt.partition_report().rows]
    assert "lm_head.weight" not in names
    assert _group(opt, "transformer.wte.weight")["tied"] == ["lm_head.weight"]
    n_params = sum(len(g["params"]) for g in opt.param_groups)
    assert n_params == len(list(model.parameters()))
    adamw = 8 * sum(p.numel() for p in model.parameters()) + 4 * n_params
    assert opt.partition_report().adamw_state_bytes == adamw


def test_named_parameters_give_the_same_partition_as_the_module() -> None:
    model = tiny_gpt2()
    by_module = adapm.AdaPM(model, lr=1e-3).partition_report()
    by_names = adapm.AdaPM(model.named_parameters(), lr=1e-3).partition_report()
    assert [(r.name, r.momentum, r.state_bytes) for r in by_module.rows] == [
        (r.name, r.momentum, r.state_bytes) for r in by_names.rows
    ]


class _NanoBlock(nn.Module):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(n)
        self.attn = nn.Module()
        self.attn.c_attn = nn.Linear(n, 3 * n)
        self.attn.c_proj = nn.Linear(n, n)
        self.ln_2 = nn.LayerNorm(n)
        self.mlp = nn.Module()
        self.mlp.c_fc = nn.Linear(n, 4 * n)
        self.mlp.c_proj = nn.Linear(4 * n, n)


class _NanoGPT(nn.Module):
    """nanoGPT's module names with nn.Linear layers (weights stored as (out, in))."""

    def __init__(self, n: int = 32, layers: int = 2, vocab: int = 64) -> None:
        super().__init__()
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(vocab, n),
                wpe=nn.Embedding(16, n),
                h=nn.ModuleList([_NanoBlock(n) for _ in range(layers)]),
                ln_f=nn.LayerNorm(n),
            )
        )
        self.lm_head = nn.Linear(n, vocab, bias=False)
        self.lm_head.weight = self.transformer.wte.weight


def test_nanogpt_fused_qkv_is_split_into_rows() -> None:
    model = _NanoGPT()
    opt = adapm.AdaPMMini(model, lr=1e-3)
    group = _group(opt, "transformer.h.0.attn.c_attn.weight")
    assert group["split_dim"] == 0
    assert [s["momentum"] for s in group["segments"]] == ["lowrank", "lowrank", "full"]
    layout = opt.layout(model.transformer.h[0].attn.c_attn.weight)
    assert [s.block for s in layout.segments] == [(0, 1), (0, 1), (0, 1)]  # no config: heads unknown
    assert _rows(opt)["transformer.h.0.attn.c_proj.weight"].momentum == "none"
    # Without the module, the (3n, n) shape still tells nanoGPT's layout from HF's (n, 3n).
    by_names = adapm.AdaPM(model.named_parameters(), lr=1e-3)
    assert _group(by_names, "transformer.h.0.attn.c_attn.weight")["split_dim"] == 0


def _llama_family(kind: str) -> nn.Module:
    import transformers

    common = dict(
        num_hidden_layers=2,
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=80,
        max_position_embeddings=32,
        tie_word_embeddings=False,
    )
    config_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    }[kind]
    torch.manual_seed(0)
    return model_cls(config_cls(**common))


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2"])
def test_llama_family(kind: str) -> None:
    model = _llama_family(kind)
    opt = adapm.AdaPMMini(model, lr=1e-3)
    rows = _rows(opt)
    layer = "model.layers.0"
    expected = {
        "model.embed_tokens.weight": "none",
        f"{layer}.self_attn.q_proj.weight": "lowrank",
        f"{layer}.self_attn.k_proj.weight": "lowrank",
        f"{layer}.self_attn.v_proj.weight": "full",
        f"{layer}.self_attn.o_proj.weight": "none",
        f"{layer}.mlp.gate_proj.weight": "lowrank",
        f"{layer}.mlp.up_proj.weight": "lowrank",
        f"{layer}.mlp.down_proj.weight": "lowrank",
        f"{layer}.input_layernorm.weight": "full",
        "lm_head.weight": "none",
    }
    for name, momentum in expected.items():
        assert rows[name].momentum == momentum, name
    assert opt.layout(model.model.layers[0].self_attn.k_proj.weight).segments[0].block == (0, 8)  # per KV head
    assert opt.layout(model.model.layers[0].self_attn.v_proj.weight).segments[0].block == (0, 1)
    assert opt.partition_report().unmatched == []
    if kind == "qwen2":
        assert rows[f"{layer}.self_attn.q_proj.bias"].momentum == "full"


def test_bert_encoder_and_unknown_matrices_are_flagged() -> None:
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    model = BertForMaskedLM(
        BertConfig(vocab_size=80, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    )
    opt = adapm.AdaPMMini(model, lr=1e-3)
    rows = _rows(opt)
    layer = "bert.encoder.layer.0"
    assert rows["bert.embeddings.word_embeddings.weight"].momentum == "none"
    assert rows["bert.embeddings.position_embeddings.weight"].momentum == "none"
    assert rows[f"{layer}.attention.self.query.weight"].momentum == "lowrank"
    assert rows[f"{layer}.attention.self.key.weight"].momentum == "lowrank"
    assert rows[f"{layer}.attention.self.value.weight"].momentum == "full"
    assert rows[f"{layer}.attention.output.dense.weight"].momentum == "none"
    assert rows[f"{layer}.intermediate.dense.weight"].momentum == "lowrank"
    assert rows[f"{layer}.output.dense.weight"].momentum == "lowrank"
    unknown = "cls.predictions.transform.dense.weight"
    report = opt.partition_report()
    assert unknown in report.unmatched
    assert (rows[unknown].momentum, rows[unknown].second_moment) == ("full", "full")
    assert "matched no preset" in str(report)


def test_user_rules_override_presets_and_address_fused_segments() -> None:
    model = tiny_gpt2()
    opt = adapm.AdaPM(
        model,
        lr=1e-3,
        rules=[
            (r"c_attn\.weight\[V\]", "lowrank"),
            (r"\.wte\.", {"momentum": "full", "second_moment": "block"}),
            adapm.Rule(r"mlp\.c_fc", rank_ratio=0.5),
        ],
    )
    rows = _rows(opt)
    assert rows["transformer.h.0.attn.c_attn.weight[V]"].momentum == "lowrank"
    assert rows["transformer.h.0.attn.c_attn.weight[Q]"].momentum == "lowrank"
    assert (rows["transformer.wte.weight"].momentum, rows["transformer.wte.weight"].second_moment) == (
        "full",
        "block",
    )
    assert rows["transformer.h.0.mlp.c_fc.weight"].rank == 16
    assert rows["transformer.h.0.mlp.c_proj.weight"].rank == 2


def test_frozen_parameters_are_left_out() -> None:
    model = tiny_gpt2()
    model.transformer.wpe.weight.requires_grad_(False)
    opt = adapm.AdaPM(model, lr=1e-3)
    assert "transformer.wpe.weight" not in _rows(opt)
