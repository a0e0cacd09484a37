"""Partition presets: every model-specific parameter name in adapm lives in this module.

A preset rule maps a parameter name (regular expression, searched) to a *role*; a fused weight maps
to a tuple of roles, one per equal segment. Roles then map to the paper's momentum split (Table 1)
and to Adam-mini's second-moment blocks. First match wins; 1-D parameters (norms, biases) are
recognised by shape before any rule is tried.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

ROLES = ("embedding", "output", "query", "key", "value", "attn_out", "mlp", "router", "adapter", "vector", "other")
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
    "adapter": "full",
    "vector": "full",
    "other": "full",
}
"""The paper's momentum policy per role (its Table 1); ``router`` is a mixture-of-experts router or
another small matrix (full momentum costs little there); ``adapter`` a PEFT adapter's tensor (LoRA's factors, and
those of PEFT's other tuners: :data:`PEFT_ADAPTER_CONTAINERS`), which keeps AdamW's state whole, its second moment
included: the paper's split is for the weights themselves, and an adapter's state is small; ``other`` is an
unrecognised matrix."""

PEFT_WHOLE_MODULES = ("modules_to_save", "ln_tuning_layers")
"""Where PEFT keeps the trained copy of a module it trains whole (``lm_head.modules_to_save.default.weight``; LN
tuning's ``input_layernorm.ln_tuning_layers.default.weight``): a module, partitioned as the module itself."""

PEFT_WRAPPER_SEGMENTS = r"\.(base_layer|(" + "|".join(PEFT_WHOLE_MODULES) + r")\.[^.]+)(?=\.)"
"""What PEFT inserts into a wrapped module's parameter names: ``q_proj.base_layer.weight`` (the weight under a LoRA
layer) and the copies of :data:`PEFT_WHOLE_MODULES`. Preset patterns are searched in the name without them, so a
module PEFT wraps keeps its role."""

PEFT_ADAPTER_CONTAINERS = "adapter_layer_names"
"""The attribute by which each PEFT tuner layer names the containers of its own trained tensors (LoRA's ``lora_A``,
``lora_B``...; LoHa's ``hada_w1_a``...; IA3's ``ia3_l``; DoRA adds ``lora_magnitude_vector``): a parameter in one of
them is an adapter, of any shape, in any of PEFT's tuners (except :data:`PEFT_WHOLE_MODULES`)."""

PEFT_PROMPT_MODULES = (
    "peft.tuners.prompt_tuning.model.PromptEmbedding",
    "peft.tuners.multitask_prompt_tuning.model.MultitaskPromptEmbedding",
    "peft.tuners.p_tuning.model.PromptEncoder",
    "peft.tuners.prefix_tuning.model.PrefixEncoder",
    "peft.tuners.cpt.model.CPTEmbedding",
    "peft.tuners.adaption_prompt.layer.AdaptedAttention",
    "peft.tuners.adaption_prompt.layer.AdaptedAttentionGPT",
)
"""PEFT's prompt learning (prompt, prefix and P-tuning, CPT, LLaMA-Adapter's adaption prompts): modules of its own,
not tuner layers, whose matrices are adapters (named with their module: SAM has a ``prompt_encoder`` too)."""


def plain_name(name: str) -> str:
    """``name`` without PEFT's wrapper segments (:data:`PEFT_WRAPPER_SEGMENTS`), as preset patterns read it."""
    if "base_layer" not in name and not any(whole in name for whole in PEFT_WHOLE_MODULES):
        return name  # the usual case, without the regular expression
    return re.sub(PEFT_WRAPPER_SEGMENTS, "", name)


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
    """How a fused weight holds its roles (see :func:`fused_parts` for the config-dependent ones):
    ``contiguous``: equal consecutive parts along its output axis. ``experts``: a 3-D ``(experts, rows,
    cols)`` stack of ``nn.Linear``-shaped expert matrices, each holding ``roles`` in equal consecutive
    row ranges. ``qkv_heads``: query, key and value interleaved per head (``[q_h, k_h, v_h]`` for each head
    h). ``qkv_sizes``: query, key and value in consecutive parts of their own sizes (grouped-query
    attention). ``falcon``: Falcon's three layouts, chosen by its config. ``bigcode``: GPT-BigCode's two. ``codegen``:
    CodeGen's four ``[q | v | k]`` blocks. ``mla_kv_a``, ``mla_kv_b``, ``mla_q_gate``: multi-head latent
    attention's (see :data:`MLA_MODEL_TYPES`). ``linear_qkv``, ``linear_qkvz``: Gated DeltaNet's (see
    :data:`GATED_DELTANET_MODEL_TYPES`). ``q_gate_heads``: a query and an output gate per head. ``mamba2``: a
    Mamba-2 mixer's ``[z | x | B | C | dt]`` (see :data:`MAMBA2_MIXERS`). ``rows_xz``: Zamba's x and z rows,
    alternating (see :data:`ZAMBA_MIXERS`)."""
    segment_names: tuple[str, ...] = ()
    """Names of the segments of one expert (default: the roles' short names)."""
    split_axis: int = 0
    """For ``experts``: the axis of each expert matrix that is its output and holds the roles: 0 for
    ``nn.Linear``-shaped ``(out, in)`` experts, 1 for ``(in, out)`` experts used as ``x @ W``."""
    in_out: bool = False
    """The matrix is stored ``(in, out)`` and used as ``x @ W`` (a bare parameter, e.g. Gemma 3's projector), so its
    output neurons (its blocks, and a fused weight's segments) run along its columns, as in Conv1D's layout."""
    interleaved: bool = False
    """For ``experts``: the roles alternate along ``split_axis`` (``gate, up, gate, up, ...``) instead of
    filling consecutive halves."""
    model_types: tuple[str, ...] = ()
    """If given, the rule applies only to models whose ``config.model_type`` is one of these."""
    head_size: tuple[str, ...] = ()
    """Config attributes whose sum is this weight's attention head size (the per-head second-moment
    blocks of its query and key parts), where that is not the model's ``head_dim``; ``"a|b"`` reads the first of
    ``a`` and ``b`` that the config has (families that name one size differently)."""
    per_neuron: bool = False
    """A query or key matrix whose output is not split into heads (a latent projection): per-output-
    neuron second-moment blocks instead of per-head ones."""
    within: tuple[str, ...] = ()
    """If given, the rule applies only to parameters inside a module of one of these classes: where a model
    has two kinds of block whose parameters share names (Kimi Linear's linear and latent attention), or where the
    model has no ``config.model_type`` to tell its family by (LitGPT's). A class is named alone or with its module
    (``litgpt.model.CausalSelfAttention``), the latter where other code uses the same class name."""


MLA_MODEL_TYPES = ("deepseek_v2", "deepseek_v3", "deepseek_v32", "glm4_moe_lite", "glm_moe_dsa", "minicpm3", "youtu",
                   "axk1", "kimi_linear", "axk2", "dots3_note_text", "hy_v4", "longcat_flash", "bailing_hybrid",
                   "mistral4", "mistral_large4_text", "glm5_next_text")
"""Models with DeepSeek-V2's multi-head latent attention, as their modeling code computes it: ``q_a_proj`` then
``q_b_proj`` (or ``q_proj``) give each head's ``[nope | rope]`` query; ``kv_a_proj_with_mqa`` gives the
key-value latent then the one rotary key shared by all heads; ``kv_b_proj`` maps the latent to each
head's ``[key nope | value]``. A.X K2 fuses each head's query with a gate of its output (``q_gate_proj``, from
``q_a_proj``'s output normed and raw); Dots3 and LongCat-Flash scale the latents; LongCat-Flash has two attention
blocks per layer; Dots3's sliding-window layers have sizes of their own; Ling's hybrid gates each head's output
(``g_proj``). Every model type here is proven on its own forward in the tests."""

DSA_MODEL_TYPES = ("deepseek_v32", "glm_moe_dsa", "axk2", "dots3_note_text", "hy_v4", "mistral_large4_text",
                   "glm5_next_text")
"""Of those, the models with DeepSeek-V3.2's sparse-attention indexer (``indexer.wq_b``, ``indexer.wk``,
``indexer.weights_proj``; it picks the keys each query attends to, and is trained by its own loss)."""


GATED_DELTANET_MODEL_TYPES = ("qwen3_next", "qwen3_5", "qwen3_5_text", "qwen3_5_moe", "qwen3_5_moe_text", "olmo_hybrid")
"""Models with Gated DeltaNet linear-attention layers (``linear_attn``), as their modeling code computes them:
per-head queries and keys of ``linear_key_head_dim``, values, an output gate (``z``, OLMo Hybrid's
``g_proj``), per-head decay and beta inputs (``a``, ``b``) and a depthwise convolution over q, k and v.
Qwen3-Next fuses them per key head as ``[q | k | v | z]`` (``in_proj_qkvz``) and ``[b | a]``; Qwen3.5 as
``[q | k | v]``; OLMo Hybrid keeps them apart. Every model type here is proven on its own forward in the tests."""

KDA_MODULES = ("KimiLinearDeltaAttention", "BailingHybridDeltaAttention", "Glm5NextTextLinearAttention")
"""Kimi Delta Attention (the linear-attention layers of Kimi Linear and of Ling's hybrid, named ``self_attn`` like
their latent-attention layers): per-head queries and keys of ``linear_head_dim``, values, an output gate and a
per-channel forget gate (Kimi Linear's low-rank: ``g_a_proj`` and ``g_b_proj``, ``forget_gate.f_a_proj`` and
``f_b_proj``; Ling's full-size: ``g_proj``, ``forget_gate.f_proj``), a per-head beta (``b_proj``) and a depthwise
convolution over q, k and v. Proven on each model's own forward in the tests."""

KDA_MODEL_TYPES = ("kimi_linear", "bailing_hybrid", "glm5_next_text")
"""The model types with Kimi Delta Attention layers."""

GATED_ATTENTION_MODEL_TYPES = ("qwen3_next", "qwen3_5", "qwen3_5_text", "qwen3_5_moe", "qwen3_5_moe_text")
"""Models whose full-attention ``q_proj`` holds each head's query then its output gate (``[q_h | gate_h]``),
the gate multiplying that head's attention output."""


MAMBA2_MIXERS = ("Mamba2Mixer", "BambaMixer", "FalconH1Mixer", "GraniteMoeHybridMambaLayer", "NemotronHMamba2Mixer",
                 "Zamba2MambaMixer")
"""Mamba-2 (state-space) mixers, as their modeling code computes them: ``in_proj`` gives ``[z | x | B | C | dt]``,
the output gate ``z`` and the input ``x`` of ``intermediate`` (heads x head size) rows each, ``B`` and ``C`` of
``groups x state size`` rows each, and one time step per head; a depthwise convolution runs over ``x``, ``B``
and ``C``; ``out_proj`` maps the gated scan back. Every one is proven on its own forward in the tests."""

MAMBA2_MODEL_TYPES = ("mamba2", "bamba", "falcon_h1", "granitemoehybrid", "nemotron_h", "zamba2")
"""The model types with those mixers (Mamba-2 alone, and the hybrids that interleave it with attention)."""

MAMBA_MIXERS = ("MambaMixer", "FalconMambaMixer", "JambaMambaMixer")
"""Mamba (version 1) mixers: ``in_proj`` gives ``[x | z]``; ``x_proj`` maps the convolved ``x`` to the time-step
rank, ``B`` and ``C``; ``dt_proj`` maps the time-step rank to one step per channel; ``A_log`` is a
``(intermediate, state)`` parameter used as it is. Every one is proven on its own forward in the tests."""

MAMBA_MODEL_TYPES = ("mamba", "falcon_mamba", "jamba")
"""The model types with those mixers."""

ZAMBA_MIXERS = ("ZambaMambaMixer",)
"""Zamba's (version 1) Mamba mixers: Mamba's parts, with ``in_proj``'s x and z alternating row by row, and ``x_proj``,
``dt_proj`` (3-D) and their bias, ``A_log`` and ``D`` held per head. Proven on the model's own forward in the tests."""

GRIFFIN_BLOCKS = ("RecurrentGemmaRecurrentBlock",)
"""RecurrentGemma's recurrent blocks (Griffin's): ``linear_y`` through a GeLU gates the output of the recurrence,
which runs ``linear_x`` through a depthwise convolution and the RG-LRU (whose input and recurrence gates are
block-diagonal per head); ``linear_out`` maps it back. Proven on the model's own forward in the tests."""

SHORT_CONV_MODULES = ("Lfm2ShortConv", "Lfm2MoeShortConv", "Lfm3ShortConv", "Lfm3VlVisionShortConv")
"""LFM2's and LFM3's gated short convolutions (and LFM3-VL's vision tower's, over the patch grid), as their modeling
code computes them: ``in_proj`` gives ``[B | C | x]`` of the hidden size each; a depthwise convolution (``conv``; the
tower's 2-D ``spatial_conv``) runs over ``B * x``, ``C`` gates its output channel by channel, and ``out_proj`` maps it
back. Proven on each model's own forward in the tests."""

MODERNBERT_MODEL_TYPES = ("modernbert", "modernbert-decoder")
"""ModernBERT and its decoder (their matrices are named ``Wqkv``, ``Wo``, ``Wi``)."""

MIXTRAL_STYLE_EXPERTS = ("MixtralExperts", "Qwen2MoeExperts", "Qwen3MoeExperts", "OlmoeExperts", "DeepseekV2Experts",
                         "DeepseekV3Experts", "DeepseekV32Experts", "Glm4MoeLiteExperts", "GlmMoeDsaExperts",
                         "AXK1Experts", "AXK2Experts", "AfmoeExperts", "BailingHybridExperts", "Cohere2MoeExperts",
                         "Ernie4_5_MoeExperts", "ExaoneMoeExperts", "FlexOlmoExperts",
                         "FlintExperts", "Glm4MoeExperts", "GraniteMoeExperts", "GraniteMoeSWAExperts",
                         "GraniteMoeHybridExperts", "GraniteMoeSharedExperts", "HYV3Experts", "InklingExperts",
                         "JambaExperts", "KimiLinearExperts", "Kolibri1Experts", "LagunaExperts", "MellumExperts",
                         "MiMoV2FlashExperts", "MiniMaxExperts", "MiniMaxM2Experts", "PhimoeExperts",
                         "Qwen3_5MoeExperts", "Qwen3NextExperts", "SolarOpenExperts", "ZayaExperts",
                         "DeepseekV4Experts", "HYV4Experts", "BeamExperts", "MiniMaxM3VLExperts", "Inkling2Experts",
                         "Dots3NoteExperts", "LongcatFlashExperts", "Lfm2MoeExperts", "HunYuanMoEV1Experts",
                         "Dots1Experts", "Qwen3VLMoeTextExperts", "Qwen3OmniMoeThinkerTextExperts",
                         "Glm4vMoeTextExperts", "Ernie4_5_VLMoeMoeExperts", "Mistral4Experts",
                         "MistralLarge4TextExperts", "MuseSparkExperts", "Step3p7Experts", "UnlimitedOcrTextExperts",
                         "Glm5NextTextExperts")
"""Expert modules holding ``(experts, 2 * intermediate, hidden)`` gate rows then up rows and ``(experts, hidden,
intermediate)`` down matrices, each used as ``nn.Linear`` weights, whatever gated activation they apply to
the two halves (SwiGLU, or a clamped one as in DeepSeek-V4); every one is proven in the tests. (LongCat-Flash's
``gate_up_proj`` also holds slots for its identity experts, which compute nothing: they get no gradient.)"""

IN_OUT_EXPERTS = ("Llama4TextExperts", "AriaExperts")
"""Expert modules holding ``(experts, hidden, 2 * intermediate)`` gate columns then up columns and ``(experts,
intermediate, hidden)`` down matrices, used as ``x @ W`` (Llama 4, Aria; proven in the tests)."""

INKLING_MODEL_TYPES = ("inkling_text", "inkling2_text")
"""Inkling and Inkling 2 (their sliding-window layers sized by the config's ``swa_*`` fields)."""

QWEN_VL_VISION_ATTENTION = ("VisionAttention", "Qwen2_5_VLVisionAttention", "Qwen3VLVisionAttention",
                            "Qwen3VLMoeVisionAttention", "Qwen3_5VisionAttention", "Qwen3_5MoeVisionAttention",
                            "Qwen3OmniMoeVisionAttention", "Qwen2_5OmniVisionAttention", "Glm4vVisionAttention",
                            "Glm4vMoeVisionAttention", "GlmOcrVisionAttention", "Ernie4_5_VLMoeVisionAttention",
                            "Kimi_K25VisionAttention", "MuseGlimmerVisionAttention", "MuseSparkVisionAttention",
                            "Glm5NextVisionAttention")
"""The vision towers' attention of Qwen2-VL (its class is plainly ``VisionAttention``), Qwen2.5-VL, Qwen3-VL(-MoE),
Qwen3.5(-MoE), Qwen2.5-Omni and Qwen3-Omni, GLM-4.1V, GLM-4.5V, GLM-OCR and ERNIE-4.5-VL: ``qkv`` gives ``[q | k | v]``
(Qwen2.5-Omni's separate ``q``, ``k``, ``v``; Kimi K2.5's, MuSE Glimmer's and MuSE Spark's ``q_proj``, ``k_proj``,
``v_proj``), each of ``num_heads`` heads of the module's ``head_dim``; proven on their own forward in the tests."""

SAM_VISION_ATTENTION = ("SamVisionAttention", "SamVisionSdpaAttention", "SamHQVisionAttention",
                        "SamHQVisionSdpaAttention", "GotOcr2VisionAttention", "PPFormulaNetVisionAttention",
                        "UnlimitedOcrSamVisionAttention", "UnlimitedOcrSamVisionSdpaAttention",
                        "DeepseekOcr2SamVisionAttention", "DeepseekOcr2SamVisionSdpaAttention")
"""The attention of SAM's ViT image encoder and the towers built on it (GOT-OCR 2.0 and PP-Chart2Table,
PP-FormulaNet, DeepSeek-VL's high-resolution tower, Unlimited-OCR, DeepSeek-OCR 2): ``qkv`` gives ``[q | k | v]``, each
of ``num_attention_heads`` heads of ``hidden_size / num_attention_heads``, with relative position tables ``rel_pos_h``
and ``rel_pos_w`` (proven on GOT-OCR 2.0's and SAM's own forward in the tests)."""

BLIP_VISION_ATTENTION = ("BlipAttention", "Blip2Attention", "InstructBlipAttention", "InstructBlipVideoAttention")
"""The vision towers' attention of BLIP, BLIP-2, InstructBLIP and InstructBLIP-Video: ``qkv`` gives ``[q | k | v]``,
each of ``num_heads`` heads of the module's ``head_dim`` (proven on BLIP-2's own forward in the tests)."""

SIGLIP_POOLING_HEADS = ("SiglipMultiheadAttentionPoolingHead", "Siglip2MultiheadAttentionPoolingHead",
                        "Phi4MultimodalVisionMultiheadAttentionPoolingHead")
"""SigLIP's (and SigLIP 2's, Phi-4-multimodal's) attention-pooling head: a learned query ``probe`` attending over the
tower's output with torch's ``nn.MultiheadAttention`` (``in_proj_weight`` is ``[q | k | v]``, proven in the tests)."""

PIX2STRUCT_MODEL_TYPES = ("pix2struct_vision_model", "pix2struct_text_model", "kosmos_2_5_vision_model")
"""Pix2Struct's image encoder and text decoder, and Kosmos-2.5's image encoder, built as Pix2Struct's (each part is
read with its own config)."""

XLM_MODEL_TYPES = ("xlm", "flaubert", "distilbert")
"""Models with XLM's attention and MLP names (``q_lin``, ``k_lin``, ``v_lin``, ``out_lin``, ``lin1``, ``lin2``)."""

PROPHETNET_ATTENTION = ("ProphetNetAttention", "ProphetNetNgramSelfAttention")
"""ProphetNet's attention modules (the encoder's and the cross-attention, and the decoder's n-gram self-attention)."""

WHISPER_STYLE_AUDIO = ("whisper", "qwen2_audio_encoder", "qwen2_5_omni_audio_encoder", "qwen3_omni_moe_audio_encoder",
                       "voxtral_encoder", "audioflamingo3_encoder", "glmasr_encoder", "moss_transcribe_diarize_audio")
"""Whisper-style audio encoders (Whisper's, and the audio towers of Qwen2-Audio, Qwen2.5-Omni, Qwen3-Omni, Voxtral,
Audio Flamingo 3, GLM-ASR and MOSS): convolutions over the mel spectrogram, transformer layers with Whisper's names,
and in some a projection out of the encoder."""

FLORENCE2_ATTENTION = ("Florence2VisionWindowAttention", "Florence2VisionChannelAttention")
"""Florence-2's DaViT vision tower: windowed attention over patches (``num_heads`` heads) and channel attention, where
each group of channels attends over the others of its group (its ``groups`` are its heads: the query's rows of one
group are the channels that group's attention reads with). Both compute ``[q | k | v]`` from one ``qkv``."""

JETMOE_EXPERTS = ("JetMoeParallelExperts",)
"""JetMoE's expert stacks: ``weight`` of ``(experts, out, in)``, expert i applied as ``F.linear(x, weight[i])`` to the
tokens routed to it (proven on the model's own forward in the tests)."""

LITGPT_ATTENTION = ("litgpt.model.CausalSelfAttention",)
LITGPT_LATENT_ATTENTION = ("litgpt.model.MultiheadLatentAttention",)
LITGPT_MLPS = ("litgpt.model.GptNeoxMLP", "litgpt.model.LLaMAMLP", "litgpt.model.GemmaMLP")
LITGPT_MOE = ("litgpt.model.LLaMAMoE",)
"""LitGPT's modules (``litgpt.model``), named with their module: nanoGPT-style code has a ``CausalSelfAttention``
too, with a layout of its own. Every one is proven on LitGPT's own forward in the tests."""

PRESET_RULES: tuple[PresetRule, ...] = (
    # PEFT: the rows of the tokens ``trainable_token_indices`` trains are an embedding's rows; LoRA's factors
    # (``lora_A``, ``lora_B``; an embedding's ``lora_embedding_A``, ``_B``; AdaLoRA's ``lora_E``), one per adapter name,
    # are adapters, by name where only names are known (the model's tuner layers say it of every tuner's tensors).
    PresetRule("peft", r"(^|\.)token_adapter\.trainable_tokens_delta\.[^.]+$", ("embedding",)),
    PresetRule("peft", r"(^|\.)lora_(A|B|E|embedding_A|embedding_B)\.[^.]+(\.weight)?$", ("adapter",)),
    PresetRule("peft", r"(^|\.)(prompt_encoder\.[^.]+\..*|adaption_prompt)$", ("adapter",), within=PEFT_PROMPT_MODULES),
    # GPT-BigCode: nn.Linear c_attn, per-head [q, k, v] (multi-head) or [q | k | v] with one K/V head.
    PresetRule("gpt_bigcode", r"(^|\.)attn\.c_attn\.weight$", ("query", "key", "value"), ("Linear",),
               layout="bigcode", model_types=("gpt_bigcode",)),
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
    # LitGPT (``litgpt.GPT``, one class for every family it ships): ``qkv`` is ``[q | k | v]`` with ``n_head`` query
    # heads and ``n_query_groups`` key and value heads of ``head_size`` each; ``proj`` the attention output; its MLPs'
    # ``fc`` (GPT-NeoX's), ``fc_1`` (the gate), ``fc_2`` and ``proj``, also as each expert of a mixture; the expert
    # router ``mlp.gate``; and DeepSeek-V3's latent attention, laid out as Hugging Face's (see MLA_MODEL_TYPES).
    PresetRule("litgpt", r"(^|\.)attn\.qkv\.weight$", ("query", "key", "value"), ("Linear",), plain_model_only=True,
               layout="qkv_sizes", head_size=("head_size",), within=LITGPT_ATTENTION),
    PresetRule("litgpt", r"(^|\.)attn\.proj\.weight$", ("attn_out",),
               within=LITGPT_ATTENTION + LITGPT_LATENT_ATTENTION),
    PresetRule("litgpt", r"(^|\.)(fc|fc_1|fc_2|proj)\.weight$", ("mlp",), within=LITGPT_MLPS),
    PresetRule("litgpt", r"(^|\.)mlp\.gate\.weight$", ("router",), within=LITGPT_MOE),
    PresetRule("litgpt", r"(^|\.)attn\.q_a_proj\.weight$", ("query",), per_neuron=True,
               within=LITGPT_LATENT_ATTENTION),
    PresetRule("litgpt", r"(^|\.)attn\.q_b_proj\.weight$", ("query",),
               head_size=("qk_nope_head_dim", "qk_rope_head_dim"), within=LITGPT_LATENT_ATTENTION),
    PresetRule("litgpt", r"(^|\.)attn\.kv_a_proj_with_mqa\.weight$", ("value", "key"), ("Linear",),
               plain_model_only=True, layout="mla_kv_a", head_size=("qk_rope_head_dim",),
               within=LITGPT_LATENT_ATTENTION),
    PresetRule("litgpt", r"(^|\.)attn\.kv_b_proj\.weight$", ("key", "value"), ("Linear",), plain_model_only=True,
               layout="mla_kv_b", head_size=("qk_nope_head_dim",), within=LITGPT_LATENT_ATTENTION),
    # Kimi Delta Attention, before the latent attention rules its q_proj would otherwise match: roles as Gated
    # DeltaNet's (the output gate an MLP gate; beta, the convolution and a low-rank forget gate tiny: full momentum;
    # a full-size forget gate, as large as the query, is read as a gate is, like the output gate).
    PresetRule("kda", r"(^|\.)self_attn\.q_proj\.weight$", ("query",), head_size=("linear_head_dim",),
               model_types=KDA_MODEL_TYPES, within=KDA_MODULES),
    PresetRule("kda", r"(^|\.)self_attn\.k_proj\.weight$", ("key",), head_size=("linear_head_dim",),
               model_types=KDA_MODEL_TYPES, within=KDA_MODULES),
    PresetRule("kda", r"(^|\.)self_attn\.(g_a_proj|g_b_proj|g_proj|forget_gate\.f_proj)\.weight$", ("mlp",),
               model_types=KDA_MODEL_TYPES, within=KDA_MODULES),
    PresetRule("kda", r"(^|\.)self_attn\.(b_proj|conv1d|forget_gate\.f_a_proj|forget_gate\.f_b_proj)\.weight$",
               ("router",), model_types=KDA_MODEL_TYPES, within=KDA_MODULES),
    PresetRule("kda", r"(^|\.)forget_gate\.A_log$", ("vector",), model_types=KDA_MODEL_TYPES, within=KDA_MODULES),
    # Multi-head latent attention (DeepSeek-V2/V3 and the models that share it). The latent feeds both
    # keys and values: it gets a value's full momentum; the query's down-projection has no heads.
    PresetRule("mla", r"(^|\.)q_a_proj\.weight$", ("query",), per_neuron=True, model_types=MLA_MODEL_TYPES),
    PresetRule("mla", r"(^|\.)(q_b_proj|q_proj)\.weight$", ("query",),
               head_size=("qk_nope_head_dim", "qk_rope_head_dim"), model_types=MLA_MODEL_TYPES),
    PresetRule("mla", r"(^|\.)kv_a_proj_with_mqa\.weight$", ("value", "key"), ("Linear",), layout="mla_kv_a",
               head_size=("qk_rope_head_dim",), model_types=MLA_MODEL_TYPES),
    PresetRule("mla", r"(^|\.)kv_b_proj\.weight$", ("key", "value"), ("Linear",), layout="mla_kv_b",
               head_size=("qk_nope_head_dim",), model_types=MLA_MODEL_TYPES),
    # DeepSeek-V3.2's sparse-attention indexer: its own per-head queries, one key head, per-head weights.
    PresetRule("dsa", r"(^|\.)indexer\.wq_b\.weight$", ("query",), head_size=("index_head_dim",),
               model_types=DSA_MODEL_TYPES),
    PresetRule("dsa", r"(^|\.)indexer\.wk\.weight$", ("key",), head_size=("index_head_dim",),
               model_types=DSA_MODEL_TYPES),
    PresetRule("dsa", r"(^|\.)indexer\.weights_proj\.weight$", ("router",), model_types=DSA_MODEL_TYPES),
    # GLM-5-Next's indexer scores pools of keys: a softmax gate weighs the keys of a pool (an MLP-like gate, as
    # DeepSeek-V4's compressors'), plus a learned bias per position in the pool (a vector).
    PresetRule("dsa", r"(^|\.)indexer\.index_kpool_compress_gate$", ("mlp",), model_types=("glm5_next_text",)),
    PresetRule("dsa", r"(^|\.)indexer\.index_kpool_compress_ape$", ("vector",), model_types=("glm5_next_text",)),
    # A.X K2: each head's query, then the sigmoid gate of that head's output (an MLP-like gate).
    PresetRule("mla", r"(^|\.)self_attn\.q_gate_proj\.weight$", ("query", "mlp"), ("Linear",), layout="mla_q_gate",
               head_size=("qk_nope_head_dim", "qk_rope_head_dim"), model_types=("axk2",)),
    # A sigmoid or softplus gate of each head's attention output (Dots3, LFM3, Laguna, Ling's hybrid, Step 3.7's
    # language model; one value per head or per channel), read as an MLP gate is.
    PresetRule("output-gate", r"(^|\.)self_attn\.g_proj\.weight$", ("mlp",),
               model_types=("dots3_note_text", "lfm3", "laguna", "bailing_hybrid", "step3p5")),
    # DeepSeek-V4's attention: a query latent and per-head queries; one head read as both key and value (as a latent
    # attention's key-value latent: a value's full momentum); a grouped low-rank output projection in two matrices.
    # Its compressors pool windows of tokens into more key-value entries, weighted by a softmax gate (an MLP-like
    # gate) plus a learned position bias; the sparse-attention indexer's compressor makes its keys.
    PresetRule("deepseek-v4", r"(^|\.)self_attn\.q_a_proj\.weight$", ("query",), per_neuron=True,
               model_types=("deepseek_v4",)),
    PresetRule("deepseek-v4", r"(^|\.)self_attn\.q_b_proj\.weight$", ("query",), model_types=("deepseek_v4",)),
    PresetRule("deepseek-v4", r"(^|\.)self_attn\.(kv_proj|compressor\.kv_proj)\.weight$", ("value",),
               model_types=("deepseek_v4",)),
    PresetRule("deepseek-v4", r"(^|\.)self_attn\.(o_a_proj|o_b_proj)\.weight$", ("attn_out",),
               model_types=("deepseek_v4",)),
    PresetRule("deepseek-v4", r"(^|\.)(compressor|indexer)\.gate_proj\.weight$", ("mlp",),
               model_types=("deepseek_v4",)),
    PresetRule("deepseek-v4", r"(^|\.)(compressor|indexer)\.position_bias$", ("vector",),
               model_types=("deepseek_v4",)),
    PresetRule("deepseek-v4", r"(^|\.)indexer\.q_b_proj\.weight$", ("query",), head_size=("index_head_dim",),
               model_types=("deepseek_v4",)),
    PresetRule("deepseek-v4", r"(^|\.)indexer\.kv_proj\.weight$", ("key",), head_size=("index_head_dim",),
               model_types=("deepseek_v4",)),
    PresetRule("deepseek-v4", r"(^|\.)indexer\.scorer\.weights_proj\.weight$", ("router",),
               model_types=("deepseek_v4",)),
    # Hyper-connections (DeepSeek-V4, HY-V4): tiny matrices mixing the residual streams, full momentum.
    PresetRule("hyper-connections", r"(^|\.)(attn_hc\.fn|ffn_hc\.fn|hc_head\.hc_fn)$", ("router",),
               model_types=("deepseek_v4", "hy_v4", "glm5_next_text")),
    # Gated DeltaNet linear attention: queries and keys per head of linear_key_head_dim, values, the output
    # gate (a gate like an MLP's: low-rank momentum), and tiny matrices (the per-head decay and beta inputs,
    # the depthwise convolution kernels): full momentum.
    PresetRule("gated-deltanet", r"(^|\.)linear_attn\.in_proj_qkvz\.weight$", ("query", "key", "value", "mlp"),
               ("Linear",), layout="linear_qkvz", head_size=("linear_key_head_dim",),
               model_types=GATED_DELTANET_MODEL_TYPES),
    PresetRule("gated-deltanet", r"(^|\.)linear_attn\.in_proj_qkv\.weight$", ("query", "key", "value"), ("Linear",),
               layout="linear_qkv", head_size=("linear_key_head_dim",), model_types=GATED_DELTANET_MODEL_TYPES),
    PresetRule("gated-deltanet", r"(^|\.)linear_attn\.q_proj\.weight$", ("query",), head_size=("linear_key_head_dim",),
               model_types=GATED_DELTANET_MODEL_TYPES),
    PresetRule("gated-deltanet", r"(^|\.)linear_attn\.k_proj\.weight$", ("key",), head_size=("linear_key_head_dim",),
               model_types=GATED_DELTANET_MODEL_TYPES),
    PresetRule("gated-deltanet", r"(^|\.)linear_attn\.v_proj\.weight$", ("value",),
               model_types=GATED_DELTANET_MODEL_TYPES),
    PresetRule("gated-deltanet", r"(^|\.)linear_attn\.(in_proj_z|g_proj)\.weight$", ("mlp",),
               model_types=GATED_DELTANET_MODEL_TYPES),
    PresetRule("gated-deltanet", r"(^|\.)linear_attn\.(in_proj_ba|in_proj_a|in_proj_b|a_proj|b_proj|conv1d)\.weight$",
               ("router",), model_types=GATED_DELTANET_MODEL_TYPES),
    PresetRule("gated-deltanet", r"(^|\.)linear_attn\.(out_proj|o_proj)\.weight$", ("attn_out",),
               model_types=GATED_DELTANET_MODEL_TYPES),
    # State-space mixers, with Gated DeltaNet's roles where they play the same part: the scan's C reads the state as
    # a query does and B writes it as a key does (per group of state size), x is what is written (a value), z gates
    # the output through a SiLU (an MLP gate), the time steps and the convolution kernels are tiny (full
    # momentum), out_proj is the mixer's output projection. A_log is a parameter used as it is, not a map.
    PresetRule("mamba2", r"(^|\.)in_proj\.weight$", ("mlp", "value", "key", "query", "router"), ("Linear",),
               layout="mamba2", head_size=("mamba_d_state|ssm_state_size|state_size",), model_types=MAMBA2_MODEL_TYPES,
               within=MAMBA2_MIXERS),
    PresetRule("mamba", r"(^|\.)in_proj\.weight$", ("value", "mlp"), ("Linear",), segment_names=("x", "z"),
               model_types=MAMBA_MODEL_TYPES, within=MAMBA_MIXERS),
    PresetRule("zamba", r"(^|\.)in_proj\.weight$", ("value", "mlp"), ("Linear",), layout="rows_xz",
               model_types=("zamba",), within=ZAMBA_MIXERS),
    PresetRule("zamba", r"(^|\.)(x_proj_weight|dt_proj_weight)$", ("router",), within=ZAMBA_MIXERS),
    PresetRule("zamba", r"(^|\.)(dt_proj_bias|A_log|D)$", ("vector",), within=ZAMBA_MIXERS),
    PresetRule("mamba", r"(^|\.)(conv1d|x_proj|dt_proj)\.weight$", ("router",),
               within=MAMBA2_MIXERS + MAMBA_MIXERS + ZAMBA_MIXERS),
    PresetRule("mamba", r"(^|\.)out_proj\.weight$", ("attn_out",), within=MAMBA2_MIXERS + MAMBA_MIXERS + ZAMBA_MIXERS),
    PresetRule("mamba", r"(^|\.)A_log$", ("vector",), within=MAMBA_MIXERS),
    # LFM2/LFM3's short convolution: B, C and x gate one another channel by channel, as an MLP's gate and up do (no
    # heads, no keys or values); the depthwise kernels are tiny; out_proj is the block's output projection.
    PresetRule("short-conv", r"(^|\.)conv\.in_proj\.weight$", ("mlp", "mlp", "mlp"), ("Linear",),
               segment_names=("B", "C", "x"), within=SHORT_CONV_MODULES),
    PresetRule("short-conv", r"(^|\.)conv\.(conv|spatial_conv)\.weight$", ("router",), within=SHORT_CONV_MODULES),
    PresetRule("short-conv", r"(^|\.)conv\.out_proj\.weight$", ("attn_out",), within=SHORT_CONV_MODULES),
    # Zamba2's shared transformer block (tied across the hybrid layers): its MLP's [gate | up] and each layer's own
    # low-rank adapters (the first matrix of a query or key adapter a latent without heads, as q_a_proj is); `linear`
    # maps the block's output into the layer's Mamba input (an MLP-like projection).
    PresetRule("zamba2", r"(^|\.)shared_transformer\.feed_forward\.gate_up_proj\.weight$", ("mlp", "mlp"), ("Linear",),
               segment_names=("gate", "up"), model_types=("zamba2",)),
    PresetRule("zamba2", r"(^|\.)gate_up_proj_adapter_list\.\d+\.[01]\.weight$", ("mlp",), model_types=("zamba2",)),
    PresetRule("zamba2", r"(^|\.)linear_q_adapter_list\.\d+\.0\.weight$", ("query",), per_neuron=True,
               model_types=("zamba2",)),
    PresetRule("zamba2", r"(^|\.)linear_q_adapter_list\.\d+\.1\.weight$", ("query",), model_types=("zamba2",)),
    PresetRule("zamba2", r"(^|\.)linear_k_adapter_list\.\d+\.0\.weight$", ("key",), per_neuron=True,
               model_types=("zamba2",)),
    PresetRule("zamba2", r"(^|\.)linear_k_adapter_list\.\d+\.1\.weight$", ("key",), model_types=("zamba2",)),
    PresetRule("zamba2", r"(^|\.)linear_v_adapter_list\.\d+\.[01]\.weight$", ("value",), model_types=("zamba2",)),
    PresetRule("zamba2", r"(^|\.)layers\.\d+\.linear\.weight$", ("mlp",), model_types=("zamba", "zamba2")),
    # RecurrentGemma's (Griffin's) recurrent block, with Mamba's roles: linear_x feeds the recurrence (a value),
    # linear_y gates its output through a GeLU (an MLP gate), linear_out is the block's output; the RG-LRU's
    # block-diagonal input and recurrence gates and the convolution kernels are small (full momentum).
    PresetRule("griffin", r"(^|\.)temporal_block\.linear_x\.weight$", ("value",), within=GRIFFIN_BLOCKS),
    PresetRule("griffin", r"(^|\.)temporal_block\.linear_y\.weight$", ("mlp",), within=GRIFFIN_BLOCKS),
    PresetRule("griffin", r"(^|\.)temporal_block\.linear_out\.weight$", ("attn_out",), within=GRIFFIN_BLOCKS),
    PresetRule("griffin", r"(^|\.)(temporal_block\.conv_1d\.weight|rg_lru\.(input|recurrent)_gate_weight)$",
               ("router",), within=GRIFFIN_BLOCKS),
    PresetRule("griffin", r"(^|\.)rg_lru\.(input|recurrent)_gate_bias$", ("vector",), within=GRIFFIN_BLOCKS),
    # xLSTM's mLSTM layers (weight_mode "single"; transformers cannot build "fused"): per-head queries, keys and values,
    # a sigmoid output gate (an MLP gate), per-head input and forget gates (tiny). Its feed-forward is a gated MLP.
    PresetRule("xlstm", r"(^|\.)mlstm_layer\.q\.weight$", ("query",), head_size=("qk_head_dim",),
               model_types=("xlstm",)),
    PresetRule("xlstm", r"(^|\.)mlstm_layer\.k\.weight$", ("key",), head_size=("qk_head_dim",),
               model_types=("xlstm",)),
    PresetRule("xlstm", r"(^|\.)mlstm_layer\.v\.weight$", ("value",), model_types=("xlstm",)),
    PresetRule("xlstm", r"(^|\.)mlstm_layer\.ogate_preact\.weight$", ("mlp",), model_types=("xlstm",)),
    PresetRule("xlstm", r"(^|\.)mlstm_layer\.(igate_preact|fgate_preact)\.weight$", ("router",),
               model_types=("xlstm",)),
    PresetRule("xlstm", r"(^|\.)mlstm_layer\.out_proj\.weight$", ("attn_out",), model_types=("xlstm",)),
    PresetRule("xlstm", r"(^|\.)ffn\.(proj_up_gate|proj_up|proj_down)\.weight$", ("mlp",), model_types=("xlstm",)),
    # RWKV (version 4): its time mixing weights each channel's values by exp(key) with a learned decay (one channel a
    # "head": per-neuron blocks), and a sigmoid receptance gates the result (an MLP gate); its channel mixing is a
    # gated MLP; the token-shift mixing coefficients are vectors.
    PresetRule("rwkv", r"(^|\.)attention\.key\.weight$", ("key",), per_neuron=True, model_types=("rwkv",)),
    PresetRule("rwkv", r"(^|\.)attention\.value\.weight$", ("value",), model_types=("rwkv",)),
    PresetRule("rwkv", r"(^|\.)attention\.receptance\.weight$", ("mlp",), model_types=("rwkv",)),
    PresetRule("rwkv", r"(^|\.)attention\.output\.weight$", ("attn_out",), model_types=("rwkv",)),
    PresetRule("rwkv", r"(^|\.)feed_forward\.(key|value|receptance)\.weight$", ("mlp",), model_types=("rwkv",)),
    PresetRule("rwkv", r"(^|\.)time_mix_(key|value|receptance)$", ("vector",), model_types=("rwkv",)),
    PresetRule("rwkv", r"^head\.weight$", ("output",), model_types=("rwkv",)),
    # JetMoE: a mixture of attention heads, whose experts each hold the query heads and output projection of one
    # attention block (the key and value heads, [key | value] in kv_proj, are shared by all of them), and a mixture of
    # MLP experts, each [gate | up] then down. Its expert stacks are (experts, out, in), used as nn.Linear weights.
    PresetRule("jetmoe", r"(^|\.)self_attention\.experts\.input_linear\.weight$", ("query",), JETMOE_EXPERTS,
               layout="experts", model_types=("jetmoe",)),
    PresetRule("jetmoe", r"(^|\.)self_attention\.experts\.output_linear\.weight$", ("attn_out",), JETMOE_EXPERTS,
               layout="experts", model_types=("jetmoe",)),
    PresetRule("jetmoe", r"(^|\.)self_attention\.kv_proj\.weight$", ("key", "value"), ("Linear",),
               model_types=("jetmoe",)),
    PresetRule("jetmoe", r"(^|\.)mlp\.input_linear\.weight$", ("mlp", "mlp"), JETMOE_EXPERTS, layout="experts",
               segment_names=("gate", "up"), model_types=("jetmoe",)),
    PresetRule("jetmoe", r"(^|\.)mlp\.output_linear\.weight$", ("mlp",), JETMOE_EXPERTS, layout="experts",
               model_types=("jetmoe",)),
    # Doge: dt_proj maps the values to a time step per key-value head that masks its attention dynamically (tiny, as
    # Mamba's dt); its cross-domain experts are rows of two tables read by index at the experts a token picks, as token
    # embeddings are read (no momentum, a block per row), picked by a product-key router.
    PresetRule("doge", r"(^|\.)self_attn\.dt_proj\.weight$", ("router",), model_types=("doge",)),
    PresetRule("doge", r"(^|\.)mlp\.router_gate\.weight$", ("router",), model_types=("doge",)),
    PresetRule("doge", r"(^|\.)mlp\.(down_embed|up_embed)\.weight$", ("embedding",), model_types=("doge",)),
    # ZAYA: its compressed convolutional attention gives each value head half from the current token and half from the
    # previous one (two value matrices) and mixes queries and keys with small convolutions; its router is a small
    # network of its own (full momentum, as a router).
    PresetRule("zaya", r"(^|\.)qkv_proj\.(v_proj_current|v_proj_delayed)\.weight$", ("value",), model_types=("zaya",)),
    PresetRule("zaya", r"(^|\.)qkv_proj\.(conv_qk_depthwise|conv_qk_grouped)\.weight$", ("router",),
               model_types=("zaya",)),
    PresetRule("zaya", r"(^|\.)mlp\.gate\.(down_proj|router_mlp\.fc1|router_mlp\.fc2|router_mlp\.out_proj)\.weight$",
               ("router",), model_types=("zaya",), within=("ZayaRouter",)),
    # Inkling: each head's relative-position query (r_proj, heads of d_rel) scores a learned table of distances
    # (rel_logits_proj.proj, small); short causal convolutions run over the keys, the values and the residual stream
    # (Inkling 2's full-attention layers add per-token taps: static_weight, weight_proj); Inkling 2 adds per-head
    # attention sinks and learned per-channel scales of the query and relative query. Inkling's shared experts are
    # stacks.
    PresetRule("inkling", r"(^|\.)self_attn\.r_proj\.weight$", ("query",), head_size=("d_rel",),
               model_types=INKLING_MODEL_TYPES),
    PresetRule("inkling", r"(^|\.)(k_sconv|v_sconv|attn_sconv|mlp_sconv|post_attention_convolution|"
               r"post_mlp_convolution)\.conv1d\.weight$", ("router",), model_types=INKLING_MODEL_TYPES),
    PresetRule("inkling", r"(^|\.)(k_sconv|v_sconv)\.(static_weight|weight_proj\.weight)$", ("router",),
               model_types=INKLING_MODEL_TYPES),
    PresetRule("inkling", r"(^|\.)self_attn\.(rel_logits_proj\.proj|sink_proj\.weight)$", ("router",),
               model_types=INKLING_MODEL_TYPES),
    PresetRule("inkling", r"(^|\.)(q_l2_clip|rel_l2_clip)\.scale$", ("vector",), model_types=INKLING_MODEL_TYPES),
    # Inkling 2's attention over earlier blocks' outputs: learned query vectors (three in a full-attention layer, for
    # the inputs of its query, key and value).
    PresetRule("inkling", r"(^|\.)(attention_input|mlp_input|final_input)\.query$", ("vector",),
               model_types=INKLING_MODEL_TYPES),
    PresetRule("inkling", r"(^|\.)shared_experts\.(gate_proj|up_proj|down_proj)$", ("mlp",),
               ("InklingSharedExperts",), layout="experts", model_types=INKLING_MODEL_TYPES),
    # Muse Spark's mixture of experts runs in a space of its own: projections into and out of it around the experts.
    PresetRule("muse-spark", r"(^|\.)mlp\.(pre_expert_proj|post_expert_proj)\.weight$", ("mlp",),
               model_types=("muse_spark_text",)),
    # Granite's shared MLP: [gate | up], then the down projection.
    PresetRule("granite", r"(^|\.)shared_mlp\.input_linear\.weight$", ("mlp", "mlp"), ("Linear",),
               segment_names=("gate", "up"), model_types=("granitemoeshared", "granitemoehybrid")),
    PresetRule("granite", r"(^|\.)shared_mlp\.output_linear\.weight$", ("mlp",),
               model_types=("granitemoeshared", "granitemoehybrid")),
    # Qwen3-Next / Qwen3.5 gated attention: per head, the query then the gate of that head's output.
    PresetRule("gated-attention", r"(^|\.)self_attn\.q_proj\.weight$", ("query", "mlp"), ("Linear",),
               layout="q_gate_heads", model_types=GATED_ATTENTION_MODEL_TYPES),
    # Llama, Mistral, Qwen2 and their relatives.
    PresetRule("llama", r"(^|\.)embed_tokens\.weight$", ("embedding",)),
    PresetRule("llama", r"(^|\.)q_proj\.weight$", ("query",)),
    PresetRule("llama", r"(^|\.)k_proj\.weight$", ("key",)),
    PresetRule("llama", r"(^|\.)v_proj\.weight$", ("value",)),
    PresetRule("llama", r"(^|\.)o_proj\.weight$", ("attn_out",)),
    PresetRule("llama", r"(^|\.)(gate|up|down)_proj\.weight$", ("mlp",)),
    PresetRule("llama", r"(^|\.)feed_forward\.w[123]\.weight$", ("mlp",)),  # Meta's reference naming, LFM2
    # Gemma 3n / Gemma 4 per-layer inputs: a per-token embedding for every layer, projected from the input
    # embeddings and fed through a gated MLP-like path in each layer (gate, activation, product, projection).
    PresetRule("gemma-per-layer", r"(^|\.)embed_tokens_per_layer\.weight$", ("embedding",)),
    PresetRule("gemma-per-layer", r"(^|\.)(per_layer_input_gate|per_layer_projection|per_layer_model_projection)"
               r"\.weight$", ("mlp",)),
    # Gemma 3n: AltUp keeps extra copies of the residual stream, mixed by tiny coefficient matrices chosen by a modality
    # router (full momentum), and projected into and out of the extra streams at the ends of the model (MLP-like);
    # LAuReL adds a low-rank residual branch (two MLP-like matrices) to each layer.
    PresetRule("gemma3n", r"(^|\.)altup\.(correction_coefs|prediction_coefs|modality_router)\.weight$", ("router",),
               model_types=("gemma3n_text",)),
    PresetRule("gemma3n", r"(^|\.)(laurel\.linear_left|laurel\.linear_right|altup_projections\.\d+|"
               r"altup_unembed_projections\.\d+)\.weight$", ("mlp",), model_types=("gemma3n_text",)),
    # Moshi's decoder wraps each attention projection in a module of its own (``q_proj.linear``).
    PresetRule("moshi", r"(^|\.)q_proj\.linear\.weight$", ("query",), model_types=("moshi",)),
    PresetRule("moshi", r"(^|\.)k_proj\.linear\.weight$", ("key",), model_types=("moshi",)),
    PresetRule("moshi", r"(^|\.)v_proj\.linear\.weight$", ("value",), model_types=("moshi",)),
    PresetRule("moshi", r"(^|\.)o_proj\.linear\.weight$", ("attn_out",), model_types=("moshi",)),
    PresetRule("llama", r"(^|\.)lm_head\.weight$", ("output",)),
    # Phi, GPT-J, OPT (their q/k/v_proj, embed_tokens, wte and lm_head are matched above or below).
    PresetRule("phi", r"(^|\.)self_attn\.dense\.weight$", ("attn_out",)),
    PresetRule("gptj-opt", r"(^|\.)(attn|self_attn|encoder_attn|attention)\.out_proj\.weight$", ("attn_out",)),
    PresetRule("phi-gptj-opt", r"(^|\.)(fc1|fc2|fc_in|fc_out)\.weight$", ("mlp",)),
    PresetRule("opt", r"(^|\.)embed_positions\.weight$", ("embedding",)),
    # GPT-NeoX / Pythia, BLOOM, Falcon: embeddings, attention output and MLP by name. Their fused
    # query_key_value interleaves heads (NeoX, BLOOM) or has unequal parts (Falcon): no layout is declared
    # for it yet, so it is kept whole (full momentum), and the warning says so.
    PresetRule("neox-bloom-falcon", r"(^|\.)(embed_in|word_embeddings)\.weight$", ("embedding",)),
    PresetRule("neox", r"(^|\.)embed_out\.weight$", ("output",)),
    PresetRule("neox-bloom-falcon", r"(^|\.)(attention|self_attention)\.dense\.weight$", ("attn_out",)),
    PresetRule("neox-bloom-falcon", r"(^|\.)dense_(h_to_4h|4h_to_h)\.weight$", ("mlp",)),
    PresetRule("gpt_neox", r"(^|\.)attention\.query_key_value\.weight$", ("query", "key", "value"),
               ("Linear",), layout="qkv_heads", model_types=("gpt_neox", "gpt_neox_japanese")),
    PresetRule("persimmon", r"(^|\.)self_attn\.query_key_value\.weight$", ("query", "key", "value"),
               ("Linear",), layout="qkv_heads", model_types=("persimmon",)),
    PresetRule("bloom", r"(^|\.)self_attention\.query_key_value\.weight$", ("query", "key", "value"),
               ("Linear",), layout="qkv_heads", model_types=("bloom",)),
    PresetRule("falcon", r"(^|\.)self_attention\.query_key_value\.weight$", ("query", "key", "value"),
               ("FalconLinear", "Linear"), layout="falcon", model_types=("falcon",)),
    # Any other model with these names: the layout is not known, so the weight is kept whole.
    PresetRule("fused-qkv", r"(^|\.)(attention|self_attention)\.query_key_value\.weight$",
               ("query", "key", "value")),
    # MiniMax-Text-01's lightning (linear) attention: [q_h | k_h | v_h] per head, and a sigmoid gate of its output.
    PresetRule("minimax", r"(^|\.)self_attn\.qkv_proj\.weight$", ("query", "key", "value"), ("Linear",),
               layout="qkv_heads", model_types=("minimax",)),
    PresetRule("minimax", r"(^|\.)self_attn\.output_gate\.weight$", ("mlp",), model_types=("minimax",)),
    # CodeGen: four [q | v | k] blocks (its modeling code's mp_num = 4); MPT: [q | k | v].
    PresetRule("codegen", r"(^|\.)attn\.qkv_proj\.weight$", ("query", "key", "value"), ("Linear",),
               layout="codegen", model_types=("codegen",)),
    PresetRule("mpt", r"(^|\.)attn\.Wqkv\.weight$", ("query", "key", "value"), ("Linear",),
               model_types=("mpt",)),  # [q | k | v]: MPT's attention chunks it in three
    # Phi-3: [q | k | v] with grouped-query attention, and [gate | up] (as the MLPs of GLM, GLM-4, GLM-4.1V's and
    # GLM-OCR's language models).
    PresetRule("phi3", r"(^|\.)self_attn\.qkv_proj\.weight$", ("query", "key", "value"), ("Linear",),
               layout="qkv_sizes", model_types=("phi3", "phi4_multimodal")),
    PresetRule("phi3", r"(^|\.)mlp\.gate_up_proj\.weight$", ("mlp", "mlp"), ("Linear",),
               segment_names=("gate", "up"),
               model_types=("phi3", "phi4_multimodal", "glm", "glm4", "glm4v_text", "glm_ocr_text")),
    # MiniMax-M3's dense MLPs (its dense layers' and its shared experts'): [gate | up], then a clamped SwiGLU.
    PresetRule("minimax-m3", r"(^|\.)mlp\.(shared_experts\.)?gate_up_proj\.weight$", ("mlp", "mlp"), ("Linear",),
               segment_names=("gate", "up"), model_types=("minimax_m3_vl_text",), within=("MiniMaxM3VLDenseMLP",)),
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
    PresetRule("moe", r"(^|\.)experts\.gate_up_proj$", ("mlp", "mlp"), fused_modules=MIXTRAL_STYLE_EXPERTS,
               layout="experts", segment_names=("gate", "up")),
    PresetRule("moe", r"(^|\.)experts\.down_proj$", ("mlp",), fused_modules=MIXTRAL_STYLE_EXPERTS, layout="experts"),
    # Llama 4, Aria: (experts, hidden, 2 * intermediate) used as x @ W, gate columns then up columns.
    PresetRule("moe-in-out", r"(^|\.)experts\.gate_up_proj$", ("mlp", "mlp"), IN_OUT_EXPERTS, layout="experts",
               segment_names=("gate", "up"), split_axis=1),
    PresetRule("moe-in-out", r"(^|\.)experts\.down_proj$", ("mlp",), IN_OUT_EXPERTS, layout="experts",
               split_axis=1),
    # GPT-OSS: (experts, hidden, 2 * intermediate) used as x @ W + b, gate and up columns alternating.
    PresetRule("gpt_oss", r"(^|\.)experts\.gate_up_proj$", ("mlp", "mlp"), ("GptOssExperts",), layout="experts",
               segment_names=("gate", "up"), split_axis=1, interleaved=True),
    PresetRule("gpt_oss", r"(^|\.)experts\.down_proj$", ("mlp",), ("GptOssExperts",), layout="experts",
               split_axis=1),
    # Nemotron-H: ungated experts, (experts, intermediate, hidden) up and (experts, hidden, intermediate) down.
    PresetRule("nemotron_h", r"(^|\.)experts\.(up_proj|down_proj)$", ("mlp",), ("NemotronHExperts",),
               layout="experts"),
    PresetRule("nemotron_h", r"(^|\.)mixer\.gate\.weight$", ("router",), model_types=("nemotron_h",)),
    # Any other expert stack: kept whole, flagged.
    PresetRule("moe", r"(^|\.)experts\.(gate_up_proj|down_proj)$", ("mlp",), layout="experts"),
    PresetRule("moe", r"(^|\.)experts\.\w+_bias$", ("vector",)),
    # Mixture-of-experts routers (Mixtral, Qwen2-MoE and Qwen3-MoE's mlp.gate, a shared expert's gate).
    PresetRule("moe", r"(^|\.)router\.(gate\.|layer\.|classifier\.)?weight$", ("router",)),
    PresetRule("moe", r"(^|\.)mlp\.gate\.weight$", ("router",)),
    PresetRule("moe", r"(^|\.)shared_expert_gate\.weight$", ("router",)),
    PresetRule("moe", r"(^|\.)feed_forward\.gate\.weight$", ("router",), model_types=("lfm2_moe",)),
    PresetRule("moe", r"(^|\.)mlp\.gate\.wg\.weight$", ("router",), model_types=("hunyuan_v1_moe",)),
    PresetRule("moe", r"(^|\.)mlp\.(text_moe|vision_moe)\.gate\.weight$", ("router",),
               model_types=("ernie4_5_vl_moe_text",)),
    # ModernBERT (and its decoder): [q | k | v] (its attention views it as three parts); the MLP's Wi holds the half
    # it activates (its code's "input": a gate, in the words used here) then the half it multiplies (its "gate": up).
    PresetRule("modernbert", r"(^|\.)tok_embeddings\.weight$", ("embedding",), model_types=MODERNBERT_MODEL_TYPES),
    PresetRule("modernbert", r"(^|\.)attn\.Wqkv\.weight$", ("query", "key", "value"), ("Linear",),
               model_types=MODERNBERT_MODEL_TYPES),
    PresetRule("modernbert", r"(^|\.)attn\.Wo\.weight$", ("attn_out",), model_types=MODERNBERT_MODEL_TYPES),
    PresetRule("modernbert", r"(^|\.)mlp\.Wi\.weight$", ("mlp", "mlp"), ("Linear",), segment_names=("gate", "up"),
               model_types=MODERNBERT_MODEL_TYPES),
    PresetRule("modernbert", r"(^|\.)(mlp\.Wo|head\.dense)\.weight$", ("mlp",), model_types=MODERNBERT_MODEL_TYPES),
    # Vision towers (CLIP, SigLIP and their kin in LLaVA, PaliGemma, Gemma 3, Idefics and others): the position table
    # is read by index as GPT-2's positions are (an embedding); the patch embedding, a convolution over pixels, is
    # small (full momentum, as other convolution kernels); the projector into the language model is a two-layer MLP.
    PresetRule("vision", r"(^|\.)embeddings\.position_embedding\.weight$", ("embedding",)),
    PresetRule("vision", r"(^|\.)(embeddings\.patch_embedding|(vision_tower|vision_encoder)\.patch_conv)\.weight$",
               ("router",)),
    # ... and the patch embeddings of other towers (convolutions, or linear maps of flattened patches, as small: the
    # timm-style patch_embed.proj, MiniMax-M3's, Molmo 2's, RADIO's and its video patches', UDOP's) and Step3's
    # downsampling convolutions.
    PresetRule("vision", r"(^|\.)(patch_embed\.proj|vision_tower\.embeddings\.proj|vision_tower\.patch_embedding|"
               r"patch_embedder\.patch_embedding|"
               r"embeddings\.(video_)?patch_projection|embed_patches\.proj|vision_model\.downsampler\d)\.weight$",
               ("router",)),
    PresetRule("vision", r"(^|\.)patch_embed\.weight$", ("router",), model_types=("lfm3_vl_vision",)),  # linear
    # ... and those of ViT-style towers (ViT, InternVL: a convolution) and Llama 4's (a linear map of unfolded
    # patches, as small: full momentum too); Llama 4's position table holds a row per patch position.
    PresetRule("vision", r"(^|\.)(embeddings\.patch_embeddings\.projection|patch_embedding\.linear)\.weight$",
               ("router",)),
    PresetRule("vision", r"(^|\.)positional_embedding_vlm$", ("embedding",)),
    # Llama 3.2 Vision (Mllama): its patch convolution; a position table with a row per patch position and tables
    # read by aspect-ratio id (tile positions), all embeddings.
    PresetRule("vision", r"(^|\.)patch_embedding\.weight$", ("router",), model_types=("mllama_vision_model",)),
    PresetRule("vision", r"(^|\.)(gated_positional_embedding\.(embedding|tile_embedding\.weight)|"
               r"(pre|post)_tile_positional_embedding\.embedding\.weight)$", ("embedding",),
               model_types=("mllama_vision_model",)),
    PresetRule("vision", r"(^|\.)(attention|self_attn)\.projection_layer\.weight$", ("attn_out",)),  # InternVL, Janus
    # Pix2Struct (and Kosmos-2.5's image encoder): T5-style attention in both towers (query, key, value and output,
    # heads of d_kv), the image encoder's gated MLP, its linear patch embedding (small: full momentum) and the row and
    # column tables read by each patch's row and column index (embeddings).
    PresetRule("pix2struct", r"(^|\.)attention\.query\.weight$", ("query",), model_types=PIX2STRUCT_MODEL_TYPES),
    PresetRule("pix2struct", r"(^|\.)attention\.key\.weight$", ("key",), model_types=PIX2STRUCT_MODEL_TYPES),
    PresetRule("pix2struct", r"(^|\.)attention\.value\.weight$", ("value",), model_types=PIX2STRUCT_MODEL_TYPES),
    PresetRule("pix2struct", r"(^|\.)attention\.output\.weight$", ("attn_out",), model_types=PIX2STRUCT_MODEL_TYPES),
    PresetRule("pix2struct", r"(^|\.)mlp\.(wi_0|wi_1|wo)\.weight$", ("mlp",), model_types=PIX2STRUCT_MODEL_TYPES),
    PresetRule("pix2struct", r"(^|\.)embeddings\.patch_projection\.weight$", ("router",),
               model_types=PIX2STRUCT_MODEL_TYPES),
    PresetRule("pix2struct", r"(^|\.)embeddings\.(row|column)_embedder\.weight$", ("embedding",),
               model_types=PIX2STRUCT_MODEL_TYPES),
    # Kosmos-2 and Kosmos-2.5: the image features' projection into the language model (an MLP matrix), the learned
    # queries that attend over them (a vector) with an attention whose output projection is the attention output;
    # Kosmos-2.5's table of two segments (text, image) is read by each position's segment (an embedding).
    PresetRule("kosmos", r"(^|\.)image_to_text_projection\.dense\.weight$", ("mlp",),
               model_types=("kosmos-2", "kosmos-2.5")),
    PresetRule("kosmos", r"(^|\.)image_to_text_projection\.latent_query$", ("vector",),
               model_types=("kosmos-2", "kosmos-2.5")),
    PresetRule("kosmos", r"(^|\.)image_to_text_projection\.x_attn\.out_proj\.weight$", ("attn_out",),
               model_types=("kosmos-2", "kosmos-2.5")),
    PresetRule("kosmos", r"(^|\.)segment_emb\.weight$", ("embedding",), model_types=("kosmos_2_5_text_model",)),
    # GIT: its image features' projection (a linear layer, then a norm) and its language-model head, named ``output``.
    PresetRule("git", r"(^|\.)visual_projection\.visual_projection\.0\.weight$", ("mlp",), model_types=("git",)),
    PresetRule("git", r"(^|\.)output\.weight$", ("output",), model_types=("git",)),
    # Whisper-style audio encoders: the convolutions over the mel spectrogram are kernels (full momentum, as every
    # convolution kernel here); the linear layers after them (Qwen3-Omni's ``conv_out`` from the flattened convolution
    # channels, the projections out of the encoder) are MLP matrices; Qwen2.5-Omni's table of two rows (the audio's
    # begin and end tokens) is an embedding.
    PresetRule("audio", r"(^|\.)(conv1|conv2|conv2d[123])\.weight$", ("router",), model_types=WHISPER_STYLE_AUDIO),
    PresetRule("audio", r"(^|\.)(proj|proj1|proj2|conv_out)\.weight$", ("mlp",), model_types=WHISPER_STYLE_AUDIO),
    PresetRule("audio", r"(^|\.)audio_bos_eos_token\.weight$", ("embedding",), model_types=WHISPER_STYLE_AUDIO),
    # MuSE Spark's audio tower: stages of a linear patch embedding (small: full momentum) and causal convolutions
    # (kernels: full momentum), then a projection out of the tower (an MLP matrix).
    PresetRule("audio", r"(^|\.)layers\.\d+\.(patch_embedder\.proj|conv_blocks\.\d+\.conv)\.weight$", ("router",),
               model_types=("muse_spark_audio",)),
    PresetRule("audio", r"(^|\.)proj\.weight$", ("mlp",), model_types=("muse_spark_audio",)),
    # Fuyu's image input: one linear map of each flattened patch into the width (small, as Llama 4's patch embedding).
    PresetRule("vision", r"(^|\.)vision_embed_tokens\.weight$", ("router",), model_types=("fuyu",)),
    # Phi-4-multimodal (its language model is Phi-3's, above): the image and audio features' projections into the
    # language model (MLP matrices) and the learned separator tokens between image crops (vectors); its audio encoder, a
    # Conformer: each feed-forward's gate_up_proj is [up | gate] (the second half activated), the subsampling's output
    # layer an MLP matrix, the convolution kernels (subsampling, depthwise, pointwise, the GLU's) full momentum as every
    # convolution kernel here, the GLU's biases vectors, the relative-position bias table (a row per distance) an
    # embedding.
    PresetRule("phi4-multimodal", r"(^|\.)(audio_embed\.(up|down)_proj_for_(speech|vision_speech)|"
               r"image_embed\.img_projection_(up|down))\.weight$", ("mlp",), model_types=("phi4_multimodal",)),
    PresetRule("phi4-multimodal", r"(^|\.)image_embed\.(global|sub)_img_feature_extensor$", ("vector",),
               model_types=("phi4_multimodal",)),
    PresetRule("phi4-multimodal", r"(^|\.)feed_forward_(in|out)\.gate_up_proj\.weight$", ("mlp", "mlp"), ("Linear",),
               segment_names=("up", "gate"), model_types=("phi4_multimodal_audio",)),
    PresetRule("phi4-multimodal", r"(^|\.)embed\.out\.weight$", ("mlp",), model_types=("phi4_multimodal_audio",)),
    PresetRule("phi4-multimodal", r"(^|\.)(embed\.conv\.\d+|conv\.(dw_sep_conv_1d\.(dw_conv|pw_conv)|ext_pw_conv_1d|"
               r"glu\.ext_pw_conv_1d))\.weight$", ("router",), model_types=("phi4_multimodal_audio",)),
    PresetRule("phi4-multimodal", r"(^|\.)conv\.glu\.b[12]$", ("vector",), model_types=("phi4_multimodal_audio",)),
    PresetRule("phi4-multimodal", r"(^|\.)relative_attention_bias_layer\.bias_values\.weight$", ("embedding",),
               model_types=("phi4_multimodal_audio",)),
    # Learned tokens prepended to or queried by a tower (a class token, BLIP-2's learned queries): one small tensor
    # each, with one block per tensor as Adam-mini gives such parameters (position tables of shape
    # (1, positions, width) keep AdamW's state).
    PresetRule("vision", r"(^|\.)(embeddings\.(cls_token|class_embedding|cls_register_token)|query_tokens|"
               r"perceiver_resampler\.latents)$", ("vector",)),
    # Aria's projector: learned queries (a vector) attend over the image features with torch's nn.MultiheadAttention
    # ([q | k | v] in its in_proj_weight, heads of its own head_dim), then an MLP.
    PresetRule("aria", r"(^|\.)multi_modal_projector\.query$", ("vector",), model_types=("aria",)),
    PresetRule("aria", r"(^|\.)cross_attn\.multihead_attn\.in_proj_weight$", ("query", "key", "value"),
               ("MultiheadAttention",), model_types=("aria",)),
    PresetRule("aria", r"(^|\.)cross_attn\.multihead_attn\.out_proj\.weight$", ("attn_out",), model_types=("aria",)),
    # Ovis 2: the tower's head gives each patch a distribution over a visual vocabulary (an output layer, a row per
    # visual word), and the image's embedding is that distribution times the table of visual words (an embedding).
    PresetRule("ovis2", r"(^|\.)head_linear\.weight$", ("output",), model_types=("ovis2_vision",)),
    PresetRule("ovis2", r"(^|\.)visual_embeddings_table\.weight$", ("embedding",), model_types=("ovis2",)),
    # Florence-2's DaViT tower: window and channel attention ([q | k | v], heads of the module's width over its heads or
    # channel groups), the depthwise convolutions before each (position encodings) and each stage's patch-embedding
    # convolution (kernels: full momentum); the projector's position tables, read by row and column index (embeddings).
    PresetRule("florence2", r"(^|\.)(window_attn|channel_attn)\.qkv\.weight$", ("query", "key", "value"), ("Linear",),
               within=FLORENCE2_ATTENTION),
    PresetRule("florence2", r"(^|\.)(window_attn|channel_attn)\.proj\.weight$", ("attn_out",),
               within=FLORENCE2_ATTENTION),
    PresetRule("florence2", r"(^|\.)((spatial|channel)_block\.conv[12]|convs\.\d+\.conv)\.weight$", ("router",),
               model_types=("florence_vision",)),
    PresetRule("florence2", r"(^|\.)image_position_embed\.(row|column)_embeddings\.weight$", ("embedding",),
               model_types=("florence2",)),
    # Inkling's multimodal towers: the audio codebook table (each frame reads one row per codebook: an embedding) and
    # the vision encoder, an MLP over patches folded step by step into depth (its projections are MLP matrices).
    PresetRule("inkling", r"(^|\.)embed_audio_tokens\.embed_audio_tokens\.weight$", ("embedding",),
               model_types=("inkling_audio",)),
    PresetRule("inkling", r"(^|\.)encoder_layers\.\d+\.projection\.weight$", ("mlp",), model_types=("inkling_vision",)),
    # Janus: its aligners' hidden layers (MLP matrices); for image generation, the table of image tokens (an embedding)
    # and the head that scores them (an MLP layer, then the output layer, a row per image token); its VQ-VAE image
    # tokenizer: convolution kernels (its attention's q, k, v and output are 1 x 1 convolutions: full momentum) and the
    # codebook, read by each patch's nearest code (an embedding).
    PresetRule("janus", r"(^|\.)(aligner|generation_aligner)\.hidden_layers\.\d+\.weight$", ("mlp",),
               model_types=("janus",)),
    PresetRule("janus", r"(^|\.)generation_embeddings\.weight$", ("embedding",), model_types=("janus",)),
    PresetRule("janus", r"(^|\.)generation_head\.proj_out\.weight$", ("mlp",), model_types=("janus",)),
    PresetRule("janus", r"(^|\.)generation_head\.vision_head\.weight$", ("output",), model_types=("janus",)),
    PresetRule("janus", r"(^|\.)(conv_in|conv_out|conv1|conv2|conv|nin_shortcut|q|k|v|proj_out|quant_conv|"
               r"post_quant_conv)\.weight$", ("router",), model_types=("janus_vqgan",)),
    PresetRule("janus", r"(^|\.)quantize\.embedding\.weight$", ("embedding",), model_types=("janus_vqgan",)),
    # PI0 (a vision-language-action model): the maps of the robot's state and its noised actions into the action
    # expert's width and of the expert's output back to actions (a few dozen wide: full momentum), and the MLP that
    # mixes the actions with the flow-matching time.
    PresetRule("pi0", r"(^|\.)(action_in_proj|state_proj|action_out_proj)\.weight$", ("router",), model_types=("pi0",)),
    PresetRule("pi0", r"(^|\.)action_time_mlp_(in|out)\.weight$", ("mlp",), model_types=("pi0",)),
    # MuSE's position table: each patch reads (and interpolates between) rows by its position (an embedding).
    PresetRule("vision", r"(^|\.)patch_embedder\.position_embedding_table\.weight$", ("embedding",)),
    # UDOP: tables of the layout's x and y coordinates, read by each token's box (embeddings).
    PresetRule("udop", r"(^|\.)cell_2d_embedding\.[xy]_position_embeddings\.weight$", ("embedding",),
               model_types=("udop",)),
    # SigLIP's attention-pooling head (which most multimodal models never run): one learned query (``probe``, a vector)
    # attends over the tower's output with torch's nn.MultiheadAttention, whose ``in_proj_weight`` is [q | k | v].
    PresetRule("vision", r"(^|\.)head\.attention\.in_proj_weight$", ("query", "key", "value"), ("MultiheadAttention",),
               within=SIGLIP_POOLING_HEADS),
    PresetRule("vision", r"(^|\.)head\.probe$", ("vector",), within=SIGLIP_POOLING_HEADS),
    # The projectors between a vision tower and its language model (LLaVA's, PaliGemma's, Idefics3's and SmolVLM's
    # connector, Pixtral's patch merger, DeepSeek-VL's aligner, the mergers of MiniCPM-V and the Qwen-VL family...):
    # their linear layers are MLP matrices.
    PresetRule("vision", r"(^|\.)(multi_modal_projector|projector|mm_projector|connector|aligner|merger|vit_merger|"
               r"vision_projection|(deepstack_)?merger_list\.\d+)\.(\w+\.)*(linear|linear_\d|linear\d|linear_fc\d|"
               r"linear_in|linear_out|proj|in_proj|out_proj|projection|image_projection|merging_layer|merge_linear_\d|"
               r"mlp\.\d+|mlp_fc\d|readout\.\d+)\.weight$", ("mlp",)),
    # ... and those that are one linear layer (Mllama's, Unlimited-OCR's, GOT-OCR 2.0's, DeepSeek-VL's aligner's),
    PresetRule("vision", r"(^|\.)(multi_modal_projector|multi_modal_projector\.multimodal_projector|projector|"
               r"vision_projection|resampler_model\.mlp|aligner\.(high_res_)?vision_proj)\.weight$", ("mlp",)),
    # or one bare (in, out) matrix used as x @ W (Gemma 3's).
    PresetRule("vision", r"(^|\.)multi_modal_projector\.mm_input_projection_weight$", ("mlp",), in_out=True),
    # Qwen-VL-style vision towers (Qwen2-VL to Qwen3.5, Qwen3-Omni, GLM-4.1V/4.5V): each block's attention computes
    # [q | k | v] from one qkv (heads of its own head_dim) and maps back with proj; Qwen3-VL's blocks have a plain MLP;
    # the patch embedding is a 3-D convolution (small: full momentum), Qwen3-VL's position table is read by index
    # (its mergers into the language model are projectors, above).
    PresetRule("qwen-vl-vision", r"(^|\.)attn\.qkv\.weight$", ("query", "key", "value"), ("Linear",),
               within=QWEN_VL_VISION_ATTENTION),
    PresetRule("qwen-vl-vision", r"(^|\.)attn\.q\.weight$", ("query",), within=QWEN_VL_VISION_ATTENTION),
    PresetRule("qwen-vl-vision", r"(^|\.)attn\.k\.weight$", ("key",), within=QWEN_VL_VISION_ATTENTION),
    PresetRule("qwen-vl-vision", r"(^|\.)attn\.v\.weight$", ("value",), within=QWEN_VL_VISION_ATTENTION),
    PresetRule("qwen-vl-vision", r"(^|\.)attn\.proj\.weight$", ("attn_out",), within=QWEN_VL_VISION_ATTENTION),
    # EXAONE 4.5's tower is of this kind with grouped-query attention: qkv is [q | k | v] of their own sizes.
    PresetRule("exaone4_5-vision", r"(^|\.)attn\.qkv\.weight$", ("query", "key", "value"), ("Linear",),
               layout="qkv_sizes", within=("Exaone4_5_VisionAttention",)),
    PresetRule("exaone4_5-vision", r"(^|\.)attn\.proj\.weight$", ("attn_out",), within=("Exaone4_5_VisionAttention",)),
    PresetRule("qwen-vl-vision", r"(^|\.)visual\.blocks\.\d+\.mlp\.(linear_fc1|linear_fc2)\.weight$", ("mlp",)),
    PresetRule("qwen-vl-vision", r"(^|\.)visual\.patch_embed\.proj\.weight$", ("router",)),
    PresetRule("qwen-vl-vision", r"(^|\.)visual\.pos_embed\.weight$", ("embedding",)),
    # GLM-4.1V's and GLM-4.5V's 2 x 2 patch merge, a strided convolution into the merger: as every convolution kernel
    # here, full momentum (low-rank momentum needs a matrix).
    PresetRule("qwen-vl-vision", r"(^|\.)(visual\.)?downsample\.weight$", ("router",),
               model_types=("glm4v_vision", "glm4v_moe_vision", "glm_ocr_vision", "glm5_next_vision")),
    # SAM-style ViT image encoders (SAM, GOT-OCR 2.0, DeepSeek-VL's high-resolution tower, Unlimited-OCR, ...): windowed
    # attention with [q | k | v] from one qkv and relative position tables indexed by the distance between two patches
    # (tiny and read every step: full momentum, one block per distance); their MLP; the patch embedding and the
    # convolutions of the neck and of the projectors after it are kernels (full momentum); the absolute position
    # table, a 4-D tensor added to every image, is left to the default (full state).
    PresetRule("sam-vision", r"(^|\.)attn\.qkv\.weight$", ("query", "key", "value"), ("Linear",),
               within=SAM_VISION_ATTENTION),
    PresetRule("sam-vision", r"(^|\.)attn\.proj\.weight$", ("attn_out",), within=SAM_VISION_ATTENTION),
    PresetRule("sam-vision", r"(^|\.)attn\.rel_pos_[hw]$", ("router",), within=SAM_VISION_ATTENTION),
    PresetRule("sam-vision", r"(^|\.)layers\.\d+\.mlp\.lin[12]\.weight$", ("mlp",)),
    PresetRule("sam-vision", r"(^|\.)patch_embed\.projection\.weight$", ("router",)),
    PresetRule("sam-vision", r"(^|\.)(neck|high_res_vision_neck|high_res_vision_proj|sam_encoder\.proj|"
               r"multi_modal_projector)\.(conv\d|conv_upsampler\d)\.weight$", ("router",)),
    # BLIP's, BLIP-2's and InstructBLIP's vision towers: [q | k | v] from one qkv (heads of the module's head_dim), and
    # its projection back.
    PresetRule("blip-vision", r"(^|\.)self_attn\.qkv\.weight$", ("query", "key", "value"), ("Linear",),
               within=BLIP_VISION_ATTENTION),
    PresetRule("blip-vision", r"(^|\.)self_attn\.projection\.weight$", ("attn_out",), within=BLIP_VISION_ATTENTION),
    # BERT-style encoders (BERT, RoBERTa, ...), and the BERT-style Q-Former of BLIP-2 and InstructBLIP (its
    # cross-attention reads keys and values from the image; its learned queries have their own MLP, ``*_query``) and
    # BLIP's text model (``crossattention``). attention.output must come before output.
    PresetRule("bert", r"(^|\.)embeddings\.(word|position|token_type)_embeddings\.weight$", ("embedding",)),
    PresetRule("bert", r"(^|\.)(cross)?attention\.(self|attention)\.query\.weight$", ("query",)),
    PresetRule("bert", r"(^|\.)(cross)?attention\.(self|attention)\.key\.weight$", ("key",)),
    PresetRule("bert", r"(^|\.)(cross)?attention\.(self|attention)\.value\.weight$", ("value",)),
    PresetRule("bert", r"(^|\.)(cross)?attention\.output\.dense\.weight$", ("attn_out",)),
    PresetRule("bert", r"(^|\.)(intermediate|output)(_query)?\.dense\.weight$", ("mlp",)),
    PresetRule("bert", r"(^|\.)language_projection\.weight$", ("mlp",)),  # BLIP-2's projector into its language model
    PresetRule("bert", r"(^|\.)(predictions\.transform|pooler)\.dense\.weight$", ("mlp",)),
    PresetRule("bert", r"(^|\.)(lm_head\.dense|pooler)\.weight$", ("mlp",)),  # RoBERTa's head; BigBird's pooler
    # ... and their kin: the projection of small embeddings up to the width (ALBERT, RemBERT, ELECTRA, ConvBERT,
    # RoFormer), ELECTRA's generator head and RemBERT's head and its own (untied) output layer, RoCBert's pronunciation
    # and glyph-shape tables and their map into the width, X-MOD's per-language adapters (a bottleneck MLP).
    PresetRule("bert", r"(^|\.)(embedding_hidden_mapping_in|embeddings_project|embeddings\.map_inputs_layer|"
               r"generator_predictions\.dense|adapter_modules\.\w+\.dense[12])\.weight$", ("mlp",)),
    PresetRule("bert", r"(^|\.)predictions\.dense\.weight$", ("mlp",), model_types=("rembert",)),
    PresetRule("bert", r"(^|\.)predictions\.decoder\.weight$", ("output",), model_types=("rembert",)),
    PresetRule("bert", r"(^|\.)embeddings\.(pronunciation|shape)_embed\.weight$", ("embedding",),
               model_types=("roc_bert",)),
    # CTRL: query, key and value (``Wq``, ``Wk``, ``Wv``), the attention output (``dense``) and a two-layer MLP.
    PresetRule("ctrl", r"(^|\.)multi_head_attention\.Wq\.weight$", ("query",), model_types=("ctrl",)),
    PresetRule("ctrl", r"(^|\.)multi_head_attention\.Wk\.weight$", ("key",), model_types=("ctrl",)),
    PresetRule("ctrl", r"(^|\.)multi_head_attention\.Wv\.weight$", ("value",), model_types=("ctrl",)),
    PresetRule("ctrl", r"(^|\.)multi_head_attention\.dense\.weight$", ("attn_out",), model_types=("ctrl",)),
    PresetRule("ctrl", r"(^|\.)h\.\d+\.ffn\.[02]\.weight$", ("mlp",), model_types=("ctrl",)),
    # XLM, FlauBERT and DistilBERT: ``q_lin``, ``k_lin``, ``v_lin``, ``out_lin``, a two-layer MLP (``lin1``, ``lin2``),
    # position and language tables read by index; DistilBERT's head transforms before its (tied) output layer.
    PresetRule("xlm", r"(^|\.)q_lin\.weight$", ("query",), model_types=XLM_MODEL_TYPES),
    PresetRule("xlm", r"(^|\.)k_lin\.weight$", ("key",), model_types=XLM_MODEL_TYPES),
    PresetRule("xlm", r"(^|\.)v_lin\.weight$", ("value",), model_types=XLM_MODEL_TYPES),
    PresetRule("xlm", r"(^|\.)out_lin\.weight$", ("attn_out",), model_types=XLM_MODEL_TYPES),
    PresetRule("xlm", r"(^|\.)(lin[12]|vocab_transform)\.weight$", ("mlp",), model_types=XLM_MODEL_TYPES),
    PresetRule("xlm", r"(^|\.)(position|lang)_embeddings\.weight$", ("embedding",), model_types=XLM_MODEL_TYPES),
    # ProphetNet: query, key and value (heads of the attention module's own size: its encoder and decoder may have
    # different head counts), the cross-attention's output, the MLP, the position and n-gram stream tables read by
    # index, and the decoder's relative-position projection (a linear map of each query's hidden state to one logit per
    # distance bucket and head: an MLP matrix, one block per output).
    PresetRule("prophetnet", r"(^|\.)query_proj\.weight$", ("query",), within=PROPHETNET_ATTENTION),
    PresetRule("prophetnet", r"(^|\.)key_proj\.weight$", ("key",), within=PROPHETNET_ATTENTION),
    PresetRule("prophetnet", r"(^|\.)value_proj\.weight$", ("value",), within=PROPHETNET_ATTENTION),
    PresetRule("prophetnet", r"(^|\.)cross_attn\.out_proj\.weight$", ("attn_out",), within=PROPHETNET_ATTENTION),
    PresetRule("prophetnet", r"(^|\.)(feed_forward\.(intermediate|output)|relative_pos_embeddings)\.weight$", ("mlp",),
               model_types=("prophetnet",)),
    PresetRule("prophetnet", r"(^|\.)(position|ngram)_embeddings\.weight$", ("embedding",),
               model_types=("prophetnet",)),
    # CPM-Ant: query, key and value (heads of dim_head), the attention output, a gated MLP, the token (and prompt) and
    # segment tables, and the relative-position bias table (one row per bucket, read by index).
    PresetRule("cpmant", r"(^|\.)self_attention\.project_q\.weight$", ("query",), model_types=("cpmant",)),
    PresetRule("cpmant", r"(^|\.)self_attention\.project_k\.weight$", ("key",), model_types=("cpmant",)),
    PresetRule("cpmant", r"(^|\.)self_attention\.project_v\.weight$", ("value",), model_types=("cpmant",)),
    PresetRule("cpmant", r"(^|\.)self_attention\.attention_out\.weight$", ("attn_out",), model_types=("cpmant",)),
    PresetRule("cpmant", r"(^|\.)ffn\.(w_in\.w_[01]|w_out)\.weight$", ("mlp",), model_types=("cpmant",)),
    PresetRule("cpmant", r"(^|\.)((segment|input)_embedding\.weight|position_bias\.relative_attention_bias)$",
               ("embedding",), model_types=("cpmant",)),
    # Byte Latent Transformer: the hashed byte n-gram tables (an embedding) and the linear maps between the local
    # models' width and the global model's patches (MLP matrices).
    PresetRule("blt", r"(^|\.)encoder_hash_tok_embedding\.weight$", ("embedding",)),
    PresetRule("blt", r"(^|\.)(patch|token)_embedding_projection\.weight$", ("mlp",)),
    PresetRule("openai-gpt", r"(^|\.)positions_embed\.weight$", ("embedding",)),
    PresetRule("mamba-nemotron", r"(^|\.)embeddings\.weight$", ("embedding",)),  # Mamba-2's, Nemotron-H's
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


Part = tuple[str, str, int, int, int, int]
"""One segment of a fused weight along its split axis: ``(name, role, start, length, groups, period)``,
``groups`` runs of ``length`` indices one every ``period`` (``groups == 1``: one run)."""


def config_attr(config: Any, key: str) -> Any:
    """``config.key``, or None where the config does not have it, or holds it per layer only (a heterogeneous
    config such as Gemma 4's raises on a global read of ``head_dim``: each layer's config says)."""
    try:
        return getattr(config, key, None)
    except RuntimeError:
        return None


def _config_size(config: Any, key: str) -> int | None:
    """``key`` read from ``config`` as an integer >= 0 (a size that may be zero: a part that is absent), or None."""
    value = config_attr(config, key)
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _zero(config: Any, keys: str) -> int | None:
    """0 where one of ``keys`` (``"a|b"``) is set to 0 in ``config`` (a part that is absent), else None."""
    return 0 if any(_config_size(config, key) == 0 for key in keys.split("|")) else None


def _config_int(config: Any, keys: tuple[str, ...]) -> int | None:
    for key in keys:
        value = config_attr(config, key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def fused_parts(layout: str, config: Any, size: int) -> list[Part] | None:
    """The segments of a fused query/key/value weight whose split axis has ``size`` entries, read from the
    model's ``config`` as its modeling code reads it; None if the config does not determine them (the
    weight is then kept whole)."""
    if layout.startswith("linear_"):
        return _linear_attention_parts(layout, config, size)
    if layout == "mamba2":
        return _mamba2_parts(config, size)
    if layout == "rows_xz":  # Zamba's in_proj: x and z alternate row by row
        half = size // 2
        return [("x", "value", 0, 1, half, 2), ("z", "mlp", 1, 1, half, 2)] if size == 2 * half else None
    heads = _config_int(config, HEAD_COUNT_KEYS)
    if heads is None:
        return None
    if layout == "q_gate_heads":
        hd = _config_int(config, ("head_dim",))
        if hd is None:
            return None
        parts = [("Q", "query", 0, hd, heads, 2 * hd), ("gate", "mlp", hd, hd, heads, 2 * hd)]
        return parts if heads * 2 * hd == size else None
    if layout.startswith("mla_"):
        return _mla_parts(layout, config, heads, size)
    if layout == "falcon":
        if getattr(config, "new_decoder_architecture", False):
            groups = _config_int(config, ("num_kv_heads",)) or heads
            per_group = heads // groups
            hd = size // (groups * (per_group + 2))
            period = (per_group + 2) * hd
            parts = [("Q", "query", 0, per_group * hd, groups, period),
                     ("K", "key", per_group * hd, hd, groups, period),
                     ("V", "value", (per_group + 1) * hd, hd, groups, period)]  # fmt: skip
            return parts if groups * period == size else None
        layout = "mqa" if getattr(config, "multi_query", False) else "qkv_heads"
    if layout == "bigcode":
        layout = "mqa" if getattr(config, "multi_query", False) else "qkv_heads"
    if layout == "codegen":
        mp = 4
        local = size // (3 * mp)
        parts = [("Q", "query", 0, local, mp, 3 * local), ("K", "key", 2 * local, local, mp, 3 * local),
                 ("V", "value", local, local, mp, 3 * local)]  # fmt: skip
        return parts if 3 * mp * local == size and heads % mp == 0 else None
    if layout == "qkv_heads":
        hd = size // (3 * heads)
        parts = [(n, r, i * hd, hd, heads, 3 * hd) for i, (n, r) in enumerate(_QKV)]
        return parts if 3 * heads * hd == size else None
    if layout in ("mqa", "qkv_sizes"):
        kv = 1 if layout == "mqa" else (_config_int(config, KV_HEAD_COUNT_KEYS) or heads)
        hd = _config_int(config, ("head_dim",)) or size // (heads + 2 * kv)
        sizes = (heads * hd, kv * hd, kv * hd)
        if sum(sizes) != size:
            return None
        starts = (0, sizes[0], sizes[0] + sizes[1])
        return [(n, r, start, length, 1, 0) for (n, r), start, length in zip(_QKV, starts, sizes)]
    return None


_QKV = (("Q", "query"), ("K", "key"), ("V", "value"))


def _config_ints(config: Any, keys: tuple[str, ...]) -> list[int] | None:
    """Each of ``keys`` read from ``config`` as a positive integer, or None if any is missing."""
    dims = [_config_int(config, (key,)) for key in keys]
    return None if any(d is None for d in dims) else [int(d) for d in dims if d is not None]


def _linear_attention_parts(layout: str, config: Any, size: int) -> list[Part] | None:
    """Gated DeltaNet's fused input projections (see :data:`GATED_DELTANET_MODEL_TYPES`): ``linear_qkv`` is
    ``[q | k | v]``; ``linear_qkvz`` is ``[q | k | v | z]`` for each key head in turn, its v and z holding that
    key head's share of the value heads."""
    dims = _config_ints(config, ("linear_num_key_heads", "linear_num_value_heads", "linear_key_head_dim",
                                 "linear_value_head_dim"))  # fmt: skip
    if dims is None:
        return None
    nk, nv, dk, dv = dims
    if layout == "linear_qkv":
        q, v = nk * dk, nv * dv
        parts: list[Part] = [("Q", "query", 0, q, 1, 0), ("K", "key", q, q, 1, 0), ("V", "value", 2 * q, v, 1, 0)]
        return parts if 2 * q + v == size else None
    if layout != "linear_qkvz" or nv % nk:
        return None
    w = nv // nk * dv
    period = 2 * dk + 2 * w
    parts = [("Q", "query", 0, dk, nk, period), ("K", "key", dk, dk, nk, period), ("V", "value", 2 * dk, w, nk, period),
             ("gate", "mlp", 2 * dk + w, w, nk, period)]  # fmt: skip
    return parts if nk * period == size else None


MAMBA2_KEYS = (("mamba_n_heads", "mamba_num_heads", "n_mamba_heads", "num_heads"),
               ("mamba_d_head", "mamba_head_dim", "mamba_headdim", "head_dim"),
               ("mamba_d_state", "ssm_state_size", "state_size"), ("mamba_n_groups", "mamba_ngroups", "n_groups"))
"""Where the Mamba-2 families' configs keep the mixer's heads, head size, state size and groups (a hybrid's
``head_dim`` is its attention's: the mixer's own names come first)."""


def _mamba2_parts(config: Any, size: int) -> list[Part] | None:
    """A Mamba-2 mixer's ``in_proj`` (see :data:`MAMBA2_MIXERS`): ``[z | x | B | C | dt]``."""
    dims = [_config_int(config, keys) for keys in MAMBA2_KEYS]
    if any(d is None for d in dims):
        return None
    heads, head_dim, state, groups = (int(d) for d in dims if d is not None)
    inner, bc = heads * head_dim, groups * state
    parts: list[Part] = [("z", "mlp", 0, inner, 1, 0), ("x", "value", inner, inner, 1, 0),
                         ("B", "key", 2 * inner, bc, 1, 0), ("C", "query", 2 * inner + bc, bc, 1, 0),
                         ("dt", "router", 2 * inner + 2 * bc, heads, 1, 0)]  # fmt: skip
    return parts if 2 * inner + 2 * bc + heads == size else None


def _mla_parts(layout: str, config: Any, heads: int, size: int) -> list[Part] | None:
    """Multi-head latent attention's fused weights: ``mla_kv_a`` is ``[latent | rotary key]`` (the latent alone
    where the attention has no rotary part, as GLM-5-Next's), ``mla_kv_b`` is ``[key nope | value]`` for each head in
    turn, ``mla_q_gate`` ``[query | output gate]`` for each head in turn, the gate of the value's size (see
    :data:`MLA_MODEL_TYPES`)."""
    dims = _config_ints(config, ("kv_lora_rank", "qk_nope_head_dim", "v_head_dim"))
    rope = _config_size(config, "qk_rope_head_dim")
    if dims is None or rope is None:
        return None
    latent, nope, v = dims
    if layout == "mla_kv_a":
        parts: list[Part] = [("KV", "value", 0, latent, 1, 0)] + ([("K", "key", latent, rope, 1, 0)] if rope else [])
        return parts if latent + rope == size else None
    if layout == "mla_q_gate":
        q = nope + rope
        parts = [("Q", "query", 0, q, heads, q + v), ("gate", "mlp", q, v, heads, q + v)]
        return parts if heads * (q + v) == size else None
    parts = [("K", "key", 0, nope, heads, nope + v), ("V", "value", nope, v, heads, nope + v)]
    return parts if heads * (nope + v) == size else None


def rule_head_size(rule: PresetRule | None, config: Any, head_dim: int | None) -> int | None:
    """The head size of the weights ``rule`` matches (1: per output neuron), else the model's ``head_dim``."""
    if rule is None:
        return head_dim
    if rule.per_neuron:
        return 1
    if rule.head_size:  # a part may be absent (size 0: no rotary part); a size the config lacks: per neuron
        sizes = [_config_int(config, tuple(key.split("|"))) or _zero(config, key) for key in rule.head_size]
        total = sum(n for n in sizes if n is not None)
        return total if None not in sizes and total > 0 else 1
    return head_dim
