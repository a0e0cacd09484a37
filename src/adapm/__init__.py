"""adapm: memory-efficient LLM training with adaptive partial momentum (AdaPM and AdaPM-mini).

>>> import adapm
>>> opt = adapm.AdaPM(model, lr=6e-4)          # or adapm.AdaPMMini(model, lr=6e-4)
>>> print(opt.partition_report())
"""

from adapm.compiled import CompiledStep, compile_step
from adapm.config import BLOCKWISE_LR_RATIOS, CLIP_SCOPES, AdaPMConfig, resolve_lr_ratios
from adapm.optim import AdaPM, AdaPMMini, state_bytes
from adapm.partition import PartitionReport, Rule, partition

__version__ = "0.1.0"

__all__ = [
    "BLOCKWISE_LR_RATIOS",
    "CLIP_SCOPES",
    "AdaPM",
    "AdaPMConfig",
    "AdaPMMini",
    "CompiledStep",
    "PartitionReport",
    "Rule",
    "__version__",
    "compile_step",
    "partition",
    "resolve_lr_ratios",
    "state_bytes",
]
