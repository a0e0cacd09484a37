"""Data-parallel training under torchrun: process-group set-up, DDP or FSDP2 wrapping, and the
checkpoint format of each (a single file written by rank 0 for DDP, torch.distributed.checkpoint
for FSDP2). The same code runs with gloo on CPUs and NCCL on GPUs; only the backend and device differ.
"""

from __future__ import annotations

import os
import shutil
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class Parallel:
    """This process's place in the job (world size 1 without torchrun)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def mean(self, value: float | torch.Tensor) -> float:
        """Average of ``value`` (a number, or a 0-d tensor on this rank's device) over ranks."""
        if not self.enabled:
            return float(value)
        t = torch.as_tensor(value, dtype=torch.float64, device=self.device).reshape(1)
        dist.all_reduce(t)
        return float(t.item()) / self.world

    def max(self, value: int | torch.Tensor) -> int:
        """Largest ``value`` (a number, or a 0-d tensor on this rank's device) over ranks."""
        if not self.enabled:
            return int(value)
        t = torch.as_tensor(value, dtype=torch.int64, device=self.device).reshape(1)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())


def launched_by_torchrun() -> bool:
    """Whether this process is one of several started by torchrun."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def rank_from_env() -> int:
    """This process's rank as torchrun set it (0 without torchrun)."""
    return int(os.environ.get("RANK", "0"))


def setup() -> Parallel:
    """Join the torchrun job if there is one (gloo on CPU, NCCL on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
        return Parallel(device=device)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend)
    return Parallel(dist.get_rank(), dist.get_world_size(), local_rank, device)


def teardown(par: Parallel) -> None:
    """Leave the torchrun job (called from ``finally``). After a successful run every rank first waits
    for the others to finish their collectives: a rank that destroyed the group while another's work
    was pending was seen aborting at exit (gloo, FSDP2 ``sft``, rarely). Not while an exception is
    propagating: the other ranks may never reach the barrier."""
    if par.enabled and dist.is_initialized():
        if sys.exc_info()[0] is None:
            dist.barrier()
        dist.destroy_process_group()


def transformer_blocks(model: nn.Module) -> nn.ModuleList:
    """The list of transformer blocks of an HF causal LM (GPT-2's ``h``, Llama's ``layers``, ...)."""
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and name.rsplit(".", 1)[-1] in ("h", "layers", "layer", "blocks"):
            return module
    raise ValueError("--fsdp: cannot find the transformer blocks (a ModuleList named h, layers or blocks)")


def wrap(model: nn.Module, par: Parallel, fsdp: bool) -> nn.Module:
    """DDP, or FSDP2 ``fully_shard`` per transformer block and at the root, on a 1-D mesh."""
    if not par.enabled:
        if fsdp:
            warnings.warn(
                "--fsdp has no effect in a single process: the model trains unsharded. To shard it, launch "
                "with torchrun (torchrun --standalone --nproc_per_node=N -m adapm.cli COMMAND ... --fsdp)",
                stacklevel=2,
            )
        return model
    if not fsdp:
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[par.local_rank] if par.device.type == "cuda" else None)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(par.device.type, (par.world,))
    for block in transformer_blocks(model):
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DDP (FSDP2 shards in place and needs no unwrapping)."""
    return model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model


def dcp_save(
    path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, extra: dict[str, Any], par: Parallel
) -> None:
    """Save a sharded checkpoint directory with torch.distributed.checkpoint.

    Written to ``path.tmp`` first; rank 0 then swaps it in (the previous checkpoint is removed only
    after the new one is complete), so a crash mid-save leaves the last complete checkpoint usable.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    tmp = path.with_name(path.name + ".tmp")
    if par.is_main and tmp.exists():
        shutil.rmtree(tmp)
    par.barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optimizer": optim_sd, "extra": extra}, checkpoint_id=str(tmp))
    par.barrier()
    if par.is_main:
        old = path.with_name(path.name + ".old")
        if path.exists():
            path.rename(old)
        tmp.rename(path)
        if old.exists():
            shutil.rmtree(old)
    par.barrier()


def dcp_load(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, extra: dict[str, Any]) -> dict[str, Any]:
    """Load a checkpoint written by :func:`dcp_save` (any world size) into ``model``, ``optimizer``
    and the ``extra`` template (whose values give the types to restore)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optimizer": optim_sd, "extra": extra}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    return state["extra"]


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's state dict gathered to CPU (every rank must call it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
