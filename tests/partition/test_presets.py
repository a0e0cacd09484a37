"""Partition presets for every supported family, built from real transformers configs (no downloads)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext
from typing import Any

import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

import adapm
from adapm.partition.presets import (
    DSA_MODEL_TYPES,
    IN_OUT_EXPERTS,
    INKLING_MODEL_TYPES,
    KDA_MODULES,
    MIXTRAL_STYLE_EXPERTS,
    MLA_MODEL_TYPES,
    MODERNBERT_MODEL_TYPES,
    QWEN_VL_VISION_ATTENTION,
    WHISPER_STYLE_AUDIO,
)

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
    # Without the module, a (3n, n) weight named c_attn may be nanoGPT's or GPT-BigCode's interleaved
    # layout: it is kept whole and flagged, never split on its name alone.
    with pytest.warns(UserWarning, match=r"kept whole.*transformer\.h\.0\.attn\.c_attn\.weight"):
        by_names = adapm.AdaPM(model.named_parameters(), lr=1e-3)
    assert "segments" not in _group(by_names, "transformer.h.0.attn.c_attn.weight")
    assert "transformer.h.0.attn.c_attn.weight" in by_names.partition_report().unmatched


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
    assert rows["cls.predictions.transform.dense.weight"].momentum == "lowrank"  # the MLM head's transform
    assert opt.partition_report().unmatched == []
    model.adapter = nn.Linear(32, 32)  # a matrix no preset knows
    opt = adapm.AdaPMMini(model, lr=1e-3)
    rows = _rows(opt)
    unknown = "adapter.weight"
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


# ----------------------------------------------------- fused splits checked against the real attention


def _probe_qkv(model: nn.Module, x: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
    """The query, key and value tensors every attention layer of ``model`` receives on ``x``, recorded
    through a registered Hugging Face attention function."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    seen: list[tuple[torch.Tensor, ...]] = []

    def probe(module, query, key, value, attention_mask, **kwargs):  # type: ignore[no-untyped-def]
        seen.append((query.detach().clone(), key.detach().clone(), value.detach().clone()))
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("adapm_probe", probe)
    model.set_attn_implementation("adapm_probe")
    model.eval()  # no dropout
    with torch.no_grad():
        model(input_ids=x)
    return seen


def _calls(model: nn.Module, module: nn.Module, name: str, x: torch.Tensor) -> list[tuple[tuple, object]]:
    """The arguments and result of each call of ``module``'s method ``name`` (run unchanged) in the model's
    forward of ``x``."""
    method, seen = getattr(module, name), []

    def record(*args, **kwargs):  # type: ignore[no-untyped-def]
        out = method(*args, **kwargs)
        seen.append((args, out))
        return out

    setattr(module, name, record)
    model.eval()
    try:
        with torch.no_grad():
            model(x)  # the token ids, first: Hugging Face's input_ids, LitGPT's idx
    finally:
        delattr(module, name)
    return seen


def _probe_method(model: nn.Module, module: nn.Module, name: str, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The first three arguments of ``module``'s method ``name`` on the model's forward of ``x``."""
    return tuple(t.detach().clone() for t in _calls(model, module, name, x)[0][0][:3])


def _probe_split(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The query, key and value layer 0's attention receives on ``x``: recorded from the model's own
    split method where it has one (BLOOM's ``_reshape``, Falcon's ``_split_heads``, run unchanged),
    else through a registered Hugging Face attention function."""
    if getattr(getattr(model, "config", None), "model_type", None) == "mpt":
        return _probe_matmuls(model, x)
    if getattr(getattr(model, "config", None), "model_type", None) == "gpt_neox_japanese":
        return _probe_method(model, model.gpt_neox_japanese.layers[0].attention, "_attn", x)
    attn = (
        next(m for m in model.modules() if hasattr(m, "_split_heads") or hasattr(m, "_reshape"))
        if any(hasattr(m, "_split_heads") or hasattr(m, "_reshape") for m in model.modules())
        else None
    )
    if attn is None:
        return _probe_qkv(model, x)[0]
    seen = [out for _, out in _calls(model, attn, "_split_heads" if hasattr(attn, "_split_heads") else "_reshape", x)]
    # One call giving (q, k, v) (BLOOM, Falcon), or one call each for q, k and v (CodeGen).
    first = seen[0] if isinstance(seen[0], tuple) else tuple(seen[:3])
    return tuple(t.detach().clone() for t in first)


def _probe_matmuls(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Query, key and value as layer 0's attention multiplies them (MPT computes attention inline): the
    operands of its first two ``torch.matmul`` calls, ``q @ k^T`` and ``probs @ v``, observed with a
    torch function mode while the model runs unchanged."""
    calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    class Record(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            if func is torch.matmul and len(calls) < 2:
                calls.append((args[0].detach().clone(), args[1].detach().clone()))
            return func(*args, **(kwargs or {}))

    model.eval()
    with torch.no_grad(), Record():
        model(input_ids=x)
    (q, k_t), (_, v) = calls
    return q, k_t.transpose(-1, -2), v


def _what_each_segment_feeds(
    model: nn.Module,
    opt: adapm.AdaPM,
    weight: nn.Parameter,
    probe: Callable[..., tuple[torch.Tensor, ...]] | None = None,
    names: str = "qkv",
) -> list[str]:
    """Perturb each segment of a split weight and record which of q, k, v in layer 0 change (as ``probe``
    records them; default: :func:`_probe_split`)."""
    probe = probe or _probe_split
    x = torch.randint(0, 50, (1, 6), generator=torch.Generator().manual_seed(0))
    base = probe(model, x)
    fed = []
    for seg in opt.layout(weight).segments:
        saved = weight.detach().clone()
        with torch.no_grad():
            # Random, not constant: a constant row shift is cancelled by the LayerNorm'd (zero-mean) input.
            delta = torch.randn(seg.shape, generator=torch.Generator().manual_seed(1))
            seg.view(weight.data).add_(seg.as_view(delta))
        after = probe(model, x)
        with torch.no_grad():
            weight.copy_(saved)
        fed.append("".join(n for n, a, b in zip(names, base, after) if (a - b).abs().max() > 1e-3))
    return fed


def _block_perturbed(weight: nn.Parameter, seg: object, block: int, size: int, probe: Callable[[], Any]) -> Any:
    """What ``probe()`` records with rows ``block * size`` to ``(block + 1) * size`` of segment ``seg`` of
    ``weight`` perturbed at random (the weight is restored after)."""
    delta = torch.zeros(seg.shape)  # type: ignore[attr-defined]
    delta[block * size : (block + 1) * size] = torch.randn(size, seg.shape[1])  # type: ignore[attr-defined]
    saved = weight.detach().clone()
    with torch.no_grad():
        seg.view(weight.data).add_(seg.as_view(delta))  # type: ignore[attr-defined]
    try:
        return probe()
    finally:
        with torch.no_grad():
            weight.copy_(saved)


def _assert_head_blocks_change_their_heads(opt: adapm.AdaPM, weights: Sequence[nn.Parameter], size: int, heads: int,
                                           probe: Callable[[], Sequence[torch.Tensor]]) -> None:  # fmt: skip
    """Each of ``weights`` is low-rank with per-head blocks of ``size`` rows, and perturbing block h of the i-th changes
    head h alone (dim 1) of ``probe()[i]`` (e.g. the query, then the key, that an attention computes with)."""
    base = probe()
    for which, weight in enumerate(weights):
        seg = opt.layout(weight).segments[0]
        assert seg.momentum == "lowrank" and seg.block == (0, size), which
        for head in range(heads):
            after = _block_perturbed(weight, seg, head, size, probe)[which]
            changed = [h for h in range(heads) if (after[:, h] - base[which][:, h]).abs().max() > 1e-5]
            assert changed == [head], (which, head, changed)


def test_hf_gpt2_split_matches_the_real_query_key_value() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=64, n_head=4, vocab_size=50, n_positions=16))
    opt = adapm.AdaPMMini(model, lr=1e-3)
    weight = model.transformer.h[0].attn.c_attn.weight
    assert [s.name.rsplit("[", 1)[1] for s in opt.layout(weight).segments] == ["Q]", "K]", "V]"]
    assert _what_each_segment_feeds(model, opt, weight) == ["q", "k", "v"]


def _fused_family(kind: str) -> tuple[nn.Module, nn.Parameter]:
    """A tiny model of each family with a fused query/key/value weight, and layer 0's fused weight."""
    import transformers as T

    torch.manual_seed(0)
    small = dict(vocab_size=50)
    if kind.startswith("bigcode"):
        model = T.GPTBigCodeForCausalLM(
            T.GPTBigCodeConfig(
                n_layer=1, n_embd=64, n_head=4, n_positions=16, multi_query=kind == "bigcode-mqa", **small
            )
        )
        return model, model.transformer.h[0].attn.c_attn.weight
    if kind == "gpt_neox":
        model = T.GPTNeoXForCausalLM(
            T.GPTNeoXConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=4, intermediate_size=128, **small)
        )
        return model, model.gpt_neox.layers[0].attention.query_key_value.weight
    if kind == "gpt_neox_japanese":
        model = T.GPTNeoXJapaneseForCausalLM(T.GPTNeoXJapaneseConfig(
            hidden_size=64, num_hidden_layers=1, num_attention_heads=4, intermediate_multiple_size=2,
            **small))  # fmt: skip
        return model, model.gpt_neox_japanese.layers[0].attention.query_key_value.weight
    if kind == "persimmon":
        model = T.PersimmonForCausalLM(T.PersimmonConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                                                         intermediate_size=128, **small))  # fmt: skip
        return model, model.model.layers[0].self_attn.query_key_value.weight
    if kind == "bloom":
        model = T.BloomForCausalLM(T.BloomConfig(hidden_size=64, n_layer=1, n_head=4, **small))
        return model, model.transformer.h[0].self_attention.query_key_value.weight
    if kind.startswith("falcon"):
        flags = {
            "falcon-mqa": dict(multi_query=True),
            "falcon-mha": dict(multi_query=False),
            "falcon-gqa": dict(new_decoder_architecture=True, num_kv_heads=2),
        }[kind]
        model = T.FalconForCausalLM(
            T.FalconConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=4, **flags, **small)
        )
        return model, model.transformer.h[0].self_attention.query_key_value.weight
    if kind == "mpt":
        model = T.MptForCausalLM(T.MptConfig(d_model=64, n_heads=4, n_layers=1, expansion_ratio=2, **small))
        return model, model.transformer.blocks[0].attn.Wqkv.weight
    if kind == "codegen":
        model = T.CodeGenForCausalLM(T.CodeGenConfig(n_embd=64, n_layer=1, n_head=8, rotary_dim=4, n_positions=16,
                                                     **small))  # fmt: skip
        return model, model.transformer.h[0].attn.qkv_proj.weight
    if kind == "phi4_multimodal":
        return (model := _phi4_multimodal()), model.model.layers[0].self_attn.qkv_proj.weight
    model = T.Phi3ForCausalLM(
        T.Phi3Config(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
            pad_token_id=0,
            **small,
        )
    )
    return model, model.model.layers[0].self_attn.qkv_proj.weight


def _phi4_multimodal() -> nn.Module:
    """A tiny Phi-4-multimodal: a Phi-3-style language model (4 query heads of 16, 2 key-value heads), a one-layer
    SigLIP-style image tower and a one-block Conformer audio encoder."""
    import transformers as T

    torch.manual_seed(0)
    return T.Phi4MultimodalForCausalLM(T.Phi4MultimodalConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=50, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        vision_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                           image_size=28, patch_size=14, crop_size=28),
        audio_config=dict(hidden_size=32, intermediate_size=48, num_blocks=1, num_attention_heads=2, input_size=16,
                          nemo_conv_channels=8, depthwise_separable_out_channel=32, ext_pw_out_channel=32)))


FUSED_FAMILIES = ("bigcode-mha", "bigcode-mqa", "gpt_neox", "gpt_neox_japanese", "persimmon", "bloom", "falcon-mqa",
                  "falcon-mha", "falcon-gqa", "phi3", "phi4_multimodal", "codegen", "mpt")


@pytest.mark.parametrize("kind", FUSED_FAMILIES)
def test_declared_fused_layouts_match_the_real_query_key_value(kind: str) -> None:
    """Each declared layout (heads interleaved, unequal parts, Falcon's grouped layout) is proven on the
    model's own attention: perturbing a segment changes exactly the one of q, k, v it is declared as."""
    import warnings

    model, weight = _fused_family(kind)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # nothing kept whole
        opt = adapm.AdaPMMini(model, lr=1e-3)
    layout = opt.layout(weight)
    assert [s.name.rsplit("[", 1)[1] for s in layout.segments] == ["Q]", "K]", "V]"]
    assert [s.momentum for s in layout.segments] == ["lowrank", "lowrank", "full"]
    assert _what_each_segment_feeds(model, opt, weight) == ["q", "k", "v"]
    assert opt.partition_report().unmatched == []


@pytest.mark.parametrize("kind", ["gpt_neox", "bloom", "bigcode-mha", "phi3", "phi4_multimodal"])
def test_per_head_blocks_follow_the_real_heads(kind: str) -> None:
    """AdaPM-mini's per-head second-moment blocks of the query segment: perturbing block j of the segment
    changes head j of the query the attention receives, and no other head."""
    model, weight = _fused_family(kind)
    opt = adapm.AdaPMMini(model, lr=1e-3)
    seg = opt.layout(weight).segments[0]
    dim, size = seg.block
    assert (dim, size) == (0, 16)
    x = torch.randint(0, 50, (1, 6), generator=torch.Generator().manual_seed(0))
    base = _probe_split(model, x)[0]  # (batch, heads, seq, head_dim)
    for head in range(seg.shape[0] // size):
        after = _block_perturbed(weight, seg, head, size, lambda: _probe_split(model, x)[0])
        changed = [h for h in range(base.shape[1]) if (after[:, h] - base[:, h]).abs().max() > 1e-4]
        assert changed == [head], (kind, head, changed)


@pytest.mark.parametrize("kind", ["gpt_neox", "falcon-gqa", "phi3", "deepseek_v3", "axk2", "qwen3_next", "qwen3_5_text",
                                  "mamba2", "mamba", "zamba", "lfm2", "jetmoe"])
def test_interleaved_and_unequal_layouts_train_like_the_per_block_reference(kind: str) -> None:
    """The grouped step on interleaved and unequal segments (and latent attention's, A.X K2's query and gate,
    Gated DeltaNet's, gated attention's, Mamba's, Zamba's alternating rows, LFM2's short convolution's and JetMoE's
    per-head blocks inside its attention experts) equals the per-block step, and both train."""
    import copy

    if kind in MLA:
        model = _mla_model(kind)
    elif kind in GATED_DELTANET or kind in MAMBA or kind in SHORT_CONV or kind in ("zamba", "jetmoe"):
        model = _tiny(kind, **TINY_OVERRIDES.get(kind, {}))
    else:
        model = _fused_family(kind)[0]
    twin = copy.deepcopy(model)
    opts = [adapm.AdaPMMini(m, lr=1e-3, foreach=f) for m, f in ((model, False), (twin, True))]
    gen = torch.Generator().manual_seed(0)
    stepped: set[str] = set()
    for _ in range(4):
        ids = torch.randint(0, 50, (2, 8), generator=gen)
        for m, o in zip((model, twin), opts):
            m(input_ids=ids, labels=ids).loss.backward()
            stepped |= {n for n, p in m.named_parameters() if p.grad is not None}
            o.step()
            o.zero_grad()
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    idle = {n for n, _ in model.named_parameters()} - stepped  # a sparse-attention indexer (A.X K2) gets no gradient
    rows = opts[0].partition_report().rows
    assert adapm.state_bytes(opts[0]) == sum(r.state_bytes for r in rows if r.name.split("[")[0] not in idle)


def test_rules_that_match_nothing_warn_and_name_the_segments() -> None:
    model = tiny_gpt2()
    with pytest.warns(UserWarning, match=r"rule 0 .*weight\$' matched no parameter.*c_attn\.weight\[Q\]"):
        adapm.AdaPM(model, lr=1e-3, rules=[(r"c_attn\.weight$", "none")])
    with pytest.warns(UserWarning, match=r"rule 1 'no_such_layer' matched no parameter"):
        adapm.AdaPM(model, lr=1e-3, rules=[(r"wte", "full"), ("no_such_layer", "full")])
    with pytest.warns(UserWarning, match=r"rule 1 'wte' matched no parameter \(or only ones an earlier rule took\)"):
        adapm.AdaPM(model, lr=1e-3, rules=[(r"\.wte\.", "full"), ("wte", "none")])


def _tied_family(kind: str) -> nn.Module:
    import transformers

    torch.manual_seed(0)
    if kind == "bloom":
        config = transformers.BloomConfig(vocab_size=80, hidden_size=32, n_layer=1, n_head=4)
        return transformers.BloomForCausalLM(config)
    if kind == "falcon":
        return transformers.FalconForCausalLM(
            transformers.FalconConfig(vocab_size=80, hidden_size=32, num_hidden_layers=1, num_attention_heads=4)
        )
    return transformers.T5ForConditionalGeneration(
        transformers.T5Config(vocab_size=80, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4)
    )


@pytest.mark.parametrize(("kind", "shared"), [("bloom", "transformer.word_embeddings.weight"),
                                              ("falcon", "transformer.word_embeddings.weight"),
                                              ("t5", "shared.weight")])  # fmt: skip
def test_tied_parameters_are_matched_under_any_of_their_names(kind: str, shared: str) -> None:
    import warnings

    model = _tied_family(kind)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # these families' fused or other matrices
        opt = adapm.AdaPMMini(model, lr=1e-3)
    group = next(g for g in opt.param_groups if shared in [g["names"][0], *g["tied"]])
    assert group["matched"] and group["momentum"] == "none", group["names"]
    assert group["role"] in ("embedding", "output")
    assert not any(shared in name for name in opt.partition_report().unmatched)


# ------------------------------------------------------------------ families: names, experts, training


def _family(kind: str) -> nn.Module:
    """A tiny random model of each family recognised by name (two layers, hidden 32)."""
    import transformers as T

    torch.manual_seed(0)
    vocab = dict(vocab_size=80, bos_token_id=0, eos_token_id=1, pad_token_id=0)
    moe = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, **vocab)
    configs = {
        "phi": lambda: T.PhiForCausalLM(T.PhiConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                    num_attention_heads=4, **vocab)),
        "gptj": lambda: T.GPTJForCausalLM(T.GPTJConfig(n_embd=32, n_layer=2, n_head=4, rotary_dim=4, **vocab)),
        "opt": lambda: T.OPTForCausalLM(T.OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                                                    num_attention_heads=4, word_embed_proj_dim=32,
                                                    max_position_embeddings=64, **vocab)),
        "t5": lambda: T.T5ForConditionalGeneration(T.T5Config(d_model=32, d_ff=64, d_kv=8, num_layers=2,
                                                              num_heads=4, decoder_start_token_id=0, **vocab)),
        "gemma2": lambda: T.Gemma2ForCausalLM(T.Gemma2Config(hidden_size=32, intermediate_size=64, head_dim=8,
                                                             num_hidden_layers=2, num_attention_heads=4,
                                                             num_key_value_heads=2, **vocab)),
        "mixtral": lambda: T.MixtralForCausalLM(T.MixtralConfig(intermediate_size=16, num_local_experts=4, **moe)),
        "qwen2_moe": lambda: T.Qwen2MoeForCausalLM(T.Qwen2MoeConfig(
            intermediate_size=64, moe_intermediate_size=16, shared_expert_intermediate_size=32, num_experts=4,
            num_experts_per_tok=2, decoder_sparse_step=1, **moe)),
        "qwen3_moe": lambda: T.Qwen3MoeForCausalLM(T.Qwen3MoeConfig(
            intermediate_size=64, moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2, head_dim=8, **moe)),
        "olmoe": lambda: T.OlmoeForCausalLM(T.OlmoeConfig(intermediate_size=16, num_experts=4,
                                                          num_experts_per_tok=2, **moe)),
        "gpt_oss": lambda: T.GptOssForCausalLM(T.GptOssConfig(
            intermediate_size=16, head_dim=8, num_local_experts=4, num_experts_per_tok=2,
            layer_types=["full_attention", "full_attention"], **moe)),
        "glm": lambda: T.GlmForCausalLM(T.GlmConfig(intermediate_size=64, head_dim=8, **moe)),
        "glm4": lambda: T.Glm4ForCausalLM(T.Glm4Config(intermediate_size=64, head_dim=8, **moe)),
        "llama4": lambda: T.Llama4ForCausalLM(T.Llama4TextConfig(
            intermediate_size=16, intermediate_size_mlp=64, head_dim=8, num_local_experts=4, num_experts_per_tok=1,
            moe_layers=[0, 1], interleave_moe_layer_step=1, **moe)),
    }  # fmt: skip
    if kind.startswith(MLA):
        return _mla_model(kind)
    return configs[kind]()


MLA = MLA_MODEL_TYPES
"""Every model type declared to have multi-head latent attention."""


def _mla_model(kind: str) -> nn.Module:
    """A tiny random model with multi-head latent attention (``kind``: a model type, or ``deepseek_v2-noqlora``
    for DeepSeek-V2-Lite's plain ``q_proj``), layer 1 a mixture of experts where the family has them."""
    from transformers import AutoConfig

    torch.manual_seed(0)
    model_type = kind.removesuffix("-noqlora").removesuffix("-nope")
    sizes = dict(hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=4, vocab_size=80, q_lora_rank=None if kind != model_type
                 else 16, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=12, n_routed_experts=4,
                 num_experts_per_tok=2, n_group=1, topk_group=1, first_k_dense_replace=1, index_head_dim=16,
                 index_n_heads=4, bos_token_id=0, eos_token_id=1, pad_token_id=0)  # fmt: skip
    if model_type == "kimi_linear":  # layer 0 latent attention, layer 1 Kimi Delta Attention with experts
        sizes.update(layer_types=["full_attention", "linear_attention"], mlp_layer_types=["dense", "sparse"],
                     num_experts=4, num_experts_per_token=2, linear_num_heads=2, linear_head_dim=8)  # fmt: skip
    if model_type == "bailing_hybrid":  # layer 0 latent attention, layer 1 Kimi Delta Attention with experts
        sizes.update(head_dim=8, num_local_experts=4, layer_types=["full_attention", "linear_attention"])
    if model_type == "dots3_note_text":  # layer 1 a sliding-window layer with sizes of its own, and experts
        sizes.update(head_dim=24, layer_types=["indexed_attention", "sliding_attention"], swa_num_attention_heads=2,
                     swa_num_key_value_heads=2, swa_q_lora_rank=16, swa_kv_lora_rank=8, swa_head_dim=20,
                     swa_qk_nope_head_dim=12, swa_v_head_dim=10, mlp_layer_types=["dense", "sparse"],
                     shared_experts_intermediate_size=16)  # fmt: skip
    if kind == "mistral_large4_text-nope":  # layer 0 without rotary parts (its module drops them), layer 1 with
        sizes.update(no_rope_layers=[0, 1])
    if model_type == "glm5_next_text":  # layer 0 latent attention without rotary parts, layer 1 Kimi Delta Attention
        sizes.update(qk_rope_head_dim=0, layer_types=["full_attention", "linear_attention"],
                     mlp_layer_types=["dense", "sparse"], linear_num_heads=2, linear_head_dim=8, index_topk=32)
    if model_type == "longcat_flash":  # two attention blocks per layer; experts and identity experts in each layer
        sizes.update(num_layers=2, head_dim=8, qk_head_dim=24, ffn_hidden_size=64, expert_ffn_hidden_size=16,
                     zero_expert_num=2, moe_topk=2)  # fmt: skip
    known = AutoConfig.for_model(model_type)
    return _model_of(AutoConfig.for_model(model_type, **{k: v for k, v in sizes.items() if _has(known, k)}))


def _has(config: object, key: str) -> bool:
    """Whether ``config`` has the field ``key``: also where it is kept per layer (Dots3's head counts, whose
    global read raises a ``RuntimeError``), and for the sliding-window layers' sizes (``swa_*``), which Dots3's
    config reads when it is built."""
    try:
        return key.startswith("swa_") or hasattr(config, key)
    except RuntimeError:
        return True


_TINY = dict(hidden_size=32, intermediate_size=64, moe_intermediate_size=16, shared_expert_intermediate_size=32,
             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8, vocab_size=80,
             num_experts=4, num_local_experts=4, n_routed_experts=4, moe_num_experts=4, num_experts_per_tok=2,
             n_group=1, topk_group=1, first_k_dense_replace=1, decoder_sparse_step=1, kv_lora_rank=16,
             q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=12, bos_token_id=0, eos_token_id=1,
             pad_token_id=0, mlp_only_layers=[0], mamba_n_heads=4, mamba_d_head=16, mamba_d_state=8,
             mamba_n_groups=1, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8,
             linear_value_head_dim=8, linear_conv_kernel_dim=4)  # fmt: skip
"""Size fields that make a tiny model (two layers, hidden 32) of a transformers model type; each is set
only where the type's config has it."""


def _tiny(model_type: str, **overrides: object) -> nn.Module:
    """A tiny random causal language model of any transformers ``model_type``, from its own config (see
    :func:`_model_of`)."""
    from transformers import AutoConfig

    torch.manual_seed(0)
    known = AutoConfig.for_model(model_type)
    sizes = {k: v for k, v in {**_TINY, **overrides}.items() if hasattr(known, k) and v is not None}
    settable = not isinstance(getattr(type(known), "layer_types", None), property)  # Jamba's is derived
    chosen = "layer_types" in overrides  # given (None: the config's own)
    if settable and not chosen and "linear_attention" in (getattr(known, "layer_types", None) or []):
        sizes["layer_types"] = ["linear_attention", "full_attention"]  # one of each
    return _model_of(AutoConfig.for_model(model_type, **sizes))


def _model_of(config: object) -> nn.Module:
    """The causal language model of ``config``; for the language model of a multimodal model that transformers has no
    causal language model class for, that language model alone (its decoder, without a head)."""
    import importlib

    from transformers import AutoModel, AutoModelForCausalLM, PreTrainedModel
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_MAPPING_NAMES

    model_type = config.model_type  # type: ignore[attr-defined]
    if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return AutoModelForCausalLM.from_config(config)
    if model_type in MODEL_MAPPING_NAMES:
        return AutoModel.from_config(config)
    modeling = importlib.import_module(type(config).__module__.replace(".configuration_", ".modeling_"))
    model_class = next(c for c in vars(modeling).values() if isinstance(c, type) and issubclass(c, PreTrainedModel)
                       and c.config_class is type(config) and not c.__name__.endswith("PreTrainedModel"))  # fmt: skip
    return model_class(config)


def _loss(model: nn.Module, ids: torch.Tensor, **kwargs: object) -> torch.Tensor:
    """The language-model loss on ``ids``; for a decoder without a head (:func:`_model_of`), the mean square of its
    last hidden states (a loss every parameter of the decoder has a gradient from)."""
    if not any(k in type(model).__name__ for k in ("For", "LMHead")):  # Mistral4Model, Qwen3VLMoeTextModel: no head
        return model(input_ids=ids, **kwargs).last_hidden_state.float().pow(2).mean()
    return model(input_ids=ids, labels=ids, **kwargs).loss


def _five_steps(model: nn.Module, opt: adapm.AdaPM, loss: Callable[[], torch.Tensor]) -> set[str]:
    """Five steps of ``opt`` on ``loss()``, each loss finite, the weights finite after them; returns the names of the
    parameters that had a gradient."""
    stepped: set[str] = set()
    for _ in range(5):
        value = loss()
        assert torch.isfinite(value)
        value.backward()
        stepped |= {n for n, p in model.named_parameters() if p.grad is not None}
        opt.step()
        opt.zero_grad()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    return stepped


def _decoder(model: nn.Module) -> nn.Module:
    """The decoder of a causal language model, or the model itself where it is a decoder alone (:func:`_model_of`)."""
    return model.model if hasattr(model, "model") else model


FAMILIES = ("phi", "gptj", "opt", "t5", "gemma2", "glm", "glm4", "mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "llama4",
            "gpt_oss", *MLA, "deepseek_v2-noqlora")

WHOLE_BY_EXPERTS = ("aria_text", "cohere2_moe", "ernie4_5_moe", "exaone_moe", "flex_olmo", "flint", "glm4_moe",
                    "granitemoe", "granitemoe_swa", "granitemoeshared", "hy_v3", "kolibri1", "mellum", "mimo_v2_flash",
                    "minimax_m2", "phimoe", "solar_open", "laguna", "minimax", "hunyuan_v1_moe", "dots1")
"""Mixture-of-experts model types whose other matrices have known names: their expert stacks complete them."""

LANGUAGE_MODELS_OF_MULTIMODAL = ("qwen3_vl_moe_text", "qwen3_omni_moe_text", "glm4v_moe_text", "glm4v_text",
                                 "glm_ocr_text", "ernie4_5_vl_moe_text", "unlimited_ocr_text", "muse_spark_text",
                                 "step3p5")  # fmt: skip
"""Language models that transformers builds only inside a multimodal model (no causal language model class): the
tests build the decoder alone (:func:`_model_of`)."""

GATED_DELTANET = ("qwen3_next", "qwen3_5_text", "qwen3_5_moe_text", "olmo_hybrid")
"""Model types with Gated DeltaNet linear attention (built with one linear and one full attention layer)."""

MAMBA: dict[str, dict[str, object]] = {
    "mamba2": dict(num_heads=4, head_dim=16, state_size=8, n_groups=2),
    "bamba": dict(attn_layer_indices=[1], layer_types=None),
    "falcon_h1": dict(mamba_d_ssm=64, mamba_rms_norm=True),
    "granitemoehybrid": dict(layer_types=["mamba", "attention"]),
    "nemotron_h": dict(mamba_num_heads=4, mamba_head_dim=16, ssm_state_size=8, n_groups=2),
    "zamba2": dict(layers_block_type=["mamba", "hybrid"], layer_types=None, use_shared_attention_adapter=True,
                   adapter_rank=4, head_dim=None, num_key_value_heads=4),
    "mamba": dict(state_size=8, intermediate_size=64, time_step_rank=4),
    "falcon_mamba": dict(state_size=8, intermediate_size=64, time_step_rank=4),
    "jamba": dict(attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1),
}  # fmt: skip
"""State-space model types (Mamba-2 and its hybrids, then Mamba), with the sizes that make them tiny (layer 0 a
Mamba mixer; two groups of state size 8 where the family has groups; Zamba2's layer 1 with its shared transformer
block and that block's adapters)."""

DEEPSEEK_V4 = dict(head_dim=16, qk_rope_head_dim=8, q_lora_rank=16, o_groups=2, o_lora_rank=8, num_key_value_heads=1,
                   index_n_heads=2, index_head_dim=8, index_topk=2, sliding_window=4, hc_mult=2,
                   layer_types=["compressed_sparse_attention", "heavily_compressed_attention"],
                   compress_rates={"compressed_sparse_attention": 2, "heavily_compressed_attention": 4},
                   mlp_layer_types=["moe", "moe"])  # fmt: skip
"""A tiny DeepSeek-V4: layer 0 compressed sparse attention (windows of 2, with the indexer), layer 1 heavily
compressed attention (windows of 4)."""

XLSTM = dict(hidden_size=128, embedding_dim=128, num_heads=2, qk_dim_factor=0.5, v_dim_factor=1.0, v_head_dim=None,
             mode="train", chunk_size=2)
"""A tiny xLSTM (hidden 128: its config rounds the query and value widths up to multiples of 64), two heads."""

ZAMBA = dict(num_hidden_layers=4, attn_layer_period=2, attn_layer_offset=0, layer_types=None, head_dim=None,
             num_key_value_heads=4, n_mamba_heads=2, mamba_d_state=8, mamba_dt_rank=4)
"""A tiny Zamba (version 1): Mamba layers 0, 1 and 3, and two hybrid layers (2, 3) sharing one transformer block
(transformers cannot tie a block used once)."""

RWKV = dict(attention_hidden_size=32, intermediate_size=64)
"""A tiny RWKV (version 4)."""

GRIFFIN = dict(lru_width=32, block_types=["recurrent", "attention"], layer_types=None)
"""A tiny RecurrentGemma: layer 0 a recurrent (Griffin) block, layer 1 local attention."""

SHORT_CONV: dict[str, dict[str, object]] = {
    "lfm2": dict(layer_types=["conv", "full_attention"]),
    "lfm2_moe": dict(layer_types=["conv", "full_attention"], num_dense_layers=1),
    "lfm3": dict(layer_types=["conv", "full_attention"]),
}
"""Model types with LFM2's gated short convolution, built with layer 0 a convolution and layer 1 attention (with
experts in LFM2-MoE)."""

DOGE = dict(is_moe=True, num_experts=16, num_experts_per_tok=2)
"""A tiny Doge with its cross-domain mixture of experts (16 retrieval experts, picked by product keys)."""

MINIMAX_M3 = dict(mlp_layer_types=["dense", "sparse"], dense_intermediate_size=64, shared_intermediate_size=32)
"""A tiny MiniMax-M3: layer 0 a dense MLP, layer 1 experts with a shared expert."""

INKLING = dict(layer_types=["hybrid_sliding", "hybrid"], swa_head_dim=4, swa_num_attention_heads=8,
               swa_num_key_value_heads=2, d_rel=4, rel_extent=16, sliding_window_size=8)  # fmt: skip
"""A tiny Inkling (or Inkling 2): layer 0 a sliding-window layer with sizes of its own (8 heads of 4), layer 1 full
attention (4 heads of 8), relative positions of 4 dimensions per head."""


GEMMA3N = dict(num_kv_shared_layers=0, layer_types=["sliding_attention", "full_attention"], laurel_rank=4,
               hidden_size_per_layer_input=8, vocab_size_per_layer_input=80, altup_num_inputs=3,
               activation_sparsity_pattern=[0.0, 0.0])  # fmt: skip
"""A tiny Gemma 3n: two layers (no key-value sharing), three AltUp streams, LAuReL of rank 4."""

MULTIMODAL_ROPE: dict[str, dict[str, object]] = {
    kind: {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "mrope_section": section, **partial}}
    for kind, section, partial in (("glm4v_text", [2, 1, 1], {}), ("glm_ocr_text", [2, 1, 1], {}),
                                   ("glm4v_moe_text", [1, 1, 0], {"partial_rotary_factor": 0.5}))
}  # fmt: skip
"""GLM-4.1V's, GLM-OCR's and GLM-4.5V's language models: multimodal rotary sections that fit a head of 8."""

OLDER_TEXT_MODELS: dict[str, dict[str, object]] = {
    "ctrl": dict(dff=64, n_positions=64), "xlm": dict(max_position_embeddings=64),
    "cpmant": dict(dim_head=4, dim_ff=64, prompt_length=4, segment_types=4),
    "rembert": dict(input_embedding_size=16, output_embedding_size=24, is_decoder=True),
    "roc_bert": dict(pronunciation_vocab_size=20, shape_vocab_size=20, pronunciation_embed_dim=8, shape_embed_dim=8,
                     is_decoder=True),
    "electra": dict(embedding_size=16, is_decoder=True), "xmod": dict(is_decoder=True),
}  # fmt: skip
"""CTRL, XLM, CPM-Ant (4 heads of ``dim_head`` 4, not width / heads) and BERT's kin as causal language models (RemBERT
and ELECTRA with embeddings narrower than the width, RoCBert with pronunciation and shape tables)."""

TINY_OVERRIDES: dict[str, dict[str, object]] = {**MAMBA, **SHORT_CONV, "deepseek_v4": DEEPSEEK_V4, "zamba": ZAMBA,
                                                "rwkv": RWKV, "recurrent_gemma": GRIFFIN, "xlstm": XLSTM,
                                                "dots1": {"n_shared_experts": 1},
                                                "minimax_m3_vl_text": MINIMAX_M3, "doge": DOGE,
                                                "zaya": {"num_experts_per_tok": 1}, "inkling_text": INKLING,
                                                "inkling2_text": INKLING, "gemma3n_text": GEMMA3N,
                                                "step3p5": {"mlp_layer_types": ["dense", "sparse"],
                                                            "sliding_window": 4},
                                                "ernie4_5_vl_moe_text": {"moe_intermediate_size": [16, 16],
                                                                         "rope_parameters": {
                                                                             "rope_type": "default",
                                                                             "rope_theta": 1e4,
                                                                             "mrope_section": [1, 1, 2]}},
                                                **MULTIMODAL_ROPE,
                                                "glm5_next_text": {"num_key_value_heads": 4, "qk_rope_head_dim": 0,
                                                                   "mlp_layer_types": ["dense", "sparse"]},
                                                **OLDER_TEXT_MODELS}  # fmt: skip
"""The sizes :func:`_tiny` needs beyond its defaults, per model type, wherever the tests build that type."""


def _named_family(kind: str) -> nn.Module:
    """A tiny model of a family recognised by names alone (no fused weight to split)."""
    import transformers as T

    torch.manual_seed(0)
    small = dict(vocab_size=80)
    models = {
        "bart": lambda: T.BartForConditionalGeneration(T.BartConfig(
            d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4, decoder_attention_heads=4,
            encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=32, **small)),
        "gpt_neo": lambda: T.GPTNeoForCausalLM(T.GPTNeoConfig(
            hidden_size=32, num_layers=2, num_heads=4, attention_types=[[["global", "local"], 1]],
            max_position_embeddings=32, **small)),
        "roberta": lambda: T.RobertaForMaskedLM(T.RobertaConfig(
            hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=40, **small)),
        "big_bird": lambda: T.BigBirdModel(T.BigBirdConfig(
            hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
            attention_type="original_full", **small)),
        "openai-gpt": lambda: T.OpenAIGPTLMHeadModel(T.OpenAIGPTConfig(n_embd=32, n_layer=1, n_head=4, n_positions=32,
                                                                       **small)),
        "lfm2": lambda: _tiny("lfm2"),
        "afmoe": lambda: _tiny("afmoe"),
        "gemma3n_text": lambda: _tiny("gemma3n_text", **GEMMA3N),
        "fuyu": lambda: T.FuyuForCausalLM(T.FuyuConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, patch_size=4,
            num_channels=3, **small)),
    }  # fmt: skip
    return models[kind]()


@pytest.mark.parametrize(("kind", "names"), [
    ("bart", {"encoder_attn.out_proj.weight": "attn_out", "self_attn.out_proj.weight": "attn_out"}),
    ("gpt_neo", {"attn.attention.out_proj.weight": "attn_out"}),
    ("roberta", {"lm_head.dense.weight": "mlp"}),
    ("big_bird", {"pooler.weight": "mlp"}),
    ("openai-gpt", {"positions_embed.weight": "embedding"}),
    ("lfm2", {"feed_forward.w1.weight": "mlp", "feed_forward.w2.weight": "mlp", "feed_forward.w3.weight": "mlp"}),
    ("afmoe", {"router.gate.weight": "router"}),
    ("gemma3n_text", {"altup.correction_coefs.weight": "router", "altup.prediction_coefs.weight": "router",
                      "altup.modality_router.weight": "router", "laurel.linear_left.weight": "mlp",
                      "laurel.linear_right.weight": "mlp", "altup_projections.1.weight": "mlp",
                      "altup_unembed_projections.1.weight": "mlp"}),
    ("fuyu", {"vision_embed_tokens.weight": "router"}),
])  # fmt: skip
def test_more_families_are_recognised_by_name(kind: str, names: dict[str, str]) -> None:
    """Cross-attention and GPT-Neo's attention outputs, RoBERTa's head, BigBird's pooler, GPT-1's positions,
    LFM2's feed-forward (Meta's w1/w2/w3 naming), AFMoE's router, Gemma 3n's AltUp and LAuReL, Fuyu's linear patch
    embedding: nothing left unknown."""
    import warnings

    model = _named_family(kind)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # nothing unknown
        opt = adapm.AdaPMMini(model, lr=1e-3)
    rows = _rows(opt)
    for suffix, role in names.items():
        found = [r.role for n, r in rows.items() if n.endswith(suffix)]
        assert found and set(found) == {role}, (suffix, found)
    assert opt.partition_report().unmatched == []


@pytest.mark.parametrize("kind", FAMILIES + WHOLE_BY_EXPERTS + GATED_DELTANET + tuple(MAMBA) + tuple(SHORT_CONV)
                         + ("deepseek_v4", "recurrent_gemma", "xlstm", "rwkv", "zamba", "moshi", "jetmoe", "ctrl",
                            "xlm", "cpmant", "minimax_m3_vl_text", "doge", "zaya", *INKLING_MODEL_TYPES, "gemma3n_text")
                         + LANGUAGE_MODELS_OF_MULTIMODAL
                         + MODERNBERT_MODEL_TYPES)
def test_every_matrix_of_each_family_is_recognised_and_trains(kind: str) -> None:
    """No matrix left unknown; forward, backward and five finite steps; the state each parameter holds
    after them is exactly what the partition report counted (for the parameters that had gradients:
    DeepSeek-V3.2's and V4's indexers get none from the language-model loss, their top-k choice has no gradient)."""
    import warnings

    model = (_family(kind) if kind in FAMILIES else _modernbert(kind) if kind in MODERNBERT_MODEL_TYPES
             else _tiny(kind, **TINY_OVERRIDES.get(kind, {})))  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # nothing kept whole, no rule unused
        opt = adapm.AdaPMMini(model, lr=1e-3)
    report = opt.partition_report()
    assert report.unmatched == [], report.unmatched
    gen = torch.Generator().manual_seed(0)

    def loss() -> torch.Tensor:
        ids = torch.randint(2, 80, (2, 12), generator=gen)
        extra = {"decoder_input_ids": ids} if kind == "t5" else {}
        return _loss(model, ids, use_cache=False, **extra)  # an all-Mamba Zamba2 needs no cache

    idle = {n for n, p in model.named_parameters() if p.requires_grad} - _five_steps(model, opt, loss)
    # DeepSeek-V3.2's and V4's indexers get no gradient, nor ERNIE-4.5-VL's vision experts from a batch of text
    assert all(".indexer." in n or ".vision_moe." in n for n in idle), idle
    assert bool(idle) == (kind in (*DSA_MODEL_TYPES, "deepseek_v4", "ernie4_5_vl_moe_text")), idle
    assert adapm.state_bytes(opt) == sum(r.state_bytes for r in report.rows if r.name.split("[")[0] not in idle)


EXPERTS: dict[str, str] = {
    "mixtral": "MixtralExperts", "qwen2_moe": "Qwen2MoeExperts", "qwen3_moe": "Qwen3MoeExperts",
    "olmoe": "OlmoeExperts", "deepseek_v2": "DeepseekV2Experts", "deepseek_v3": "DeepseekV3Experts",
    "deepseek_v32": "DeepseekV32Experts", "glm4_moe_lite": "Glm4MoeLiteExperts", "glm_moe_dsa": "GlmMoeDsaExperts",
    "axk1": "AXK1Experts", "axk2": "AXK2Experts", "afmoe": "AfmoeExperts", "bailing_hybrid": "BailingHybridExperts",
    "cohere2_moe": "Cohere2MoeExperts", "ernie4_5_moe": "Ernie4_5_MoeExperts", "exaone_moe": "ExaoneMoeExperts",
    "flex_olmo": "FlexOlmoExperts", "flint": "FlintExperts", "glm4_moe": "Glm4MoeExperts",
    "granitemoe": "GraniteMoeExperts", "granitemoe_swa": "GraniteMoeSWAExperts",
    "granitemoehybrid": "GraniteMoeHybridExperts", "granitemoeshared": "GraniteMoeSharedExperts",
    "hy_v3": "HYV3Experts", "inkling_text": "InklingExperts", "jamba": "JambaExperts",
    "kimi_linear": "KimiLinearExperts", "kolibri1": "Kolibri1Experts", "laguna": "LagunaExperts",
    "mellum": "MellumExperts", "mimo_v2_flash": "MiMoV2FlashExperts", "minimax": "MiniMaxExperts",
    "minimax_m2": "MiniMaxM2Experts", "phimoe": "PhimoeExperts", "qwen3_5_moe_text": "Qwen3_5MoeExperts",
    "qwen3_next": "Qwen3NextExperts", "solar_open": "SolarOpenExperts", "zaya": "ZayaExperts",
    "llama4": "Llama4TextExperts", "aria_text": "AriaExperts", "deepseek_v4": "DeepseekV4Experts",
    "hy_v4": "HYV4Experts", "beam": "BeamExperts", "minimax_m3_vl_text": "MiniMaxM3VLExperts",
    "inkling2_text": "Inkling2Experts", "dots3_note_text": "Dots3NoteExperts", "longcat_flash": "LongcatFlashExperts",
    "lfm2_moe": "Lfm2MoeExperts", "hunyuan_v1_moe": "HunYuanMoEV1Experts", "dots1": "Dots1Experts",
    "qwen3_vl_moe_text": "Qwen3VLMoeTextExperts", "qwen3_omni_moe_text": "Qwen3OmniMoeThinkerTextExperts",
    "glm4v_moe_text": "Glm4vMoeTextExperts", "ernie4_5_vl_moe_text": "Ernie4_5_VLMoeMoeExperts",
    "mistral4": "Mistral4Experts", "mistral_large4_text": "MistralLarge4TextExperts",
    "muse_spark_text": "MuseSparkExperts", "step3p5": "Step3p7Experts", "unlimited_ocr_text": "UnlimitedOcrTextExperts",
    "glm5_next_text": "Glm5NextTextExperts",
}  # fmt: skip
"""A model type for each expert module class the presets split, and that class."""


def test_every_expert_class_the_presets_split_is_proven_below() -> None:
    assert sorted(EXPERTS.values()) == sorted(MIXTRAL_STYLE_EXPERTS + IN_OUT_EXPERTS)


@pytest.mark.parametrize("kind", sorted(EXPERTS))
def test_expert_segments_match_what_each_expert_computes(kind: str) -> None:
    """Each declared expert segment is proven on the model's own forward: perturbing one row of an
    expert's ``gate`` segment changes the activation's input (the gate), a row of its ``up`` segment
    changes the output only, and a ``down_proj`` segment changes only its own expert's output."""
    known = kind in FAMILIES
    extra = {"beam": {"mlp_layer_types": ["dense", "sparse"]}, **TINY_OVERRIDES}.get(kind, {})
    model = _family(kind) if known else _tiny(kind, **extra)
    opt = adapm.AdaPMMini(model, lr=1e-3)
    experts = next(m for m in model.modules() if type(m).__name__ == EXPERTS[kind])
    gate_up, down = experts.gate_up_proj, experts.down_proj
    seen: list[torch.Tensor] = []  # the gate: the activation's input, or the first half of _apply_gate's
    if hasattr(experts, "_apply_gate"):  # a gated activation of its own (DeepSeek-V4's clamped SwiGLU, ...)
        apply_gate = experts._apply_gate

        def observed(gate_up: torch.Tensor) -> torch.Tensor:
            seen.append(gate_up.detach().clone().chunk(2, dim=-1)[0])
            return apply_gate(gate_up)

        experts._apply_gate = observed
    elif isinstance(experts.act_fn, nn.Module):
        experts.act_fn.register_forward_hook(lambda _m, args, _out: seen.append(args[0].detach().clone()))
    else:  # a plain function (LFM2-MoE's F.silu)
        act_fn = experts.act_fn
        experts.act_fn = lambda gate: (seen.append(gate.detach().clone()), act_fn(gate))[1]
    llama4 = kind == "llama4"  # (in, out) experts run on every expert's share of the tokens at once
    top_k = 2 if kind == "longcat_flash" else 1
    in_out = type(experts).__name__ in IN_OUT_EXPERTS
    hidden = gate_up.shape[1] if in_out else gate_up.shape[-1]
    x = torch.randn(5, hidden, generator=torch.Generator().manual_seed(1))

    def run(expert: int) -> tuple[torch.Tensor, torch.Tensor]:
        seen.clear()
        with torch.no_grad():
            if llama4:
                out = experts(x.repeat(gate_up.shape[0], 1)).view(gate_up.shape[0], 5, hidden)[expert]
                return seen[0][expert], out
            # each token to this expert (in two slots at half weight for LongCat-Flash, whose code needs top-k > 1)
            out = experts(x, torch.full((5, top_k), expert), torch.full((5, top_k), 1 / top_k))
        return seen[0], out

    def perturbed(weight: nn.Parameter, seg_name: str, row: int, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
        seg = next(s for s in opt.layout(weight).segments if s.name.endswith(f"[{seg_name}]"))
        delta = torch.zeros_like(weight)
        part = seg.view(delta)
        if in_out:  # an output column of an (in, out) expert
            part[:, row] = 1.0
        else:
            part[row] = 1.0
        saved = weight.detach().clone()
        with torch.no_grad():
            weight.add_(delta)
            result = run(expert)
            weight.copy_(saved)
        return result

    layout = opt.layout(gate_up)
    assert [s.name.rsplit("[", 1)[1] for s in layout.segments[:4]] == ["E0.gate]", "E0.up]", "E1.gate]", "E1.up]"]
    for expert in (0, 3):
        act, out = run(expert)
        act_g, out_g = perturbed(gate_up, f"E{expert}.gate", 2, expert)
        assert not torch.equal(act_g, act) and not torch.equal(out_g, out)
        assert torch.equal(
            act_g[:, [i for i in range(act.shape[1]) if i != 2]], act[:, [i for i in range(act.shape[1]) if i != 2]]
        )
        act_u, out_u = perturbed(gate_up, f"E{expert}.up", 2, expert)
        assert torch.equal(act_u, act) and not torch.equal(out_u, out)
        _, out_d = perturbed(down, f"E{expert}", 0, expert)
        assert not torch.equal(out_d, out)
        other = 1 if expert == 0 else 0
        _, out_other = perturbed(down, f"E{other}", 0, expert)
        assert torch.equal(out_other, out)
    rows = _rows(opt)
    assert rows[f"{next(n for n, p in model.named_parameters() if p is gate_up)}[E0.gate]"].momentum == "lowrank"


def test_nemotron_h_ungated_experts_are_split_per_expert_and_train() -> None:
    """Nemotron-H's experts have no gate (``down(relu2(up(x)))``): one block per expert of each stack, proven
    on the experts' own forward (an expert's up rows change its activation input, its down matrix its output
    only); with its router and embeddings nothing is left unknown, and it trains."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model(
        "nemotron_h", hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8, intermediate_size=64,
        layers_block_type=["moe", "full_attention", "mlp"], n_routed_experts=4, num_experts_per_tok=2,
        moe_intermediate_size=16, moe_shared_expert_intermediate_size=16, vocab_size=80, use_mamba_kernels=False,
        bos_token_id=0, eos_token_id=1, pad_token_id=0)  # fmt: skip
    model = AutoModelForCausalLM.from_config(config)
    opt = adapm.AdaPMMini(model, lr=1e-3)
    assert opt.partition_report().unmatched == []
    experts = model.model.layers[0].mixer.experts
    up, down = experts.up_proj, experts.down_proj
    assert [s.name.rsplit("[", 1)[1] for s in opt.layout(up).segments] == ["E0]", "E1]", "E2]", "E3]"]
    assert {s.momentum for s in opt.layout(down).segments} == {"lowrank"}
    seen: list[torch.Tensor] = []
    experts.act_fn.register_forward_hook(lambda _m, args, _out: seen.append(args[0].detach().clone()))
    x = torch.randn(5, 32, generator=torch.Generator().manual_seed(1))

    def run(weight: nn.Parameter | None = None, seg: int = 0, expert: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        saved = None if weight is None else weight.detach().clone()
        with torch.no_grad():
            if weight is not None:
                opt.layout(weight).segments[seg].view(weight.data)[0] += 1.0
            seen.clear()
            out = experts(x, torch.full((5, 1), expert), torch.ones(5, 1))
            if weight is not None:
                weight.copy_(saved)
        return seen[0], out

    for expert in (0, 3):
        act, out = run(expert=expert)
        act_u, out_u = run(up, expert, expert)
        assert not torch.equal(act_u[:, 0], act[:, 0]) and torch.equal(act_u[:, 1:], act[:, 1:])
        assert not torch.equal(out_u, out)
        assert torch.equal(run(up, 1 - expert // 3, expert)[0], act)  # another expert's up rows: nothing
        assert not torch.equal(run(down, expert, expert)[1], out)
        assert torch.equal(run(down, 1 - expert // 3, expert)[1], out)
    for _ in range(3):
        ids = torch.randint(2, 80, (2, 8))
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    assert all(torch.isfinite(p).all() for p in model.parameters())


def _route_all_to(router: nn.Module, expert: int) -> torch.utils.hooks.RemovableHandle:
    """Make a JetMoE top-k router send every token to ``expert``: its logits are replaced, the rest of the model
    runs unchanged."""

    def force(_m: nn.Module, _args: object, logits: torch.Tensor) -> torch.Tensor:
        forced = torch.zeros_like(logits)
        forced[..., expert] = 1.0
        return forced

    return router.layer.register_forward_hook(force)


def test_jetmoe_attention_and_mlp_experts_feed_what_they_are_declared_as() -> None:
    """JetMoE, on its own forward with every token routed to one expert in turn: each head block of that attention
    expert's query changes that query head alone (never the keys or values), its output projection changes the
    output, and another expert's weights change nothing; ``kv_proj`` is ``[key | value]`` with one block per key
    head; each MLP expert's gate rows feed its activation, its up rows its output only."""
    model = _tiny("jetmoe", num_experts_per_tok=1)  # one expert per token: the query has the key-value heads' count
    opt = adapm.AdaPMMini(model, lr=1e-3)
    attn, mlp = model.model.layers[0].self_attention, model.model.layers[0].mlp
    assert _what_each_segment_feeds(model, opt, attn.kv_proj.weight, _probe_sdpa) == ["k", "v"]
    _assert_each_head_block_changes_its_head(model, opt, attn.kv_proj.weight, 1, 8, heads=2)
    query, attn_out = attn.experts.input_linear.weight, attn.experts.output_linear.weight
    gate_up, down = mlp.input_linear.weight, mlp.output_linear.weight
    assert [s.name.rsplit("[", 1)[1] for s in opt.layout(gate_up).segments[:3]] == ["E0.gate]", "E0.up]", "E1.gate]"]
    assert {s.momentum for s in opt.layout(attn_out).segments} == {"none"}
    x = torch.randint(2, 50, (1, 6), generator=torch.Generator().manual_seed(0))
    hidden = torch.randn(1, 5, 32, generator=torch.Generator().manual_seed(1))
    seen: list[torch.Tensor] = []
    mlp.activation.register_forward_hook(lambda _m, args, _out: seen.append(args[0].detach().clone()))

    def segment(weight: nn.Parameter, name: str) -> object:
        return next(s for s in opt.layout(weight).segments if s.name.endswith(f"[{name}]"))

    def logits() -> torch.Tensor:
        with torch.no_grad():
            return model(input_ids=x, use_cache=False).logits

    def mlp_run() -> tuple[torch.Tensor, torch.Tensor]:
        seen.clear()
        with torch.no_grad():
            out = mlp(hidden)
        return seen[0], out

    model.eval()
    for expert in (0, 3):
        other = 3 - expert
        handles = [_route_all_to(router, expert) for router in (attn.experts.router, mlp.router)]
        try:
            q, k, v = _probe_sdpa(model, x)
            for head in range(2):
                q_h, k_h, v_h = _block_perturbed(query, segment(query, f"E{expert}"), head, 8,
                                                 lambda: _probe_sdpa(model, x))  # fmt: skip
                assert [h for h in range(2) if not torch.equal(q_h[:, h], q[:, h])] == [head]
                assert torch.equal(k_h, k) and torch.equal(v_h, v)
            assert torch.equal(_block_perturbed(query, segment(query, f"E{other}"), 0, 8,
                                                lambda: _probe_sdpa(model, x))[0], q)  # fmt: skip
            out = logits()
            assert not torch.equal(_block_perturbed(attn_out, segment(attn_out, f"E{expert}"), 0, 1, logits), out)
            assert torch.equal(_block_perturbed(attn_out, segment(attn_out, f"E{other}"), 0, 1, logits), out)
            act, out = mlp_run()
            act_g, _ = _block_perturbed(gate_up, segment(gate_up, f"E{expert}.gate"), 2, 1, mlp_run)
            assert [c for c in range(act.shape[-1]) if not torch.equal(act_g[:, c], act[:, c])] == [2]
            act_u, out_u = _block_perturbed(gate_up, segment(gate_up, f"E{expert}.up"), 2, 1, mlp_run)
            assert torch.equal(act_u, act) and not torch.equal(out_u, out)
            assert torch.equal(_block_perturbed(gate_up, segment(gate_up, f"E{other}.gate"), 2, 1, mlp_run)[0], act)
            assert not torch.equal(_block_perturbed(down, segment(down, f"E{expert}"), 0, 1, mlp_run)[1], out)
            assert torch.equal(_block_perturbed(down, segment(down, f"E{other}"), 0, 1, mlp_run)[1], out)
        finally:
            for handle in handles:
                handle.remove()


def test_doge_dynamic_mask_and_retrieval_experts_feed_what_they_are_declared_as() -> None:
    """Doge, on its own forward: ``dt_proj`` gives each key-value head's dynamic attention mask (row h changes the
    mask of that head's query heads alone, and never the query, key or value); its experts' ``down_embed`` and
    ``up_embed`` are tables read row by row at the experts each token picks (a row no token picked changes nothing),
    as token embeddings are read."""

    model = _tiny("doge", **DOGE)
    opt = adapm.AdaPMMini(model, lr=1e-3)
    assert opt.partition_report().unmatched == []
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    x = torch.randint(2, 50, (1, 6), generator=torch.Generator().manual_seed(0))

    def probe() -> tuple[torch.Tensor, ...]:
        model.set_attn_implementation("sdpa")
        model.eval()
        with torch.no_grad(), _SdpaCalls() as record:
            model(input_ids=x, use_cache=False)
        return record.calls[0]

    with torch.no_grad():
        attn.A.fill_(-1.0)  # its initial 0 makes the mask exp(0 * softplus(dt)) = 1 whatever dt is
    base = probe()
    dt = attn.dt_proj.weight
    assert _rows(opt)["model.layers.0.self_attn.dt_proj.weight"].momentum == "full"
    for head in range(2):  # two key-value heads, each shared by two query heads
        after = _block_perturbed(dt, opt.layout(dt).segments[0], head, 1, probe)
        assert all(torch.equal(a, b) for a, b in zip(after[:3], base[:3]))
        assert [h for h in range(4) if not torch.equal(after[3][:, h], base[3][:, h])] == [2 * head, 2 * head + 1]
    picked: list[torch.Tensor] = []
    mlp.down_embed.register_forward_hook(lambda _m, args, _out: picked.append(args[0]))
    hidden = torch.randn(1, 5, 32, generator=torch.Generator().manual_seed(1))

    def run() -> torch.Tensor:
        with torch.no_grad():
            return mlp(hidden)[0]

    out = run()
    used = set(picked[0].flatten().tolist())
    assert 0 < len(used) < 16
    tables = ("model.layers.0.mlp.down_embed.weight", "model.layers.0.mlp.up_embed.weight")
    assert {(_rows(opt)[n].role, _rows(opt)[n].momentum) for n in tables} == {("embedding", "none")}
    for table in (mlp.down_embed.weight, mlp.up_embed.weight):
        seg = opt.layout(table).segments[0]
        assert seg.block == (0, 1)  # a block per row: per expert
        for row in range(16):
            changed = not torch.equal(_block_perturbed(table, seg, row, 1, run), out)
            assert changed == (row in used), (row, used)


def test_zaya_attention_and_router_parts_feed_what_they_are_declared_as() -> None:
    """ZAYA, on its own forward: both value matrices (the current token's half of each value head and the previous
    token's) feed the value alone, the query-key convolutions the query and key alone, and the router network's
    matrices the experts' routing alone (never the tokens the experts compute on)."""
    model = _tiny("zaya", **TINY_OVERRIDES["zaya"])
    opt = adapm.AdaPMMini(model, lr=1e-3)
    assert opt.partition_report().unmatched == []
    layer = model.model.layers[0]
    cca, router = layer.self_attn.qkv_proj, layer.mlp.gate
    with torch.no_grad():
        layer.self_attn.qk_norm.temp.fill_(1.0)  # its initial 0 scales every key to 0
    feeds = {name: _what_each_segment_feeds(model, opt, getattr(cca, name).weight, _probe_sdpa)[0]
             for name in ("v_proj_current", "v_proj_delayed", "conv_qk_depthwise", "conv_qk_grouped")}  # fmt: skip
    assert feeds == {"v_proj_current": "v", "v_proj_delayed": "v", "conv_qk_depthwise": "qk", "conv_qk_grouped": "qk"}
    calls: list[tuple[torch.Tensor, ...]] = []
    layer.mlp.experts.register_forward_pre_hook(lambda _m, args: calls.append(tuple(a.clone() for a in args)))

    def routed(m: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        calls.clear()
        _run_hooked(m, x, [])
        return calls[0]  # layer 0's experts: the tokens, the experts picked and their weights

    for weight in (router.down_proj.weight, router.router_mlp.fc1.weight, router.router_mlp.out_proj.weight):
        assert _rows(opt)[next(n for n, p in model.named_parameters() if p is weight)].role == "router"
        assert _what_each_segment_feeds(model, opt, weight, routed, "tiw")[0] in ("w", "iw")


@pytest.mark.parametrize("kind", INKLING_MODEL_TYPES)
def test_inkling_attention_parts_feed_what_they_are_declared_as(kind: str) -> None:
    """Inkling and Inkling 2, on their own forward: each layer's query gets per-head blocks of that layer's own head
    size (the sliding-window layer's ``swa_head_dim``), each changing its head alone; each head's block of the
    relative-position query (``r_proj``, ``d_rel`` rows) changes that head's position bias alone, never the query, key
    or value; the key and value convolutions (and Inkling 2's per-token taps) feed the key or the value alone; the
    shared experts are split per expert (gate rows feed that expert's activation, up rows its output only)."""
    import sys

    model = _tiny(kind, **INKLING)
    opt = adapm.AdaPMMini(model, lr=1e-3)
    assert opt.partition_report().unmatched == []
    x = torch.randint(2, 50, (1, 6), generator=torch.Generator().manual_seed(0))
    module = sys.modules[type(model).__module__]
    real = module.eager_attention_forward

    def probe(m: nn.Module, x: torch.Tensor, call: int = 0) -> tuple[torch.Tensor, ...]:
        seen: list[tuple[torch.Tensor, ...]] = []

        def observed(attn: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *args: object,
                     **kwargs: torch.Tensor) -> object:  # fmt: skip
            seen.append(tuple(t.detach().clone() for t in (q, k, v, kwargs["position_bias"])))
            return real(attn, q, k, v, *args, **kwargs)

        m.set_attn_implementation("eager")
        _forward_observed(m, x, module, "eager_attention_forward", observed, [])
        return seen[call]

    for layer, heads, size in ((0, 8, 4), (1, 4, 8)):
        attn = model.model.layers[layer].self_attn
        _assert_each_head_block_changes_its_head(model, opt, attn.q_proj.weight, 0, size, heads=heads, call=layer)
        r_proj = attn.r_proj.weight
        seg = opt.layout(r_proj).segments[0]
        assert seg.momentum == "lowrank" and seg.block == (0, 4)
        base = probe(model, x, layer)
        for head in range(heads):
            after = _block_perturbed(r_proj, seg, head, 4, lambda: probe(model, x, layer))  # noqa: B023
            assert all(torch.equal(a, b) for a, b in zip(after[:3], base[:3]))
            assert [h for h in range(heads) if not torch.equal(after[3][:, h], base[3][:, h])] == [head]
        convs = {"k": attn.k_sconv, "v": attn.v_sconv}
        for fed, conv in convs.items():
            weights = [conv.conv1d.weight] if hasattr(conv, "conv1d") else [conv.static_weight, conv.weight_proj.weight]
            for weight in weights:
                assert _rows(opt)[next(n for n, p in model.named_parameters() if p is weight)].role == "router"
                assert _what_each_segment_feeds(model, opt, weight, lambda m, x: probe(m, x, layer), "qkvb") == [fed]  # noqa: B023
    if kind == "inkling_text":
        shared = model.model.layers[0].mlp.shared_experts
        acts: list[torch.Tensor] = []
        shared.act_fn.register_forward_hook(lambda _m, args, _out: acts.append(args[0].detach().clone()))
        hidden = torch.randn(1, 5, 32, generator=torch.Generator().manual_seed(1))

        def run() -> tuple[torch.Tensor, torch.Tensor]:
            acts.clear()
            with torch.no_grad():
                out = shared(hidden, torch.ones(5, 2))
            return acts[0], out  # the gate of each expert: (experts, tokens, intermediate)

        act, out = run()
        gate, up, down = shared.gate_proj, shared.up_proj, shared.down_proj
        act_g, _ = _block_perturbed(gate, opt.layout(gate).segments[1], 2, 1, run)
        assert [(e, c) for e in range(2) for c in range(act.shape[-1])
                if not torch.equal(act_g[e, :, c], act[e, :, c])] == [(1, 2)]  # fmt: skip
        act_u, out_u = _block_perturbed(up, opt.layout(up).segments[1], 2, 1, run)
        assert torch.equal(act_u, act) and not torch.equal(out_u, out)
        assert not torch.equal(_block_perturbed(down, opt.layout(down).segments[0], 0, 1, run)[1], out)


def test_construction_warns_once_about_what_the_partition_could_not_reach() -> None:
    import warnings

    from transformers import BertConfig, BertForMaskedLM

    model = tiny_gpt2()
    # Bare parameters: the partition cannot apply; the warning gives what that costs.
    with pytest.warns(UserWarning, match=r"without names.*full momentum \(5\d\.\d% of AdamW's optimizer state\)"):
        adapm.AdaPMMini(model.parameters(), lr=1e-3)
    with pytest.raises(ValueError, match="without names"):
        adapm.AdaPMMini(model.parameters(), lr=1e-3, strict=True)
    with pytest.raises(TypeError, match="Invalid strict: 'yes'"):
        adapm.AdaPM(model, lr=1e-3, strict="yes")  # type: ignore[arg-type]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        adapm.AdaPMMini(model.parameters(), lr=1e-3, strict=False)
        adapm.AdaPM(model, lr=1e-3, strict=True)  # every matrix recognised
        adapm.AdaPM([{"params": [model.transformer.wte.weight], "momentum": "none"}], lr=1e-3)  # deliberate
    # Unknown matrices: one warning naming them, with their share of AdamW's state.
    torch.manual_seed(0)
    bert = BertForMaskedLM(
        BertConfig(vocab_size=80, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    )
    bert.adapter = nn.Linear(32, 32)
    with pytest.warns(UserWarning) as caught:
        adapm.AdaPMMini(bert, lr=1e-3)
    messages = [str(w.message) for w in caught if "AdaPM" in str(w.message)]
    assert len(messages) == 1
    assert "1 matrix matched no preset (adapter.weight)" in messages[0]
    assert "% of AdamW's optimizer state for them" in messages[0]
    with pytest.raises(ValueError, match=r"adapter\.weight"):
        adapm.AdaPMMini(bert, lr=1e-3, strict=True)
    # A rule that chooses the unknown matrix's policy makes it deliberate: no warning, not flagged.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt = adapm.AdaPMMini(bert, lr=1e-3, rules=[(r"^adapter\.weight$", "lowrank")], strict=True)
    assert opt.partition_report().unmatched == []
    # Many unknown matrices (LoRA adapters, an unknown architecture): five names and a count, not hundreds.
    bert.adapters = nn.ModuleList(nn.Linear(32, 32) for _ in range(8))
    with pytest.warns(UserWarning, match=r"9 matrices matched no preset \(adapter\.weight, adapters\.0\.weight, "
                      r"adapters\.1\.weight, adapters\.2\.weight, adapters\.3\.weight and 4 more; "
                      r"partition_report\(\) marks them all with \(!\)\)"):  # fmt: skip
        opt = adapm.AdaPMMini(bert, lr=1e-3)
    assert len(opt.partition_report().unmatched) == 9
    assert "and 4 more" in str(opt.partition_report())


@pytest.mark.parametrize("kind", [k for k in FUSED_FAMILIES if k != "phi4_multimodal"])  # its own test, below
def test_fused_families_train_with_the_state_the_report_counts(kind: str) -> None:
    model, _ = _fused_family(kind)
    opt = adapm.AdaPMMini(model, lr=1e-3, strict=True)
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        ids = torch.randint(0, 50, (2, 8), generator=gen)
        loss = model(input_ids=ids, labels=ids).loss
        assert torch.isfinite(loss)
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert adapm.state_bytes(opt) == opt.partition_report().state_bytes
    assert opt.partition_report().ratio_to_adamw < 0.2


@pytest.mark.parametrize("kind", ["phi3", "glm", "glm4", "granitemoeshared", "granitemoehybrid", "zamba2",
                                  *MODERNBERT_MODEL_TYPES, "minimax_m3_vl_text", "minimax_m3_vl_text-shared",
                                  "glm4v_text", "glm_ocr_text", "phi4_multimodal", "phi4_multimodal-audio"])
def test_gate_up_segments_match_the_real_mlp(kind: str) -> None:
    """Perturbing the gate half of a fused ``[gate | up]`` changes the activation's input and the MLP's output, the up
    half the output alone (Phi-4-multimodal's audio encoder holds them the other way round: ``[up | gate]``)."""
    call: dict[str, int] = {}
    activation: nn.Module | None = None
    if kind.startswith("minimax_m3"):  # a clamped SwiGLU, inline: the gate (times alpha) is what torch.sigmoid sees
        model = _tiny("minimax_m3_vl_text", **MINIMAX_M3)
        mlp = model.model.layers[1].mlp.shared_experts if kind.endswith("-shared") else model.model.layers[0].mlp
        weight = mlp.gate_up_proj.weight
    elif kind in MODERNBERT_MODEL_TYPES:  # Wi: [input | gate] in its code's words, the first half activated
        model = _modernbert(kind)
        mlp = model.model.layers[0].mlp
        weight, activation = mlp.Wi.weight, mlp.act
    elif kind.startswith("granite"):  # Granite's shared MLP: input_linear is [gate | up]
        model = _tiny(kind, shared_intermediate_size=32, **MAMBA.get(kind, {}))
        mlp = model.model.layers[0].shared_mlp
        weight, activation = mlp.input_linear.weight, mlp.activation
    elif kind in ("glm4v_text", "glm_ocr_text"):  # a multimodal model's language model alone
        model = _tiny(kind)
        mlp = model.layers[0].mlp
        weight, activation = mlp.gate_up_proj.weight, mlp.activation_fn
    elif kind == "phi4_multimodal-audio":  # each Conformer block's feed-forward: [up | gate]
        model = _phi4_multimodal()
        mlp = model.model.embed_tokens_extend.audio_embed.encoder.encoders[0].feed_forward_in
        weight, activation = mlp.gate_up_proj.weight, mlp.act_fn
    elif kind == "zamba2":  # the shared transformer block's MLP, called with the hybrid layer's index
        model = _tiny(kind, **MAMBA[kind])
        mlp = model.model.layers[1].shared_transformer.feed_forward
        weight, activation, call = mlp.gate_up_proj.weight, mlp.act_fn, {"layer_idx": 1}
    else:
        model = _fused_family(kind)[0] if kind.startswith("phi") else _family(kind)
        mlp = model.model.layers[0].mlp
        weight, activation = mlp.gate_up_proj.weight, mlp.activation_fn
    opt = adapm.AdaPMMini(model, lr=1e-3)
    names = [s.name.rsplit("[", 1)[1] for s in opt.layout(weight).segments]
    assert names == (["up]", "gate]"] if kind == "phi4_multimodal-audio" else ["gate]", "up]"])
    seen: list[torch.Tensor] = []

    class SigmoidInputs(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            if func is torch.sigmoid:
                seen.append(args[0].detach().clone())
            return func(*args, **(kwargs or {}))

    if activation is not None:
        activation.register_forward_hook(lambda _m, args, out: seen.append(args[0].detach().clone()))
    x = torch.randn(1, 5, weight.shape[1], generator=torch.Generator().manual_seed(0))

    def run() -> tuple[torch.Tensor, torch.Tensor]:
        seen.clear()
        with torch.no_grad(), SigmoidInputs() if activation is None else nullcontext():
            out = mlp(x, **call)
        return seen[0], out

    act, out = run()
    for seg, gate in zip(opt.layout(weight).segments, (name == "gate]" for name in names)):
        saved = weight.detach().clone()
        with torch.no_grad():
            seg.view(weight.data).add_(torch.randn(seg.shape, generator=torch.Generator().manual_seed(1)))
        act_p, out_p = run()
        with torch.no_grad():
            weight.copy_(saved)
        assert torch.equal(act_p, act) is not gate  # the gate feeds the activation; up does not
        assert not torch.equal(out_p, out)


def test_gpt_oss_alternating_gate_and_up_columns_match_its_experts() -> None:
    """GPT-OSS's experts compute ``(up + 1) * glu(gate)``: on the model's own gating, a perturbation of
    one column of a declared ``up`` segment changes only that unit's output and linearly (twice the
    perturbation, twice the change), one of a ``gate`` segment only that unit's and not linearly."""
    model = _family("gpt_oss")
    opt = adapm.AdaPMMini(model, lr=1e-3, strict=True)
    experts = model.model.layers[0].mlp.experts
    weight = experts.gate_up_proj
    for bias in ("gate_up_proj_bias", "down_proj_bias"):  # vectors, as every bias: no weight decay
        group = _group(opt, f"model.layers.0.mlp.experts.{bias}")
        assert group["role"] == "vector" and group["weight_decay"] == 0.0
    assert _group(opt, "model.layers.0.mlp.experts.down_proj")["weight_decay"] == 0.1
    seen: list[torch.Tensor] = []
    method = experts._apply_gate

    def record(gate_up: torch.Tensor) -> torch.Tensor:
        out = method(gate_up)
        seen.append(out.detach().clone())
        return out

    experts._apply_gate = record
    x = torch.randn(5, weight.shape[1], generator=torch.Generator().manual_seed(0))

    def gated(seg_name: str, unit: int, scale: float) -> torch.Tensor:
        seg = next(s for s in opt.layout(weight).segments if s.name.endswith(f"[{seg_name}]"))
        saved = weight.detach().clone()
        with torch.no_grad():
            seg.view(weight.data)[:, unit] += scale  # one unit's column (a (hidden, units, 1) view)
            seen.clear()
            experts(x, torch.full((5, 1), 1), torch.ones(5, 1))
            weight.copy_(saved)
        return seen[0]

    base = gated("E1.up", 0, 0.0)
    for unit in (0, 5):
        for name, linear in (("E1.up", True), ("E1.gate", False)):
            one, two = gated(name, unit, 0.3) - base, gated(name, unit, 0.6) - base
            changed = [j for j in range(base.shape[1]) if one[:, j].abs().max() > 1e-6]
            assert changed == [unit], (name, unit, changed)
            assert torch.allclose(two, 2 * one, atol=1e-5) is linear, (name, unit)


def _probe_sdpa(model: nn.Module, x: torch.Tensor, call: int = 0) -> tuple[torch.Tensor, ...]:
    """The query, key and value that the ``call``-th attention (default: layer 0's) passes to torch's
    ``scaled_dot_product_attention`` (the model runs unchanged, with its ``sdpa`` attention and its own
    masks), observed with a torch function mode; in a model without an ``sdpa`` attention (HY-V4's, with
    attention sinks), to its modeling code's ``eager_attention_forward``."""
    import sys

    calls: list[tuple[torch.Tensor, ...]] = []
    if not getattr(model, "_supports_sdpa", True):
        module = sys.modules[type(model).__module__]
        real = module.eager_attention_forward

        def observed(attn: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *args: object,
                     **kwargs: object) -> object:
            calls.append((q.detach().clone(), k.detach().clone(), v.detach().clone()))
            return real(attn, q, k, v, *args, **kwargs)

        model.set_attn_implementation("eager")
        _forward_observed(model, x, module, "eager_attention_forward", observed, [])
        return calls[call]

    model.set_attn_implementation("sdpa")
    model.eval()
    with torch.no_grad(), _SdpaCalls() as record:
        model(input_ids=x)
    return record.calls[call][:3]


class _SdpaCalls(TorchFunctionMode):
    """While active, records the query, key, value and mask of every call to torch's
    ``scaled_dot_product_attention`` (the mask None where there is none)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[torch.Tensor, ...]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if func is torch.nn.functional.scaled_dot_product_attention:
            mask = (kwargs or {}).get("attn_mask", args[3] if len(args) > 3 else None)
            self.calls.append(tuple(t.detach().clone() if t is not None else t for t in (*args[:3], mask)))
        return func(*args, **(kwargs or {}))


def _assert_each_head_block_changes_its_head(model: nn.Module, opt: adapm.AdaPM, weight: nn.Parameter, which: int,
                                             size: int, heads: int, call: int = 0) -> None:
    """``weight``'s first segment is low-rank with per-head blocks of ``size`` rows, and perturbing block h
    changes head h alone of the query (``which`` 0) or key (1) that layer 0 passes to attention."""
    seg = opt.layout(weight).segments[0]
    assert seg.momentum == "lowrank" and seg.block == (0, size)
    x = torch.randint(2, 50, (1, 6), generator=torch.Generator().manual_seed(0))
    base = _probe_sdpa(model, x, call)[which]
    for head in range(heads):
        after = _block_perturbed(weight, seg, head, size, lambda: _probe_sdpa(model, x, call)[which])
        changed = [h for h in range(heads) if (after[:, h] - base[:, h]).abs().max() > 1e-4]
        assert changed == [head], (which, head, changed)


def test_a_multimodal_models_language_model_is_read_with_its_own_config() -> None:
    """Gemma 3's language model and vision tower each have a config of their own (the top-level config has
    no head size): the text query gets per-head blocks of the text head size, proven on its attention, and
    the vision query per-head blocks of the vision head size."""
    import transformers as T

    torch.manual_seed(0)
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                head_dim=16, vocab_size=80, bos_token_id=0, eos_token_id=1, pad_token_id=0)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, image_size=28,
                  patch_size=14)
    model = T.Gemma3ForConditionalGeneration(T.Gemma3Config(
        text_config=text, vision_config=vision, mm_tokens_per_image=4, image_token_index=79, boi_token_index=78,
        eoi_token_index=77))  # fmt: skip
    assert getattr(model.config, "head_dim", None) is None
    opt = adapm.AdaPMMini(model, lr=1e-3, strict=False)
    language, tower = model.model.language_model, model.model.vision_tower
    _assert_each_head_block_changes_its_head(model, opt, language.layers[0].self_attn.q_proj.weight, 0, 16, heads=4)
    assert opt.layout(tower.encoder.layers[0].self_attn.q_proj.weight).segments[0].block == (0, 8)
    from adapm.partition.rules import ModelDims, model_dims

    assert model_dims(model) == ModelDims(hidden=32, heads=4, kv_heads=2)  # the language model's (GaLore, Adam-mini)


def _llava() -> nn.Module:
    """A tiny LLaVA: a CLIP vision tower (two layers, 2 x 2 patches of 14 pixels), its projector, a Llama."""
    import transformers as T

    torch.manual_seed(0)
    text = dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=8, vocab_size=80)  # fmt: skip
    vision = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, image_size=28, patch_size=14, projection_dim=32)  # fmt: skip
    return T.LlavaForConditionalGeneration(T.LlavaConfig(text_config=text, vision_config=vision, image_token_id=79))


def test_a_vision_towers_embeddings_and_projector_are_recognised_and_train() -> None:
    """LLaVA's CLIP tower and projector: nothing unknown. The position table is read row by row (row p changes the
    embedding of patch p alone, as a token embedding's row changes its token's), the patch embedding (a convolution)
    keeps full momentum, the projector's two matrices are MLP matrices; with an image in the batch, five steps train,
    holding the state the report counted."""
    import warnings

    model = _llava()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # nothing unknown
        opt = adapm.AdaPMMini(model, lr=1e-3)
    rows = _rows(opt)
    tower = "model.vision_tower.embeddings."
    assert (rows[tower + "position_embedding.weight"].role, rows[tower + "position_embedding.weight"].momentum) == (
        "embedding", "none")  # fmt: skip
    assert (rows[tower + "patch_embedding.weight"].role, rows[tower + "patch_embedding.weight"].momentum) == (
        "router", "full")  # fmt: skip
    assert {rows[f"model.multi_modal_projector.linear_{i}.weight"].role for i in (1, 2)} == {"mlp"}
    embeddings = model.model.vision_tower.embeddings
    pixels = torch.randn(1, 3, 28, 28, generator=torch.Generator().manual_seed(1))
    table = embeddings.position_embedding.weight

    def embed() -> torch.Tensor:
        with torch.no_grad():
            return embeddings(pixels)

    base = embed()
    for row in range(table.shape[0]):  # the class token's position, then one per patch
        after = _block_perturbed(table, opt.layout(table).segments[0], row, 1, embed)
        assert [p for p in range(base.shape[1]) if not torch.equal(after[:, p], base[:, p])] == [row]
    ids = torch.tensor([[1, 79, 79, 79, 79, 5, 6, 7]])
    stepped = _five_steps(model, opt, lambda: model(input_ids=ids, pixel_values=pixels, labels=ids).loss)
    idle = {n for n, _ in model.named_parameters()} - stepped  # LLaVA reads the tower's second-to-last layer
    assert idle and all(n.startswith("model.vision_tower.") for n in idle)
    assert tower + "patch_embedding.weight" in stepped and tower + "position_embedding.weight" in stepped
    assert adapm.state_bytes(opt) == sum(r.state_bytes for r in opt.partition_report().rows if r.name not in idle)


QWEN_VL = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe", "qwen2_5_omni_thinker",
           "qwen3_omni_moe_thinker", "glm4v", "glm_ocr", "exaone4_5")
"""Multimodal models with a Qwen-VL-style vision tower (GLM-4.1V's and GLM-OCR's are such towers too, EXAONE 4.5's one
with grouped-query attention)."""


def _qwen_vl(kind: str) -> nn.Module:
    """A tiny Qwen-VL-style model: a vision tower of two blocks (2 heads of 16; Qwen2-VL's of 8, its width being
    ``embed_dim`` while its ``hidden_size`` is the language model's), patches of 2 x 2 pixels over 2 frames, merged
    2 x 2, and a language model of two layers (4 heads of 8)."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    torch.manual_seed(0)
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                head_dim=8, vocab_size=80, rope_parameters={"rope_type": "default", "rope_theta": 1e4,
                                                            "mrope_section": [2, 1, 1]})  # fmt: skip
    vision = dict(depth=2, hidden_size=32, embed_dim=16, intermediate_size=64, num_heads=2, out_hidden_size=32,
                  patch_size=2, spatial_merge_size=2, temporal_patch_size=2, fullatt_block_indexes=[0], window_size=8,
                  deepstack_visual_indexes=[0], num_position_embeddings=16)  # fmt: skip
    if kind == "exaone4_5":  # one key-value head for the vision tower's two query heads
        text, vision = {**text, "model_type": "exaone4"}, {**vision, "num_key_value_heads": 1}
    config = AutoConfig.for_model(kind, text_config=text, vision_config=vision, image_token_id=79, video_token_id=78,
                                  vision_start_token_id=77)  # fmt: skip
    return AutoModelForImageTextToText.from_config(config)


@pytest.mark.parametrize("kind", QWEN_VL)
def test_qwen_vl_vision_attention_parts_feed_what_they_are_declared_as(kind: str) -> None:
    """A Qwen-VL-style vision tower, proven on its own forward over an image: ``qkv``'s three parts feed exactly the
    query, key and value of its first block's attention, each query and key block of the module's ``head_dim`` rows
    changes its head alone (the vision tower's heads, not the language model's; Qwen2.5-Omni's q, k and v are apart;
    EXAONE 4.5's key has one head, its ``qkv`` parts of their own sizes); nothing in the model is left unknown (the
    Omni models' audio towers included)."""

    model = _qwen_vl(kind)
    opt = adapm.AdaPMMini(model, lr=1e-3, strict=True)  # nothing unknown
    visual = model.model.visual
    pixels = torch.randn(4, 3 * 2 * 2 * 2, generator=torch.Generator().manual_seed(1))  # one image of 2 x 2 patches
    grid = torch.tensor([[1, 2, 2]])

    def probe(_m: nn.Module = model, _x: object = None) -> tuple[torch.Tensor, ...]:
        visual.set_attn_implementation("sdpa")
        visual.eval()
        with torch.no_grad(), _SdpaCalls() as record:
            visual(pixels, grid_thw=grid)
        return record.calls[0][:3]  # block 0's query, key and value: (1, heads, tokens, head size)

    _assert_vision_attention_parts(model, opt, visual.blocks[0].attn, probe, 8 if kind == "qwen2_vl" else 16,
                                   (2, 1 if kind == "exaone4_5" else 2))  # fmt: skip


def _assert_vision_attention_parts(model: nn.Module, opt: adapm.AdaPM, attn: nn.Module,
                                   probe: Callable[..., tuple[torch.Tensor, ...]], size: int,
                                   heads: tuple[int, int]) -> None:  # fmt: skip
    """``attn``'s query, key and value (one ``qkv``, or ``q``, ``k``, ``v``, or ``q_proj``, ``k_proj``, ``v_proj``) feed
    exactly the query, key and value that ``probe()`` records, and each query and key block of ``size`` rows changes its
    own head alone (``heads``: the query's and the key's head counts)."""
    if hasattr(attn, "qkv"):
        weights = [attn.qkv.weight] * 3
        assert [(s.name.rsplit("[", 1)[1], s.momentum, s.block) for s in opt.layout(attn.qkv.weight).segments] == [
            ("Q]", "lowrank", (0, size)), ("K]", "lowrank", (0, size)), ("V]", "full", (0, 1))]  # fmt: skip
        assert _what_each_segment_feeds(model, opt, attn.qkv.weight, probe) == ["q", "k", "v"]
    else:  # q, k and v apart
        parts = ("q", "k", "v") if hasattr(attn, "q") else ("q_proj", "k_proj", "v_proj")
        weights = [getattr(attn, part).weight for part in parts]
        assert [_what_each_segment_feeds(model, opt, w, probe)[0] for w in weights] == ["q", "k", "v"]
    for which, count in enumerate(heads):
        seg = opt.layout(weights[which]).segments[which if len(opt.layout(weights[which]).segments) > 1 else 0]
        assert seg.block == (0, size) and seg.shape[0] == count * size
        base = probe()[which]
        for head in range(count):
            after = _block_perturbed(weights[which], seg, head, size, probe)[which]
            assert [h for h in range(count) if not torch.equal(after[:, h], base[:, h])] == [head]


def _multimodal(kind: str) -> nn.Module:
    """A tiny PaliGemma, Idefics3 or Mistral 3 (a SigLIP or Pixtral tower of one layer, its projector, a language
    model of two layers)."""
    import transformers as T

    torch.manual_seed(0)

    def text(model_type: str) -> dict[str, object]:
        return dict(model_type=model_type, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=8, vocab_size=80)  # fmt: skip

    siglip = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, image_size=28,
                  patch_size=14)  # fmt: skip
    if kind == "paligemma":
        return T.PaliGemmaForConditionalGeneration(T.PaliGemmaConfig(
            text_config=text("gemma"), vision_config={"model_type": "siglip_vision_model", **siglip,
                                                      "projection_dim": 32}, image_token_index=79))  # fmt: skip
    if kind == "idefics3":
        return T.Idefics3ForConditionalGeneration(T.Idefics3Config(text_config=text("llama"), vision_config=siglip,
                                                                   image_token_id=79, scale_factor=2))  # fmt: skip
    pixtral = dict(model_type="pixtral", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                   num_attention_heads=4, image_size=28, patch_size=14, head_dim=8)  # fmt: skip
    return T.Mistral3ForConditionalGeneration(T.Mistral3Config(text_config=text("mistral"), vision_config=pixtral,
                                                               image_token_index=79, spatial_merge_size=2))  # fmt: skip


@pytest.mark.parametrize(("kind", "projector"), [
    ("paligemma", ["model.multi_modal_projector.linear.weight"]),
    ("idefics3", ["model.connector.modality_projection.proj.weight"]),
    ("mistral3", ["model.multi_modal_projector.linear_1.weight", "model.multi_modal_projector.linear_2.weight",
                  "model.multi_modal_projector.patch_merger.merging_layer.weight"]),
])  # fmt: skip
def test_projectors_between_a_vision_tower_and_its_language_model_are_mlp_matrices(kind: str,
                                                                                  projector: list[str]) -> None:
    """PaliGemma's, Idefics3's and Mistral 3's projectors (and Pixtral's patch merger) are MLP matrices, Pixtral's patch
    convolution keeps full momentum; nothing is unknown (SigLIP's pooling head, which these models' forward never
    reads, included)."""
    model = _multimodal(kind)
    opt = adapm.AdaPMMini(model, lr=1e-3, strict=False)
    rows = _rows(opt)
    assert [(rows[n].role, rows[n].momentum) for n in projector] == [("mlp", "lowrank")] * len(projector)
    if kind == "mistral3":
        assert (rows["model.vision_tower.patch_conv.weight"].role, rows["model.vision_tower.patch_conv.weight"].momentum
                ) == ("router", "full")  # fmt: skip
    assert opt.partition_report().unmatched == []


def test_a_matrix_name_on_a_convolution_kernel_is_left_unknown_not_an_error() -> None:
    """A convolution named as a preset's matrix (``mlp.gate_proj``, low-rank momentum) cannot take low-rank
    momentum, which needs a matrix: it is left unknown (full state, flagged) and the optimizer builds and steps."""

    class ConvMLP(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gate_proj = nn.Conv2d(4, 8, 3)

    model = nn.Module()
    model.mlp = ConvMLP()
    with pytest.warns(UserWarning, match=r"1 matri\w+ matched no preset \(mlp\.gate_proj\.weight"):
        opt = adapm.AdaPMMini(model, lr=1e-3)
    assert opt.partition_report().unmatched == ["mlp.gate_proj.weight"]
    model.mlp.gate_proj(torch.randn(1, 4, 5, 5)).sum().backward()
    opt.step()


def test_a_part_whose_config_has_no_layer_count_is_read_with_its_own_config() -> None:
    """Idefics2's perceiver resampler has layers (``layers.N``) but a config without ``num_hidden_layers``, so
    transformers' per-layer view of it cannot be indexed: it is read with its config as it is, and the language
    model's query keeps its per-head blocks."""
    import transformers as T

    torch.manual_seed(0)
    text = dict(model_type="mistral", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=8, vocab_size=80)  # fmt: skip
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, image_size=28,
                  patch_size=14)  # fmt: skip
    perceiver = dict(hidden_size=32, resampler_n_latents=4, resampler_depth=1, resampler_n_heads=4,
                     resampler_head_dim=8, num_key_value_heads=2)  # fmt: skip
    config = T.Idefics2Config(text_config=text, vision_config=vision, perceiver_config=perceiver, image_token_id=79)
    model = T.Idefics2ForConditionalGeneration(config)
    assert any(".perceiver_resampler.layers.0." in n for n, _ in model.named_parameters())
    opt = adapm.AdaPMMini(model, lr=1e-3, strict=False)
    query = model.model.text_model.layers[0].self_attn.q_proj.weight
    assert opt.layout(query).segments[0].block == (0, 8)


def _probe_delta_rule(model: nn.Module, x: torch.Tensor, layer: nn.Module | None = None,
                      function: str = "torch_chunk_gated_delta_rule") -> tuple[torch.Tensor, ...]:
    """What a linear-attention layer (default: layer 0's Gated DeltaNet) computes from its input projections:
    the query, key, value, decay ``g`` and ``beta`` it passes to its delta rule (the model's own
    ``function``, observed on the way in) and the output gate it passes to its gated norm."""
    import sys

    layer = layer if layer is not None else model.model.layers[0].linear_attn
    module = sys.modules[type(layer).__module__]
    real = getattr(module, function)
    seen: list[torch.Tensor] = []

    def observed(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, **kwargs: object) -> object:
        seen.extend(t.detach().clone() for t in (query, key, value, kwargs["g"], kwargs["beta"]))  # type: ignore[union-attr]
        return real(query, key, value, **kwargs)

    norm = layer.norm if hasattr(layer, "norm") else layer.o_norm
    handle = norm.register_forward_hook(lambda _m, args, _out: seen.append(args[1].detach().clone()))
    _forward_observed(model, x, module, function, observed, [handle])
    return tuple(seen[:6])


def _forward_observed(model: nn.Module, x: torch.Tensor, module: object, function: str, observed: object,
                      handles: list[torch.utils.hooks.RemovableHandle]) -> None:
    """Run ``model`` on ``x`` (eval, no cache) with ``module.function`` replaced by ``observed``; then put the
    real function back and remove ``handles``."""
    real = getattr(module, function)
    setattr(module, function, observed)
    try:
        _run_hooked(model, x, handles)
    finally:
        setattr(module, function, real)


def _run_hooked(model: nn.Module, x: torch.Tensor, handles: list[torch.utils.hooks.RemovableHandle]) -> None:
    """Run ``model`` on ``x`` (eval, no cache, no gradients), then remove ``handles`` (the hooks observing it)."""
    try:
        model.eval()
        with torch.no_grad():
            model(input_ids=x, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()


@pytest.mark.parametrize("kind", GATED_DELTANET)
def test_gated_deltanet_and_gated_attention_parts_feed_what_they_are_declared_as(kind: str) -> None:
    """Gated DeltaNet, proven on each model's own forward: every declared part of its input projections feeds
    exactly the query, key, value, output gate (z), decay (g) or beta (b) it is declared as, and each per-head
    query and key block changes exactly its head. Qwen's gated full attention: the query part of ``q_proj``
    feeds the attention's query with per-head blocks; its gate part does not reach the attention."""
    model = _tiny(kind)
    opt = adapm.AdaPMMini(model, lr=1e-3)
    assert opt.partition_report().unmatched == []
    linear = model.model.layers[0].linear_attn
    names = "qkvgbz"
    feeds = {}
    for proj in ("in_proj_qkvz", "in_proj_ba", "in_proj_qkv", "in_proj_z", "in_proj_a", "in_proj_b", "q_proj", "k_proj",
                 "v_proj", "g_proj", "a_proj", "b_proj"):  # fmt: skip
        if hasattr(linear, proj):
            weight = getattr(linear, proj).weight
            fed = _what_each_segment_feeds(model, opt, weight, _probe_delta_rule, names)
            feeds[proj] = [(s.name.rsplit("[", 1)[-1].rstrip("]") if "[" in s.name else "", s.momentum, f)
                           for s, f in zip(opt.layout(weight).segments, fed)]  # fmt: skip
    expected = {
        "qwen3_next": {"in_proj_qkvz": [("Q", "lowrank", "q"), ("K", "lowrank", "k"), ("V", "full", "v"),
                                        ("gate", "lowrank", "z")], "in_proj_ba": [("", "full", "gb")]},
        "olmo_hybrid": {"q_proj": [("", "lowrank", "q")], "k_proj": [("", "lowrank", "k")],
                        "v_proj": [("", "full", "v")], "g_proj": [("", "lowrank", "z")], "a_proj": [("", "full", "g")],
                        "b_proj": [("", "full", "b")]},
    }.get(kind, {"in_proj_qkv": [("Q", "lowrank", "q"), ("K", "lowrank", "k"), ("V", "full", "v")],
                 "in_proj_z": [("", "lowrank", "z")], "in_proj_a": [("", "full", "g")],
                 "in_proj_b": [("", "full", "b")]})  # fmt: skip
    assert feeds == expected
    fused = getattr(linear, "in_proj_qkvz", None) or getattr(linear, "in_proj_qkv", None)
    heads = [(fused.weight, 0, 0), (fused.weight, 1, 1)] if fused is not None else [
        (linear.q_proj.weight, 0, 0), (linear.k_proj.weight, 0, 1)]  # fmt: skip
    x = torch.randint(2, 50, (1, 6), generator=torch.Generator().manual_seed(0))
    for weight, index, which in heads:  # 2 key heads of 8; a recorded tensor may repeat each for 2 value heads
        seg = opt.layout(weight).segments[index]
        assert seg.block == (0, 8) and seg.momentum == "lowrank"
        base = _probe_delta_rule(model, x)[which]
        repeat = base.shape[2] // 2
        for head in range(2):
            after = _block_perturbed(weight, seg, head, 8, lambda: _probe_delta_rule(model, x))[which]
            changed = [h for h in range(base.shape[2]) if (after[:, :, h] - base[:, :, h]).abs().max() > 1e-4]
            assert changed == list(range(head * repeat, (head + 1) * repeat)), (which, head, changed)
    attention = model.model.layers[1].self_attn
    if kind == "olmo_hybrid":
        return
    q_proj = attention.q_proj.weight
    assert [(s.name.rsplit("[", 1)[1], s.role) for s in opt.layout(q_proj).segments] == [("Q]", "query"),
                                                                                          ("gate]", "mlp")]  # fmt: skip
    assert _what_each_segment_feeds(model, opt, q_proj, _probe_sdpa) == ["q", ""]
    _assert_each_head_block_changes_its_head(model, opt, q_proj, 0, 8, heads=4)


def test_heads_are_read_from_each_layers_own_config_where_layers_differ() -> None:
    """Gemma 4's config holds head_dim per layer (sliding-window layers 8 here, global ones 16; reading it
    globally is an error in transformers): each layer's query and key get blocks of its own heads, proven on
    the global layer's attention; the per-layer input path is recognised (embedding, gated MLP)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model(
        "gemma4_text", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, per_layer_config={"01": {"head_dim": 16}},
        layer_types=["sliding_attention", "full_attention"], vocab_size=80, vocab_size_per_layer_input=80,
        hidden_size_per_layer_input=8, bos_token_id=0, eos_token_id=1, pad_token_id=0)  # fmt: skip
    model = AutoModelForCausalLM.from_config(config)
    opt = adapm.AdaPMMini(model, lr=1e-3)
    assert opt.partition_report().unmatched == []
    layers = model.model.layers
    for layer, size in ((layers[0], 8), (layers[1], 16)):
        assert opt.layout(layer.self_attn.q_proj.weight).segments[0].block == (0, size)
        assert opt.layout(layer.self_attn.k_proj.weight).segments[0].block == (0, size)
    rows = _rows(opt)
    assert rows["model.embed_tokens_per_layer.weight"].role == "embedding"
    gates = ("per_layer_input_gate", "per_layer_projection")
    assert {rows[f"model.layers.0.{n}.weight"].role for n in gates} == {"mlp"}
    # the global layer's query heads, at its attention (the model's second sdpa call)
    _assert_each_head_block_changes_its_head(model, opt, layers[1].self_attn.q_proj.weight, 0, 16, heads=4, call=1)


@pytest.mark.parametrize("kind", ["kimi_linear", "bailing_hybrid", "glm5_next_text"])
def test_kimi_delta_attention_parts_feed_what_they_are_declared_as(kind: str) -> None:
    """Kimi Linear's, Ling's hybrid's and GLM-5-Next's linear layers (Kimi Delta Attention) share parameter names with
    their latent-attention layers but not their head sizes: each is matched inside its own module. Proven on the model's
    forward: q, k and v projections feed the query, key and value of its delta rule (per-head blocks of
    ``linear_head_dim`` changing exactly their head), the forget gate feeds the decay (tiny where it is low-rank:
    full momentum; low-rank momentum where it is as large as the query), ``b_proj`` beta, and the output gate the
    gated norm."""
    model = _mla_model("kimi_linear-noqlora" if kind == "kimi_linear" else kind)  # Kimi's query as released: q_proj
    opt = adapm.AdaPMMini(model, lr=1e-3)
    assert opt.partition_report().unmatched == []
    kda = _decoder(model).layers[1].self_attn
    assert type(kda).__name__ in KDA_MODULES

    def probe(m: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return _probe_delta_rule(m, x, kda, "chunk_kimi_delta_attention")

    low_rank = kind != "bailing_hybrid"  # Kimi Linear's and GLM-5-Next's gates are low-rank pairs, Ling's full-size
    gates = ((("f_a", kda.forget_gate.f_a_proj.weight), ("f_b", kda.forget_gate.f_b_proj.weight),
              ("g_a", kda.g_a_proj.weight), ("g_b", kda.g_b_proj.weight)) if low_rank
             else (("f", kda.forget_gate.f_proj.weight), ("g", kda.g_proj.weight)))  # fmt: skip
    feeds = {name: (opt.layout(weight).segments[0].momentum, _what_each_segment_feeds(model, opt, weight, probe,
                                                                                       "qkvgbz")[0])
             for name, weight in (("q", kda.q_proj.weight), ("k", kda.k_proj.weight), ("v", kda.v_proj.weight),
                                  ("b", kda.b_proj.weight), *gates)}  # fmt: skip
    forget, output = ({"f_a": ("full", "g"), "f_b": ("full", "g")}, {"g_a": ("lowrank", "z"), "g_b": ("lowrank", "z")}
                      ) if low_rank else ({"f": ("lowrank", "g")}, {"g": ("lowrank", "z")})  # fmt: skip
    assert feeds == {"q": ("lowrank", "q"), "k": ("lowrank", "k"), "v": ("full", "v"), "b": ("full", "b"), **forget,
                     **output}  # fmt: skip
    x = torch.randint(2, 50, (1, 6), generator=torch.Generator().manual_seed(0))
    for weight, which in ((kda.q_proj.weight, 0), (kda.k_proj.weight, 1)):
        seg = opt.layout(weight).segments[0]
        assert seg.block == (0, 8)
        base = probe(model, x)[which]
        for head in range(2):
            saved = weight.detach().clone()
            with torch.no_grad():
                weight[head * 8 : (head + 1) * 8] += torch.randn(8, weight.shape[1])
            after = probe(model, x)[which]
            with torch.no_grad():
                weight.copy_(saved)
            assert [h for h in range(2) if (after[:, :, h] - base[:, :, h]).abs().max() > 1e-4] == [head]
    mla = _decoder(model).layers[0].self_attn  # the same names, the latent attention's heads: 16 + its rotary 8 or 0
    mla_query = (mla.q_proj if hasattr(mla, "q_proj") else mla.q_b_proj).weight
    assert opt.layout(mla_query).segments[0].block == (0, 16 + mla.qk_rope_head_dim)


@pytest.mark.parametrize("kind", [*MLA, "deepseek_v2-noqlora", "mistral_large4_text-nope"])
def test_latent_attention_segments_and_heads_match_the_real_query_key_value(kind: str) -> None:
    """Multi-head latent attention, proven on each model's own attention: the latent part of ``kv_a_proj_with_mqa``
    feeds keys and values, its rotary part keys only (GLM-5-Next's has none: the latent alone; nor have Mistral Large
    4's NoPE layers, whose keys are all ``qk_nope_head_dim`` + the rotary size); ``kv_b_proj``'s parts feed exactly the
    key or the value; and the per-head blocks of the query and of ``kv_b_proj``'s key part change exactly their head.
    DeepSeek-V3.2's indexer: per-head query blocks, one key head. A.X K2's fused query and gate, and Dots3's and
    HY-V4's output gates: each head's block gates that head's output alone."""
    model = _mla_model(kind)
    opt = adapm.AdaPMMini(model, lr=1e-3, strict=False)
    attn = _decoder(model).layers[0].self_attn
    attn = attn[0] if isinstance(attn, nn.ModuleList) else attn  # LongCat-Flash: two attention blocks a layer
    kv_a, kv_b = attn.kv_a_proj_with_mqa.weight, attn.kv_b_proj.weight
    rope, nope = attn.qk_rope_head_dim, attn.qk_nope_head_dim  # rope 0 (GLM-5-Next's, a NoPE layer): the latent alone
    assert [(s.name.rsplit("[", 1)[1], s.momentum) for s in opt.layout(kv_a).segments] == [
        ("KV]", "full"), *([("K]", "lowrank")] if rope else [])]  # fmt: skip
    assert _what_each_segment_feeds(model, opt, kv_a, _probe_sdpa) == ["kv", "k"][: 2 if rope else 1]
    assert [(s.name.rsplit("[", 1)[1], s.momentum) for s in opt.layout(kv_b).segments] == [
        ("K]", "lowrank"), ("V]", "full")]
    assert _what_each_segment_feeds(model, opt, kv_b, _probe_sdpa) == ["k", "v"]
    plain = getattr(attn, "q_proj", None) is not None  # no query latent (DeepSeek-V2-Lite)
    gated = getattr(attn, "q_gate_proj", None) is not None  # A.X K2: [query | output gate] per head
    query = attn.q_proj.weight if plain else attn.q_gate_proj.weight if gated else attn.q_b_proj.weight
    if not plain:
        assert opt.layout(attn.q_a_proj.weight).segments[0].block == (0, 1)  # a latent: no heads
    for weight, which, size in ((query, 0, nope + rope), (kv_b, 1, nope)):
        _assert_each_head_block_changes_its_head(model, opt, weight, which, size, heads=4)
    if gated:
        assert [(s.name.rsplit("[", 1)[1], s.role) for s in opt.layout(query).segments] == [("Q]", "query"),
                                                                                            ("gate]", "mlp")]
        assert _what_each_segment_feeds(model, opt, query, _probe_sdpa) == ["q", ""]
        _assert_output_gate_blocks_gate_their_head(model, opt, query, attn.o_proj, size=12, heads=4)
    for gate in (getattr(attn, name, None) for name in ("g_proj", "gate_proj")):  # Dots3's per head, HY-V4's
        if gate is not None:
            _assert_output_gate_blocks_gate_their_head(model, opt, gate.weight, attn.o_proj,
                                                       size=gate.weight.shape[0] // 4, heads=4)
    assert opt.partition_report().unmatched == []
    if kind in DSA_MODEL_TYPES:
        indexer = attn.indexer
        heads, size = model.config.index_n_heads, model.config.index_head_dim
        assert opt.layout(indexer.wq_b.weight).segments[0].block == (0, size) and heads > 1
        assert opt.layout(indexer.wk.weight).segments[0].block == (0, size) == (0, indexer.wk.weight.shape[0])
        weights = next(n for n, p in model.named_parameters() if p is indexer.weights_proj.weight)
        assert _rows(opt)[weights].role == "router"
        pools = {n.rsplit(".", 1)[1]: _rows(opt)[n].role for n, p in model.named_parameters()
                 if p is getattr(indexer, "index_kpool_compress_gate", None)
                 or p is getattr(indexer, "index_kpool_compress_ape", None)}  # GLM-5-Next's pooled keys  # fmt: skip
        assert pools == ({"index_kpool_compress_gate": "mlp", "index_kpool_compress_ape": "vector"}
                         if kind == "glm5_next_text" else {})  # fmt: skip


def _assert_output_gate_blocks_gate_their_head(model: nn.Module, opt: adapm.AdaPM, weight: nn.Parameter,
                                               o_proj: nn.Module, size: int, heads: int,
                                               probe: Callable[..., tuple[torch.Tensor, ...]] = _probe_sdpa) -> None:
    """``weight``'s last segment, in per-head blocks of ``size`` rows, gates the attention output: perturbing
    block h changes head h alone of what ``o_proj`` reads, and none of the query, key and value (of the same
    attention, as ``probe`` records them)."""
    seg = opt.layout(weight).segments[-1]
    assert seg.role == "mlp"
    x = torch.randint(2, 50, (1, 6), generator=torch.Generator().manual_seed(0))
    seen: list[torch.Tensor] = []
    handle = o_proj.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().clone()))

    def run() -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        seen.clear()
        return probe(model, x), seen[0]

    try:
        base_qkv, base = run()
        for head in range(heads):
            qkv, out = _block_perturbed(weight, seg, head, size, run)
            assert all(torch.equal(a, b) for a, b in zip(qkv, base_qkv))
            changed = (out - base).abs().reshape(-1, heads, out.shape[-1] // heads).amax(dim=(0, 2))
            assert [h for h in range(heads) if changed[h] > 1e-6] == [head], (head, changed)
    finally:
        handle.remove()


def _probe_scan(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """What layer 0's Mamba mixer computes from its input projections: the C, B, x and time step it passes to
    its scan (the model's own ``mamba2_chunk_scan`` or ``mamba_selective_scan``, observed on the way in) and the
    output gate z (passed to the scan by Mamba, to the gated norm by Mamba-2)."""
    import sys

    from adapm.partition.presets import MAMBA_MIXERS

    mixer = next(m for m in model.modules() if type(m).__name__.endswith(("Mixer", "MambaLayer")))
    module = sys.modules[type(mixer).__module__]
    mamba1 = type(mixer).__name__ in MAMBA_MIXERS
    function = "mamba_selective_scan" if mamba1 else "mamba2_chunk_scan"
    real = getattr(module, function)
    seen: list[torch.Tensor] = []

    def observed(hidden: torch.Tensor, dt: torch.Tensor, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor,
                 *args: object, **kwargs: object) -> object:
        if not seen:
            seen.extend(t.detach().clone() for t in (c, b, hidden, dt))
            if mamba1:
                seen.append(kwargs["z"].detach().clone())  # type: ignore[union-attr]
        return real(hidden, dt, a, b, c, *args, **kwargs)

    handles = [] if mamba1 else [mixer.norm.register_forward_hook(
        lambda _m, args, _out: seen.append(args[1].detach().clone()) if len(seen) == 4 else None)]  # fmt: skip
    _forward_observed(model, x, module, function, observed, handles)
    return tuple(seen[:5])


@pytest.mark.parametrize("kind", sorted(MAMBA))
def test_mamba_mixer_parts_feed_what_they_are_declared_as(kind: str) -> None:
    """Each Mamba mixer, proven on its model's own forward. Mamba-2's ``in_proj`` parts feed exactly the output
    gate z, the scan's input x, its B (key), its C (query) and its time steps, as declared, and each group's
    block of B and C changes exactly that group. Mamba's ``in_proj`` is ``[x | z]``: x feeds the scan's input and,
    through ``x_proj``, its B, C and time steps; z the output gate."""
    model = _tiny(kind, **MAMBA[kind])
    opt = adapm.AdaPMMini(model, lr=1e-3)
    mixer = next(m for m in model.modules() if type(m).__name__.endswith(("Mixer", "MambaLayer")))
    weight = mixer.in_proj.weight
    layout = opt.layout(weight)
    fed = _what_each_segment_feeds(model, opt, weight, _probe_scan, "qkvdz")
    got = [(s.name.rsplit("[", 1)[1].rstrip("]"), s.role, s.momentum, f) for s, f in zip(layout.segments, fed)]
    if hasattr(mixer, "x_proj"):
        assert got == [("x", "value", "full", "qkvd"), ("z", "mlp", "lowrank", "z")]
        assert _what_each_segment_feeds(model, opt, mixer.x_proj.weight, _probe_scan, "qkvdz") == ["qkd"]
        assert opt.layout(mixer.A_log).segments[0].momentum == "full"
        assert _group(opt, next(n for n, p in model.named_parameters() if p is mixer.A_log))["weight_decay"] == 0.0
        return
    assert got == [("z", "mlp", "lowrank", "z"), ("x", "value", "full", "v"), ("B", "key", "lowrank", "k"),
                   ("C", "query", "lowrank", "q"), ("dt", "router", "full", "d")]  # fmt: skip
    groups, state = mixer.n_groups, mixer.ssm_state_size
    x = torch.randint(2, 50, (1, 6), generator=torch.Generator().manual_seed(0))
    for index, which in ((2, 1), (3, 0)):  # B, then C
        seg = layout.segments[index]
        assert seg.block == (0, state)
        base = _probe_scan(model, x)[which]  # (batch, seq, groups, state)
        for group in range(groups):
            after = _block_perturbed(weight, seg, group, state, lambda: _probe_scan(model, x))[which]
            after = after.reshape(base.shape)
            changed = [g for g in range(groups) if (after[:, :, g] - base[:, :, g]).abs().max() > 1e-5]
            assert changed == [group], (which, group, changed)


@pytest.mark.parametrize("kind", sorted(SHORT_CONV))
def test_short_convolution_parts_feed_what_they_are_declared_as(kind: str) -> None:
    """LFM2's gated short convolution, proven on each model's own forward: ``in_proj``'s B and x parts feed the
    convolution's input (B * x) and its C part only the gate on the convolution's output (what ``out_proj``
    reads); row r of any part changes channel r alone (no heads: per-neuron blocks, as an MLP's have)."""
    import sys

    model = _tiny(kind, **SHORT_CONV[kind])
    opt = adapm.AdaPMMini(model, lr=1e-3)
    block = model.model.layers[0].conv
    weight = block.in_proj.weight
    segments = opt.layout(weight).segments
    assert [(s.name.rsplit("[", 1)[1], s.role) for s in segments] == [("B]", "mlp"), ("C]", "mlp"), ("x]", "mlp")]
    rows = _rows(opt)
    assert rows["model.layers.0.conv.conv.weight"].role == "router"
    assert rows["model.layers.0.conv.out_proj.weight"].role == "attn_out"
    x = torch.randint(2, 50, (1, 6), generator=torch.Generator().manual_seed(0))
    module = sys.modules[type(block).__module__]
    real = module.causal_conv1d_fn
    seen: list[torch.Tensor] = []  # the convolution's input (batch, channels, time), out_proj's (batch, time, channels)

    def observed(hidden: torch.Tensor, *args: object, **kwargs: object) -> object:
        seen.append(hidden.detach().clone())
        return real(hidden, *args, **kwargs)

    def probe() -> tuple[torch.Tensor, torch.Tensor]:
        seen.clear()
        handle = block.out_proj.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().clone()))
        _forward_observed(model, x, module, "causal_conv1d_fn", observed, [handle])
        return seen[0], seen[1]

    conv_in, gated = probe()
    for seg, feeds in zip(segments, ("conv", "gate", "conv")):
        after_conv_in, after_gated = _block_perturbed(weight, seg, 3, 1, probe)
        conv_changed = (after_conv_in - conv_in).abs().amax(dim=(0, 2)).nonzero().flatten().tolist()
        gate_changed = (after_gated - gated).abs().amax(dim=(0, 1)).nonzero().flatten().tolist()
        assert gate_changed == [3], (seg.name, gate_changed)
        assert conv_changed == ([3] if feeds == "conv" else []), (seg.name, conv_changed)


@pytest.mark.parametrize("kind", ["lfm3", "laguna", "step3p5"])
def test_output_gates_gate_each_heads_output(kind: str) -> None:
    """LFM3's, Laguna's and Step 3.7's language model's ``g_proj``, proven on the model's own attention: each head's
    block of rows gates that head's output alone, and reaches none of the query, key and value."""
    model = _tiny(kind, **TINY_OVERRIDES.get(kind, {}))
    opt = adapm.AdaPMMini(model, lr=1e-3)
    attn = next(m for m in model.modules() if getattr(m, "g_proj", None) is not None)
    heads = model.config.num_attention_heads
    o_proj = getattr(attn, "o_proj", None) or attn.out_proj
    _assert_output_gate_blocks_gate_their_head(model, opt, attn.g_proj.weight, o_proj,
                                               size=attn.g_proj.weight.shape[0] // heads, heads=heads)


def test_zamba2_shared_block_adapters_feed_what_they_are_declared_as() -> None:
    """Zamba2's shared transformer block, proven on the model's own attention: each layer's query, key and value
    adapters (two low-rank matrices each) feed exactly the query, key or value they are declared as, and the
    per-head blocks of the query's and key's second matrix change exactly their head; ``linear`` (the block's
    output into the layer's Mamba input) and the MLP adapters are MLP matrices."""
    model = _tiny("zamba2", **MAMBA["zamba2"])
    opt = adapm.AdaPMMini(model, lr=1e-3)
    attn = model.model.layers[1].shared_transformer.self_attn
    for name, role in (("q", "query"), ("k", "key"), ("v", "value")):
        adapter = getattr(attn, f"linear_{name}_adapter_list")[0]
        for weight in (adapter[0].weight, adapter[1].weight):
            assert opt.layout(weight).segments[0].role == role
            assert _what_each_segment_feeds(model, opt, weight, _probe_sdpa) == [name]
    assert opt.layout(attn.linear_q_adapter_list[0][0].weight).segments[0].block == (0, 1)  # a latent: no heads
    _assert_each_head_block_changes_its_head(model, opt, attn.linear_q_adapter_list[0][1].weight, 0, 16, heads=4)
    _assert_each_head_block_changes_its_head(model, opt, attn.linear_k_adapter_list[0][1].weight, 1, 16, heads=4)
    rows = _rows(opt)
    assert rows["model.layers.1.linear.weight"].role == "mlp"
    mlp_adapter = "model.layers.1.shared_transformer.feed_forward.gate_up_proj_adapter_list.0.{}.weight"
    assert {rows[mlp_adapter.format(i)].role for i in (0, 1)} == {"mlp"}
    assert opt.partition_report().unmatched == []


def test_deepseek_v4_attention_parts_feed_what_they_are_declared_as() -> None:
    """DeepSeek-V4's attention, proven on the model's own forward: ``q_b_proj``'s per-head blocks change exactly
    their head of the query; ``kv_proj`` (one head read as both key and value) and each compressor's ``kv_proj``
    and softmax gate feed both the key and the value, never the query; the indexer's query and keys get per-head
    blocks of its head size."""
    import functools

    model = _tiny("deepseek_v4", **DEEPSEEK_V4)
    opt = adapm.AdaPMMini(model, lr=1e-3)
    heads = model.config.num_attention_heads
    for layer in (0, 1):  # compressed sparse attention, then heavily compressed attention
        attn = model.model.layers[layer].self_attn
        assert opt.layout(attn.q_a_proj.weight).segments[0].block == (0, 1)  # a latent: no heads
        _assert_each_head_block_changes_its_head(model, opt, attn.q_b_proj.weight, 0, 16, heads=heads, call=layer)
        probe = functools.partial(_probe_sdpa, call=layer)
        for module, role in ((attn.kv_proj, "value"), (attn.compressor.kv_proj, "value"),
                             (attn.compressor.gate_proj, "mlp")):  # fmt: skip
            assert opt.layout(module.weight).segments[0].role == role
            assert _what_each_segment_feeds(model, opt, module.weight, probe) == ["kv"]
        for module in (attn.o_a_proj, attn.o_b_proj):
            assert opt.layout(module.weight).segments[0].role == "attn_out"
    indexer = model.model.layers[0].self_attn.compressor.indexer
    assert opt.layout(indexer.q_b_proj.weight).segments[0].block == (0, 8)
    assert opt.layout(indexer.kv_proj.weight).segments[0].block == (0, 8)  # two compressed series of one key head
    assert opt.partition_report().unmatched == []


def test_lightning_attention_parts_feed_what_they_are_declared_as() -> None:
    """MiniMax-Text-01's lightning attention, proven on the model's own forward: ``qkv_proj``'s parts feed exactly
    the query, key and value its linear attention multiplies, each per-head block of the query and key part changes
    exactly its head, and ``output_gate``'s per-head blocks gate that head's output alone."""
    model = _tiny("minimax")
    opt = adapm.AdaPMMini(model, lr=1e-3)
    attn = model.model.layers[0].self_attn  # a lightning attention layer
    weight = attn.qkv_proj.weight
    assert _what_each_segment_feeds(model, opt, weight, _probe_matmuls) == ["q", "k", "v"]
    x = torch.randint(2, 50, (1, 6), generator=torch.Generator().manual_seed(0))
    base = _probe_matmuls(model, x)
    for seg, which in zip(opt.layout(weight).segments[:2], (0, 1)):
        assert seg.block == (0, 8)
        for head in range(4):
            after = _block_perturbed(weight, seg, head, 8, lambda: _probe_matmuls(model, x))[which]
            assert [h for h in range(4) if (after[:, h] - base[which][:, h]).abs().max() > 1e-5] == [head]
    _assert_output_gate_blocks_gate_their_head(model, opt, attn.output_gate.weight, attn.out_proj, size=8, heads=4,
                                               probe=_probe_matmuls)


def test_griffin_recurrent_block_parts_feed_what_they_are_declared_as() -> None:
    """RecurrentGemma's recurrent block, proven on the model's own forward: ``linear_x`` feeds the recurrence (the
    RG-LRU's input) and not the gate, ``linear_y`` feeds the gate (its GeLU's input) and not the recurrence; each
    head's block of the RG-LRU's gate weights changes that head's channels alone."""
    model = _tiny("recurrent_gemma", **GRIFFIN)
    opt = adapm.AdaPMMini(model, lr=1e-3)
    block = model.model.layers[0].temporal_block
    x = torch.randint(2, 50, (1, 6), generator=torch.Generator().manual_seed(0))
    seen: list[torch.Tensor] = []

    def probe() -> tuple[torch.Tensor, ...]:
        """The recurrence's input, the gate's input, and the recurrence's output."""
        seen.clear()
        _run_hooked(model, x, [
            block.rg_lru.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().clone())),
            block.act_fn.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().clone())),
            block.rg_lru.register_forward_hook(lambda _m, _a, out: seen.append(out.detach().clone()))])  # fmt: skip
        gate, recurrence, output = seen  # in the order the block runs them: the gate first
        return recurrence, gate, output

    base = probe()
    for module, role, feeds in ((block.linear_x, "value", [True, False]), (block.linear_y, "mlp", [False, True])):
        seg = opt.layout(module.weight).segments[0]
        assert seg.role == role
        after = _block_perturbed(module.weight, seg, 0, module.weight.shape[0], probe)
        assert [not torch.equal(a, b) for a, b in zip(base[:2], after[:2])] == feeds, module
    heads, width = block.rg_lru.input_gate_weight.shape[:2]
    for weight in (block.rg_lru.input_gate_weight, block.rg_lru.recurrent_gate_weight):
        assert opt.layout(weight).segments[0].role == "router"
        for head in range(heads):
            saved = weight.detach().clone()
            with torch.no_grad():
                weight[head] += 1.0
            after = probe()[2]
            with torch.no_grad():
                weight.copy_(saved)
            changed = (after - base[2]).abs().amax(dim=(0, 1)).view(heads, width).amax(-1)
            assert [h for h in range(heads) if changed[h] > 0] == [head]
    rows = _rows(opt)
    assert rows["model.layers.0.temporal_block.linear_out.weight"].role == "attn_out"
    assert opt.partition_report().unmatched == []


def _probe_mlstm(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The query, key, value, input gate and forget gate that block 0's mLSTM layer passes to its backend, and what
    its ``out_proj`` reads (the gated, normed output)."""
    layer = model.backbone.blocks[0].mlstm_layer
    seen: list[torch.Tensor] = []
    _run_hooked(model, x, [
        layer.mlstm_backend.register_forward_pre_hook(
            lambda _m, _a, kw: seen.extend(kw[k].detach().clone() for k in ("query", "key", "value", "igate", "fgate")),
            with_kwargs=True),
        layer.out_proj.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().clone())),
    ])  # fmt: skip
    return tuple(seen)


def test_xlstm_layer_parts_feed_what_they_are_declared_as() -> None:
    """xLSTM's mLSTM layer, proven on the model's own forward: q, k, v and the input and forget gates each feed
    exactly what they are declared as; the output gate reaches only the output; each per-head block of the query
    and key changes exactly its head."""
    model = _tiny("xlstm", **XLSTM)
    opt = adapm.AdaPMMini(model, lr=1e-3)
    layer = model.backbone.blocks[0].mlstm_layer
    names = "qkvifo"  # o: what out_proj reads
    for module, role, feeds in ((layer.q, "query", "qo"), (layer.k, "key", "ko"), (layer.v, "value", "vo"),
                                (layer.igate_preact, "router", "io"), (layer.fgate_preact, "router", "fo"),
                                (layer.ogate_preact, "mlp", "o")):  # fmt: skip
        assert opt.layout(module.weight).segments[0].role == role
        assert _what_each_segment_feeds(model, opt, module.weight, _probe_mlstm, names) == [feeds], module
    x = torch.randint(2, 50, (1, 6), generator=torch.Generator().manual_seed(0))
    base = _probe_mlstm(model, x)
    for weight, which in ((layer.q.weight, 0), (layer.k.weight, 1)):
        seg = opt.layout(weight).segments[0]
        assert seg.block == (0, 32)
        for head in range(2):
            after = _block_perturbed(weight, seg, head, 32, lambda: _probe_mlstm(model, x))[which]
            assert [h for h in range(2) if (after[:, h] - base[which][:, h]).abs().max() > 1e-5] == [head]
    assert opt.partition_report().unmatched == []


def test_rwkv_time_mixing_parts_feed_what_they_are_declared_as() -> None:
    """RWKV's time mixing, proven on the model's own forward: ``key`` and ``value`` feed exactly the keys and values of
    its weighted average (the ``rwkv_linear_attention`` it calls), ``receptance`` only the gate on the result (what
    ``output`` reads); the key's blocks are per channel, as its recurrence is."""
    import sys

    model = _tiny("rwkv", **RWKV)
    opt = adapm.AdaPMMini(model, lr=1e-3)
    attn = model.rwkv.blocks[0].attention
    module = sys.modules[type(attn).__module__]
    real = module.rwkv_linear_attention

    def probe(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        seen: list[torch.Tensor] = []

        def observed(decay: torch.Tensor, first: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     *args: object, **kwargs: object) -> object:
            if not seen:
                seen.extend((key.detach().clone(), value.detach().clone()))
            return real(decay, first, key, value, *args, **kwargs)

        handle = attn.output.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().clone()))
        _forward_observed(model, x, module, "rwkv_linear_attention", observed, [handle])
        return tuple(seen[:3])

    for linear, role, feeds in ((attn.key, "key", "ko"), (attn.value, "value", "vo"), (attn.receptance, "mlp", "o")):
        assert opt.layout(linear.weight).segments[0].role == role
        assert _what_each_segment_feeds(model, opt, linear.weight, probe, "kvo") == [feeds], linear
    assert opt.layout(attn.key.weight).segments[0].block == (0, 1)
    assert _rows(opt)["head.weight"].role == "output"
    assert opt.partition_report().unmatched == []


def test_zamba_mixer_in_proj_alternates_x_and_z_row_by_row() -> None:
    """Zamba's (version 1) Mamba mixer, proven on the model's own forward: ``in_proj``'s x rows (every other row,
    from the first) feed exactly the input of each head's scan, its z rows exactly the gate; row r of each part
    changes channel r alone."""
    import sys

    model = _tiny("zamba", **ZAMBA)
    opt = adapm.AdaPMMini(model, lr=1e-3)
    mixer = model.model.layers[0].mamba
    module = sys.modules[type(mixer).__module__]
    real = module.mamba_selective_scan

    def probe(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        seen: list[tuple[torch.Tensor, torch.Tensor]] = []

        def observed(hidden: torch.Tensor, *args: object, **kwargs: object) -> object:
            seen.append((hidden.detach().clone(), kwargs["z"].detach().clone()))  # type: ignore[union-attr]
            return real(hidden, *args, **kwargs)

        _forward_observed(model, x, module, "mamba_selective_scan", observed, [])
        heads = seen[: mixer.n_mamba_heads]  # layer 0's, one scan per head: (batch, head size, time) each
        return torch.cat([h for h, _ in heads], dim=1), torch.cat([z for _, z in heads], dim=1)

    weight = mixer.in_proj.weight
    segments = opt.layout(weight).segments
    assert [(s.name.rsplit("[", 1)[1], s.role) for s in segments] == [("x]", "value"), ("z]", "mlp")]
    assert _what_each_segment_feeds(model, opt, weight, probe, "xz") == ["x", "z"]
    x = torch.randint(2, 50, (1, 6), generator=torch.Generator().manual_seed(0))
    base = probe(model, x)
    for seg, which in zip(segments, (0, 1)):
        after = _block_perturbed(weight, seg, 5, 1, lambda: probe(model, x))[which]
        assert (after - base[which]).abs().amax(dim=(0, 2)).nonzero().flatten().tolist() == [5]
    assert _rows(opt)["model.layers.2.linear.weight"].role == "mlp"


def _modernbert(kind: str) -> nn.Module:
    """A tiny ModernBERT (masked language model) or ModernBERT decoder (causal)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM

    torch.manual_seed(0)
    sizes = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=80)
    config = AutoConfig.for_model(kind, **sizes, pad_token_id=0, bos_token_id=0, eos_token_id=1, cls_token_id=0,
                                  sep_token_id=1)  # fmt: skip
    return (AutoModelForCausalLM if kind.endswith("decoder") else AutoModelForMaskedLM).from_config(config)


def test_modernbert_query_key_value_parts_feed_what_they_are_declared_as() -> None:
    """ModernBERT's ``Wqkv``, proven on the model's own attention: its parts feed exactly the query, key and value,
    and the query's per-head blocks change exactly their head."""
    model = _modernbert("modernbert")
    opt = adapm.AdaPMMini(model, lr=1e-3)
    weight = model.model.layers[0].attn.Wqkv.weight
    assert _what_each_segment_feeds(model, opt, weight, _probe_sdpa) == ["q", "k", "v"]
    _assert_each_head_block_changes_its_head(model, opt, weight, 0, 8, heads=4)


def test_moshi_wrapped_projections_feed_what_they_are_declared_as() -> None:
    """Moshi's decoder, proven on the model's own attention: each wrapped projection (``q_proj.linear``, ...) feeds
    exactly the query, key or value it is declared as, with per-head blocks for the query and key."""
    model = _tiny("moshi")
    opt = adapm.AdaPMMini(model, lr=1e-3)
    attn = model.model.layers[0].self_attn
    for proj, role in (("q", "query"), ("k", "key"), ("v", "value")):
        weight = getattr(attn, f"{proj}_proj").linear.weight
        assert opt.layout(weight).segments[0].role == role
        assert _what_each_segment_feeds(model, opt, weight, _probe_sdpa) == [proj]
    _assert_each_head_block_changes_its_head(model, opt, attn.q_proj.linear.weight, 0, 8, heads=4)
    _assert_each_head_block_changes_its_head(model, opt, attn.k_proj.linear.weight, 1, 8, heads=2)
    assert opt.layout(attn.o_proj.linear.weight).segments[0].role == "attn_out"


class _MatmulCalls(TorchFunctionMode):
    """While active, records both operands of every ``a @ b`` (with ``einsum=True``, also of every two-operand
    ``torch.einsum``)."""

    def __init__(self, einsum: bool = False) -> None:
        super().__init__()
        self.einsum = einsum
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if func in (torch.Tensor.__matmul__, torch.Tensor.matmul, torch.matmul):
            self.calls.append((args[0].detach().clone(), args[1].detach().clone()))
        elif func is torch.einsum and self.einsum:
            operands = args[1] if len(args) == 2 else args[1:]  # einsum(eq, a, b) or einsum(eq, (a, b))
            self.calls.append(tuple(t.detach().clone() for t in operands))  # type: ignore[arg-type]
        return func(*args, **(kwargs or {}))


def _sam_style(kind: str) -> nn.Module:
    """A tiny GOT-OCR 2.0 (a SAM-style image encoder of two layers, 2 heads of 16, 4 x 4 patches, the first layer's
    attention in windows of 2 x 2 patches; its neck, projector and a Qwen2 of two layers) or SAM's image encoder
    alone."""
    import transformers as T

    torch.manual_seed(0)
    vision = dict(hidden_size=32, output_channels=16, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                  patch_size=8, mlp_dim=64, window_size=2, global_attn_indexes=[1], initializer_range=0.02)  # fmt: skip
    if kind == "sam":  # (SAM's default initializer_range, 1e-10, draws near-zero weights)
        return T.SamVisionModel(T.SamVisionConfig(**vision))
    text = dict(model_type="qwen2", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=80)  # fmt: skip
    return T.GotOcr2ForConditionalGeneration(T.GotOcr2Config(text_config=text, vision_config=vision,
                                                             image_token_index=79))  # fmt: skip


@pytest.mark.parametrize("kind", ["got_ocr2", "sam"])
def test_sam_style_vision_attention_parts_feed_what_they_are_declared_as(kind: str) -> None:
    """SAM's image encoder and GOT-OCR 2.0's (its attention computed with plain matmuls, SAM's with sdpa), proven on
    their own forward over an image: ``qkv``'s three parts feed exactly the query, key and value of the first
    (windowed) layer's attention, and each query and key block of ``hidden_size / heads`` rows changes its head alone.
    The relative position tables and the convolutions of the patch embedding, the neck and the projector keep full
    momentum, the MLP and the projector's linear layer are MLP matrices; only the absolute position table (4-D, added
    to every image) is left to the default. GOT-OCR 2.0 trains five steps with an image in the batch, holding the
    state the report counted."""
    model = _sam_style(kind)
    opt = adapm.AdaPMMini(model, lr=1e-3, strict=False)
    tower = model.vision_encoder if kind == "sam" else model.model.vision_tower
    prefix = "vision_encoder." if kind == "sam" else "model.vision_tower."
    assert opt.partition_report().unmatched == [prefix + "pos_embed"]
    rows = _rows(opt)
    expected = {"layers.1.attn.rel_pos_h": ("router", "full"), "layers.0.attn.rel_pos_w": ("router", "full"),
                "layers.0.attn.proj.weight": ("attn_out", "none"), "layers.1.mlp.lin1.weight": ("mlp", "lowrank"),
                "layers.0.mlp.lin2.weight": ("mlp", "lowrank"), "patch_embed.projection.weight": ("router", "full"),
                "neck.conv1.weight": ("router", "full"), "neck.conv2.weight": ("router", "full")}  # fmt: skip
    expected = {prefix + name: role for name, role in expected.items()}
    if kind == "got_ocr2":
        expected |= {"model.multi_modal_projector.conv_upsampler2.weight": ("router", "full"),
                     "model.multi_modal_projector.multimodal_projector.weight": ("mlp", "lowrank")}  # fmt: skip
    assert {name: (rows[name].role, rows[name].momentum) for name in expected} == expected
    pixels = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))

    def probe(_m: nn.Module = model, _x: object = None) -> tuple[torch.Tensor, ...]:
        """Layer 0's query, key and value as ``(windows, heads, tokens, head size)``."""
        with torch.no_grad():
            if kind == "sam":
                with _SdpaCalls() as sdpa:
                    tower(pixels)
                return sdpa.calls[0][:3]
            with _MatmulCalls() as matmul:
                tower(pixels)
        (scaled_q, k_t), (_, v) = matmul.calls[:2]  # (q * scale) @ k^T, then probabilities @ v
        return tuple(t.reshape(-1, 2, *t.shape[1:]) for t in (scaled_q, k_t.transpose(-2, -1), v))

    qkv = tower.layers[0].attn.qkv.weight
    assert [(s.name.rsplit("[", 1)[1], s.momentum, s.block) for s in opt.layout(qkv).segments] == [
        ("Q]", "lowrank", (0, 16)), ("K]", "lowrank", (0, 16)), ("V]", "full", (0, 1))]  # fmt: skip
    assert _what_each_segment_feeds(model, opt, qkv, probe) == ["q", "k", "v"]
    for which in (0, 1):
        seg = opt.layout(qkv).segments[which]
        base = probe()[which]
        assert base.shape[:2] == (4, 2)  # four windows of two heads
        for head in range(2):
            after = _block_perturbed(qkv, seg, head, 16, probe)[which]
            assert [h for h in range(2) if not torch.equal(after[:, h], base[:, h])] == [head]
    if kind == "got_ocr2":
        ids = torch.tensor([[1, 79, 5, 6, 7]])  # one image token: the 4 x 4 patches come out as one
        stepped = _five_steps(model, opt, lambda: model(input_ids=ids, pixel_values=pixels, labels=ids).loss)
        assert stepped == {n for n, _ in model.named_parameters()}
        assert adapm.state_bytes(opt) == sum(r.state_bytes for r in opt.partition_report().rows)


def _blip2() -> nn.Module:
    """A tiny BLIP-2: a vision tower of one layer (2 heads of 16, 2 x 2 patches), a Q-Former of one layer (4 heads of 8,
    cross-attention to the image in every layer, two learned queries) and an OPT of two layers."""
    import transformers as T

    torch.manual_seed(0)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                  patch_size=14, initializer_range=0.02)  # fmt: skip (its default, 1e-10, draws near-zero weights)
    qformer = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                   encoder_hidden_size=32, cross_attention_frequency=1)  # fmt: skip
    text = dict(model_type="opt", hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                vocab_size=80, word_embed_proj_dim=32)  # fmt: skip
    model = T.Blip2ForConditionalGeneration(T.Blip2Config(vision_config=vision, qformer_config=qformer,
                                                          text_config=text, num_query_tokens=2, image_token_index=79))
    with torch.no_grad():  # the learned queries start at zero, which the Q-Former's first LayerNorm maps to its bias
        model.query_tokens.normal_()
    return model


def test_blip2_vision_tower_and_q_former_parts_feed_what_they_are_declared_as() -> None:
    """BLIP-2, proven on its own forward over an image (sdpa calls: the vision layer's, then the Q-Former's self- and
    cross-attention): the vision tower's ``qkv`` feeds exactly its query, key and value, each query and key block of
    the module's ``head_dim`` changing its head alone; the Q-Former's query, key and value (self- and cross-attention)
    feed what they are named, with per-head blocks, the keys and values of the cross-attention read from the image.
    Its output projections are attention outputs (the cross-attention's was an MLP matrix before), its learned
    queries' MLP and the projector into the language model are MLP matrices; the learned queries and the class token
    are vectors; only the vision tower's position table (a (1, positions, width) tensor) is left to the default. Five
    steps train with an image in the batch, holding the state the report counted."""
    model = _blip2()
    opt = adapm.AdaPMMini(model, lr=1e-3, strict=False)
    assert opt.partition_report().unmatched == ["vision_model.embeddings.position_embedding"]
    assert {_rows(opt)[n].role for n in ("query_tokens", "vision_model.embeddings.class_embedding")} == {"vector"}
    rows = _rows(opt)
    layer = "qformer.encoder.layer.0."
    expected = {"vision_model.encoder.layers.0.self_attn.projection.weight": ("attn_out", "none"),
                layer + "attention.output.dense.weight": ("attn_out", "none"),
                layer + "crossattention.output.dense.weight": ("attn_out", "none"),
                layer + "intermediate_query.dense.weight": ("mlp", "lowrank"),
                layer + "output_query.dense.weight": ("mlp", "lowrank"),
                "language_projection.weight": ("mlp", "lowrank")}  # fmt: skip
    assert {name: (rows[name].role, rows[name].momentum) for name in expected} == expected
    pixels = torch.randn(1, 3, 28, 28, generator=torch.Generator().manual_seed(1))

    def calls() -> list[tuple[torch.Tensor, ...]]:
        model.eval()  # no dropout
        with torch.no_grad(), _SdpaCalls() as sdpa:
            model.get_image_features(pixels)
        return sdpa.calls

    qkv = model.vision_model.encoder.layers[0].self_attn.qkv.weight
    assert [(s.name.rsplit("[", 1)[1], s.momentum, s.block) for s in opt.layout(qkv).segments] == [
        ("Q]", "lowrank", (0, 16)), ("K]", "lowrank", (0, 16)), ("V]", "full", (0, 1))]  # fmt: skip
    assert _what_each_segment_feeds(model, opt, qkv, lambda _m, _x: calls()[0][:3]) == ["q", "k", "v"]
    qformer, names = model.qformer.encoder.layer[0], {id(p): n for n, p in model.named_parameters()}
    for call, attention, size, heads in [(0, model.vision_model.encoder.layers[0].self_attn.qkv, 16, 2),
                                         (1, qformer.attention.attention, 8, 4),
                                         (2, qformer.crossattention.attention, 8, 4)]:  # fmt: skip
        if call:  # the Q-Former's separate query, key and value: each changes what it is named alone
            for which, name in enumerate(("query", "key", "value")):
                weight = getattr(attention, name).weight
                assert (rows[names[id(weight)]].role, opt.layout(weight).segments[0].block) == (
                    name, (0, size) if which < 2 else (0, 1))  # fmt: skip
                probe = lambda _m, _x, c=call: calls()[c][:3]  # noqa: E731
                assert _what_each_segment_feeds(model, opt, weight, probe) == ["qkv"[which]]
        for which in (0, 1):
            weight = attention.weight if call == 0 else getattr(attention, ("query", "key")[which]).weight
            seg = opt.layout(weight).segments[which if call == 0 else 0]
            base = calls()[call][which]
            for head in range(heads):
                after = _block_perturbed(weight, seg, head, size, lambda c=call, w=which: calls()[c][w])
                assert [h for h in range(heads) if not torch.equal(after[:, h], base[:, h])] == [head]
    ids = torch.tensor([[79, 79, 5, 6, 7]])  # the two learned queries' places
    model.train()
    stepped = _five_steps(model, opt, lambda: model(input_ids=ids, pixel_values=pixels, labels=ids).loss)
    assert stepped == {n for n, _ in model.named_parameters()}
    assert adapm.state_bytes(opt) == sum(r.state_bytes for r in opt.partition_report().rows)


def test_siglip_pooling_heads_in_proj_is_query_key_value_with_per_head_blocks() -> None:
    """SigLIP's attention-pooling head: nothing in a SigLIP tower is left unknown (no warning). Its
    ``nn.MultiheadAttention``'s ``in_proj_weight`` is ``[q | k | v]``, proven on that module's own forward with a query,
    keys and values of their own: each part changes nothing when its own input is zero (so it reads that input); the
    query and key parts change the attention weights, the value part does not; each query and key block of
    ``hidden_size / heads`` rows changes its head's weights alone. The learned query ``probe`` is a vector."""
    import warnings

    import transformers as T

    torch.manual_seed(0)
    model = T.SiglipVisionModel(T.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                     num_attention_heads=4, image_size=28, patch_size=14))  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # nothing unknown
        opt = adapm.AdaPMMini(model, lr=1e-3)
    assert (_rows(opt)["head.probe"].role, _rows(opt)["head.probe"].momentum) == (
        "vector", "full")  # fmt: skip
    attention = model.head.attention
    with torch.no_grad():
        attention.in_proj_bias.normal_()  # (zero at first, which would make a zero input's part vanish whatever it is)
    weight, segments = attention.in_proj_weight, opt.layout(attention.in_proj_weight).segments
    assert [(s.name.rsplit("[", 1)[1], s.momentum, s.block) for s in segments] == [
        ("Q]", "lowrank", (0, 8)), ("K]", "lowrank", (0, 8)), ("V]", "full", (0, 1))]  # fmt: skip
    g = torch.Generator().manual_seed(1)
    inputs = [torch.randn(1, n, 32, generator=g) for n in (2, 5, 5)]  # two queries; five keys and values

    def run(zero: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The per-head attention weights and the output, with input ``zero`` (query, key or value) zeroed."""
        args = [torch.zeros_like(t) if i == zero else t for i, t in enumerate(inputs)]
        with torch.no_grad():
            out, weights = attention(*args, need_weights=True, average_attn_weights=False)
        return weights, out

    for part, seg in enumerate(segments):
        whole = seg.shape[0]
        base, after = run(), _block_perturbed(weight, seg, 0, whole, run)
        assert torch.equal(base[0], after[0]) == (part == 2)  # only the value part leaves the weights as they are
        assert not torch.equal(base[1], after[1])
        base, after = run(part), _block_perturbed(weight, seg, 0, whole, lambda p=part: run(p))
        assert torch.equal(base[0], after[0]) and torch.equal(base[1], after[1])  # it reads its own input alone
        if part < 2:
            for head in range(4):
                after = _block_perturbed(weight, seg, head, 8, run)[0]
                assert [h for h in range(4) if not torch.equal(after[:, h], run()[0][:, h])] == [head]


def test_gemma3s_in_out_projector_has_one_block_per_output_column_and_nothing_is_unknown() -> None:
    """A tiny Gemma 3 with an image: nothing in it is unknown (no warning: SigLIP tower, its pooling head, projector
    and language model). Its projector is one bare ``(vision width, text width)`` matrix used as ``x @ W``: an MLP
    matrix with one block per output neuron, i.e. per column (column j changes output feature j alone, on the
    projector's own forward); five steps train with the image, holding the state the report counted."""
    import warnings

    import transformers as T

    torch.manual_seed(0)
    text = dict(model_type="gemma3_text", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=8, vocab_size=80)  # fmt: skip
    vision = dict(model_type="siglip_vision_model", hidden_size=48, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=4, image_size=28, patch_size=14)  # fmt: skip
    model = T.Gemma3ForConditionalGeneration(T.Gemma3Config(text_config=text, vision_config=vision,
                                                            mm_tokens_per_image=1, image_token_index=79,
                                                            boi_token_index=78, eoi_token_index=77))  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # nothing unknown
        opt = adapm.AdaPMMini(model, lr=1e-3)
    projector = model.model.multi_modal_projector
    weight = projector.mm_input_projection_weight
    seg = opt.layout(weight).segments[0]
    assert tuple(weight.shape) == (48, 32) and (seg.role, seg.momentum, seg.block) == ("mlp", "lowrank", (1, 1))
    with torch.no_grad():
        weight.normal_()  # (zero at first)
    features = torch.randn(1, 4, 48, generator=torch.Generator().manual_seed(1))  # a 2 x 2 grid of patches

    def project() -> torch.Tensor:
        with torch.no_grad():
            return projector(features)

    base = project()
    for column in range(32):
        saved = weight.detach().clone()
        with torch.no_grad():
            weight[:, column] += torch.randn(48)
        after = project()
        with torch.no_grad():
            weight.copy_(saved)
        assert [j for j in range(32) if not torch.equal(after[..., j], base[..., j])] == [column]
    ids = torch.tensor([[1, 78, 79, 77, 5, 6]])
    pixels = torch.randn(1, 3, 28, 28, generator=torch.Generator().manual_seed(2))
    stepped = _five_steps(model, opt, lambda: model(input_ids=ids, pixel_values=pixels, labels=ids).loss)
    idle = {n for n, _ in model.named_parameters()} - stepped
    assert idle and all(".vision_tower.head." in n for n in idle)  # Gemma 3 never runs the pooling head
    rows = opt.partition_report().rows
    assert adapm.state_bytes(opt) == sum(r.state_bytes for r in rows if r.name.split("[")[0] not in idle)


@pytest.mark.parametrize("kind", ["llama4", "internvl"])
def test_llama4s_and_internvls_vision_towers_are_recognised_and_train(kind: str) -> None:
    """Llama 4's vision tower: nothing unknown (no warning); its patch embedding (a linear map of unfolded patches)
    keeps full momentum; its position table holds a row per position (row p changes the embedding of position p alone,
    the patches' and the class token's, on the tower's own forward). InternVL's: the attention's ``projection_layer``
    is the attention output, the patch convolution keeps full momentum, the class token is a vector, and only the
    ``(1, positions, width)`` position table is left to the default. Each tower trains five steps on an image, holding
    the state the report counted."""
    import warnings

    import transformers as T

    torch.manual_seed(0)
    pixels = torch.randn(1, 3, 28, 28, generator=torch.Generator().manual_seed(1))  # 2 x 2 patches of 14 pixels
    if kind == "internvl":
        model = T.InternVLVisionModel(T.InternVLVisionConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                                             intermediate_size=64, image_size=[28, 28],
                                                             patch_size=[14, 14]))  # fmt: skip
        opt = adapm.AdaPMMini(model, lr=1e-3, strict=False)
        assert opt.partition_report().unmatched == ["embeddings.position_embeddings"]
        expected = {"encoder.layer.0.attention.projection_layer.weight": ("attn_out", "none"),
                    "embeddings.patch_embeddings.projection.weight": ("router", "full"),
                    "embeddings.cls_token": ("vector", "full")}  # fmt: skip
    else:
        model = T.Llama4VisionModel(T.Llama4VisionConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                                         intermediate_size=128, image_size=28, patch_size=14,
                                                         vision_output_dim=32, projector_input_dim=32,
                                                         projector_output_dim=32, pixel_shuffle_ratio=0.5))  # fmt: skip
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)  # nothing unknown
            opt = adapm.AdaPMMini(model, lr=1e-3)
        expected = {"patch_embedding.linear.weight": ("router", "full"),
                    "positional_embedding_vlm": ("embedding", "none")}  # fmt: skip
        table, embedded = model.positional_embedding_vlm, {}
        model.layernorm_pre.register_forward_pre_hook(lambda _m, args: embedded.update(x=args[0].detach().clone()))

        def embed() -> torch.Tensor:
            with torch.no_grad():
                model(pixels)
            return embedded["x"].reshape(-1, 32)  # (positions, width)

        base = embed()
        for row in range(table.shape[0]):  # the patches' positions, then the class token's
            after = _block_perturbed(table, opt.layout(table).segments[0], row, 1, embed)
            assert [p for p in range(base.shape[0]) if not torch.equal(after[p], base[p])] == [row]
    rows = _rows(opt)
    assert {name: (rows[name].role, rows[name].momentum) for name in expected} == expected
    stepped = _five_steps(model, opt, lambda: model(pixels).last_hidden_state.square().mean())
    assert stepped == {n for n, _ in model.named_parameters()}
    assert adapm.state_bytes(opt) == sum(r.state_bytes for r in opt.partition_report().rows)


def test_llama_3_2_visions_tables_are_embeddings_read_by_position_and_by_aspect_ratio() -> None:
    """Llama 3.2 Vision's tower (Mllama): nothing unknown (no warning). The patch convolution keeps full momentum; the
    position table holds a row per position (row p changes position p alone, in every tile); the tile tables are read
    by aspect-ratio id (a row other than the image's id changes nothing); all are embeddings. Five steps train on an
    image of two tiles, holding the state the report counted."""
    import warnings

    import transformers as T

    torch.manual_seed(0)
    model = T.MllamaVisionModel(T.MllamaVisionConfig(
        hidden_size=32, num_hidden_layers=2, num_global_layers=1, num_attention_heads=4, intermediate_size=64,
        image_size=28, patch_size=14, max_num_tiles=2, vision_output_dim=64, intermediate_layers_indices=[0],
        supported_aspect_ratios=[[1, 1], [1, 2]]))  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # nothing unknown
        opt = adapm.AdaPMMini(model, lr=1e-3)
    rows = _rows(opt)
    tables = ["gated_positional_embedding.embedding", "gated_positional_embedding.tile_embedding.weight",
              "pre_tile_positional_embedding.embedding.weight", "post_tile_positional_embedding.embedding.weight"]
    assert {n: (rows[n].role, rows[n].momentum) for n in ["patch_embedding.weight", *tables]} == {
        "patch_embedding.weight": ("router", "full"), **{n: ("embedding", "none") for n in tables}}  # fmt: skip
    embedding = model.gated_positional_embedding
    with torch.no_grad():
        embedding.gate.fill_(0.5)  # (zero at first, which hides the tile table)
    pixels = torch.randn(1, 1, 2, 3, 28, 28, generator=torch.Generator().manual_seed(1))  # one image of two tiles
    ratio, mask = torch.tensor([[2]]), torch.tensor([[[1, 1]]])  # aspect ratio [1, 2] (id 2)
    seen: dict[str, torch.Tensor] = {}
    embedding.register_forward_hook(lambda _m, _a, out: seen.update(x=out.detach().clone()))

    def embedded() -> torch.Tensor:
        with torch.no_grad():
            model(pixel_values=pixels, aspect_ratio_ids=ratio, aspect_ratio_mask=mask)
        return seen["x"].reshape(2, 5, 32)  # (tiles, positions: the class token's and 2 x 2 patches', width)

    base, table = embedded(), embedding.embedding
    for row in range(5):
        after = _block_perturbed(table, opt.layout(table).segments[0], row, 1, embedded)
        assert [p for p in range(5) if not torch.equal(after[:, p], base[:, p])] == [row]
    tiles = embedding.tile_embedding.weight
    for row in range(tiles.shape[0]):
        after = _block_perturbed(tiles, opt.layout(tiles).segments[0], row, 1, embedded)
        assert torch.equal(after, base) == (row != 2)
    def loss() -> torch.Tensor:
        out = model(pixel_values=pixels, aspect_ratio_ids=ratio, aspect_ratio_mask=mask)
        return out.last_hidden_state.square().mean()

    stepped = _five_steps(model, opt, loss)
    assert stepped == {n for n, _ in model.named_parameters()}
    assert adapm.state_bytes(opt) == sum(r.state_bytes for r in opt.partition_report().rows)


def _flattened_patches(gen: torch.Generator) -> torch.Tensor:
    """Pix2Struct-style image input: 8 patches (2 rows x 4 columns), each its row and column index (from 1) then 12
    random values, for a batch of one."""
    index = torch.stack([torch.arange(8) // 4 + 1, torch.arange(8) % 4 + 1], -1).float()
    return torch.cat([index, torch.randn(8, 12, generator=gen)], -1)[None]


def test_pix2struct_attention_heads_are_d_kv_rows_and_nothing_is_unknown() -> None:
    """Pix2Struct (image encoder and text decoder): nothing unknown (no warning). Its heads are ``d_kv`` rows, which
    in the image encoder differs from width / heads (its query is heads x d_kv rows, not width; the decoder's is width
    x width and needs width = heads x d_kv): each query and key block changes its own head alone of what layer 0's
    self-attention (and the decoder's cross-attention) pass to attention. The patch embedding keeps full momentum;
    the row and column tables are embeddings; the model trains five steps."""
    import warnings

    import transformers as T

    torch.manual_seed(0)
    config = T.Pix2StructConfig(
        text_config=dict(vocab_size=64, hidden_size=32, d_kv=4, d_ff=48, num_layers=1, num_heads=8),
        vision_config=dict(hidden_size=32, d_kv=4, d_ff=48, num_hidden_layers=1, num_attention_heads=2,
                           patch_embed_hidden_size=12, seq_len=8),
    )  # fmt: skip
    model = T.Pix2StructForConditionalGeneration(config)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # nothing unknown
        opt = adapm.AdaPMMini(model, lr=1e-3)
    rows = _rows(opt)
    expected = {"encoder.encoder.layer.0.attention.value.weight": ("value", "full"),
                "encoder.encoder.layer.0.attention.output.weight": ("attn_out", "none"),
                "encoder.encoder.layer.0.mlp.wi_0.weight": ("mlp", "lowrank"),
                "encoder.encoder.layer.0.mlp.wo.weight": ("mlp", "lowrank"),
                "encoder.embeddings.patch_projection.weight": ("router", "full"),
                "encoder.embeddings.row_embedder.weight": ("embedding", "none"),
                "encoder.embeddings.column_embedder.weight": ("embedding", "none"),
                "decoder.layer.0.self_attention.attention.value.weight": ("value", "full"),
                "decoder.layer.0.encoder_decoder_attention.attention.output.weight": ("attn_out", "none")}  # fmt: skip
    assert {name: (rows[name].role, rows[name].momentum) for name in expected} == expected
    gen = torch.Generator().manual_seed(1)
    patches = _flattened_patches(gen)
    labels = torch.randint(1, 64, (1, 5), generator=gen)
    model.set_attn_implementation("sdpa")
    model.eval()  # no dropout while probing

    def attention_inputs() -> list[tuple[torch.Tensor, ...]]:
        with torch.no_grad(), _SdpaCalls() as record:
            model(flattened_patches=patches, attention_mask=torch.ones(1, 8), labels=labels)
        return record.calls  # the encoder's self-attention, the decoder's self- and cross-attention

    named = dict(model.named_parameters())
    for call, prefix, heads in ((0, "encoder.encoder.layer.0.attention", 2),
                                (1, "decoder.layer.0.self_attention.attention", 8),
                                (2, "decoder.layer.0.encoder_decoder_attention.attention", 8)):  # fmt: skip
        # (the cross-attention's keys are computed from the encoder's output: its queries are checked)
        weights = [named[f"{prefix}.{part}.weight"] for part in (("query",) if call == 2 else ("query", "key"))]
        _assert_head_blocks_change_their_heads(opt, weights, 4, heads, lambda call=call: attention_inputs()[call])
    model.train()
    stepped = _five_steps(model, opt, lambda: model(flattened_patches=patches, attention_mask=torch.ones(1, 8),
                                                    labels=labels).loss)  # fmt: skip
    assert stepped == {n for n, _ in model.named_parameters()}


def test_t5_heads_are_d_kv_rows_where_that_is_not_width_over_heads() -> None:
    """T5 (and its kin: UMT5, LongT5, Switch) sizes a head by ``d_kv``, which need not be width / heads (T5 11B: 1024
    wide, 128 heads of 128). Each block of ``d_kv`` query or key rows changes its own head alone of what layer 0's
    self-attention passes to attention."""
    import transformers as T

    torch.manual_seed(0)
    model = T.T5ForConditionalGeneration(T.T5Config(vocab_size=64, d_model=32, d_kv=4, d_ff=48, num_layers=1,
                                                    num_heads=2, decoder_start_token_id=0, pad_token_id=0))  # fmt: skip
    model.set_attn_implementation("sdpa")
    model.eval()
    opt = adapm.AdaPMMini(model, lr=1e-3)
    x = torch.randint(1, 64, (1, 5), generator=torch.Generator().manual_seed(1))

    def encoder_attention() -> tuple[torch.Tensor, ...]:
        with torch.no_grad(), _SdpaCalls() as record:
            model(input_ids=x, labels=x)
        return record.calls[0]

    named = dict(model.named_parameters())
    weights = [named[f"encoder.block.0.layer.0.SelfAttention.{part}.weight"] for part in ("q", "k")]
    _assert_head_blocks_change_their_heads(opt, weights, 4, 2, encoder_attention)


def test_kosmos_2_5s_image_encoder_is_read_as_pix2structs() -> None:
    """Kosmos-2.5's image encoder is built as Pix2Struct's: nothing in it is unknown, each block of ``head_dim`` query
    or key rows changes its own head alone of the query and keys its attention multiplies, and it trains five steps."""
    import transformers as T
    from transformers.models.kosmos2_5 import modeling_kosmos2_5

    torch.manual_seed(0)
    config = T.Kosmos2_5VisionConfig(hidden_size=32, head_dim=4, num_attention_heads=2, num_hidden_layers=1,
                                     intermediate_size=48, patch_embed_hidden_size=12)
    model = modeling_kosmos2_5.Kosmos2_5VisionModel(config)
    opt = adapm.AdaPMMini(model, lr=1e-3, strict=True)  # nothing unknown
    rows = _rows(opt)
    expected = {"encoder.layer.0.attention.value.weight": "value",
                "encoder.layer.0.attention.output.weight": "attn_out", "encoder.layer.0.mlp.wi_1.weight": "mlp",
                "embeddings.patch_projection.weight": "router", "embeddings.column_embedder.weight": "embedding"}
    assert {name: rows[name].role for name in expected} == expected
    gen = torch.Generator().manual_seed(1)
    patches = _flattened_patches(gen)
    model.eval()

    def attention_inputs() -> tuple[torch.Tensor, ...]:  # its eager attention: the query and the keys transposed
        with torch.no_grad(), _MatmulCalls() as record:
            model(flattened_patches=patches, attention_mask=torch.ones(1, 8))
        return record.calls[0]

    named = dict(model.named_parameters())
    weights = [named[f"encoder.layer.0.attention.{part}.weight"] for part in ("query", "key")]
    _assert_head_blocks_change_their_heads(opt, weights, 4, 2, attention_inputs)
    model.train()
    stepped = _five_steps(model, opt, lambda: model(flattened_patches=patches,
                                                    attention_mask=torch.ones(1, 8)).last_hidden_state.square().mean())
    assert stepped == {n for n, _ in model.named_parameters()}


def _kosmos(kind: str) -> nn.Module:
    """A tiny Kosmos-2 (a CLIP-style tower of 2 x 2 patches) or Kosmos-2.5 (a Pix2Struct-style encoder, 2 heads of 4),
    each with 4 learned queries and a language model of one layer."""
    import transformers as T

    torch.manual_seed(0)
    text = dict(vocab_size=64, embed_dim=32, layers=1, attention_heads=2, ffn_dim=48)
    vision = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2)
    if kind == "kosmos-2.5":
        config = T.Kosmos2_5Config(text_config=text, latent_query_num=4,
                                   vision_config={**vision, "head_dim": 4, "patch_embed_hidden_size": 12})  # fmt: skip
        return T.Kosmos2_5ForConditionalGeneration(config)
    config = T.Kosmos2Config(text_config=text, latent_query_num=4,
                             vision_config={**vision, "image_size": 28, "patch_size": 14})  # fmt: skip
    return T.Kosmos2ForConditionalGeneration(config)


def test_kosmos_2_5_is_recognised_whole_and_its_segment_table_is_read_by_segment() -> None:
    """Kosmos-2.5 (image encoder, projection, language model): nothing unknown. The projection's ``dense`` is an MLP
    matrix, its learned queries a vector, its attention's ``out_proj`` the attention output; the segment table is an
    embedding with a row per segment: row 0 changes the text positions alone of what enters the first layer, row 1
    the image positions. The model trains five steps."""
    model = _kosmos("kosmos-2.5")
    opt = adapm.AdaPMMini(model, lr=1e-3, strict=True)  # nothing unknown
    rows = _rows(opt)
    expected = {"image_to_text_projection.dense.weight": ("mlp", "lowrank"),
                "image_to_text_projection.latent_query": ("vector", "full"),
                "image_to_text_projection.x_attn.out_proj.weight": ("attn_out", "none"),
                "text_model.model.segment_emb.weight": ("embedding", "none")}  # fmt: skip
    assert {name: (rows[name].role, rows[name].momentum) for name in expected} == expected
    gen = torch.Generator().manual_seed(1)
    inputs = dict(flattened_patches=_flattened_patches(gen),
                  input_ids=torch.randint(3, 64, (1, 8), generator=gen), attention_mask=torch.ones(1, 8),
                  image_embeds_position_mask=torch.tensor([[0, 1, 1, 1, 1, 0, 0, 0]]))  # 4 image positions
    model.eval()
    entered: dict[str, torch.Tensor] = {}
    model.text_model.model.layers[0].register_forward_pre_hook(
        lambda _m, args, kwargs: entered.update(x=(args[0] if args else kwargs["hidden_states"]).detach().clone()),
        with_kwargs=True)  # fmt: skip

    def first_layer_input() -> torch.Tensor:
        with torch.no_grad():
            model(**inputs)
        return entered["x"][0]

    base = first_layer_input()
    table = model.text_model.model.segment_emb.weight
    for segment, positions in ((0, [0, 5, 6, 7]), (1, [1, 2, 3, 4])):
        after = _block_perturbed(table, opt.layout(table).segments[0], segment, 1, first_layer_input)
        assert [p for p in range(8) if not torch.equal(after[p], base[p])] == positions
    model.train()
    stepped = _five_steps(model, opt, lambda: model(**inputs, labels=inputs["input_ids"]).loss)
    assert stepped == {n for n, _ in model.named_parameters()}


def test_kosmos_2s_projection_takes_the_same_roles_and_nothing_is_unknown() -> None:
    """Kosmos-2's image-to-text projection is built as Kosmos-2.5's: the same roles, and nothing in the model is
    unknown (``strict=True``)."""
    opt = adapm.AdaPMMini(_kosmos("kosmos-2"), lr=1e-3, strict=True)
    rows = _rows(opt)
    assert {n: rows[f"image_to_text_projection.{n}"].role for n in ("dense.weight", "latent_query",
                                                                    "x_attn.out_proj.weight")} == {
        "dense.weight": "mlp", "latent_query": "vector", "x_attn.out_proj.weight": "attn_out"}  # fmt: skip


def test_gits_projection_and_head_are_recognised_and_its_head_has_a_row_per_token() -> None:
    """GIT: nothing unknown. The image features' projection is an MLP matrix; ``output`` is the language-model head,
    whose row v changes the logit of token v alone; the model trains five steps."""
    import transformers as T

    torch.manual_seed(0)
    config = T.GitConfig(vision_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                            num_attention_heads=2, image_size=28, patch_size=14),
                         vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=48, bos_token_id=1, eos_token_id=2, pad_token_id=0)  # fmt: skip
    model = T.GitForCausalLM(config)
    opt = adapm.AdaPMMini(model, lr=1e-3, strict=True)  # nothing unknown
    rows = _rows(opt)
    assert rows["git.visual_projection.visual_projection.0.weight"].role == "mlp"
    assert rows["output.weight"].role == "output"
    gen = torch.Generator().manual_seed(1)
    inputs = dict(input_ids=torch.randint(3, 64, (1, 5), generator=gen),
                  pixel_values=torch.randn(1, 3, 28, 28, generator=gen))  # fmt: skip
    model.eval()

    def logits() -> torch.Tensor:
        with torch.no_grad():
            return model(**inputs).logits[0]

    base = logits()
    head = model.output.weight
    for token in (0, 7, 63):
        after = _block_perturbed(head, opt.layout(head).segments[0], token, 1, logits)
        assert [v for v in range(64) if not torch.equal(after[:, v], base[:, v])] == [token]
    model.train()
    stepped = _five_steps(model, opt, lambda: model(**inputs, labels=inputs["input_ids"]).loss)
    assert stepped == {n for n, _ in model.named_parameters()}


def _older_attention(kind: str) -> nn.Module:
    """A tiny CTRL, XLM, FlauBERT, DistilBERT, CPM-Ant (:data:`OLDER_TEXT_MODELS`) or ProphetNet (an encoder of 2 heads
    of 16, a decoder of 4 heads of 8)."""
    import transformers as T

    torch.manual_seed(0)
    if kind == "flaubert":
        return T.FlaubertWithLMHeadModel(T.FlaubertConfig(emb_dim=32, n_layers=1, n_heads=4, vocab_size=80,
                                                          max_position_embeddings=64))  # fmt: skip
    if kind == "distilbert":
        return T.DistilBertForMaskedLM(T.DistilBertConfig(dim=32, n_layers=1, n_heads=4, hidden_dim=64, vocab_size=80))
    if kind == "prophetnet":
        return T.ProphetNetForConditionalGeneration(T.ProphetNetConfig(
            vocab_size=80, hidden_size=32, num_encoder_layers=1, num_decoder_layers=1, num_encoder_attention_heads=2,
            num_decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, ngram=2, max_position_embeddings=64))
    return _tiny(kind, **OLDER_TEXT_MODELS[kind])


OLDER_ATTENTION: dict[str, tuple[tuple[str, tuple[str, str], int, int, int], ...]] = {
    "ctrl": (("transformer.h.0.multi_head_attention.{}.weight", ("Wq", "Wk"), 0, 8, 4),),
    "xlm": (("transformer.attentions.0.{}.weight", ("q_lin", "k_lin"), 0, 8, 4),),
    "flaubert": (("transformer.attentions.0.{}.weight", ("q_lin", "k_lin"), 0, 8, 4),),
    "distilbert": (("distilbert.transformer.layer.0.attention.{}.weight", ("q_lin", "k_lin"), 0, 8, 4),),
    "cpmant": (("cpmant.encoder.layers.0.self_att.self_attention.{}.weight", ("project_q", "project_k"), 0, 4, 4),),
    "prophetnet": (("prophetnet.encoder.layers.0.self_attn.{}.weight", ("query_proj", "key_proj"), 0, 16, 2),
                   ("prophetnet.decoder.layers.0.self_attn.{}.weight", ("query_proj", "key_proj"), 2, 8, 4),
                   ("prophetnet.decoder.layers.0.cross_attn.{}.weight", ("query_proj", "key_proj"), 6, 8, 4)),
}  # fmt: skip
"""Per model type: the query and key weights of an attention (a name template and its two parts), the call that
multiplies them (the n-th ``scaled_dot_product_attention`` for CTRL and DistilBERT; the n-th ``q @ kᵀ`` or einsum for
the others: ProphetNet's encoder self-attention, then its decoder's main-stream self-attention, then its
cross-attention), and the head size and count."""


@pytest.mark.parametrize("kind", sorted(OLDER_ATTENTION))
def test_older_models_query_and_key_blocks_are_their_real_heads_and_they_train(kind: str) -> None:
    """CTRL, XLM, FlauBERT, DistilBERT, CPM-Ant and ProphetNet: nothing unknown; each block of query or key rows changes
    its own head alone of what the attention multiplies (CPM-Ant's heads are ``dim_head`` rows, not width / heads;
    ProphetNet's encoder and decoder have their own head counts); five steps train every parameter."""
    model = _older_attention(kind)
    opt = adapm.AdaPMMini(model, lr=1e-3, strict=True)  # nothing unknown
    x = torch.randint(2, 50, (1, 6), generator=torch.Generator().manual_seed(1))
    extra = {"decoder_input_ids": x} if kind == "prophetnet" else {}
    recorder: Callable[[], TorchFunctionMode] = (_SdpaCalls if kind in ("ctrl", "distilbert")
                                                 else lambda: _MatmulCalls(einsum=kind == "prophetnet"))  # fmt: skip
    named = dict(model.named_parameters())
    model.eval()
    for template, parts, call, size, heads in OLDER_ATTENTION[kind]:

        def attention_inputs(call: int = call) -> tuple[torch.Tensor, ...]:
            with torch.no_grad(), recorder() as record:
                model(input_ids=x, **extra)
            return record.calls[call][:2]

        weights = [named[template.format(part)] for part in parts]
        _assert_head_blocks_change_their_heads(opt, weights, size, heads, attention_inputs)
    model.train()
    assert _five_steps(model, opt, lambda: model(input_ids=x, labels=x, **extra).loss) == set(named)


@pytest.mark.parametrize(("kind", "roles"), [
    ("rembert", {"rembert.encoder.embedding_hidden_mapping_in.weight": "mlp", "cls.predictions.dense.weight": "mlp",
                 "cls.predictions.decoder.weight": "output"}),
    ("roc_bert", {"roc_bert.embeddings.pronunciation_embed.weight": "embedding",
                  "roc_bert.embeddings.shape_embed.weight": "embedding",
                  "roc_bert.embeddings.map_inputs_layer.weight": "mlp"}),
    ("electra", {"electra.embeddings_project.weight": "mlp", "generator_predictions.dense.weight": "mlp"}),
    ("xmod", {"roberta.encoder.layer.0.output.adapter_modules.en_XX.dense1.weight": "mlp",
              "roberta.encoder.layer.0.output.adapter_modules.en_XX.dense2.weight": "mlp"}),
    ("blt", {"model.encoder_hash_tok_embedding.weight": "embedding",
             "model.local_encoder.patch_embedding_projection.weight": "mlp",
             "model.local_decoder.patch_embedding_projection.weight": "mlp"}),
])  # fmt: skip
def test_bert_kin_and_blt_tables_and_projections_take_their_roles_and_train(kind: str, roles: dict[str, str]) -> None:
    """RemBERT's, ELECTRA's and RoCBert's projections into the width and heads, RoCBert's pronunciation and shape
    tables, X-MOD's language adapters, the Byte Latent Transformer's hashed n-gram table and patch projections: each
    takes its role, nothing is unknown, and five steps as a causal language model train every parameter."""
    import transformers as T

    if kind == "blt":
        torch.manual_seed(0)
        local = dict(hidden_size=16, hidden_size_global=32, num_attention_heads=2, num_key_value_heads=2,
                     intermediate_size=48, num_hidden_layers=1, vocab_size=96)
        model: nn.Module = T.BltForCausalLM(T.BltConfig(
            vocab_size=96, patch_in_forward=False, patching_mode=None, patch_size=4, cross_attn_k=2,
            encoder_hash_byte_group_size=[3, 4], encoder_hash_byte_group_vocab=50, max_position_embeddings=64,
            encoder_config=local, decoder_config=local,
            global_config=dict(hidden_size=32, num_attention_heads=2, num_key_value_heads=2, intermediate_size=64,
                               num_hidden_layers=1)))  # fmt: skip
    else:
        model = _tiny(kind, **OLDER_TEXT_MODELS[kind])
    if kind == "xmod":
        model.set_default_language("en_XX")
    opt = adapm.AdaPMMini(model, lr=1e-3, strict=True)  # nothing unknown
    rows = _rows(opt)
    assert {name: rows[name].role for name in roles} == roles
    x = torch.randint(4, 80, (2, 8), generator=torch.Generator().manual_seed(1))
    stepped = _five_steps(model, opt, lambda: model(input_ids=x, labels=x, use_cache=False).loss)
    assert stepped == {n for n, _ in model.named_parameters()}


def test_phi4_multimodals_audio_encoder_and_projectors_take_their_roles_and_train() -> None:
    """Phi-4-multimodal: nothing unknown. The image and audio projections into the language model are MLP matrices, the
    learned separators between image crops vectors; in the audio encoder the subsampling's output layer is an MLP
    matrix, the convolution kernels keep full momentum, the GLU's biases are vectors and the relative-position bias
    table (a row per distance) an embedding. The audio encoder, on audio features, and the language model, on text,
    each train five steps, every parameter of theirs stepped."""
    model = _phi4_multimodal()
    opt = adapm.AdaPMMini(model, lr=1e-3, strict=True)  # nothing unknown
    rows = _rows(opt)
    audio = "model.embed_tokens_extend.audio_embed."
    block = audio + "encoder.encoders.0.conv."
    expected = {
        "model.embed_tokens_extend.image_embed.img_projection_up.weight": ("mlp", "lowrank"),
        "model.embed_tokens_extend.image_embed.sub_img_feature_extensor": ("vector", "full"),
        "model.embed_tokens_extend.image_embed.global_img_feature_extensor": ("vector", "full"),
        audio + "up_proj_for_speech.weight": ("mlp", "lowrank"),
        audio + "down_proj_for_vision_speech.weight": ("mlp", "lowrank"),
        audio + "encoder.embed.out.weight": ("mlp", "lowrank"),
        audio + "encoder.embed.conv.3.weight": ("router", "full"),
        audio + "encoder.relative_attention_bias_layer.bias_values.weight": ("embedding", "none"),
        block + "dw_sep_conv_1d.dw_conv.weight": ("router", "full"),
        block + "dw_sep_conv_1d.pw_conv.weight": ("router", "full"),
        block + "glu.ext_pw_conv_1d.weight": ("router", "full"), block + "ext_pw_conv_1d.weight": ("router", "full"),
        block + "glu.b1": ("vector", "full"),
    }  # fmt: skip
    assert {name: (rows[name].role, rows[name].momentum) for name in expected} == expected
    encoder = model.model.embed_tokens_extend.audio_embed.encoder
    features = torch.randn(1, 32, 16, generator=torch.Generator().manual_seed(1))
    heard = _five_steps(model, opt, lambda: encoder(features, None).square().mean())
    assert heard == {audio + "encoder." + n for n, _ in encoder.named_parameters()}
    x = torch.randint(3, 50, (2, 6), generator=torch.Generator().manual_seed(2))
    read = _five_steps(model, opt, lambda: model(input_ids=x, labels=x).loss)
    assert read == {n for n, _ in model.named_parameters() if not n.startswith("model.embed_tokens_extend.")}
    assert adapm.state_bytes(opt) == sum(r.state_bytes for r in opt.partition_report().rows
                                         if r.name.split("[")[0] in heard | read)  # fmt: skip


AUDIO_ENCODERS: dict[str, tuple[str, str]] = {
    "whisper": ("whisper", "WhisperEncoder"), "qwen2_audio_encoder": ("qwen2_audio", "Qwen2AudioEncoder"),
    "qwen2_5_omni_audio_encoder": ("qwen2_5_omni", "Qwen2_5OmniAudioEncoder"),
    "qwen3_omni_moe_audio_encoder": ("qwen3_omni_moe", "Qwen3OmniMoeAudioEncoder"),
    "voxtral_encoder": ("voxtral", "VoxtralEncoder"), "glmasr_encoder": ("glmasr", "GlmAsrEncoder"),
    "audioflamingo3_encoder": ("audioflamingo3", "AudioFlamingo3Encoder"),
    "moss_transcribe_diarize_audio": ("moss_transcribe_diarize", "MossTranscribeDiarizeAudioModel"),
}  # fmt: skip
"""Each Whisper-style audio encoder's model type: its transformers module and class."""


def test_every_whisper_style_audio_encoder_is_proven_below() -> None:
    assert sorted(AUDIO_ENCODERS) == sorted(WHISPER_STYLE_AUDIO)


@pytest.mark.parametrize("kind", sorted(AUDIO_ENCODERS))
def test_whisper_style_audio_encoders_are_recognised_whole_and_train(kind: str) -> None:
    """Whisper's encoder and the audio towers built as it: nothing unknown; the convolutions over the mel spectrogram
    keep full momentum, the linear layers after them are MLP matrices, Qwen2.5-Omni's begin/end table an embedding;
    five steps on mel features train every trainable parameter the encoder uses (Whisper's position table is frozen;
    Qwen2.5-Omni's begin/end rows are placed by its language model's side). In Whisper's encoder each block of query or
    key rows changes its own head alone of what its attention receives."""
    import importlib

    module, name = AUDIO_ENCODERS[kind]
    encoder_class = getattr(importlib.import_module(f"transformers.models.{module}.modeling_{module}"), name)
    sizes = dict(d_model=32, hidden_size=32, encoder_layers=1, num_hidden_layers=1, encoder_attention_heads=2,
                 num_attention_heads=2, encoder_ffn_dim=48, intermediate_size=48, num_mel_bins=8,
                 max_source_positions=16, output_dim=24, downsample_hidden_size=8)  # fmt: skip
    fields = set(encoder_class.config_class().to_dict())
    torch.manual_seed(0)
    encoder = encoder_class(encoder_class.config_class(**{k: v for k, v in sizes.items() if k in fields}))
    opt = adapm.AdaPMMini(encoder, lr=1e-3, strict=True)  # nothing unknown
    rows = _rows(opt)
    convs = {n for n in rows if n.split(".")[0] in ("conv1", "conv2", "conv2d1", "conv2d2", "conv2d3")} - {
        n for n in rows if n.endswith(".bias")}  # fmt: skip
    linear = {n for n in rows if n in ("proj.weight", "proj1.weight", "proj2.weight", "conv_out.weight")}
    assert len(convs) == (3 if kind.startswith("qwen3") else 2)
    assert bool(linear) == kind.startswith(("qwen2_5", "qwen3"))
    assert {(rows[n].role, rows[n].momentum) for n in convs} == {("router", "full")}
    assert all(rows[n].role == "mlp" for n in linear)
    gen = torch.Generator().manual_seed(1)
    if kind.startswith("qwen3"):  # mel bins x frames, chunked in windows of its n_window (50)
        inputs: dict[str, object] = dict(input_features=torch.randn(8, 100, generator=gen),
                                         feature_lens=torch.tensor([100]))
    elif kind.startswith("qwen2_5"):
        inputs = dict(input_features=torch.randn(8, 32, generator=gen), feature_lens=torch.tensor([32]),
                      aftercnn_lens=torch.tensor([16]))  # fmt: skip
    else:
        inputs = dict(input_features=torch.randn(1, 8, 32, generator=gen))
        if kind.startswith("audioflamingo3"):
            inputs["input_features_mask"] = torch.ones(1, 32, dtype=torch.long)
    stepped = _five_steps(encoder, opt, lambda: encoder(**inputs).last_hidden_state.square().mean())
    unused = {"audio_bos_eos_token.weight"}  # Qwen2.5-Omni's: the begin and end of the audio, placed by the thinker
    assert stepped == {n for n, p in encoder.named_parameters() if p.requires_grad} - unused
    if kind == "whisper":
        encoder.eval()

        def attention_inputs() -> tuple[torch.Tensor, ...]:
            with torch.no_grad(), _SdpaCalls() as record:
                encoder(**inputs)
            return record.calls[0][:2]

        attn = encoder.layers[0].self_attn
        _assert_head_blocks_change_their_heads(opt, [attn.q_proj.weight, attn.k_proj.weight], 16, 2, attention_inputs)


@pytest.mark.parametrize(("kind", "roles"), [
    ("idefics2", {"model.connector.perceiver_resampler.latents": "vector"}),
    ("video_llama_3", {"model.projector.readout.0.weight": "mlp", "model.projector.readout.2.weight": "mlp"}),
    ("lighton_ocr", {"model.vision_encoder.patch_conv.weight": "router"}),
    ("hyperclovax_vision_v2", {"model.vision_model.patch_embed.proj.weight": "router",
                               "model.projector.weight": "mlp"}),
    ("granite_docling", {"model.vision_model.connector.coarse.projection.weight": "mlp",
                         "model.vision_model.connector.fine.projection.weight": "mlp",
                         "model.vision_model.connector.mlp_fc2.weight": "mlp"}),
    ("minimax_m3_vl", {"model.vision_tower.embeddings.proj.weight": "router",
                       "model.multi_modal_projector.merge_linear_1.weight": "mlp",
                       "model.multi_modal_projector.merge_linear_2.weight": "mlp"}),
    ("ovis2", {"model.vision_tower.head_linear.weight": "output", "model.visual_embeddings_table.weight": "embedding"}),
    ("aria", {"model.multi_modal_projector.query": "vector",
              "model.multi_modal_projector.cross_attn.multihead_attn.out_proj.weight": "attn_out",
              "model.multi_modal_projector.feed_forward.linear_in.weight": "mlp",
              "model.multi_modal_projector.feed_forward.linear_out.weight": "mlp"}),
    ("molmo2", {"model.vision_tower.patch_embedding.weight": "router"}),
    ("nemotron_h_omni", {"vision_model.embeddings.cls_register_token": "vector",
                         "vision_model.embeddings.patch_projection.weight": "router",
                         "vision_model.embeddings.video_patch_projection.weight": "router"}),
    ("step3p7", {"model.vision_model.downsampler1.weight": "router",
                 "model.vision_model.downsampler2.weight": "router"}),
    ("janus", {"model.vision_model.encoder.layers.0.self_attn.projection_layer.weight": "attn_out",
               "model.aligner.hidden_layers.0.weight": "mlp", "model.generation_aligner.hidden_layers.0.weight": "mlp",
               "model.generation_embeddings.weight": "embedding", "model.generation_head.proj_out.weight": "mlp",
               "model.generation_head.vision_head.weight": "output",
               "model.vqmodel.encoder.mid.attn_1.q.weight": "router", "model.vqmodel.decoder.conv_in.weight": "router",
               "model.vqmodel.quantize.embedding.weight": "embedding"}),
    ("pi0", {"embed_action_time.action_in_proj.weight": "router", "embed_action_time.state_proj.weight": "router",
             "action_out_proj.weight": "router", "embed_action_time.action_time_mlp_in.weight": "mlp",
             "embed_action_time.action_time_mlp_out.weight": "mlp"}),
    ("muse_spark", {"model.audio_tower.layers.0.patch_embedder.proj.weight": "router",
                    "model.audio_tower.layers.0.conv_blocks.0.conv.weight": "router",
                    "model.audio_tower.proj.weight": "mlp"}),
    ("inkling_mm_model", {"model.audio_tower.embed_audio_tokens.embed_audio_tokens.weight": "embedding",
                          "model.vision_tower.encoder_layers.0.projection.weight": "mlp"}),
    ("florence2", {"model.multi_modal_projector.image_projection.weight": "mlp",
                   "model.multi_modal_projector.image_position_embed.row_embeddings.weight": "embedding",
                   "model.multi_modal_projector.image_position_embed.column_embeddings.weight": "embedding"}),
    ("udop", {"patch_embed.proj.weight": "router", "decoder.embed_patches.proj.weight": "router",
              "encoder.cell_2d_embedding.x_position_embeddings.weight": "embedding",
              "encoder.cell_2d_embedding.y_position_embeddings.weight": "embedding"}),
])  # fmt: skip
def test_multimodal_models_small_parts_take_their_roles_at_full_size(kind: str, roles: dict[str, str]) -> None:
    """Parts of multimodal models built at their default (full) size on the meta device: projectors, learned queries
    and tokens, patch embeddings, layout tables, Inkling's audio codebook table and patch MLP, Janus's image-generation
    head and VQ-VAE, PI0's action projections, MuSE Spark's audio tower. Each takes its role, and nothing else is left
    unknown but the position tables added whole to every image (Molmo 2's and RADIO's), which keep AdamW's state.
    Aria's projector attention (torch's nn.MultiheadAttention) is split into query, key and value with blocks of that
    module's own ``head_dim`` (the SigLIP pooling-head test proves such blocks are its heads), not of the language
    model's."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(AutoConfig.for_model(kind))
    opt = adapm.AdaPMMini(model, lr=1e-3, strict=False)
    rows = _rows(opt)
    assert {name: rows[name].role for name in roles} == roles
    left = {"molmo2": ["model.vision_tower.positional_embedding"],
            "nemotron_h_omni": ["vision_model.embeddings.position_embedding"]}.get(kind, [])  # fmt: skip
    assert opt.partition_report().unmatched == left
    if kind == "aria":
        attention = model.model.multi_modal_projector.cross_attn.multihead_attn
        assert attention.head_dim != _decoder(model).language_model.config.head_dim
        assert [(s.role, s.block) for s in opt.layout(attention.in_proj_weight).segments] == [
            ("query", (0, attention.head_dim)), ("key", (0, attention.head_dim)), ("value", (0, 1))]  # fmt: skip


ROTARY_VISION_TOWERS = {"ernie4_5_vl_moe": "Ernie4_5_VLMoeVisionConfig", "kimi_k25": "Kimi_K25VisionConfig",
                        "muse_glimmer": "MuseGlimmerVisionConfig", "muse_spark": "MuseSparkVisionConfig",
                        "glm5_next": "Glm5NextVisionConfig"}  # fmt: skip
"""Multimodal models whose vision tower's attention is Qwen2-VL's (ERNIE-4.5-VL's and GLM-5-Next's ``qkv``; the others'
``q_proj``, ``k_proj``, ``v_proj``), and the config class of that tower."""


@pytest.mark.parametrize("kind", sorted(ROTARY_VISION_TOWERS))
def test_qwen_vl_style_attention_of_other_towers_feeds_what_it_is_declared_as(kind: str) -> None:
    """ERNIE-4.5-VL's, Kimi K2.5's, MuSE Glimmer's, MuSE Spark's and GLM-5-Next's vision towers (one block, 2 heads of
    16), proven on their first block's attention called as the tower calls it (a sequence of patches, its rotary
    angles): the query, key and value parts feed exactly those, each query and key block of the module's ``head_dim``
    rows changes its head alone, and ``proj`` is the attention output; nothing in the tower is unknown but Kimi K2.5's
    position grid (a 3-D table interpolated and added whole)."""
    import importlib

    from transformers import PreTrainedModel

    configs = importlib.import_module(f"transformers.models.{kind}.configuration_{kind}")
    modeling = importlib.import_module(f"transformers.models.{kind}.modeling_{kind}")
    config_class = getattr(configs, ROTARY_VISION_TOWERS[kind])
    sizes = dict(hidden_size=32, embed_dim=32, num_heads=2, num_attention_heads=2, depth=1, num_hidden_layers=1,
                 intermediate_size=48, mlp_ratio=1.5, patch_size=2, spatial_merge_size=2, temporal_patch_size=1)
    fields = set(config_class().to_dict())
    tower_class = next(c for c in vars(modeling).values() if isinstance(c, type) and issubclass(c, PreTrainedModel)
                       and c.config_class is config_class and not c.__name__.endswith("PreTrainedModel"))  # fmt: skip
    torch.manual_seed(0)
    tower = tower_class(config_class(**{k: v for k, v in sizes.items() if k in fields}))
    opt = adapm.AdaPMMini(tower, lr=1e-3, strict=False)
    left = ["patch_embed.pos_emb.position_embeddings"] if kind == "kimi_k25" else []
    assert opt.partition_report().unmatched == left
    attn = next(m for m in tower.modules() if type(m).__name__ in QWEN_VL_VISION_ATTENTION)
    assert (attn.head_dim, opt.layout(attn.proj.weight).segments[0].role) == (16, "attn_out")
    gen = torch.Generator().manual_seed(1)
    patches = torch.randn(6, 32, generator=gen)
    angles = torch.randn(6, 16, generator=gen)
    tower.set_attn_implementation("sdpa")
    tower.eval()

    def probe(_m: nn.Module = tower, _x: object = None) -> tuple[torch.Tensor, ...]:
        with torch.no_grad(), _SdpaCalls() as record:
            attn(patches, cu_seqlens=torch.tensor([0, 6]), position_embeddings=(angles.cos(), angles.sin()))
        return record.calls[0][:3]  # (1, heads, patches, head size) each

    _assert_vision_attention_parts(tower, opt, attn, probe, 16, (2, 2))


def test_florence2s_window_and_channel_attention_heads_are_their_real_heads_and_the_tower_trains() -> None:
    """Florence-2's DaViT tower (two stages of different widths, heads and channel groups): nothing unknown. In each
    stage the window attention's ``qkv`` and the channel attention's feed exactly the query, key and value its attention
    receives; each query and key block of width / heads rows (window attention) or width / groups rows (channel
    attention: each group of channels attends within itself) changes its own head or group alone. The convolutions
    keep full momentum, ``proj`` is the attention output, and the tower trains five steps, every parameter stepped."""
    import transformers as T
    from transformers.models.florence2 import modeling_florence2

    torch.manual_seed(0)
    config = T.Florence2VisionConfig(depths=[1, 1], patch_size=[3, 3], patch_stride=[2, 2], patch_padding=[1, 1],
                                     patch_prenorm=[False, True], embed_dim=[16, 24], num_heads=[2, 3],
                                     num_groups=[4, 2], window_size=2, drop_path_rate=0.0, mlp_ratio=2.0)  # fmt: skip
    tower = modeling_florence2.Florence2VisionBackbone(config)
    opt = adapm.AdaPMMini(tower, lr=1e-3, strict=True)  # nothing unknown
    rows = _rows(opt)
    expected = {"convs.0.conv.weight": ("router", "full"), "blocks.1.0.channel_block.conv2.weight": ("router", "full"),
                "blocks.0.0.spatial_block.window_attn.proj.weight": ("attn_out", "none"),
                "blocks.1.0.channel_block.channel_attn.proj.weight": ("attn_out", "none")}  # fmt: skip
    assert {name: (rows[name].role, rows[name].momentum) for name in expected} == expected
    pixels = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    tower.set_attn_implementation("sdpa")
    tower.eval()
    # the attentions in the order the tower calls them, with their head (or group) size and count
    stages = [tower.blocks[0][0], tower.blocks[1][0]]
    attentions = [(stages[0].spatial_block.window_attn, 8, 2), (stages[0].channel_block.channel_attn, 4, 4),
                  (stages[1].spatial_block.window_attn, 8, 3), (stages[1].channel_block.channel_attn, 12, 2)]
    for call, (attn, size, count) in enumerate(attentions):

        def probe(_m: nn.Module = tower, _x: object = None, call: int = call) -> tuple[torch.Tensor, ...]:
            with torch.no_grad(), _SdpaCalls() as record:
                tower(pixels)
            return record.calls[call][:3]  # (windows or batch, heads or groups, tokens or channels, features)

        _assert_vision_attention_parts(tower, opt, attn, probe, size, (count, count))
    tower.train()
    stepped = _five_steps(tower, opt, lambda: tower(pixels).last_hidden_state.square().mean())
    assert stepped == {n for n, _ in tower.named_parameters()}


def test_lfm3_vls_vision_short_convolution_parts_feed_what_they_are_declared_as() -> None:
    """LFM3-VL's vision tower (a conv layer, then an attention layer): nothing unknown. Its gated short convolution over
    the patch grid, proven on the tower's own forward over an image: ``in_proj``'s B and x parts feed the 2-D depthwise
    convolution's input (B * x) and its C part only the gate on its output (what ``out_proj`` reads); row r of any part
    changes channel r alone. The linear patch embedding keeps full momentum; the tower trains five steps."""
    import transformers as T
    from transformers.models.lfm3_vl import modeling_lfm3_vl

    torch.manual_seed(0)
    config = T.Lfm3VlVisionConfig(hidden_size=16, intermediate_size=32, patch_size=2, temporal_patch_size=1,
                                  num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                                  layer_types=["conv", "full_attention"])  # fmt: skip
    tower = modeling_lfm3_vl.Lfm3VlVisionModel(config)
    opt = adapm.AdaPMMini(tower, lr=1e-3, strict=True)  # nothing unknown
    block = tower.layers[0].conv
    weight = block.in_proj.weight
    segments = opt.layout(weight).segments
    assert [(s.name.rsplit("[", 1)[1], s.role) for s in segments] == [("B]", "mlp"), ("C]", "mlp"), ("x]", "mlp")]
    rows = _rows(opt)
    assert {n: rows[n].role for n in ("patch_embed.weight", "layers.0.conv.spatial_conv.weight",
                                      "layers.0.conv.out_proj.weight")} == {
        "patch_embed.weight": "router", "layers.0.conv.spatial_conv.weight": "router",
        "layers.0.conv.out_proj.weight": "attn_out"}  # fmt: skip
    gen = torch.Generator().manual_seed(1)
    pixels = torch.randn(16, 3 * 2 * 2, generator=gen)  # one image of 4 x 4 patches
    grid = torch.tensor([[1, 4, 4]])
    tower.eval()

    def probe() -> tuple[torch.Tensor, torch.Tensor]:
        """The convolution's input (frames, channels, height, width) and out_proj's (patches, channels)."""
        seen: list[torch.Tensor] = []
        hooks = [m.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().clone()))
                 for m in (block.spatial_conv, block.out_proj)]  # fmt: skip
        with torch.no_grad():
            tower(pixels, grid_thw=grid)
        for hook in hooks:
            hook.remove()
        return seen[0], seen[1]

    conv_in, gated = probe()
    for seg, feeds in zip(segments, ("conv", "gate", "conv")):
        after_conv_in, after_gated = _block_perturbed(weight, seg, 3, 1, probe)
        conv_changed = (after_conv_in - conv_in).abs().amax(dim=(0, 2, 3)).nonzero().flatten().tolist()
        gate_changed = (after_gated - gated).abs().amax(dim=0).nonzero().flatten().tolist()
        assert gate_changed == [3], (seg.name, gate_changed)
        assert conv_changed == ([3] if feeds == "conv" else []), (seg.name, conv_changed)
    tower.train()
    stepped = _five_steps(tower, opt, lambda: tower(pixels, grid_thw=grid).last_hidden_state.square().mean())
    assert stepped == {n for n, _ in tower.named_parameters()}


LITGPT: dict[str, tuple[str, dict[str, Any]]] = {
    "pythia": ("pythia-14m", {}),  # GPT-NeoX's MLP, biases, parallel residual
    "llama3": ("Llama-3.2-1B", {"n_query_groups": 2}),
    "falcon": ("falcon-7b", {"n_query_groups": 1}),  # one key and value head
    "gemma2": ("Gemma-2-2b", {"n_query_groups": 2, "head_size": 8}),  # softcapped scores; head_size != n_embd / n_head
    "qwen3": ("Qwen3-0.6B", {"n_query_groups": 2, "head_size": 24}),  # each head's query and key normed
    "olmo2": ("OLMo-2-1124-7B", {"n_query_groups": 4, "head_size": 8}),  # the query and key normed across heads
    "qwen3_moe": ("Qwen3-30B-A3B", {"n_query_groups": 2, "head_size": 8, "n_expert": 4, "n_expert_per_token": 2,
                                    "moe_intermediate_size": 32}),
    "latent": ("", {"n_query_groups": 4, "head_size": 16, "mlp_class_name": "LLaMAMoE", "norm_class_name": "RMSNorm",
                    "bias": False, "parallel_residual": False, "n_expert": 4, "n_expert_per_token": 2,
                    "moe_intermediate_size": 32, "n_shared_expert": 1, "n_expert_groups": 2, "n_topk_groups": 1,
                    "n_topk_scores_per_group": 2, "first_k_dense_replace": 1,
                    "latent_attention": {"q_lora_rank": 24, "kv_lora_rank": 16, "qk_rope_head_dim": 4,
                                         "qk_nope_head_dim": 8, "v_head_dim": 12}}),  # DeepSeek-V3's layout
}  # fmt: skip
"""Tiny LitGPT models (``litgpt.GPT``, built from one of LitGPT's own named configs, sizes shrunk), one per kind of
attention and MLP it has; ``latent``: a DeepSeek-V3-style config (latent attention, grouped routing, shared experts)."""


def _litgpt(kind: str) -> nn.Module:
    litgpt = pytest.importorskip("litgpt")
    name, overrides = LITGPT[kind]
    sizes = {"n_layer": 2, "n_embd": 64, "n_head": 4, "padded_vocab_size": 96, "vocab_size": 96, "block_size": 16,
             "intermediate_size": 96}  # fmt: skip
    config = (litgpt.Config.from_name(name, **sizes, **overrides) if name
              else litgpt.Config(name="tiny-latent", **sizes, **overrides))  # fmt: skip
    torch.manual_seed(0)
    model = litgpt.GPT(config)
    model.apply(model._init_weights)  # LitGPT's initializer: its grouped router is torch.empty until then
    return model


def _probe_litgpt(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The query, key and value (batch, head, position, size) that layer 0's attention of a LitGPT model computes with:
    the arguments of its ``scaled_dot_product_attention`` (run unchanged; keys and values repeated for each query head
    they serve)."""
    return _probe_method(model, model.transformer.h[0].attn, "scaled_dot_product_attention", x)


@pytest.mark.parametrize("kind", sorted(LITGPT))
def test_every_litgpt_matrix_is_recognised_and_trains(kind: str) -> None:
    """LitGPT has no ``config.model_type``: its modules say what each matrix is. Nothing is left unknown, each matrix
    takes its role, and five steps on the next-token loss are finite; the state held is what the report counted."""
    import warnings

    model = _litgpt(kind)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # nothing kept whole, no rule unused
        opt = adapm.AdaPMMini(model, lr=1e-3)
    report = opt.partition_report()
    assert report.unmatched == [], report.unmatched
    latent = kind == "latent"
    expected = {
        "lm_head.weight": "output", "transformer.wte.weight": "embedding",
        "transformer.h.1.attn.proj.weight": "attn_out", "transformer.h.1.mlp.gate.weight": "router",
        "transformer.h.1.mlp.experts.0.fc_1.weight": "mlp", "transformer.h.1.mlp.experts.0.fc_2.weight": "mlp",
        "transformer.h.1.mlp.experts.0.proj.weight": "mlp", "transformer.h.1.mlp.shared_experts.fc_1.weight": "mlp",
        "transformer.h.0.mlp.fc.weight": "mlp", "transformer.h.0.mlp.fc_1.weight": "mlp",
        "transformer.h.0.mlp.fc_2.weight": "mlp", "transformer.h.0.mlp.proj.weight": "mlp",
        "transformer.h.1.attn.q_a_proj.weight": "query", "transformer.h.1.attn.q_b_proj.weight": "query",
        "transformer.h.1.attn.kv_a_proj_with_mqa.weight[KV]": "value",
        "transformer.h.1.attn.kv_a_proj_with_mqa.weight[K]": "key",
        "transformer.h.1.attn.kv_b_proj.weight[K]": "key", "transformer.h.1.attn.kv_b_proj.weight[V]": "value",
        "transformer.h.1.attn.qkv.weight[Q]": "query", "transformer.h.1.attn.qkv.weight[K]": "key",
        "transformer.h.1.attn.qkv.weight[V]": "value",
    }  # fmt: skip
    rows = _rows(opt)
    present = {name: rows[name].role for name in expected if name in rows}
    assert present == {name: expected[name] for name in present}
    assert ("transformer.h.1.attn.kv_b_proj.weight[K]" in present) == latent
    assert ("transformer.h.1.attn.qkv.weight[Q]" in present) == (not latent)
    assert ("transformer.h.1.mlp.gate.weight" in present) == (kind in ("qwen3_moe", "latent"))
    assert all(r.role != "other" for r in report.rows)
    gen = torch.Generator().manual_seed(0)

    def loss() -> torch.Tensor:
        ids = torch.randint(0, 96, (2, 12), generator=gen)
        logits = model(ids)
        return nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())

    model.train()
    stepped = _five_steps(model, opt, loss)
    assert {n for n, p in model.named_parameters() if ".experts." not in n} <= stepped  # experts: where routed
    assert adapm.state_bytes(opt) == sum(r.state_bytes for r in report.rows if r.name.split("[")[0] in stepped)


@pytest.mark.parametrize("kind", [k for k in sorted(LITGPT) if k != "latent"])
def test_litgpt_qkv_parts_and_heads_match_what_its_attention_computes(kind: str) -> None:
    """LitGPT's ``qkv`` is ``[q | k | v]`` with ``n_head`` query and ``n_query_groups`` key and value heads of
    ``head_size``: each part feeds exactly the query, key or value that layer 0's attention computes with, and each
    per-head block of the query (of the key) changes exactly its head (the query heads it serves). OLMo 2 norms the
    query and key across all heads at once, so a head's rows move every head there: its parts are proven, not its
    heads."""
    model = _litgpt(kind)
    opt = adapm.AdaPMMini(model, lr=1e-3)
    config = model.config
    qkv = model.transformer.h[0].attn.qkv.weight
    assert _what_each_segment_feeds(model, opt, qkv, _probe_litgpt) == ["q", "k", "v"]
    if kind == "olmo2":
        return
    x = torch.randint(0, 96, (1, 6), generator=torch.Generator().manual_seed(0))
    base = _probe_litgpt(model, x)
    size, heads, per_group = config.head_size, config.n_head, config.n_head // config.n_query_groups
    for which, count, serves in ((0, heads, 1), (1, config.n_query_groups, per_group)):
        seg = opt.layout(qkv).segments[which]
        assert seg.momentum == "lowrank" and seg.block == (0, size), (which, seg.block)
        for block in range(count):
            after = _block_perturbed(qkv, seg, block, size, lambda: _probe_litgpt(model, x))[which]
            changed = [h for h in range(heads) if (after[:, h] - base[which][:, h]).abs().max() > 1e-5]
            assert changed == list(range(block * serves, (block + 1) * serves)), (which, block, changed)


def test_litgpt_latent_attention_parts_and_heads_match_what_its_attention_computes() -> None:
    """LitGPT's latent attention (DeepSeek-V3's): ``kv_a_proj_with_mqa``'s latent feeds keys and values, its rotary
    part the keys alone; ``kv_b_proj``'s parts feed exactly the key or the value; and the per-head blocks of the query
    (``q_b_proj``) and of ``kv_b_proj``'s key part change exactly their head; ``q_a_proj`` (a latent) has no heads."""
    model = _litgpt("latent")
    opt = adapm.AdaPMMini(model, lr=1e-3)
    attn, la = model.transformer.h[0].attn, model.config.latent_attention
    assert _what_each_segment_feeds(model, opt, attn.kv_a_proj_with_mqa.weight, _probe_litgpt) == ["kv", "k"]
    assert _what_each_segment_feeds(model, opt, attn.kv_b_proj.weight, _probe_litgpt) == ["k", "v"]
    assert opt.layout(attn.q_a_proj.weight).segments[0].block == (0, 1)
    nope, rope = la["qk_nope_head_dim"], la["qk_rope_head_dim"]
    x = torch.randint(0, 96, (1, 6), generator=torch.Generator().manual_seed(0))
    for weight, which, size in ((attn.q_b_proj.weight, 0, nope + rope), (attn.kv_b_proj.weight, 1, nope)):
        _assert_head_blocks_change_their_heads(opt, [weight], size, heads=4,
                                               probe=lambda which=which: [_probe_litgpt(model, x)[which]])  # fmt: skip


def test_every_model_litgpt_ships_is_recognised() -> None:
    """Each of LitGPT's named configs (two layers of it, on the meta device): nothing unknown or kept whole
    (``strict=True``, no warning), and AdaPM-mini holds under 6% of AdamW's state."""
    import warnings

    litgpt = pytest.importorskip("litgpt")
    from litgpt.config import configs

    assert len(configs) > 200
    for entry in configs:
        config = litgpt.Config.from_name(entry["name"], n_layer=2)
        with torch.device("meta"):
            model = litgpt.GPT(config)
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)
            opt = adapm.AdaPMMini(model, lr=1e-3, strict=True)
        assert opt.partition_report().ratio_to_adamw < 0.06, entry["name"]
