"""One process (no torchrun): the model is left as it is, and ``--fsdp`` says that it cannot shard."""

from __future__ import annotations

import warnings

import pytest
from torch import nn

from adapm.train.parallel import Parallel, setup, wrap


def test_single_process_leaves_the_model_and_warns_about_fsdp(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    par = setup()
    assert par == Parallel(device=par.device) and not par.enabled
    model = nn.Linear(4, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # plain (no --fsdp): nothing to say
        assert wrap(model, par, fsdp=False) is model
    with pytest.warns(UserWarning, match=r"--fsdp has no effect in a single process.*torchrun"):
        assert wrap(model, par, fsdp=True) is model
