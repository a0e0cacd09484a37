"""Policy objects: state declared once, everything else derived from the declarations."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

import adapm
from adapm.partition.layout import build_layout
from adapm.policies.momentum import MOMENTUM
from adapm.policies.second_moment import SECOND_MOMENT
from adapm.policies.state import StateSpec, join_specs, register
from adapm.policies.trackers import TRACKER

from conftest import tiny_gpt2


def test_registries_hold_the_built_in_policies() -> None:
    assert tuple(MOMENTUM) == ("full", "lowrank", "none")
    assert tuple(SECOND_MOMENT) == ("full", "block")
    assert tuple(TRACKER) == ("power", "gd", "fixed")
    with pytest.raises(ValueError, match="'full' is already registered"):
        register(MOMENTUM)(type(MOMENTUM["full"]))


def test_fused_segments_stack_or_concatenate_their_declared_state() -> None:
    parts = [StateSpec((4, 8), 0), StateSpec((4, 8), 0)]
    assert join_specs(parts, True, (8, 8)) == StateSpec((2, 4, 8), 1)
    assert join_specs(parts[:1], False, (4, 8)) == parts[0]
    cols = [StateSpec((8, 4), 0, "concat", 1)] * 3
    assert join_specs(cols, True, (8, 12)).shape == (8, 12)
    blocks = [StateSpec((3,), None, "concat", 0), StateSpec((5,), None, "concat", 0)]
    assert join_specs(blocks, True, (8, 4)).shape == (8,)
    whole = [StateSpec((2, 4), 0, "whole")] * 6  # e.g. gate and up of three experts
    assert join_specs(whole, True, (3, 4, 4)) == StateSpec((3, 4, 4), 0, "whole")
    assert StateSpec((2, 3), 0, dtype=torch.bfloat16).nbytes == 12


@pytest.fixture
def half_momentum() -> Iterator[str]:
    """A new momentum policy, registered for one test: full momentum kept in bfloat16."""

    @register(MOMENTUM)
    class HalfMomentum:
        name = "half"
        source = "ema"
        bias_correction = True
        in_clip_scope = False
        needs_matrix = False

        def state(self, seg):  # type: ignore[no-untyped-def]
            return {"exp_avg_half": StateSpec(seg.shape, 0 if seg.shape else None, dtype=torch.bfloat16)}

    yield "half"
    del MOMENTUM["half"]


def test_a_new_policy_needs_only_its_declaration_for_layout_bytes_report_and_rules(half_momentum: str) -> None:
    group = {"momentum": half_momentum, "second_moment": "block", "rank_ratio": 0.05, "block": "auto"}
    layout = build_layout("w", (16, 8), group)
    assert layout.state_shapes() == {"step": (), "exp_avg_sq": (16,), "exp_avg_half": (16, 8)}
    assert layout.state_row_dims()["exp_avg_half"] == 0
    assert layout.state_bytes() == 4 + 4 * 16 + 2 * 16 * 8
    # Rules and the partition report take the new name; the report counts its bytes from the declaration.
    model = tiny_gpt2()
    opt = adapm.AdaPMMini(model, lr=1e-3, rules=[(r"mlp\.c_fc\.weight$", half_momentum)])
    rows = [r for r in opt.partition_report().rows if r.name.endswith("h.0.mlp.c_fc.weight")]
    assert rows[0].momentum == half_momentum
    assert rows[0].state_bytes == opt.layout(model.transformer.h[0].mlp.c_fc.weight).state_bytes()
    # State allocation goes through the same declaration (meta device: nothing allocated).
    opt.init_state()
    state = opt.state[model.transformer.h[0].mlp.c_fc.weight]
    assert state["exp_avg_half"].dtype == torch.bfloat16 and state["exp_avg_half"].shape == (32, 128)
