"""Config dataclasses: every field documented, bad values named, files and unknown keys."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from adapm.train.config import (
    CompareConfig,
    DataConfig,
    FinetuneModelConfig,
    ModelConfig,
    OptimConfig,
    PretrainConfig,
    RLHFConfig,
    SFTConfig,
    SFTDataConfig,
    TrainConfig,
    field_docs,
    from_dict,
    read_config_file,
)

SIDE_BY_SIDE = [CompareConfig, SFTConfig, RLHFConfig]


@pytest.mark.parametrize(
    "cls", [DataConfig, ModelConfig, OptimConfig, TrainConfig, SFTDataConfig, FinetuneModelConfig, *SIDE_BY_SIDE]
)
def test_every_field_has_a_docstring(cls: type) -> None:
    docs = field_docs(cls)
    nested = {"data", "model", "optim", "train"} if cls in SIDE_BY_SIDE else set()
    for f in dataclasses.fields(cls):
        if f.name not in nested:
            assert docs.get(f.name), f"{cls.__name__}.{f.name} has no docstring"


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: DataConfig(vocab_size=100), "Invalid vocab_size: 100"),
        (lambda: DataConfig(seq_len=2), "Invalid seq_len"),
        (lambda: DataConfig(val_fraction=0.9), "Invalid val_fraction"),
        (lambda: ModelConfig(model="gpt5"), "Invalid model: 'gpt5'"),
        (lambda: OptimConfig(optimizer="sgd"), "Invalid optimizer: 'sgd'"),
        (lambda: OptimConfig(lr=-1.0), "Invalid lr"),
        (lambda: OptimConfig(beta1=1.0), "Invalid beta1"),
        (lambda: OptimConfig(rank_ratio=0.0), "Invalid rank_ratio"),
        (lambda: OptimConfig(tracker="x"), "Invalid tracker"),
        (lambda: OptimConfig(state_dtype="int4"), "Invalid state_dtype: 'int4'"),
        (lambda: OptimConfig(optimizer="galore", lr_ratios="blockwise"), "Invalid lr_ratios: 'blockwise'.*galore"),
        (lambda: TrainConfig(steps=0), "Invalid steps: 0"),
        (lambda: TrainConfig(grad_clip=0.0), "Invalid grad_clip"),
        (lambda: TrainConfig(min_lr_ratio=2.0), "Invalid min_lr_ratio"),
        (lambda: CompareConfig(optimizers="adamw,lion"), "Invalid optimizers: 'lion'"),
    ],
)
def test_bad_values_name_the_field(build, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build()


@pytest.mark.parametrize("cls", [PretrainConfig, *SIDE_BY_SIDE])
def test_every_run_config_checks_its_optimizers_and_compile_step(cls: type) -> None:
    """Pretraining and the three side-by-side runs refuse the same things when they are built."""
    with pytest.raises(ValueError, match=r"Invalid compile_step: True; expected false with fsdp"):
        cls(optim=OptimConfig(optimizer="adapm", compile_step=True), train=TrainConfig(fsdp=True))
    if cls is not PretrainConfig:
        with pytest.raises(ValueError, match=r"Invalid optimizers: 'lion'"):
            cls(optimizers="adamw,lion")
        # Each run's settings: block-wise lrs would be ignored by SGD-SaI, so they are refused up front.
        with pytest.raises(ValueError, match=r"Invalid lr_ratios: 'blockwise'; expected null for sgd-sai"):
            cls(optimizers="adamw,sgd-sai", optim=OptimConfig(lr_ratios="blockwise"))
        assert cls(optimizers="adamw,adam-mini,adapm-mini", optim=OptimConfig(lr_ratios="blockwise"))


def test_from_dict_nested_and_unknown_keys() -> None:
    cfg = from_dict(PretrainConfig, {"optim": {"optimizer": "adamw", "lr": 1e-3}, "train": {"steps": 5}})
    assert cfg.optim.optimizer == "adamw" and cfg.train.steps == 5 and cfg.data.seq_len == 128
    with pytest.raises(ValueError, match=r"unknown config.optim keys \['learning_rate'\]"):
        from_dict(PretrainConfig, {"optim": {"learning_rate": 1.0}})


def test_config_files(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_text(json.dumps({"train": {"steps": 7}}))
    (tmp_path / "b.yaml").write_text("train:\n  steps: 9\n")
    (tmp_path / "bad.json").write_text("{nope")
    (tmp_path / "list.json").write_text("[1, 2]")
    assert read_config_file(tmp_path / "a.json") == {"train": {"steps": 7}}
    assert read_config_file(tmp_path / "b.yaml") == {"train": {"steps": 9}}
    with pytest.raises(ValueError, match="cannot parse config file"):
        read_config_file(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="mapping at the top level"):
        read_config_file(tmp_path / "list.json")
    with pytest.raises(FileNotFoundError, match="config file not found"):
        read_config_file(tmp_path / "missing.json")
