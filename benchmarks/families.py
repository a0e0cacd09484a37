"""What the partition reaches in each model family: unknown matrices, fused weights kept whole, and the
optimizer state of AdaPM and AdaPM-mini in % of AdamW's, on a tiny random model of each family and at
real size (counted on the meta device from the family's published config shape; nothing downloaded).
For mixture-of-experts models, ``expert_share_pct`` is the share of AdaPM-mini's state that the expert
stacks hold.

    python benchmarks/families.py --json docs/benchmarks/families.json   # writes families.md beside it
    python benchmarks/families.py --quick                                # tiny models only

The README's preset table is this script's Markdown.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info, markdown_table

import adapm
from adapm.train.memory import count_state_bytes, model_from_config

_MLA_TINY = {"moe_intermediate_size": 32, "n_routed_experts": 4, "num_experts_per_tok": 2, "first_k_dense_replace": 1,
             "n_group": 1, "topk_group": 1, "kv_lora_rank": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 16,
             "v_head_dim": 16}
"""The overrides that make a tiny model of a latent-attention family (with the shared ones below)."""

_GATED_DELTANET_REAL = {"hidden_size": 2048, "moe_intermediate_size": 512, "shared_expert_intermediate_size": 512,
                        "num_attention_heads": 16, "num_key_value_heads": 2, "head_dim": 256,
                        "linear_num_key_heads": 16, "linear_num_value_heads": 32, "linear_key_head_dim": 128,
                        "linear_value_head_dim": 128}
"""Qwen3-Next's and Qwen3.5-MoE's shared shape: three Gated DeltaNet layers, then one gated full attention."""
_GATED_DELTANET_TINY = {"moe_intermediate_size": 32, "shared_expert_intermediate_size": 32, "head_dim": 16,
                        "num_experts": 4, "num_experts_per_tok": 2, "linear_num_key_heads": 2,
                        "linear_num_value_heads": 4, "linear_key_head_dim": 16, "linear_value_head_dim": 16,
                        "layer_types": ["linear_attention", "full_attention"]}

# Real-size shapes of a well-known checkpoint of each family (its config.json's size fields), and the
# overrides that make a tiny model (2 layers, hidden 64) of the same family.
FAMILIES: dict[str, tuple[str, dict[str, Any], dict[str, Any]]] = {
    "gpt2": ("GPT-2 1.5B", {"model_type": "gpt2", "n_embd": 1600, "n_layer": 48, "n_head": 25, "vocab_size": 50257},
             {"n_embd": 64, "n_layer": 2, "n_head": 4}),
    "llama": ("Llama-2 7B", {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008,
                             "num_hidden_layers": 32, "num_attention_heads": 32, "vocab_size": 32000}, {}),
    "mistral": ("Mistral 7B", {"model_type": "mistral", "hidden_size": 4096, "intermediate_size": 14336,
                               "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                               "vocab_size": 32000}, {}),
    "qwen2": ("Qwen2 7B", {"model_type": "qwen2", "hidden_size": 3584, "intermediate_size": 18944,
                           "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
                           "vocab_size": 152064}, {}),
    "gemma2": ("Gemma-2 9B", {"model_type": "gemma2", "hidden_size": 3584, "intermediate_size": 14336,
                              "num_hidden_layers": 42, "num_attention_heads": 16, "num_key_value_heads": 8,
                              "head_dim": 256, "vocab_size": 256000}, {"head_dim": 16}),
    "phi": ("Phi-2", {"model_type": "phi", "hidden_size": 2560, "intermediate_size": 10240, "num_hidden_layers": 32,
                      "num_attention_heads": 32, "vocab_size": 51200}, {}),
    "gptj": ("GPT-J 6B", {"model_type": "gptj", "n_embd": 4096, "n_layer": 28, "n_head": 16, "rotary_dim": 64,
                          "vocab_size": 50400}, {"n_embd": 64, "n_layer": 2, "n_head": 4, "rotary_dim": 8}),
    "opt": ("OPT 6.7B", {"model_type": "opt", "hidden_size": 4096, "ffn_dim": 16384, "num_hidden_layers": 32,
                         "num_attention_heads": 32, "word_embed_proj_dim": 4096, "vocab_size": 50272},
            {"ffn_dim": 128, "word_embed_proj_dim": 64}),
    "t5": ("T5-base", {"model_type": "t5", "d_model": 768, "d_ff": 3072, "d_kv": 64, "num_layers": 12,
                       "num_heads": 12, "vocab_size": 32128},
           {"d_model": 64, "d_ff": 128, "d_kv": 16, "num_layers": 2, "num_heads": 4}),
    "bert": ("BERT-base", {"model_type": "bert", "hidden_size": 768, "intermediate_size": 3072,
                           "num_hidden_layers": 12, "num_attention_heads": 12, "vocab_size": 30522}, {}),
    "mixtral": ("Mixtral 8x7B", {"model_type": "mixtral", "hidden_size": 4096, "intermediate_size": 14336,
                                 "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                                 "num_local_experts": 8, "num_experts_per_tok": 2, "vocab_size": 32000},
                {"num_local_experts": 4}),
    "qwen2_moe": ("Qwen1.5-MoE A2.7B", {"model_type": "qwen2_moe", "hidden_size": 2048, "intermediate_size": 5632,
                                        "moe_intermediate_size": 1408, "shared_expert_intermediate_size": 5632,
                                        "num_hidden_layers": 24, "num_attention_heads": 16, "num_key_value_heads": 16,
                                        "num_experts": 60, "num_experts_per_tok": 4, "vocab_size": 151936},
                  {"moe_intermediate_size": 32, "shared_expert_intermediate_size": 128, "num_experts": 4}),
    "gpt_neox": ("Pythia 1B", {"model_type": "gpt_neox", "hidden_size": 2048, "intermediate_size": 8192,
                               "num_hidden_layers": 16, "num_attention_heads": 8, "rotary_pct": 0.25,
                               "vocab_size": 50304}, {}),
    "bloom": ("BLOOM 1.1B", {"model_type": "bloom", "hidden_size": 1536, "n_layer": 24, "n_head": 16,
                             "vocab_size": 250880}, {"n_layer": 2, "n_head": 4}),
    "falcon": ("Falcon 7B", {"model_type": "falcon", "hidden_size": 4544, "num_hidden_layers": 32,
                             "num_attention_heads": 71, "multi_query": True, "new_decoder_architecture": False,
                             "vocab_size": 65024}, {}),
    "falcon_gqa": ("Falcon 40B", {"model_type": "falcon", "hidden_size": 8192, "num_hidden_layers": 60,
                                  "num_attention_heads": 128, "num_kv_heads": 8, "new_decoder_architecture": True,
                                  "vocab_size": 65024}, {"num_kv_heads": 2}),
    "phi3": ("Phi-3 mini", {"model_type": "phi3", "hidden_size": 3072, "intermediate_size": 8192,
                            "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
                            "vocab_size": 32064, "pad_token_id": 0}, {}),
    "gpt_bigcode": ("StarCoder 15B", {"model_type": "gpt_bigcode", "n_embd": 6144, "n_layer": 40, "n_head": 48,
                                      "multi_query": True, "vocab_size": 49152},
                    {"n_embd": 64, "n_layer": 2, "n_head": 4}),
    "llama4": ("Llama 4 Scout", {"model_type": "llama4_text", "hidden_size": 5120, "intermediate_size": 8192,
                                 "intermediate_size_mlp": 16384, "num_hidden_layers": 48, "num_attention_heads": 40,
                                 "num_key_value_heads": 8, "head_dim": 128, "num_local_experts": 16,
                                 "num_experts_per_tok": 1, "interleave_moe_layer_step": 1, "vocab_size": 202048},
               {"intermediate_size": 32, "intermediate_size_mlp": 128, "head_dim": 16, "num_local_experts": 4}),
    "gpt_oss": ("GPT-OSS 20B", {"model_type": "gpt_oss", "hidden_size": 2880, "intermediate_size": 2880,
                                "num_hidden_layers": 24, "num_attention_heads": 64, "num_key_value_heads": 8,
                                "head_dim": 64, "num_local_experts": 32, "vocab_size": 201088},
                {"intermediate_size": 32, "head_dim": 16, "num_local_experts": 4,
                 "layer_types": ["full_attention", "full_attention"]}),
    "deepseek_v2": ("DeepSeek-V2-Lite", {"model_type": "deepseek_v2", "hidden_size": 2048, "intermediate_size": 10944,
                                         "moe_intermediate_size": 1408, "num_hidden_layers": 27,
                                         "num_attention_heads": 16, "num_key_value_heads": 16, "n_routed_experts": 64,
                                         "n_shared_experts": 2, "num_experts_per_tok": 6, "first_k_dense_replace": 1,
                                         "q_lora_rank": None, "kv_lora_rank": 512, "qk_rope_head_dim": 64,
                                         "qk_nope_head_dim": 128, "v_head_dim": 128, "vocab_size": 102400},
                    _MLA_TINY),
    "deepseek_v3": ("DeepSeek-V3", {"model_type": "deepseek_v3", "hidden_size": 7168, "intermediate_size": 18432,
                                    "moe_intermediate_size": 2048, "num_hidden_layers": 61, "num_attention_heads": 128,
                                    "num_key_value_heads": 128, "n_routed_experts": 256, "n_shared_experts": 1,
                                    "num_experts_per_tok": 8, "first_k_dense_replace": 3, "n_group": 8,
                                    "topk_group": 4, "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_rope_head_dim": 64,
                                    "qk_nope_head_dim": 128, "v_head_dim": 128, "vocab_size": 129280},
                    {**_MLA_TINY, "q_lora_rank": 16}),
    "glm4_moe": ("GLM-4.5-Air", {"model_type": "glm4_moe", "hidden_size": 4096, "intermediate_size": 10944,
                                 "moe_intermediate_size": 1408, "num_hidden_layers": 46, "num_attention_heads": 96,
                                 "num_key_value_heads": 8, "n_routed_experts": 128, "n_shared_experts": 1,
                                 "num_experts_per_tok": 8, "first_k_dense_replace": 1, "vocab_size": 151552},
                 {"moe_intermediate_size": 32, "n_routed_experts": 4, "num_experts_per_tok": 2}),
    "minimax_m2": ("MiniMax-M2", {"model_type": "minimax_m2", "hidden_size": 3072, "intermediate_size": 1536,
                                  "num_hidden_layers": 62, "num_attention_heads": 48, "num_key_value_heads": 8,
                                  "head_dim": 128, "num_local_experts": 256, "num_experts_per_tok": 8,
                                  "vocab_size": 200064},
                   {"intermediate_size": 32, "head_dim": 16, "num_local_experts": 4, "num_experts_per_tok": 2}),
    "qwen3_next": ("Qwen3-Next 80B-A3B", {"model_type": "qwen3_next", **_GATED_DELTANET_REAL,
                                          "intermediate_size": 5632, "num_hidden_layers": 48, "num_experts": 512,
                                          "num_experts_per_tok": 10, "vocab_size": 151936}, _GATED_DELTANET_TINY),
    "qwen3_5_moe": ("Qwen3.5 35B-A3B", {"model_type": "qwen3_5_moe_text", **_GATED_DELTANET_REAL,
                                        "num_hidden_layers": 40, "num_experts": 256, "num_experts_per_tok": 8,
                                        "vocab_size": 248320}, _GATED_DELTANET_TINY),
    "olmo_hybrid": ("OLMo Hybrid 7B", {"model_type": "olmo_hybrid", "hidden_size": 3840, "intermediate_size": 11008,
                                       "num_hidden_layers": 32, "num_attention_heads": 30, "num_key_value_heads": 30,
                                       "linear_num_key_heads": 30, "linear_num_value_heads": 30,
                                       "linear_key_head_dim": 96, "linear_value_head_dim": 192, "vocab_size": 100352},
                    {"linear_num_key_heads": 2, "linear_num_value_heads": 2, "linear_key_head_dim": 16,
                     "linear_value_head_dim": 16, "layer_types": ["linear_attention", "full_attention"],
                     "pad_token_id": 0}),
    "kimi_linear": ("Kimi Linear 48B-A3B", {"model_type": "kimi_linear", "hidden_size": 2304, "intermediate_size": 9216,
                                            "moe_intermediate_size": 1024, "num_hidden_layers": 27,
                                            "num_attention_heads": 32, "num_key_value_heads": 32, "num_experts": 256,
                                            "num_experts_per_token": 8, "kv_lora_rank": 512, "q_lora_rank": None,
                                            "qk_rope_head_dim": 64, "qk_nope_head_dim": 128, "v_head_dim": 128,
                                            "linear_num_heads": 32, "linear_head_dim": 128, "vocab_size": 163840},
                    {"moe_intermediate_size": 32, "num_experts": 4, "num_experts_per_token": 2, "kv_lora_rank": 16,
                     "qk_rope_head_dim": 8, "qk_nope_head_dim": 16, "v_head_dim": 16, "linear_num_heads": 2,
                     "linear_head_dim": 16, "layer_types": ["linear_attention", "full_attention"],
                     "mlp_layer_types": ["dense", "sparse"], "pad_token_id": 0}),
    "mamba2": ("Mamba-Codestral 7B", {"model_type": "mamba2", "hidden_size": 4096, "num_hidden_layers": 64,
                                      "num_heads": 128, "head_dim": 64, "state_size": 128, "n_groups": 8, "expand": 2,
                                      "vocab_size": 32768},
               {"num_heads": 8, "head_dim": 16, "state_size": 16, "n_groups": 2}),
    "jamba": ("Jamba v0.1", {"model_type": "jamba", "hidden_size": 4096, "intermediate_size": 14336,
                             "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                             "num_experts": 16, "num_experts_per_tok": 2, "attn_layer_period": 8,
                             "attn_layer_offset": 4, "expert_layer_period": 2, "expert_layer_offset": 1,
                             "mamba_d_state": 16, "mamba_expand": 2, "mamba_dt_rank": 256, "vocab_size": 65536},
              {"num_experts": 4, "attn_layer_period": 2, "attn_layer_offset": 1, "mamba_dt_rank": 8,
               "pad_token_id": 0}),
    "deepseek_v4": ("DeepSeek-V4-Flash",
                    {"model_type": "deepseek_v4", "hidden_size": 4096, "moe_intermediate_size": 2048,
                     "num_hidden_layers": 43, "num_attention_heads": 64, "head_dim": 512, "q_lora_rank": 1024,
                     "o_groups": 8, "o_lora_rank": 1024, "n_routed_experts": 256, "num_experts_per_tok": 6,
                     "index_n_heads": 64, "index_head_dim": 128, "vocab_size": 129280},
                    {"moe_intermediate_size": 32, "head_dim": 16, "qk_rope_head_dim": 8, "q_lora_rank": 16,
                     "o_groups": 2, "o_lora_rank": 8, "n_routed_experts": 4, "num_experts_per_tok": 2,
                     "index_n_heads": 2, "index_head_dim": 8, "hc_mult": 2, "mlp_layer_types": ["moe", "moe"],
                     "layer_types": ["compressed_sparse_attention", "heavily_compressed_attention"]}),
    "lfm2": ("LFM2 1.2B", {"model_type": "lfm2", "hidden_size": 2048, "intermediate_size": 12288,
                           "block_auto_adjust_ff_dim": True, "num_hidden_layers": 16, "num_attention_heads": 32,
                           "num_key_value_heads": 8, "full_attn_idxs": [2, 5, 8, 10, 12, 14], "vocab_size": 65536},
             {"full_attn_idxs": [1]}),
    "codegen": ("CodeGen 350M", {"model_type": "codegen", "n_embd": 1024, "n_layer": 20, "n_head": 16,
                                 "rotary_dim": 32, "vocab_size": 51200},
                {"n_embd": 64, "n_layer": 2, "n_head": 4, "rotary_dim": 8}),
    "mpt": ("MPT 7B", {"model_type": "mpt", "d_model": 4096, "n_heads": 32, "n_layers": 32, "expansion_ratio": 4,
                       "vocab_size": 50432}, {"d_model": 64, "n_heads": 4, "n_layers": 2}),
}  # fmt: skip

TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 100}  # fmt: skip


def tiny_config(full: dict[str, Any], extra: dict[str, Any], vocab: int = 100) -> dict[str, Any]:
    """The tiny model's config: 2 layers, hidden 64, and ``vocab`` tokens (0: the family's default vocabulary,
    whose embeddings then dominate a model this small)."""
    config = {**full, **{k: v for k, v in TINY.items() if k in full or k == "vocab_size"}, **extra}
    if vocab:
        config["vocab_size"] = vocab
    else:
        config.pop("vocab_size")
    if full.get("num_key_value_heads") == full.get("num_attention_heads"):
        config["num_key_value_heads"] = config.get("num_attention_heads", 4)
    return config


def measure(config: dict[str, Any], device: str) -> dict[str, Any]:
    from transformers import AutoConfig

    hf = AutoConfig.for_model(**config)
    torch.manual_seed(0)
    model = model_from_config(hf, device=device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = adapm.AdaPMMini(model, lr=1e-3, strict=False).partition_report()
        whole = [g["names"][0] for g in adapm.AdaPMMini(model, lr=1e-3, strict=False).param_groups
                 if g.get("kept_whole")]  # fmt: skip
    adamw = count_state_bytes(model, "adamw")
    experts = sum(r.state_bytes for r in report.rows if ".experts." in r.name)
    row = {
        "parameters_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "unknown": len([n for n in report.unmatched if n not in whole]),
        "kept_whole": len(whole),
        "expert_share_pct": 100.0 * experts / report.state_bytes if experts else None,
    }
    for name in ("adapm", "adapm-mini"):
        row[f"{name}_pct"] = 100.0 * count_state_bytes(model, name) / adamw
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, help="also write this JSON and a .md table beside it")
    parser.add_argument("--quick", action="store_true", help="tiny models only")
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--tiny-vocab", type=int, default=100,
                        help="vocabulary of the tiny models (0: each family's default; embeddings then dominate)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    rows = []
    for family in args.families.split(","):
        if family not in FAMILIES:
            parser.error(f"--families: unknown family {family!r}; choose from {', '.join(FAMILIES)}")
        checkpoint, full, extra = FAMILIES[family]
        tiny = measure(tiny_config(full, extra, args.tiny_vocab), "meta" if args.tiny_vocab == 0 else "cpu")
        row: dict[str, Any] = {"family": family, "checkpoint": checkpoint, "unknown": tiny["unknown"],
                               "kept_whole": tiny["kept_whole"], "tiny_adapm_pct": tiny["adapm_pct"],
                               "tiny_adapm_mini_pct": tiny["adapm-mini_pct"],
                               "expert_share_pct": tiny["expert_share_pct"]}  # fmt: skip
        if not args.quick:
            real = measure(full, "meta")
            row.update(parameters_m=real["parameters_m"], adapm_pct=real["adapm_pct"],
                       adapm_mini_pct=real["adapm-mini_pct"], expert_share_pct=real["expert_share_pct"])  # fmt: skip
        rows.append(row)
        print(json.dumps(row), flush=True)
    columns = [("family", "{}"), ("checkpoint", "{}"), ("parameters_m", "{:,.0f}M"), ("unknown", "{}"),
               ("kept_whole", "{}"), ("adapm_pct", "{:.1f}%"), ("adapm_mini_pct", "{:.1f}%"),
               ("expert_share_pct", "{:.0f}%"),
               ("tiny_adapm_pct", "{:.1f}%"), ("tiny_adapm_mini_pct", "{:.1f}%")]  # fmt: skip
    if args.quick:
        columns = [c for c in columns if not c[0].startswith(("parameters", "adapm"))]
    table = markdown_table(rows, columns)
    print(table)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        info = {**machine_info(), "command": " ".join(sys.argv)}
        args.json.write_text(json.dumps({"machine": info, "rows": rows}, indent=2))
        args.json.with_suffix(".md").write_text(table + "\n")


if __name__ == "__main__":
    main()
