"""The Adam-style update shared by every policy combination (docs/algorithm.md, "Per step, per block")."""

from __future__ import annotations

import functools
import math
from typing import Any, cast

import torch
from torch import Tensor

from adapm.policies.momentum import full_momentum
from adapm.policies.second_moment import _block_shape, broadcast_blocks, full_second_moment


def apply_update(
    target: Tensor,
    numerator: Tensor,
    denominator: Tensor,
    *,
    lr: float,
    bias_correction1: float,
    update_clip: float | None,
) -> None:
    """``W <- W - lr * clamp(numerator / bias_correction1 / denominator, -clip, clip)`` in place.

    ``denominator`` is ``sqrt(vhat) + eps``; ``bias_correction1`` is ``1 - b1^t`` for an EMA momentum
    and ``1`` for ``none``. Without a clip this is exactly ``torch.optim.AdamW``'s ``addcdiv_`` form,
    so that the full/full policy reproduces AdamW to round-off.
    """
    if update_clip is None:
        target.addcdiv_(numerator, denominator, value=-(lr / bias_correction1))
        return
    update = numerator / denominator
    if bias_correction1 != 1.0:
        update.div_(bias_correction1)
    target.add_(update.clamp_(-update_clip, update_clip), alpha=-lr)


def elementwise_update(
    target: Tensor,
    grad: Tensor,
    *,
    v: Tensor | None,
    m: Tensor | None,
    numerator: Tensor | None,
    denom: Tensor | None,
    beta1: float,
    beta2: float,
    lr: float,
    decay: float,
    bias_correction1: float,
    bias_correction2_sqrt: float,
    eps: float,
    update_clip: float | None,
) -> None:
    """The elementwise tail of a step on one (piece of a) segment, in place.

    ``v``: the full second moment to update (else ``denom``, ``sqrt(vhat) + eps`` broadcastable to
    ``target``, from block second moments). ``m``: the full momentum to update; otherwise the
    ``numerator`` (corrected low-rank momentum) or, if that is None too, the gradient (no momentum).
    ``decay`` is ``1 - lr * weight_decay``. The order of operations is torch.optim.AdamW's.
    """
    if m is not None:
        numerator = full_momentum(m, grad, beta1)
    elif numerator is None:
        numerator = grad
    if decay != 1:
        target.mul_(decay)
    if update_clip is None:  # torch.optim.AdamW's exact sequence of operations
        if v is not None:
            full_second_moment(v, grad, beta2)
            denom = (v.sqrt() / bias_correction2_sqrt).add_(eps)
        assert denom is not None
        apply_update(target, numerator, denom, lr=lr, bias_correction1=bias_correction1, update_clip=None)
        return
    # Clipped update with one division: u = num / ((sqrt(v) / sqrt(bc2) + eps) * bc1), computed in
    # a single temporary.
    if v is not None:
        full_second_moment(v, grad, beta2)
        work = v.sqrt().mul_(bias_correction1 / bias_correction2_sqrt).add_(eps * bias_correction1)
    else:
        assert denom is not None
        work = (denom * bias_correction1).expand_as(numerator).contiguous()
    torch.div(numerator, work, out=work)
    target.add_(work.clamp_(-update_clip, update_clip), alpha=-lr)


# ----------------------------------------------------------------------------- grouped (foreach) tail


def foreach_elementwise_update(
    targets: list[Tensor],
    grads: list[Tensor],
    *,
    vs: list[Tensor] | None,
    ms: list[Tensor] | None,
    denoms: list[Tensor] | None,
    numerators: list[Tensor] | None = None,
    beta1: float,
    beta2: float,
    lr: float,
    decay: float,
    bias_correction1: float,
    bias_correction2_sqrt: float,
    eps: float,
    update_clip: float | None,
) -> None:
    """:func:`elementwise_update` for many blocks that share their policies and scalars, with one
    ``torch._foreach_*`` op per arithmetic step instead of one op per block (torch.optim's multi-tensor
    form). The same operations in the same order, so on CPU the result is bit-identical to the
    per-block form. ``ms``: full momenta to update (else ``numerators``, e.g. corrected low-rank momenta,
    or if those are None too the gradients: no momentum); ``vs``: full second moments to update (else
    ``denoms``, ``sqrt(vhat) + eps`` per block, broadcastable).
    """
    if ms is not None:
        torch._foreach_lerp_(ms, grads, 1.0 - beta1)
        numerators = ms
    elif numerators is None:
        numerators = grads
    if decay != 1:
        torch._foreach_mul_(targets, decay)
    if vs is not None:
        torch._foreach_mul_(vs, beta2)
        torch._foreach_addcmul_(vs, grads, grads, value=1.0 - beta2)
    if update_clip is None:  # torch.optim.AdamW's exact sequence of operations
        if vs is not None:
            denoms = torch._foreach_sqrt(vs)
            torch._foreach_div_(denoms, bias_correction2_sqrt)
            torch._foreach_add_(denoms, eps)
        assert denoms is not None
        torch._foreach_addcdiv_(targets, numerators, denoms, value=-(lr / bias_correction1))
        return
    if vs is not None:
        work = torch._foreach_sqrt(vs)
        torch._foreach_mul_(work, bias_correction1 / bias_correction2_sqrt)
        torch._foreach_add_(work, eps * bias_correction1)
    else:
        assert denoms is not None
        work = torch._foreach_mul(denoms, bias_correction1)
    updates = torch._foreach_div(numerators, work)
    torch._foreach_clamp_min_(updates, -update_clip)
    torch._foreach_clamp_max_(updates, update_clip)
    torch._foreach_add_(targets, updates, alpha=-lr)


# ----------------------------------------------------------------------------- fused (compiled) tail
#
# The same update as ``elementwise_update`` written as one pure function per (momentum source, second
# moment) pair, for ``torch.compile``: Inductor fuses each into a single pass over memory (a C++/OpenMP
# kernel on CPU) instead of the eager sequence of 5-8 passes. Scalars are 0-d tensors so that a changing
# learning rate or step count does not trigger recompilation; ``update_clip=None`` is passed as ``inf``.


def _fused_ema_full(target: Tensor, grad: Tensor, m: Tensor, v: Tensor, s: Tensor) -> None:
    lr, decay, bc1, bc2s, eps, clip, beta1, beta2 = s.unbind()
    m.lerp_(grad, 1.0 - beta1)
    v.mul_(beta2).add_(grad * grad * (1.0 - beta2))
    update = (m / bc1) / (v.sqrt() / bc2s + eps)
    target.mul_(decay).sub_(lr * update.clamp(-clip, clip))


def _fused_given_full(target: Tensor, grad: Tensor, numerator: Tensor, v: Tensor, s: Tensor) -> None:
    lr, decay, bc1, bc2s, eps, clip, _beta1, beta2 = s.unbind()
    v.mul_(beta2).add_(grad * grad * (1.0 - beta2))
    update = (numerator / bc1) / (v.sqrt() / bc2s + eps)
    target.mul_(decay).sub_(lr * update.clamp(-clip, clip))


def _fused_ema_block(target: Tensor, grad: Tensor, m: Tensor, denom: Tensor, s: Tensor) -> None:
    lr, decay, bc1, _bc2s, _eps, clip, beta1, _beta2 = s.unbind()
    m.lerp_(grad, 1.0 - beta1)
    update = (m / bc1) / denom
    target.mul_(decay).sub_(lr * update.clamp(-clip, clip))


def _fused_given_block(target: Tensor, grad: Tensor, numerator: Tensor, denom: Tensor, s: Tensor) -> None:
    lr, decay, bc1, _bc2s, _eps, clip, _beta1, _beta2 = s.unbind()
    update = (numerator / bc1) / denom
    target.mul_(decay).sub_(lr * update.clamp(-clip, clip))


_FUSED_KERNELS = {
    (True, True): _fused_ema_full,
    (False, True): _fused_given_full,
    (True, False): _fused_ema_block,
    (False, False): _fused_given_block,
}


def _fused_kernel(ema: bool, full: bool) -> Any:
    return _FUSED_KERNELS[ema, full]


@functools.cache
def _compiled(make: Any, flags: tuple[bool, ...], threads: int) -> Any:
    """``make(*flags)`` compiled (dynamic shapes, one graph); ``threads`` is part of the cache key because
    Inductor fixes a kernel's OpenMP thread count when it generates it."""
    del threads
    return torch.compile(make(*flags), dynamic=True, fullgraph=True)


def _run_compiled(make: Any, flags: tuple[bool, ...], *args: Any) -> Any:
    """Call the compiled ``make(*flags)`` on ``args``, allowing :data:`_RECOMPILE_LIMIT` variants."""
    kernel = _compiled(make, flags, torch.get_num_threads())
    with torch._dynamo.config.patch(recompile_limit=_RECOMPILE_LIMIT):
        return kernel(*args)


def fused_scalars(*, device: torch.device, **values: float | None) -> Tensor:
    """The scalars of one step for :func:`fused_elementwise_update`, as one small float32 tensor
    (``values``: the keyword arguments of :func:`scalar_values`)."""
    return torch.tensor(scalar_values(**values), dtype=torch.float32, device=device)  # type: ignore[arg-type]


def scalar_values(
    *,
    lr: float,
    decay: float,
    bias_correction1: float,
    bias_correction2_sqrt: float,
    eps: float,
    update_clip: float | None,
    beta1: float,
    beta2: float,
) -> list[float]:
    """The row of :func:`fused_scalars` (several groups' rows make one tensor with one host-to-device copy)."""
    clip = math.inf if update_clip is None else update_clip
    return [lr, decay, bias_correction1, bias_correction2_sqrt, eps, clip, beta1, beta2]


def fused_elementwise_update(
    target: Tensor,
    grad: Tensor,
    *,
    v: Tensor | None,
    m: Tensor | None,
    numerator: Tensor | None,
    denom: Tensor | None,
    scalars: Tensor,
) -> None:
    """:func:`elementwise_update` as one compiled kernel (same arguments; the scalars from
    :func:`fused_scalars`). Equal to the eager form up to float32 rounding (the order of the
    operations differs slightly). Raises whatever ``torch.compile`` raises if no kernel can be built
    (e.g. no C++ compiler); callers fall back to :func:`elementwise_update`."""
    ema = m is not None
    second = v if v is not None else denom
    if second is None:
        raise ValueError("fused_elementwise_update: one of v (full) or denom (block) is required")
    source = m if ema else (numerator if numerator is not None else grad)
    # Plain 2-D tensors (detached views of the same storage) keep the number of compiled variants
    # small: parameters would get static shapes, and every rank and size-1 pattern its own graph.
    args = [_as_2d(x) for x in (target, grad, source, second)]
    _run_compiled(_fused_kernel, (ema, v is not None), *args, scalars)


def _foreach_body(ema: bool, full: bool, masked: bool) -> Any:
    body = _FUSED_KERNELS[ema, full]

    def run(targets: list[Tensor], grads: list[Tensor], sources: list[Tensor], seconds: list[Tensor],
            s: Tensor, oks: list[Tensor] | None = None) -> None:  # fmt: skip
        for i, (target, grad, source, second) in enumerate(zip(targets, grads, sources, seconds)):
            tail_body(body, ema, full, target, grad, source, second, s, cast(list[Tensor], oks)[i] if masked else None)

    return run


def tail_body(body: Any, ema: bool, full: bool, target: Tensor, grad: Tensor, source: Tensor, second: Tensor,
              s: Tensor, ok: Tensor | None) -> None:  # fmt: skip
    """One block's fused tail (``body``, one of :data:`_FUSED_KERNELS`) inside a traced function; ``ok``: a
    0-d boolean, False to leave the parameter and the state the body writes as they were."""
    args = [x.reshape(1, -1) if x.dim() < 2 else x for x in (target, grad, source, second)]
    if ok is None:
        body(*args, s)
        return
    # The tensors the body updates (the parameter; m and v where they are state): their old values where
    # this block's ``ok`` is False. In the graph this is one pass, not a copy.
    written = [args[0]] + ([args[2]] if ema else []) + ([args[3]] if full else [])
    old = [x.clone() for x in written]
    body(*args, s)
    for x, before in zip(written, old):
        x.copy_(torch.where(ok, x, before))


def fused_foreach_update(
    targets: list[Tensor],
    grads: list[Tensor],
    *,
    vs: list[Tensor] | None,
    ms: list[Tensor] | None,
    denoms: list[Tensor] | None,
    numerators: list[Tensor] | None = None,
    scalars: Tensor,
    oks: list[Tensor] | None = None,
) -> None:
    """:func:`foreach_elementwise_update` as compiled calls, one per bucket of up to :data:`_BUCKET`
    same-layout blocks (arguments as there; the scalars from :func:`fused_scalars`): one pass over each
    block's memory instead of 5-8, and one dispatched call instead of one op per arithmetic step. Equal
    to the eager form up to float32 rounding. ``oks``: one boolean 0-d tensor per block; a block whose
    flag is False keeps its parameter and state (the device-side skip of a non-finite gradient: no host
    sync). Raises whatever ``torch.compile`` raises if no kernel can be built; callers fall back."""
    second = vs if vs is not None else denoms
    if second is None:
        raise ValueError("fused_foreach_update: one of vs (full) or denoms (block) is required")
    sources = ms if ms is not None else (numerators if numerators is not None else grads)
    # In-graph views (1-d tensors as rows) dispatch nothing per tensor; called under no_grad (the step).
    # One call per bucket of same-layout blocks (see _BUCKET).
    flags = (ms is not None, vs is not None, oks is not None)
    for run in _buckets([_signature(*xs) for xs in zip(targets, grads, sources, second)]):
        lists = [[xs[i] for i in run] for xs in (targets, grads, sources, second)]
        masks = () if oks is None else ([oks[i] for i in run],)
        _run_compiled(_foreach_body, flags, *lists, scalars, *masks)


BlockSpec = tuple[tuple[int, ...], int | None, int]
"""One block's layout for :func:`fused_block_moments`: ``(matrix shape, block_dim, block_size)``."""


def _block_moments_body(masked: bool) -> Any:
    def run(vs: list[Tensor], grads: list[Tensor], scalars: list[Tensor], specs: tuple[BlockSpec, ...],
            oks: list[Tensor] | None = None) -> list[Tensor]:  # fmt: skip
        return [block_moment(v, grad, s, spec, cast(list[Tensor], oks)[i] if masked else None)
                for i, (v, grad, s, spec) in enumerate(zip(vs, grads, scalars, specs))]  # fmt: skip

    return run


def block_moment(v: Tensor, grad: Tensor, s: Tensor, spec: BlockSpec, ok: Tensor | None) -> Tensor:
    """One block's part of :func:`fused_block_moments` inside a traced function: ``v`` updated in place
    (kept where the 0-d ``ok`` is False), its denominators returned shaped to broadcast."""
    shape, block_dim, block_size = spec
    _lr, _decay, _bc1, bc2s, eps, _clip, _beta1, beta2 = s.unbind()
    pre, n_blocks, post = _block_shape(shape, block_dim, block_size)  # the block means of g^2
    row = grad.reshape(pre, n_blocks, post).square().sum(dim=(0, 2)) / (pre * post)
    new = torch.lerp(v, row, 1.0 - beta2)
    if ok is not None:
        new = torch.where(ok, new, v)
    v.copy_(new)
    return broadcast_blocks(new.sqrt() / bc2s + eps, shape, block_dim, block_size)


def fused_block_moments(
    vs: list[Tensor], grads: list[Tensor], scalars: list[Tensor], specs: tuple[BlockSpec, ...],
    oks: list[Tensor] | None = None,
) -> list[Tensor]:  # fmt: skip
    """Block second moments as compiled calls, one per bucket of up to :data:`_BUCKET` same-layout
    blocks: the block means ``row`` of
    ``g^2`` (``grads``: any shape with the matrix's entries, read as the matrix of its :data:`BlockSpec`),
    ``v <- lerp(v, row, 1 - beta2)`` in place, and the
    denominators ``sqrt(v) / sqrt(1 - beta2^t) + eps`` returned, each shaped to broadcast over its block's
    matrix (see :func:`adapm.policies.second_moment.broadcast_blocks`). ``scalars``: each block's row of
    :func:`fused_scalars`. ``oks``: as in :func:`fused_foreach_update` (a block whose flag is False keeps
    its ``v``). Raises whatever ``torch.compile`` raises if no kernel can be built; callers fall back."""
    denoms: list[Tensor] = list(vs)  # placeholders, each replaced below
    for run in _buckets([(_signature(v, g), spec) for v, g, spec in zip(vs, grads, specs)]):  # see _BUCKET
        masks = () if oks is None else ([oks[i] for i in run],)
        made = _run_compiled(_block_moments_body, (oks is not None,), [vs[i] for i in run], [grads[i] for i in run],
                             [scalars[i] for i in run], tuple(specs[i] for i in run), *masks)  # fmt: skip
        for i, denom in zip(run, made):
            denoms[i] = denom
    return denoms


def _fixed_basis_body(masked: bool) -> Any:
    def run(q: Tensor, right: Tensor, g: Tensor, s: Tensor, oks: list[Tensor] | None = None) -> Tensor:
        weight, a = s[0], s[1]  # 1 - beta1, and (1 + c_t)(1 - beta1)
        p = q.mT @ g
        new = torch.lerp(right, p, weight)
        keep = torch.stack(cast(list[Tensor], oks)).view(-1, 1, 1) if masked else torch.isfinite(new)
        new = torch.where(keep, new, right)
        g.copy_(a * g + q @ (new - a * p))
        return new

    return run


def fixed_basis_values(beta1: float, a: float) -> list[float]:
    """The row of scalars of :func:`fused_fixed_basis_momentum`, as long as a row of :func:`scalar_values`
    (so that both share one table): ``1 - beta1``, ``a = (1 + c_t)(1 - beta1)``, then zeros."""
    return [1.0 - beta1, a, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]


def fused_fixed_basis_momentum(
    q: Tensor, right: Tensor, g: Tensor, scalars: Tensor, oks: list[Tensor] | None = None
) -> Tensor:
    """The ``fixed`` tracker's step between refreshes (see
    :func:`adapm.policies.momentum.lowrank_momentum`) for a stack ``q (B, m, r)``, ``right (B, r, n)``,
    ``g (B, m, n)`` as one compiled call: the corrected momentum ``a g + Q (R_t - a P)`` overwrites ``g``,
    and ``R_t = lerp(R, Q^T g, 1 - beta1)`` is returned, each block's old ``R`` kept where its flag in
    ``oks`` (0-d booleans, one per block) is False, or else entry by entry where ``R_t`` is not finite.
    ``scalars``: a row of :func:`fixed_basis_values`. Inputs other than ``g`` are untouched. Equal to the
    eager form to float32 rounding; raises whatever ``torch.compile`` raises if it cannot build the call."""
    args = (q, right, g, scalars) + (() if oks is None else (oks,))
    return _run_compiled(_fixed_basis_body, (oks is not None,), *args)


_RECOMPILE_LIMIT = 64
"""Variants per kernel (layouts: contiguous or strided, vectors, broadcast patterns of the block
denominators); each compiles once per process and is cached on disk."""


_BUCKET = 8
"""Most blocks one compiled call of :func:`fused_foreach_update` or :func:`fused_block_moments` takes.
A call's graph is unrolled per block, so compiling it takes longer the more blocks it has: one call for
every layer's blocks made the first step's compile time grow with the model's depth. Calls take buckets
of at most this many blocks of one layout (shape, strides, dtype), so the buckets of different layers
are the same graph: the graphs, and the compile time, stay the same whatever the depth. The cost is one
call per bucket instead of one per group (each a guard check and a call into the graph, on the host);
the kernels a GPU runs are the same, one per block (docs/benchmarks.md, section 5)."""


def _signature(*xs: Tensor) -> tuple[Any, ...]:
    """What decides a compiled call's graph for one block: its tensors' layouts."""
    return tuple((tuple(x.shape), x.stride(), x.dtype) for x in xs)


def _buckets(signatures: list[Any]) -> list[list[int]]:
    """Positions of equal ``signatures`` together (in order of first appearance), in runs of at most
    :data:`_BUCKET`."""
    alike: dict[Any, list[int]] = {}
    for i, signature in enumerate(signatures):
        alike.setdefault(signature, []).append(i)
    return [run[k : k + _BUCKET] for run in alike.values() for k in range(0, len(run), _BUCKET)]


def _as_2d(x: Tensor) -> Tensor:
    x = x.detach()
    return x.reshape(1, -1) if x.dim() < 2 else x
