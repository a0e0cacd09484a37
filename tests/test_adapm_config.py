"""AdaPMConfig: the one place AdaPM's hyperparameters are defaulted and validated."""

from __future__ import annotations

import dataclasses
import inspect

import pytest

import adapm
from adapm.train.config import OptimConfig

from conftest import tiny_gpt2


def test_the_optimizer_and_the_harness_take_their_defaults_from_the_config() -> None:
    config = adapm.AdaPMConfig()
    signature = inspect.signature(adapm.AdaPM)
    for f in dataclasses.fields(adapm.AdaPMConfig):
        assert signature.parameters[f.name].default == getattr(config, f.name), f.name
    harness = OptimConfig()
    assert (harness.beta1, harness.beta2) == config.betas
    for name in ("weight_decay", "rank_ratio", "tracker", "refresh_every", "correction", "update_clip", "clip_scope"):
        assert getattr(harness, name) == getattr(config, name), name
    assert harness.adapm_config() == config


def test_a_built_optimizer_exposes_its_validated_config() -> None:
    opt = adapm.AdaPMMini(tiny_gpt2(), lr=1e-3, betas=[0.8, 0.9], tracker="fixed")
    assert opt.config.betas == (0.8, 0.9) and opt.config.tracker == "fixed"
    assert opt.config.second_moment == "block"  # the class's own default, resolved
    with pytest.raises(dataclasses.FrozenInstanceError):
        opt.config.tracker = "gd"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"betas": (1.0, 0.9)}, ValueError, "Invalid beta parameter at index 0: 1.0"),
        ({"rank_ratio": 0.0}, ValueError, "Invalid rank_ratio: 0.0"),
        ({"tracker": "lbfgs"}, ValueError, r"Invalid tracker: 'lbfgs'; expected one of \('power', 'gd', 'fixed'\)"),
        ({"refresh_every": 0}, ValueError, "Invalid refresh_every: 0"),
        ({"update_clip": -1.0}, ValueError, "Invalid update_clip: -1.0"),
        ({"clip_scope": "some"}, ValueError, "Invalid clip_scope: 'some'"),
        ({"lr_ratios": "sharpness"}, ValueError, "Invalid lr_ratios: 'sharpness'"),
        ({"fused": "yes"}, TypeError, "Invalid fused: 'yes'"),
        ({"second_moment": "diag"}, ValueError, "Invalid second_moment policy: 'diag'"),
    ],
)
def test_bad_values_fail_in_the_config_and_in_the_optimizer_alike(kwargs: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        adapm.AdaPMConfig(**kwargs)
    with pytest.raises(error, match=match):
        adapm.AdaPM(tiny_gpt2(), lr=1e-3, **kwargs)


def test_the_harness_names_its_own_fields() -> None:
    with pytest.raises(ValueError, match=r"Invalid beta2: 1\.5"):
        OptimConfig(beta2=1.5)
    with pytest.raises(ValueError, match="Invalid tracker: 'x'"):
        OptimConfig(tracker="x")
