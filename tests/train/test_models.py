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
    with pytest.raises(ValueError, match="Invalid model preset"):
        build_model("gpt2-2m")
