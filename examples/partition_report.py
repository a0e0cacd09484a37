"""Print AdaPM's partition report for a tiny HF GPT-2 and a tiny Llama, and the totals at real sizes.

python examples/partition_report.py
"""

from __future__ import annotations

import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import adapm


def main() -> None:
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=64, n_head=4, vocab_size=512, n_positions=128))
    print("## AdaPMMini on a 1-layer HF GPT-2\n")
    print(adapm.AdaPMMini(gpt2, lr=6e-4).partition_report())

    llama = LlamaForCausalLM(
        LlamaConfig(
            num_hidden_layers=1,
            hidden_size=64,
            intermediate_size=176,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=512,
            tie_word_embeddings=False,
        )
    )
    print("\n## AdaPM on a 1-layer Llama (grouped-query attention)\n")
    print(adapm.AdaPM(llama, lr=6e-4).partition_report())

    print("\n## Totals at real sizes (counted on the meta device, nothing allocated)\n")
    sizes = {
        "GPT-2 124M": lambda: GPT2LMHeadModel(GPT2Config()),
        "GPT-2 1.5B": lambda: GPT2LMHeadModel(GPT2Config(n_layer=48, n_embd=1600, n_head=25)),
        "Llama 350M (hidden 1024, 24 layers)": lambda: LlamaForCausalLM(
            LlamaConfig(
                hidden_size=1024,
                intermediate_size=2736,
                num_hidden_layers=24,
                num_attention_heads=16,
                vocab_size=32000,
                tie_word_embeddings=False,
            )
        ),
    }
    for label, build in sizes.items():
        with torch.device("meta"):
            model = build()
        for cls in (adapm.AdaPM, adapm.AdaPMMini):
            report = cls(model, lr=6e-4).partition_report()
            by_policy = ", ".join(f"{k} {v / 1e9:.3f}" for k, v in sorted(report.by_momentum().items()))
            print(
                f"{label:<36} {cls.__name__:<10} {report.state_bytes / 1e9:6.3f} GB = "
                f"{100 * report.ratio_to_adamw:5.1f}% of AdamW's {report.adamw_state_bytes / 1e9:.3f} GB"
                f"\n{'':<47}by momentum policy: {by_policy} GB"
            )


if __name__ == "__main__":
    main()
