"""Model size presets (HF GPT2LMHeadModel and LlamaForCausalLM), architectures from Hugging Face configs,
and loading local checkpoints.

Tiny presets (about 1M, 5M and 20M parameters at a 2048-token vocabulary) train on a CPU; the paper's
sizes (GPT-2 124M-1.5B with its 50257-token vocabulary, Llama 60M-350M and 7B with 32000 tokens) are
for memory accounting on the meta device and for real hardware.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class ModelPreset:
    """A named model size: the HF family and the config fields that define it."""

    family: str
    """'gpt2' or 'llama'."""
    config: dict[str, Any] = field(default_factory=dict)
    """Config fields (layers, widths, heads)."""
    paper_vocab: int | None = None
    """The vocabulary of the paper's model of this size (used when no tokenizer decides it)."""


def _gpt2(n_layer: int, n_embd: int, n_head: int, paper: bool = False) -> ModelPreset:
    return ModelPreset("gpt2", dict(n_layer=n_layer, n_embd=n_embd, n_head=n_head), 50257 if paper else None)


def _llama(layers: int, hidden: int, inter: int, heads: int, paper: bool = False) -> ModelPreset:
    return ModelPreset(
        "llama",
        dict(num_hidden_layers=layers, hidden_size=hidden, intermediate_size=inter, num_attention_heads=heads),
        32000 if paper else None,
    )


MODEL_PRESETS: dict[str, ModelPreset] = {
    "gpt2-1m": _gpt2(2, 160, 4),
    "gpt2-5m": _gpt2(6, 256, 4),
    "gpt2-20m": _gpt2(6, 512, 8),
    "gpt2-124m": _gpt2(12, 768, 12, paper=True),
    "gpt2-350m": _gpt2(24, 1024, 16, paper=True),
    "gpt2-774m": _gpt2(36, 1280, 20, paper=True),
    "gpt2-1.5b": _gpt2(48, 1600, 25, paper=True),
    "llama-1m": _llama(2, 128, 352, 4),
    "llama-2m": _llama(3, 192, 512, 4),
    "llama-5m": _llama(4, 256, 688, 4),
    "llama-10m": _llama(5, 384, 1024, 6),
    "llama-20m": _llama(6, 512, 1376, 8),
    "llama-60m": _llama(8, 512, 1376, 8, paper=True),
    "llama-130m": _llama(12, 768, 2048, 12, paper=True),
    "llama-350m": _llama(24, 1024, 2736, 16, paper=True),
    "llama-7b": _llama(32, 4096, 11008, 32, paper=True),
}
"""Every model size by name; the Llama sizes follow GaLore's and Adam-mini's configs."""


def config_file(name: str, flag: str = "--model") -> Path:
    """The ``config.json`` that ``name`` names: the file itself, a local model directory holding one, or a
    model id in the local Hugging Face cache (never downloaded)."""
    from adapm.train.hub import cached_snapshot, looks_like_hub_id

    path = cached_snapshot(name, "model", flag) if looks_like_hub_id(name) else Path(name).expanduser()
    file = path / "config.json" if path.is_dir() else path
    if not (file.is_file() and file.suffix == ".json"):
        raise ValueError(
            f"Invalid model: {name!r}; expected a preset {sorted(MODEL_PRESETS)}, a local Hugging Face model "
            "directory, a config.json file or a model id in the local Hugging Face cache"
        )
    return file


def load_config(name: str, flag: str = "--model") -> Any:
    """The transformers config that :func:`config_file` finds for ``name``."""
    from transformers import AutoConfig

    file = config_file(name, flag)
    try:
        return AutoConfig.from_pretrained(str(file), local_files_only=True)
    except (OSError, ValueError, KeyError) as err:
        raise ValueError(f"Invalid model: {name!r}: {file} is not a Hugging Face config ({err})") from None


def _from_file(name: str, vocab_size: int | None, seq_len: int) -> Any:
    """A Hugging Face config given by file, directory or cached id, its vocabulary resized to ``vocab_size``
    (the data's tokenizer) and its special-token ids kept inside it."""
    config = load_config(name)
    text = config.get_text_config()
    if vocab_size is not None:
        text.vocab_size = vocab_size
        for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
            value = getattr(text, key, None)
            if isinstance(value, int) and value >= vocab_size:
                setattr(text, key, None if key == "pad_token_id" else vocab_size - 1)
    if getattr(text, "max_position_embeddings", seq_len) < seq_len:
        text.max_position_embeddings = seq_len
    return config


def hf_config(name: str, vocab_size: int | None = None, seq_len: int = 1024) -> Any:
    """The transformers config of a preset (``vocab_size`` defaults to the paper's), or of a Hugging Face
    ``config.json`` (file, model directory or cached model id), resized to ``vocab_size`` when given."""
    from transformers import GPT2Config, LlamaConfig

    if name not in MODEL_PRESETS:
        return _from_file(name, vocab_size, seq_len)
    preset = MODEL_PRESETS[name]
    vocab = vocab_size or preset.paper_vocab or 2048
    if preset.family == "gpt2":
        return GPT2Config(
            vocab_size=vocab,
            n_positions=max(seq_len, 1024 if preset.paper_vocab else seq_len),
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            bos_token_id=vocab - 1 if vocab < 50257 else 50256,
            eos_token_id=vocab - 1 if vocab < 50257 else 50256,
            **preset.config,
        )
    return LlamaConfig(
        vocab_size=vocab,
        max_position_embeddings=max(seq_len, 2048 if preset.paper_vocab else seq_len),
        bos_token_id=1 if vocab > 2 else 0,
        eos_token_id=2 if vocab > 2 else 0,
        pad_token_id=None,
        tie_word_embeddings=False,
        **preset.config,
    )


def build_model(
    name: str,
    vocab_size: int | None = None,
    seq_len: int = 1024,
    *,
    eos_token_id: int | None = None,
    device: str | torch.device | None = None,
) -> nn.Module:
    """A freshly initialised causal LM of preset ``name``, or of the architecture a Hugging Face config names
    (see :func:`hf_config`; its weights, if any, are not read), on ``device`` (e.g. ``"meta"``)."""
    from transformers import AutoModelForCausalLM

    config = hf_config(name, vocab_size, seq_len)
    if eos_token_id is not None:
        text = config.get_text_config()
        text.eos_token_id = text.bos_token_id = eos_token_id
    with torch.device(device or "cpu"):
        return AutoModelForCausalLM.from_config(config)


def checkpoint_dir(path: str | Path) -> Path:
    """``path`` if it is a local Hugging Face checkpoint directory (``--init-from``), else an error saying so."""
    path = Path(path).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"--init-from: {path} is not a Hugging Face checkpoint directory (no config.json)")
    return path


def load_pretrained(path: str | Path) -> nn.Module:
    """A causal LM from a local Hugging Face checkpoint directory (never downloads)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(checkpoint_dir(path)), local_files_only=True, dtype=torch.float32)


def count_parameters(model: nn.Module) -> int:
    """Parameters counted once (tied weights once)."""
    return sum(p.numel() for p in model.parameters())
