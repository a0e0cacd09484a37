"""Model presets: sizes as named, local checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest

from adapm.train.models import MODEL_PRESETS, build_model, count_parameters, load_pretrained


@pytest.mark.parametrize(
    ("name", "low", "high"),
    [
        ("gpt2-1m", 0.8e6, 1.3e6),
        ("gpt2-5m", 4e6, 6.5e6),
        ("gpt2-20m", 16e6, 25e6),
        ("llama-1m", 0.8e6, 1.3e6),
        ("llama-5m", 4e6, 6.5e6),
        ("llama-20m", 16e6, 25e6),
        ("gpt2-124m", 120e6, 130e6),
        ("gpt2-1.5b", 1.5e9, 1.6e9),
        ("llama-60m", 50e6, 65e6),
        ("llama-350m", 330e6, 380e6),
    ],
)
def test_preset_sizes(name: str, low: float, high: float) -> None:
    vocab = None if MODEL_PRESETS[name].paper_vocab else 2048
    model = build_model(name, vocab, 128, device="meta")
    assert low <= count_parameters(model) <= high


def test_init_from_local_checkpoint(tmp_path: Path) -> None:
    model = build_model("llama-1m", 300, 32)
    model.save_pretrained(str(tmp_path / "ckpt"))
    loaded = load_pretrained(tmp_path / "ckpt")
    assert count_parameters(loaded) == count_parameters(model)
    with pytest.raises(FileNotFoundError, match="not a Hugging Face checkpoint directory"):
        load_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"Invalid model: .gpt2-2m.; expected a preset"):
        build_model("gpt2-2m")


def test_an_architecture_from_a_hugging_face_config_trains_from_a_random_init(
    play_text: Path, cache_dir: Path, tmp_path: Path
) -> None:
    """``--model config.json`` (or its directory): the architecture is built from the config, at the data's
    vocabulary, with special-token ids that fall outside it moved in; nothing is read but the config."""
    import dataclasses
    import json
    import warnings

    from transformers import AutoConfig

    from adapm.train.config import ModelConfig
    from adapm.train.loop import pretrain

    from conftest import tiny_config

    AutoConfig.for_model(
        "qwen3_5_text", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8,
        linear_value_head_dim=8, layer_types=["linear_attention", "full_attention"], vocab_size=151936,
        pad_token_id=151643, eos_token_id=151645, max_position_embeddings=16,
    ).save_pretrained(str(tmp_path / "qwen"))  # fmt: skip
    model = build_model(str(tmp_path / "qwen" / "config.json"), vocab_size=300, seq_len=32, eos_token_id=7)
    config = model.config
    assert (config.model_type, config.vocab_size, config.pad_token_id, config.eos_token_id) == ("qwen3_5_text", 300,
                                                                                                 None, 7)  # fmt: skip
    assert config.max_position_embeddings == 32
    base = tiny_config(play_text, cache_dir, tmp_path / "run", "adapm-mini", save_model=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # every matrix recognised: no partition warning
        summary = pretrain(dataclasses.replace(base, model=ModelConfig(model=str(tmp_path / "qwen"))))
    assert summary["final_val_loss"] < summary["unigram_val_loss"] + 1.0
    resolved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert resolved["model"]["model"] == str(tmp_path / "qwen")
    with pytest.raises(ValueError, match=r"Invalid model: '.*nowhere'; expected a preset"):
        ModelConfig(model=str(tmp_path / "nowhere"))
