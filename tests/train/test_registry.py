"""The optimizer registry: one list of names, a builder per family, lrs with their source."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from adapm.train import registry
from adapm.train.optimizers import BUILDERS


def test_every_name_has_a_builder_and_unknown_names_are_errors() -> None:
    assert {spec.family for spec in registry.REGISTRY.values()} <= set(BUILDERS)
    with pytest.raises(ValueError, match=r"Invalid --optimizers: 'lion'; expected one of adamw, adam-mini"):
        registry.parse_names("adamw,lion", "--optimizers")
    with pytest.raises(ValueError, match="at least one name"):
        registry.parse_names(" , ")
    with pytest.raises(ValueError, match="adamw is listed twice"):  # one run directory per name
        registry.parse_names("adamw,adapm, adamw")


def test_swept_lrs_win_over_defaults_and_say_so(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    table = tmp_path / "lr_table.json"
    table.write_text(json.dumps({"lrs": {"gpt2-1m": {"adapm-mini": 0.0015}}}))
    monkeypatch.setattr(registry, "LR_TABLE_PATH", table)
    registry.swept.cache_clear()
    try:
        assert registry.lr_with_source("adapm-mini", model="gpt2-1m") == (0.0015, "swept for gpt2-1m")
        assert registry.lr_with_source("adapm-mini", model="llama-1m") == (3e-3, "default")
        assert registry.lr_with_source("adapm-mini", finetune=True, model="gpt2-1m") == (2e-5, "default")
    finally:
        registry.swept.cache_clear()


def test_block_wise_lrs_on_a_plain_name_take_its_blr_variants_base_lr() -> None:
    """``--optimizer adamw --lr-ratios ...`` starts from adamw-blr's base lr, not AdamW's own (which the
    x10 multipliers would push far out of range); a -blr name or an explicit --lr is left as it is."""
    for name, blr in (("adamw", "adamw-blr"), ("adam-mini", "adam-mini-blr"), ("adapm-mini", "adapm-mini-blr"),
                      ("adapm-bf16", "adapm-blr")):  # fmt: skip
        for finetune in (False, True):
            ours = registry.lr_with_source(name, finetune, "gpt2-1m", blockwise=True)
            assert ours == registry.lr_with_source(blr, finetune, "gpt2-1m"), (name, finetune)
            assert ours[0] < registry.default_lr(name, finetune, "gpt2-1m")
    assert registry.lr_with_source("adamw-blr", blockwise=True) == registry.lr_with_source("adamw-blr")


def test_an_optimizer_whose_package_is_missing_is_a_clear_error_up_front(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without the baselines' packages (e.g. adapm installed with [train] only), naming one is an error
    that names the package and the extra, before any run starts; `adapm memory`'s default list leaves
    them out and says so. ``sys.modules[name] = None`` is how Python itself marks a module as absent."""
    from adapm.cli import main
    from adapm.train.config import CompareConfig, OptimConfig
    from adapm.train.models import build_model
    from adapm.train.optimizers import build_optimizer

    monkeypatch.setitem(sys.modules, "galore_torch", None)
    assert registry.missing_package("galore") == "galore-torch" and registry.missing_package("adamw") is None
    message = r"galore needs the galore-torch package, which is not installed: pip install 'adapm\[baselines\]'"
    with pytest.raises(ValueError, match="Invalid --optimizers: " + message):
        registry.parse_names("adamw,galore", "--optimizers")
    with pytest.raises(ValueError, match=message):
        CompareConfig(optimizers="adamw,galore")  # before the AdamW run, not after it
    with pytest.raises(ValueError, match=message):
        build_optimizer(build_model("gpt2-1m", vocab_size=256, seq_len=32), OptimConfig(optimizer="galore", lr=1e-3))

    assert main(["memory", "--model", "gpt2-124m", "--optimizers", "adamw,galore"]) == 2
    assert "galore needs the galore-torch package" in capsys.readouterr().err
    assert main(["memory", "--model", "gpt2-124m"]) == 0
    captured = capsys.readouterr()
    assert "left out galore: pip install 'adapm[baselines]'" in captured.err
    assert "| galore |" not in captured.out and "| adapm-mini |" in captured.out
