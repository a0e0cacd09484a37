"""Run under torchrun by tests/distributed/test_scaleout.py: AdaPM under DDP and FSDP2 against a
single-process run, and torch.distributed.checkpoint save / resume / reshard.

    torchrun --standalone --nproc_per_node=2 tests/distributed/worker.py equivalence OUT.json
    torchrun --standalone --nproc_per_node=2 tests/distributed/worker.py checkpoint OUT.json CKPT_DIR
    torchrun --standalone --nproc_per_node=1 tests/distributed/worker.py reshard OUT.json CKPT_DIR
    torchrun --standalone --nproc_per_node=2 tests/distributed/worker.py zero OUT.json
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel

import adapm

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
STEPS = 20
GLOBAL_BATCH = 4


def make_model(kind: str) -> nn.Module:
    """Shapes chosen so that shards split heads and vocabularies unevenly (world size 2)."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if kind == "neox":  # per-head interleaved query_key_value: its parts run along the rows FSDP2 shards
        from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

        return GPTNeoXForCausalLM(GPTNeoXConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                                intermediate_size=32, vocab_size=99))  # fmt: skip
    if kind == "mixtral":  # expert stacks, which FSDP2 shards across experts
        from transformers import MixtralConfig, MixtralForCausalLM

        return MixtralForCausalLM(MixtralConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                                num_attention_heads=2, num_key_value_heads=2, num_local_experts=4,
                                                num_experts_per_tok=2, vocab_size=99))  # fmt: skip
    if kind == "gpt2":
        cfg = GPT2Config(
            n_layer=2,
            n_embd=36,
            n_head=4,
            vocab_size=99,
            n_positions=32,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            bos_token_id=0,
            eos_token_id=0,
        )
        return GPT2LMHeadModel(cfg)
    cfg = LlamaConfig(
        num_hidden_layers=2,
        hidden_size=36,
        intermediate_size=80,
        num_attention_heads=3,
        num_key_value_heads=1,
        vocab_size=99,
        max_position_embeddings=32,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(cfg)


def batches(n: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        start = torch.randint(0, 99, (GLOBAL_BATCH, 1), generator=g)
        stride = torch.randint(1, 4, (GLOBAL_BATCH, 1), generator=g)
        out.append((start + stride * torch.arange(16)) % 99)
    return out


def blocks(model: nn.Module) -> nn.ModuleList:
    if hasattr(model, "gpt_neox"):
        return model.gpt_neox.layers
    return model.transformer.h if hasattr(model, "transformer") else model.model.layers


def shard(model: nn.Module) -> nn.Module:
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for block in blocks(model):
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def train(model: nn.Module, opt: torch.optim.Optimizer, data: list[torch.Tensor], rank: int, world: int) -> list[float]:
    per_rank = GLOBAL_BATCH // world
    losses = []
    for x in data:
        xs = x[rank * per_rank : (rank + 1) * per_rank]
        loss = model(input_ids=xs, labels=xs).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        value = loss.detach().clone()
        if world > 1:
            dist.all_reduce(value)
            value /= world
        losses.append(value.item())
    return losses


def full_params(model: nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in model.named_parameters():
        name = name.removeprefix("module.").replace("_checkpoint_wrapped_module.", "")
        out[name] = p.full_tensor().detach() if hasattr(p, "full_tensor") else p.detach()
    return out


ROUNDOFF_ONLY = ("attn.c_attn.bias",)
"""GPT-2's fused QKV bias holds the key bias, whose gradient is exactly zero in exact arithmetic
(softmax ignores a constant shift of the scores): every Adam-type optimizer normalizes its round-off
into full-size steps, so it differs between any two summation orders (torch AdamW included)."""


def rel_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], skip: tuple[str, ...] = ()) -> float:
    """||a - b|| / ||a|| over all parameters together (except names containing a ``skip`` entry)."""
    assert a.keys() == b.keys(), (sorted(a)[:3], sorted(b)[:3])
    keys = [k for k in a if not any(s in k for s in skip)]
    num = sum(float((a[k] - b[k]).double().square().sum()) for k in keys)
    den = sum(float(a[k].double().square().sum()) for k in keys)
    return (num / den) ** 0.5


def worst_tensor(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> tuple[str, float]:
    """The parameter with the largest ||a - b|| / ||a||."""
    return max(((k, float((a[k] - b[k]).norm() / a[k].norm().clamp_min(1e-12))) for k in a), key=lambda kv: kv[1])


def make_opt(cls_name: str, model: nn.Module, tracker: str) -> torch.optim.Optimizer:
    if cls_name == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    cls = adapm.AdaPMMini if cls_name.startswith("adapm-mini") else adapm.AdaPM
    grouped = cls_name.endswith("-grouped")  # the grouped step, as on an accelerator (stacked blocks)
    cls_name = cls_name.removesuffix("-grouped")
    ratios = "blockwise" if cls_name.endswith("-blr") else None
    state_dtype = cls_name.rsplit("-", 1)[-1] if cls_name.endswith(("-bf16", "-int8")) else "fp32"
    return cls(model, lr=3e-3 / (4 if ratios else 1), tracker=tracker, refresh_every=7, lr_ratios=ratios,
               state_dtype=state_dtype, foreach=grouped or None)  # fmt: skip


CASES = (
    ("adamw", "-"),
    ("adapm", "power"),
    ("adapm-mini", "power"),
    ("adapm", "gd"),
    ("adapm", "fixed"),
    ("adapm-mini-blr", "power"),
    ("adapm-mini-bf16", "power"),
    ("adapm-int8", "power"),
    ("adapm-grouped", "power"),
    ("adapm-mini-grouped", "power"),
    ("adapm-grouped", "gd"),
    ("adapm-grouped", "fixed"),
    ("adapm-mini-bf16-grouped", "power"),
)
"""Optimizer and tracker of each equivalence case, run on both models (``cases="all"``)."""
ONE_MODEL = {
    ("adapm", "gd"): "gpt2",
    ("adapm-grouped", "fixed"): "gpt2",
    ("adapm-mini-bf16", "power"): "gpt2",
    ("adapm", "fixed"): "llama",
    ("adapm-grouped", "gd"): "llama",
    ("adapm-mini-bf16-grouped", "power"): "llama",
}
"""The test suite runs these cases on one model only: each other tracker and bf16 state still runs once
per step path (per parameter, grouped) and on both models' layouts."""


def equivalence(out_file: str, cases: str = "split") -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    data = batches(STEPS)
    results = []
    for kind in ("gpt2", "llama"):
        for opt_name, tracker in CASES:
            if cases != "all" and ONE_MODEL.get((opt_name, tracker), kind) != kind:
                continue
            ref = make_model(kind)
            ref_losses = train(ref, make_opt(opt_name, ref, tracker), data, 0, 1)
            ref_params = full_params(ref)
            row = {"model": kind, "optimizer": opt_name, "tracker": tracker, "ref_final_loss": ref_losses[-1]}
            ddp = DistributedDataParallel(make_model(kind))
            ddp_losses = train(ddp, make_opt(opt_name, ddp, tracker), data, rank, world)
            row["ddp_loss_rel"] = max(abs(a - b) / abs(a) for a, b in zip(ref_losses, ddp_losses))
            row["ddp_param_rel"] = rel_diff(ref_params, full_params(ddp))
            row["ddp_param_rel_excl"] = rel_diff(ref_params, full_params(ddp), ROUNDOFF_ONLY)
            row["ddp_worst_tensor"] = worst_tensor(ref_params, full_params(ddp))
            fsdp = shard(make_model(kind))
            fsdp_opt = make_opt(opt_name, fsdp, tracker)
            fsdp_losses = train(fsdp, fsdp_opt, data, rank, world)
            row["fsdp_loss_rel"] = max(abs(a - b) / abs(a) for a, b in zip(ref_losses, fsdp_losses))
            row["fsdp_param_rel"] = rel_diff(ref_params, full_params(fsdp))
            row["fsdp_param_rel_excl"] = rel_diff(ref_params, full_params(fsdp), ROUNDOFF_ONLY)
            row["fsdp_worst_tensor"] = worst_tensor(ref_params, full_params(fsdp))
            row["fsdp_state_bytes_this_rank"] = adapm.state_bytes(fsdp_opt)
            # Views of parameters and state kept between steps: only the grouped step makes them.
            row["fsdp_grouped_step"] = bool(getattr(fsdp_opt, "_views", None) and fsdp_opt._views._views)
            results.append(row)
    results.append({"unsupported": unsupported_fused_rows(), "unsupported_neox": unsupported_interleaved(),
                    "unsupported_experts": sharded_experts()})
    if rank == 0:
        with open(out_file, "w") as f:
            json.dump(results, f, indent=2)


def _sharded_fused(model: nn.Module) -> dict:
    """Shard ``model`` with FSDP2, build AdaPM and take one step: the weights kept whole because FSDP2 shards
    the rows their parts run along, the construction warning, and whether the step left everything finite."""
    fully_shard(model, mesh=init_device_mesh("cpu", (dist.get_world_size(),)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt = adapm.AdaPM(model, lr=1e-3)  # the module shows the layout (names alone would not)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    return {
        "whole": [g["names"][0] for g in opt.param_groups if g.get("kept_whole") == "sharded"],
        "warning": " ".join(str(w.message) for w in caught if "AdaPM" in str(w.message)),
        "finite": all(bool(torch.isfinite(p.full_tensor()).all()) for p in model.parameters()),
    }


def unsupported_fused_rows() -> dict:
    """A nanoGPT-style fused QKV nn.Linear (segments along the sharded dim 0)."""
    torch.manual_seed(0)
    attn = nn.Module()
    attn.c_attn = nn.Linear(8, 24)
    model = nn.Module()
    model.attn = attn
    return _sharded_fused(model)


def unsupported_interleaved() -> dict:
    """GPT-NeoX's per-head interleaved query_key_value (rows along the sharded dim 0)."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    config = GPTNeoXConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                           vocab_size=40)  # fmt: skip
    return _sharded_fused(GPTNeoXForCausalLM(config))


def sharded_experts() -> dict:
    """Mixtral's expert stacks, which FSDP2 shards across experts."""
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    config = MixtralConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                           vocab_size=40)  # fmt: skip
    return _sharded_fused(MixtralForCausalLM(config))


def accelerate_prepare(out_file: str) -> None:
    """AdaPM built on the whole model, then Accelerate's FSDP2 ``prepare`` (as ``Trainer`` with FSDP2 does
    too): it shards the model and swaps each parameter of the optimizer for its sharded one. Compared with
    AdaPM built after ``fully_shard`` on the same model: the losses, the parameters, the state held and the
    weights kept whole. For two models also Accelerate's ``save_state`` after 3 of the 6 steps and
    ``load_state`` into a newly prepared model and optimizer: the resumed run against the straight one."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    rank, world = dist.get_rank(), dist.get_world_size()
    data = batches(6)
    layers = {"llama": "LlamaDecoderLayer", "gpt2": "GPT2Block", "neox": "GPTNeoXLayer",
              "mixtral": "MixtralDecoderLayer"}  # fmt: skip

    def as_fsdp(accelerator: Accelerator) -> Accelerator:
        # Accelerate runs FSDP only on accelerators; on CPU this sets its distributed type (its prepare resets
        # it), the one thing changed: the sharding, the swap of the parameters and the checkpoints are its own.
        accelerator.state.distributed_type = DistributedType.FSDP
        return accelerator

    def prepared(
        kind: str, checkpointing: bool, strict: bool | None = None
    ) -> tuple[Accelerator, nn.Module, Any, adapm.AdaPMMini]:
        accelerator = Accelerator(cpu=True)
        as_fsdp(accelerator).state.fsdp_plugin = FullyShardedDataParallelPlugin(
            fsdp_version=2, auto_wrap_policy="transformer_based_wrap", transformer_cls_names_to_wrap=[layers[kind]],
            activation_checkpointing=checkpointing,
        )
        model = make_model(kind)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt = adapm.AdaPMMini(model, lr=3e-3, strict=strict)
        model, wrapped = accelerator.prepare(model, opt)
        return accelerator, model, wrapped, opt

    rows = []
    # (row, model, Accelerate's activation checkpointing: it wraps each block, which renames the parameters)
    cases = [(kind, kind, False) for kind in layers] + [("llama-ac", "llama", True)]
    for row_name, kind, checkpointing in cases:
        ref = shard(make_model(kind))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref_opt = adapm.AdaPMMini(ref, lr=3e-3)
        ref_losses = train(ref, ref_opt, data, rank, world)
        _, model, wrapped, opt = prepared(kind, checkpointing)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            losses = train(model, wrapped, data, rank, world)
        row = {
            "model": row_name,
            "renamed": any("_checkpoint_wrapped_module" in name for name, _ in model.named_parameters()),
            "swapped": all(type(p).__name__ == "DTensor" for g in opt.param_groups for p in g["params"]),
            "loss_rel": max(abs(a - b) / abs(a) for a, b in zip(ref_losses, losses)),
            "param_rel": rel_diff(full_params(ref), full_params(model)),
            "state_bytes": adapm.state_bytes(opt),
            "ref_state_bytes": adapm.state_bytes(ref_opt),
            "whole": [g["names"][0] for g in opt.param_groups if g.get("kept_whole") == "sharded"],
            "ref_whole": [g["names"][0] for g in ref_opt.param_groups if g.get("kept_whole") == "sharded"],
            "warnings": [str(w.message) for w in caught if "AdaPM" in str(w.message)],
        }
        if row_name in ("llama", "neox"):
            state_dir = os.path.join(os.path.dirname(out_file), f"accelerate_state_{kind}")
            accelerator, first_model, first_wrapped, _ = prepared(kind, False)
            first = train(first_model, first_wrapped, data[:3], rank, world)
            as_fsdp(accelerator).save_state(state_dir)
            accelerator, resumed, resumed_wrapped, resumed_opt = prepared(kind, False)
            as_fsdp(accelerator).load_state(state_dir)
            second = train(resumed, resumed_wrapped, data[3:], rank, world)
            row["resume_losses_equal"] = first + second == losses
            row["resume_param_rel"] = rel_diff(full_params(model), full_params(resumed))
            row["resume_steps"] = sorted({int(s["step"]) for s in resumed_opt.state.values()})
        if row_name == "neox":  # strict=True: keeping the fused weights whole is an error, and changes nothing
            _, strict_model, strict_wrapped, strict_opt = prepared(kind, False, strict=True)
            try:
                train(strict_model, strict_wrapped, data[:1], rank, world)
                row["strict_error"] = ""
            except ValueError as exc:
                row["strict_error"] = str(exc)
            row["strict_unchanged"] = not any(g.get("kept_whole") for g in strict_opt.param_groups)
        rows.append(row)
    if rank == 0:
        with open(out_file, "w") as f:
            json.dump(rows, f, indent=2)


def _fsdp_run(kind: str, data: list[torch.Tensor], opt_name: str, ckpt: str | None = None, load: str | None = None):
    rank, world = dist.get_rank(), dist.get_world_size()
    model = shard(make_model(kind))
    opt = make_opt(opt_name, model, "power")
    if load is not None:
        model_sd, opt_sd = get_state_dict(model, opt)
        state = {"model": model_sd, "optim": opt_sd}
        dcp.load(state, checkpoint_id=load)
        set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    losses = train(model, opt, data[:10], rank, world) if load is None else []
    if ckpt is not None:
        model_sd, opt_sd = get_state_dict(model, opt)
        dcp.save({"model": model_sd, "optim": opt_sd}, checkpoint_id=ckpt)
    losses += train(model, opt, data[10:], rank, world)
    return losses, full_params(model)


def checkpoint(out_file: str, ckpt_dir: str, opt_name: str = "adapm-mini") -> None:
    data = batches(STEPS)
    straight_losses, straight = _fsdp_run("llama", data, opt_name, ckpt=ckpt_dir)
    resumed_losses, resumed = _fsdp_run("llama", data, opt_name, load=ckpt_dir)
    if dist.get_rank() == 0:
        torch.save(straight, ckpt_dir + ".final.pt")
        with open(out_file, "w") as f:
            json.dump(
                {
                    "resume_param_rel": rel_diff(straight, resumed),
                    "resume_bit_identical": all(torch.equal(straight[k], resumed[k]) for k in straight),
                    "resume_losses": resumed_losses,
                    "straight_losses": straight_losses[10:],
                },
                f,
                indent=2,
            )


def reshard(out_file: str, ckpt_dir: str, opt_name: str = "adapm-mini") -> None:
    data = batches(STEPS)
    _, resumed = _fsdp_run("llama", data, opt_name, load=ckpt_dir)
    straight = torch.load(ckpt_dir + ".final.pt", weights_only=True)
    with open(out_file, "w") as f:
        json.dump({"world_size": dist.get_world_size(), "reshard_param_rel": rel_diff(straight, resumed)}, f)


def zero(out_file: str) -> None:
    """torch's ZeroRedundancyOptimizer with AdaPM as each rank's optimizer, against one process with
    AdaPM on the same bare parameters (ZeRO hands its optimizer bare parameters, so no partition)."""
    from torch.distributed.optim import ZeroRedundancyOptimizer

    rank, world = dist.get_rank(), dist.get_world_size()
    data = batches(STEPS)
    ref = make_model("llama")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref_opt = adapm.AdaPM(ref.parameters(), lr=3e-3)
    ref_losses = train(ref, ref_opt, data, 0, 1)
    ddp = DistributedDataParallel(make_model("llama"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt = ZeroRedundancyOptimizer(ddp.parameters(), optimizer_class=adapm.AdaPM, lr=3e-3)
    losses = train(ddp, opt, data, rank, world)
    state_bytes: list[int] = [0] * world
    dist.all_gather_object(state_bytes, adapm.state_bytes(opt.optim))
    if rank == 0:
        with open(out_file, "w") as f:
            json.dump(
                {
                    "loss_rel": max(abs(a - b) / abs(a) for a, b in zip(ref_losses, losses)),
                    "param_rel": rel_diff(full_params(ref), full_params(ddp)),
                    "warnings": [str(w.message) for w in caught],
                    "state_bytes_per_rank": state_bytes,
                    "ref_state_bytes": adapm.state_bytes(ref_opt),
                },
                f,
                indent=2,
            )


def main() -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    command, out_file, *rest = sys.argv[1:]
    commands = {"equivalence": equivalence, "checkpoint": checkpoint, "reshard": reshard, "zero": zero,
                "accelerate": accelerate_prepare}  # fmt: skip
    commands[command](out_file, *rest)
    # Every rank waits for the others' collectives before leaving: a rank that destroyed the group while
    # another's gloo work was pending was seen aborting at exit ("terminate called without an active
    # exception", rarely, 2 processes on 2 cores), as in adapm.train.parallel.teardown.
    dist.barrier()
    rank = dist.get_rank()
    dist.destroy_process_group()
    print(f"worker rank {rank}: {command} done, leaving", file=sys.stderr)
    # The barrier did not end it: a rank still aborted the same way, once in CI (equivalence, 2 ranks).
    # The same abort at interpreter exit is reported from PyTorch's own FSDP tests (pytorch#90549): C++
    # threads torn down while Python finalizes. It did not reproduce here in 10 runs under load, so its
    # exact source is unknown. The results are written and closed by now, so the rank leaves without
    # finalizing; a failure raised above still ends it with a traceback and a non-zero status.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
