"""Optimizer-state bytes at paper scale, counted on the meta device without allocating anything.

Every optimizer is built by :func:`adapm.train.optimizers.build_optimizer`, exactly as for training,
on a meta-device model with meta gradients; its state is then created by its own code (one ``step()``
for the baselines, :meth:`adapm.AdaPM.init_state` for AdaPM) and counted with
:func:`adapm.state_bytes`. Nothing is allocated, so GPT-2 1.5B and Llama 7B take seconds.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

import adapm
from adapm.train.config import OptimConfig
from adapm.train.models import MODEL_PRESETS, build_model, load_config
from adapm.train.optimizers import build_optimizer
from adapm.train.registry import PAPER_OPTIMIZERS, REGISTRY
from adapm.train.tables import markdown_table

PAPER_TABLE2: dict[str, dict[str, float]] = {
    "llama-350m": {"adamw": 2.72e9, "adam-mini": 1.36e9, "adapm": 1.48e9, "adapm-mini": 0.12e9},
    "gpt2-1.5b": {"adamw": 12.48e9, "adam-mini": 6.24e9, "adapm": 6.98e9, "adapm-mini": 0.74e9},
}
"""The paper's Table 2 (float32 states, 1G = 1e9 bytes); its 'Adam' column is our adamw."""


@dataclass(frozen=True)
class MemoryRow:
    """One optimizer's state bytes for one model."""

    optimizer: str
    state_bytes: int
    ratio_to_adamw: float
    paper_bytes: float | None = None


def meta_model(name: str) -> nn.Module:
    """A preset (paper vocabulary), a local HF model directory, a ``config.json`` file or a model id in the
    local Hugging Face cache, built on the meta device (nothing allocated, nothing downloaded)."""
    if name in MODEL_PRESETS:
        return build_model(name, device="meta")
    return model_from_config(load_config(name), device="meta")


def model_from_config(config: Any, device: str | torch.device = "meta") -> nn.Module:
    """The model a Hugging Face config describes: causal LM, else sequence-to-sequence LM, else the base model."""
    import transformers

    with torch.device(device):
        for auto in (transformers.AutoModelForCausalLM, transformers.AutoModelForSeq2SeqLM, transformers.AutoModel):
            try:
                return auto.from_config(config)
            except ValueError:  # this config has no model of that kind
                continue
    raise ValueError(f"no transformers model class for config type {type(config).__name__}")


def count_state_bytes(model: nn.Module, optimizer: str, cfg: OptimConfig | None = None) -> int:
    """State bytes of ``optimizer`` on ``model`` through the optimizer's own allocation code.

    ``model`` may live on the meta device (nothing is allocated) or be real (then a real, zero-gradient
    step is taken on a copy-free basis: gradients are set to zeros and parameters are restored).
    """
    cfg = cfg or OptimConfig(optimizer=optimizer)
    if cfg.optimizer != optimizer:
        cfg = OptimConfig(**{**cfg.__dict__, "optimizer": optimizer})
    params = [p for p in model.parameters() if p.requires_grad]
    saved = [p.detach().clone() for p in params] if not params[0].is_meta else None
    for p in params:
        p.grad = torch.zeros_like(p)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = build_optimizer(model, cfg)
        if isinstance(opt, adapm.AdaPM):
            opt.init_state()
        else:
            opt.step()
    nbytes = adapm.state_bytes(opt)
    with torch.no_grad():
        for i, p in enumerate(params):
            p.grad = None
            if saved is not None:
                p.copy_(saved[i])
    return nbytes


def state_counts(model: nn.Module, optimizers: tuple[str, ...]) -> dict[str, int]:
    """:func:`count_state_bytes` of each optimizer. A third-party baseline whose own code fails on this
    model (e.g. the official Adam-mini on DeepSeek's latent attention) is left out with a warning naming
    it and its error, so that the others are still counted; adapm's and torch's errors are raised."""
    counts = {}
    for opt in optimizers:
        try:
            counts[opt] = count_state_bytes(model, opt)
        except Exception as err:
            package = REGISTRY[opt].extra
            if package is None:
                raise
            warnings.warn(f"{opt} left out: the {package} package fails on this model "
                          f"({type(err).__name__}: {err})", RuntimeWarning, stacklevel=2)  # fmt: skip
    return counts


def memory_table(name: str, optimizers: tuple[str, ...] = PAPER_OPTIMIZERS) -> list[MemoryRow]:
    """State bytes of each optimizer for model ``name``, with the paper's Table 2 value where it has one."""
    model = meta_model(name)
    counts = state_counts(model, optimizers)
    adamw = counts["adamw"] if "adamw" in counts else count_state_bytes(model, "adamw")
    paper = PAPER_TABLE2.get(name, {})
    return [MemoryRow(opt, n, n / adamw, paper.get(opt)) for opt, n in counts.items()]


def format_memory_table(name: str, rows: list[MemoryRow]) -> str:
    """A Markdown table of :func:`memory_table` rows."""
    params = sum(p.numel() for p in meta_model(name).parameters())
    has_paper = any(r.paper_bytes is not None for r in rows)
    cells = [{"optimizer": r.optimizer, "ours": r.state_bytes / 1e9, "vs": 100 * r.ratio_to_adamw,
              "paper": r.paper_bytes and r.paper_bytes / 1e9,
              "ratio": r.paper_bytes and r.state_bytes / r.paper_bytes} for r in rows]  # fmt: skip
    columns = [("optimizer", "{}"), ("ours", "state (ours)", "{:.3f} GB"), ("vs", "vs AdamW", "{:.1f}%")]
    if has_paper:
        columns += [("paper", "paper Table 2", "{:.2f} GB"), ("ratio", "ours / paper", "{:.2f}")]
    kinds = "float32 state (bf16 and 8-bit in the -bf16, -int8 and -8bit rows)"
    return f"{name}: {params / 1e6:,.1f}M parameters, {kinds}, 1 GB = 1e9 bytes\n\n" + markdown_table(cells, columns)


@dataclass(frozen=True)
class TrainingMemoryRow:
    """What one optimizer's training step holds on the device, in bytes."""

    optimizer: str
    weights: int
    gradients: int
    optimizer_state: int
    activations_estimate: int
    activations_method: str = "counted"
    """How the activations were found: "counted" (the model's forward on the meta device) or "formula"."""

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer_state + self.activations_estimate


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ATTENTION = ("sdpa", "eager")
"""How attention is computed in training: ``sdpa`` with a fused kernel (FlashAttention or memory-efficient,
what GPUs run; it keeps no s x s matrix) or ``eager`` (the scores and probabilities are kept for backward)."""


def saved_activation_bytes(model: nn.Module, batch_size: int, seq_len: int, attention: str = "sdpa") -> int:
    """Bytes of the tensors that ``model``'s forward (and loss) saves for backward, on the meta device.

    The model's own forward runs on shapes only (``model`` must be on the meta device, in its training
    dtype), and every tensor autograd saves is counted once per storage, parameters excluded. The meta
    device computes attention eagerly, so the count holds the ``(batch, heads, s, s)`` scores and
    probabilities; with ``attention="sdpa"`` those are left out, as a fused kernel does not keep them.

    Raises:
        Exception: whatever the forward raises where it cannot run on the meta device (e.g. routing that
            depends on the values, as in mixture-of-experts layers).
    """
    # Storages are told apart by ``_cdata`` (the address of the storage object): on the meta device every
    # data_ptr() is 0, and a Python storage object is made anew for each access.
    storages: dict[int, int] = {}
    scores: set[int] = set()  # storages saved as (batch, heads, s, s), in whatever view
    params = {p.untyped_storage()._cdata for p in model.parameters()}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        storages[storage._cdata] = storage.nbytes()
        if t.dim() == 4 and tuple(t.shape[-2:]) == (seq_len, seq_len):
            scores.add(storage._cdata)
        return t

    ids = torch.zeros((batch_size, seq_len), dtype=torch.long, device="meta")
    was_training = model.training
    model.train()
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            try:
                model(input_ids=ids, labels=ids)
            except TypeError:  # a base model without a loss
                model(input_ids=ids)
    finally:
        model.train(was_training)
    left_out = params | (scores if attention != "eager" else set())
    return sum(n for key, n in storages.items() if key not in left_out)


def formula_activation_bytes(model: nn.Module, batch_size: int, seq_len: int, dtype_bytes: int, attention: str) -> int:
    """An estimate for a model whose forward does not run on the meta device: per layer ``s b h (34 + 5 a
    s / h)`` bytes at 2-byte precision (Korthikanti et al., "Reducing Activation Recomputation in Large
    Transformer Models", 2022; the ``5 a s / h`` term, the s x s scores, only for ``eager``), scaled to
    ``dtype_bytes``, plus the logits and their softmax in float32."""
    config = model.config  # type: ignore[attr-defined]
    layers = next(getattr(config, k) for k in ("num_hidden_layers", "n_layer", "num_layers") if hasattr(config, k))
    hidden = next(getattr(config, k) for k in ("hidden_size", "n_embd", "d_model") if hasattr(config, k))
    heads = next(getattr(config, k) for k in ("num_attention_heads", "n_head", "num_heads") if hasattr(config, k))
    s, b = seq_len, batch_size
    scores = 5 * heads * s / hidden if attention == "eager" else 0
    per_layer = s * b * hidden * (34 + scores) * dtype_bytes / 2
    logits = 2 * 4 * b * s * config.vocab_size
    return int(layers * per_layer + logits)


def activation_bytes(model: nn.Module, batch_size: int, seq_len: int, attention: str = "sdpa") -> tuple[int, str]:
    """The activations a training step keeps (no recomputation) and how they were found: ``counted`` by
    :func:`saved_activation_bytes`, or by ``formula`` (:func:`formula_activation_bytes`) where the forward
    does not run on the meta device."""
    try:
        return saved_activation_bytes(model, batch_size, seq_len, attention), "counted"
    except Exception:  # any forward that needs values (routing, config defaults it lacks): the formula
        dtype_bytes = next(model.parameters()).element_size()
        return formula_activation_bytes(model, batch_size, seq_len, dtype_bytes, attention), "formula"


def training_memory(
    name: str, optimizers: tuple[str, ...], batch_size: int, seq_len: int, dtype: str, attention: str = "sdpa"
) -> list[TrainingMemoryRow]:
    """Weights, gradients, optimizer state (counted through each optimizer's own code on the meta device;
    AdaPM keeps float32 state whatever the parameter dtype unless ``state_dtype`` is ``bf16`` or ``int8``,
    torch's optimizers the parameter dtype) and the activations (:func:`activation_bytes`), for training
    ``name`` with parameters in ``dtype``."""
    if dtype not in DTYPES:
        raise ValueError(f"Invalid --dtype: {dtype!r}; expected one of {', '.join(DTYPES)}")
    if attention not in ATTENTION:
        raise ValueError(f"Invalid --attention: {attention!r}; expected one of {', '.join(ATTENTION)}")
    if batch_size < 1 or seq_len < 1:
        raise ValueError(f"Invalid --batch-size/--seq-len: {batch_size}/{seq_len}; expected integers >= 1")
    model = meta_model(name).to(DTYPES[dtype])
    n_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    acts, method = activation_bytes(model, batch_size, seq_len, attention)
    return [TrainingMemoryRow(opt, n_bytes, n_bytes, n, acts, method)
            for opt, n in state_counts(model, optimizers).items()]  # fmt: skip


def format_training_memory(
    name: str, rows: list[TrainingMemoryRow], batch_size: int, seq_len: int, dtype: str, attention: str = "sdpa"
) -> str:
    """A Markdown table of :func:`training_memory` rows, with the GPU sizes each total fits in."""
    how = ("counted from the model's forward on the meta device" if rows[0].activations_method == "counted"
           else "estimated by formula (the forward does not run on the meta device)")  # fmt: skip
    kept = "no s x s attention matrix (fused sdpa kernel)" if attention == "sdpa" else "eager attention's s x s scores"
    title = (f"{name}, {dtype} parameters, batch {batch_size} x {seq_len} tokens (1 GB = 1e9 bytes; activations "
             f"{how}, without recomputation, with {kept})")  # fmt: skip
    cells = []
    for r in rows:
        fits = ", ".join(f"{size} GiB" for size in (24, 40, 80) if r.total <= size * 2**30)
        gb = {k: v / 1e9 for k, v in r.__dict__.items() if isinstance(v, int)}
        cells.append({**gb, "optimizer": r.optimizer, "total": r.total / 1e9, "fits": fits or "none of 24/40/80 GiB"})
    headings = {"weights": "weights", "gradients": "gradients", "optimizer_state": "optimizer state",
                "activations_estimate": "activations", "total": "total"}  # fmt: skip
    columns = [("optimizer", "{}"), *((k, h, "{:.2f} GB") for k, h in headings.items()), ("fits", "fits in", "{}")]
    return title + "\n\n" + markdown_table(cells, columns)
