"""Pure update math for AdaPM: tensors in, tensors out.

Nothing in this package knows about parameter names, param groups or process groups. Each module is
one idea (a second-moment policy, a momentum policy, a low-rank tracker, the residual correction),
and :mod:`adapm.optim` composes them.
"""

from adapm.policies.correction import CORRECTIONS, correction_coefficient
from adapm.policies.momentum import MOMENTUM_POLICIES, full_momentum, lowrank_momentum
from adapm.policies.second_moment import (
    SECOND_MOMENT_POLICIES,
    block_count,
    block_second_moment,
    expand_blocks,
    full_second_moment,
)
from adapm.policies.trackers import TRACKERS, gd_track, power_track, randomized_factors
from adapm.policies.update import apply_update, elementwise_update

__all__ = [
    "CORRECTIONS",
    "MOMENTUM_POLICIES",
    "SECOND_MOMENT_POLICIES",
    "TRACKERS",
    "apply_update",
    "block_count",
    "block_second_moment",
    "correction_coefficient",
    "elementwise_update",
    "expand_blocks",
    "full_momentum",
    "full_second_moment",
    "gd_track",
    "lowrank_momentum",
    "power_track",
    "randomized_factors",
]
