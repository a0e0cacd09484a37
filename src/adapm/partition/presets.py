"""Partition presets: every model-specific parameter name in adapm lives in this module.

A preset rule maps a parameter name (regular expression, searched) to a *role*; a fused weight maps
to a tuple of roles, one per equal segment. Roles then map to the paper's momentum split (Table 1)
and to Adam-mini's second-moment blocks. First match wins; 1-D parameters (norms, biases) are
recognised by shape before any rule is tried.
"""

from __future__ import annotations

from dataclasses import dataclass

ROLES = ("embedding", "output", "query", "key", "value", "attn_out", "mlp", "router", "vector", "other")
"""Every role a parameter (or a segment of a fused parameter) can have."""

PAPER_MOMENTUM: dict[str, str] = {
    "embedding": "none",
    "output": "none",
    "attn_out": "none",
    "query": "lowrank",
    "key": "lowrank",
    "mlp": "lowrank",
    "value": "full",
    "router": "full",
    "vector": "full",
    "other": "full",
}
"""The paper's momentum policy per role (its Table 1); ``router`` is a mixture-of-experts router or
another small matrix (full momentum costs little there); ``other`` is an unrecognised matrix."""


@dataclass(frozen=True)
class PresetRule:
    """One preset rule.

    Attributes:
        family: the model family the rule belongs to (shown in the partition report).
        pattern: a regular expression searched in the parameter name.
        roles: one role, or one role per segment for a fused weight (segments of equal size).
    """

    family: str
    pattern: str
    roles: tuple[str, ...]
    fused_modules: tuple[str, ...] = ()
    """For a fused weight (several roles): the owner-module classes whose layout is known to be
    ``roles`` in contiguous equal parts. A weight held by any other module (or whose module is unknown
    and whose shape does not show the layout) is kept whole and flagged, never split on its name."""
    plain_model_only: bool = False
    """For a fused weight: ``nn.Linear`` owners count only in models without a Hugging Face
    ``config.model_type`` (nanoGPT-style code); a Hugging Face model with this name (e.g. GPT-BigCode's
    ``c_attn``) may interleave heads or have unequal parts."""
    layout: str = "contiguous"
    """``contiguous``: the roles are equal consecutive parts of the weight along its output axis.
    ``experts``: a 3-D ``(experts, rows, cols)`` stack of expert matrices, each ``nn.Linear``-shaped and
    holding ``roles`` in equal consecutive row ranges (one block per expert and role)."""
    segment_names: tuple[str, ...] = ()
    """Names of the segments of one expert (default: the roles' short names)."""


PRESET_RULES: tuple[PresetRule, ...] = (
    # HF GPT-2 (Conv1D, weight is (in, out)) and nanoGPT (nn.Linear, weight is (out, in)).
    PresetRule("gpt2", r"(^|\.)(wte|wpe)\.weight$", ("embedding",)),
    PresetRule(
        "gpt2",
        r"(^|\.)attn\.c_attn\.weight$",
        ("query", "key", "value"),
        fused_modules=("Conv1D", "Linear"),
        plain_model_only=True,
    ),
    PresetRule("gpt2", r"(^|\.)attn\.c_proj\.weight$", ("attn_out",)),
    PresetRule("gpt2", r"(^|\.)mlp\.c_(fc|proj)\.weight$", ("mlp",)),
    # Llama, Mistral, Qwen2 and their relatives.
    PresetRule("llama", r"(^|\.)embed_tokens\.weight$", ("embedding",)),
    PresetRule("llama", r"(^|\.)q_proj\.weight$", ("query",)),
    PresetRule("llama", r"(^|\.)k_proj\.weight$", ("key",)),
    PresetRule("llama", r"(^|\.)v_proj\.weight$", ("value",)),
    PresetRule("llama", r"(^|\.)o_proj\.weight$", ("attn_out",)),
    PresetRule("llama", r"(^|\.)(gate|up|down)_proj\.weight$", ("mlp",)),
    PresetRule("llama", r"(^|\.)lm_head\.weight$", ("output",)),
    # Phi, GPT-J, OPT (their q/k/v_proj, embed_tokens, wte and lm_head are matched above or below).
    PresetRule("phi", r"(^|\.)self_attn\.dense\.weight$", ("attn_out",)),
    PresetRule("gptj-opt", r"(^|\.)(attn|self_attn)\.out_proj\.weight$", ("attn_out",)),
    PresetRule("phi-gptj-opt", r"(^|\.)(fc1|fc2|fc_in|fc_out)\.weight$", ("mlp",)),
    PresetRule("opt", r"(^|\.)embed_positions\.weight$", ("embedding",)),
    # GPT-NeoX / Pythia, BLOOM, Falcon: embeddings, attention output and MLP by name. Their fused
    # query_key_value interleaves heads (NeoX, BLOOM) or has unequal parts (Falcon): no layout is declared
    # for it yet, so it is kept whole (full momentum), and the warning says so.
    PresetRule("neox-bloom-falcon", r"(^|\.)(embed_in|word_embeddings)\.weight$", ("embedding",)),
    PresetRule("neox", r"(^|\.)embed_out\.weight$", ("output",)),
    PresetRule("neox-bloom-falcon", r"(^|\.)(attention|self_attention)\.dense\.weight$", ("attn_out",)),
    PresetRule("neox-bloom-falcon", r"(^|\.)dense_(h_to_4h|4h_to_h)\.weight$", ("mlp",)),
    PresetRule("neox-bloom-falcon", r"(^|\.)(attention|self_attention)\.query_key_value\.weight$",
               ("query", "key", "value")),
    # T5 (encoder-decoder): shared embedding, self- and cross-attention, the feed-forward.
    PresetRule("t5", r"(^|\.)shared\.weight$", ("embedding",)),
    PresetRule("t5", r"(^|\.)(SelfAttention|EncDecAttention)\.q\.weight$", ("query",)),
    PresetRule("t5", r"(^|\.)(SelfAttention|EncDecAttention)\.k\.weight$", ("key",)),
    PresetRule("t5", r"(^|\.)(SelfAttention|EncDecAttention)\.v\.weight$", ("value",)),
    PresetRule("t5", r"(^|\.)(SelfAttention|EncDecAttention)\.o\.weight$", ("attn_out",)),
    PresetRule("t5", r"(^|\.)relative_attention_bias\.weight$", ("embedding",)),
    PresetRule("t5", r"(^|\.)DenseReluDense\.(wi|wi_0|wi_1|wo)\.weight$", ("mlp",)),
    # Mixture-of-experts expert stacks: (experts, 2 * intermediate, hidden) with gate rows then up rows,
    # and (experts, hidden, intermediate), in the module classes whose forward does exactly that.
    PresetRule("moe", r"(^|\.)experts\.gate_up_proj$", ("mlp", "mlp"), fused_modules=("MixtralExperts",
               "Qwen2MoeExperts", "Qwen3MoeExperts", "OlmoeExperts"), layout="experts", segment_names=("gate", "up")),
    PresetRule("moe", r"(^|\.)experts\.down_proj$", ("mlp",), fused_modules=("MixtralExperts", "Qwen2MoeExperts",
               "Qwen3MoeExperts", "OlmoeExperts"), layout="experts"),
    # Mixture-of-experts routers (Mixtral, Qwen2-MoE and Qwen3-MoE's mlp.gate, a shared expert's gate).
    PresetRule("moe", r"(^|\.)mlp\.gate\.weight$", ("router",)),
    PresetRule("moe", r"(^|\.)shared_expert_gate\.weight$", ("router",)),
    # BERT-style encoders (BERT, RoBERTa, ...). attention.output must come before output.
    PresetRule("bert", r"(^|\.)embeddings\.(word|position|token_type)_embeddings\.weight$", ("embedding",)),
    PresetRule("bert", r"(^|\.)attention\.self\.query\.weight$", ("query",)),
    PresetRule("bert", r"(^|\.)attention\.self\.key\.weight$", ("key",)),
    PresetRule("bert", r"(^|\.)attention\.self\.value\.weight$", ("value",)),
    PresetRule("bert", r"(^|\.)attention\.output\.dense\.weight$", ("attn_out",)),
    PresetRule("bert", r"(^|\.)(intermediate|output)\.dense\.weight$", ("mlp",)),
    PresetRule("bert", r"(^|\.)(predictions\.transform|pooler)\.dense\.weight$", ("mlp",)),
)

SEGMENT_NAMES: dict[str, str] = {"query": "Q", "key": "K", "value": "V"}
"""Short names of fused segments, as they appear in names such as ``h.0.attn.c_attn.weight[V]``."""

CONV1D_CLASS_NAMES = ("Conv1D",)
"""Module classes that store weights as (in, out), as HF GPT-2's ``Conv1D`` does."""

FUSED_QKV_PATTERN = r"(^|\.)attn\.c_attn\.weight$"
"""Used, when only names are known, to tell HF GPT-2's (in, 3*in) layout from nanoGPT's (3*in, in)."""

HEAD_COUNT_KEYS = ("num_attention_heads", "n_head", "n_heads")
KV_HEAD_COUNT_KEYS = ("num_key_value_heads", "n_kv_heads", "n_query_groups")
HIDDEN_SIZE_KEYS = ("hidden_size", "n_embd", "dim", "d_model")
