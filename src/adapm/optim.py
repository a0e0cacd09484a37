"""The AdaPM optimizer shell: validation, lazy state, dispatch to the pure policies, checkpoints."""

from __future__ import annotations

import copy
import functools
import math
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from adapm.config import AdaPMConfig, check_hyperparameters, resolve_lr_ratios
from adapm.distributed import ShardInfo, agree_all, local, make_state, shard_info
from adapm.grouped import (
    Block,
    ScalarRows,
    Views,
    copy_chunks,
    elementwise_tails,
    second_moment_denominators,
    step_lowrank,
)
from adapm.partition.layout import ParamLayout, build_layout
from adapm.partition.report import PartitionReport, some_names
from adapm.partition.rules import partition
from adapm.policies.momentum import lowrank_momentum
from adapm.policies.precision import Run, Stored, is_scale_key, read_working, scale_key, write_working
from adapm.policies.second_moment import (
    block_entries,
    block_second_moment,
    broadcast_blocks,
    local_block_sums,
    needs_square_buffer,
)
from adapm.policies.update import (
    elementwise_update,
    fused_elementwise_update,
    fused_scalars,
)

__all__ = ["AdaPM", "AdaPMMini", "state_bytes"]  # the hyperparameters live in adapm.config

STATE_KEYS = ("step", "exp_avg_sq", "exp_avg", "lowrank_L", "lowrank_R")

_GROUP_KEYS = frozenset(
    {
        "params",
        "lr",
        "betas",
        "eps",
        "weight_decay",
        "momentum",
        "second_moment",
        "rank_ratio",
        "block",
        "split_dim",
        "segments",
        "names",
        "tied",
        "role",
        "family",
        "matched",
        "tracker",
        "refresh_every",
        "correction",
        "update_clip",
        "clip_scope",
        "state_dtype",
        "lr_ratio",
        "experts",
        "kept_whole",
        "user_group",
    }
)
# Keys that LR/momentum schedulers write into param groups.
_SCHEDULER_KEYS = frozenset({"initial_lr", "base_lr", "max_lr", "min_lr", "base_momentum", "max_momentum"})
# Keys whose value must agree between a loaded state dict and this optimizer.
_POLICY_GROUP_KEYS = ("momentum", "second_moment", "split_dim")
# The group keys a parameter's layout is built from (see adapm.partition.layout.build_layout).
_LAYOUT_KEYS = ("momentum", "second_moment", "rank_ratio", "block", "split_dim", "segments", "experts", "role",
                "lr_ratio", "state_dtype")  # fmt: skip


def _layout_keys(group: Mapping[str, Any]) -> tuple[Any, ...]:
    return tuple(map(group.get, _LAYOUT_KEYS))


def _rows_cut(layout: ParamLayout, info: ShardInfo) -> str | None:
    """What FSDP2's row sharding cuts through in a fused weight: ``"experts"`` (a stack of expert
    matrices), a description of parts that run along the rows, or None (nothing it cannot follow)."""
    if not (info.sharded and layout.fused):
        return None
    first = layout.segments[0]
    if first.index is not None:
        return "experts"
    if first.dim == 0:
        unequal = first.groups > 1 or len({seg.shape for seg in layout.segments}) > 1
        return "interleaved or unequal q/k/v parts" if unequal else "segments"
    return None


_GOLDEN = 0.6180339887498949
# sqrt(float32 max) / 2: a gradient of larger norm would overflow g^2 (or its block sums) in float32.
_MAX_GRAD_NORM = 2.0**63
_CHUNK_ELEMENTS = 1 << 16


def _rows(x: Tensor | None, r0: int, r1: int, rows: int) -> Tensor | None:
    """Rows ``[r0, r1)`` of ``x``; tensors that broadcast along dim 0 (or scalars) are returned whole."""
    if x is None or x.dim() == 0 or (x.shape[0] == 1 and rows > 1):
        return x
    return x[r0:r1]


def _is_named(x: Any) -> bool:
    return isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], str)


def _as_list(params: Any) -> Any:
    """A group's ``params`` as a list (a generator is read once); a tensor or a set as it is (torch
    takes the one and refuses the other)."""
    return params if params is None or isinstance(params, (Tensor, set)) else list(params)


def _all_named(params: Any) -> bool:
    return isinstance(params, list) and bool(params) and all(_is_named(x) for x in params)


def _groups_are_named(items: list[Any]) -> bool:
    """Whether the user's param groups hold ``(name, parameter)`` pairs (torch's named param groups).
    Groups with names and groups without cannot be mixed (as in torch)."""
    if not items or not all(isinstance(g, dict) for g in items):
        return False
    named = [_all_named(g.get("params")) for g in items]
    if any(named) and not all(named):
        raise ValueError(
            "all optimizer param groups should be with names or without names: param group "
            f"{named.index(False)} has parameters without names; give every group (name, parameter) pairs"
        )
    return all(named)


def _apply_group_settings(groups: list[dict[str, Any]], named_groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The partition's groups (one per parameter) with the settings of the user's named group that
    holds each parameter (``lr``, ``weight_decay``, policy keys...), which win over the partition's, and
    that group's index as ``user_group`` (for per-group scheduler arguments)."""
    settings = {id(p): {**{k: v for k, v in g.items() if k not in ("params", "names")}, "user_group": index}
                for index, g in enumerate(named_groups) for _, p in g["params"]}  # fmt: skip
    return [{**group, **settings[id(group["params"][0])]} for group in groups]


class AdaPM(Optimizer):
    r"""AdaPM: Adam with momentum only where it pays (adaptive partial momentum).

    Every parameter block has a *momentum policy* (``full``, ``lowrank`` or ``none``) and a
    *second-moment policy* (``full``, or ``block`` for AdaPM-mini). Built from a model (or its
    ``named_parameters()``), the paper's partition is applied automatically: embeddings, LM head and
    attention output projection get no momentum; query, key and MLP matrices a rank-``r`` momentum
    with residual correction; value and all vectors full momentum. Plain ``params``/param groups
    work as in :class:`torch.optim.AdamW`; a group may carry ``momentum``, ``second_moment`` and
    ``rank_ratio`` keys (a group without them is full/full, i.e. AdamW).

    .. math::
       \begin{aligned}
       &\textbf{input}: \gamma_t \text{ (lr)}, \beta_1, \beta_2, \epsilon, \lambda \text{ (weight decay)},
            c \text{ (update clip)}, r, T \text{ (refresh)} \\
       &\textbf{for } t = 1, 2, \ldots \textbf{ do} \\
       &\quad g_t \leftarrow \nabla_W f_t(W_{t-1}) \\
       &\quad v_t \leftarrow \beta_2 v_{t-1} + (1-\beta_2)\, g_t^2
            \quad\text{(block: } v_t[b] \leftarrow \beta_2 v_{t-1}[b] + (1-\beta_2)\,
            \mathrm{mean}_{i \in b}\, g_t[i]^2 \text{)} \\
       &\quad \textbf{full: } m_t \leftarrow \beta_1 m_{t-1} + (1-\beta_1) g_t,\quad
            \hat m_t \leftarrow m_t / (1-\beta_1^t) \\
       &\quad \textbf{none: } \hat m_t \leftarrow g_t \\
       &\quad \textbf{lowrank: } m_t \leftarrow \beta_1 L_{t-1} R_{t-1} + (1-\beta_1) g_t
            \quad\text{(transient)} \\
       &\qquad (L_t, R_t) \leftarrow \begin{cases}
            \mathrm{rsvd}_r(m_t) & t = 1 \text{ or } t \equiv t_0 \pmod T \\
            Q = \mathrm{qr}(m_t R_{t-1}^\top),\ (Q, Q^\top m_t) & \text{power tracker} \\
            (L_{t-1}, L_{t-1}^\top m_t) & \text{fixed tracker} \end{cases} \\
       &\qquad \rho_t \leftarrow m_t - L_t R_t, \qquad
            c_t \leftarrow \beta_1 (1 - \beta_1^{t-1}) / (1 - \beta_1) \\
       &\qquad \hat m_t \leftarrow (m_t + c_t \rho_t) / (1 - \beta_1^t) \\
       &\quad u_t \leftarrow \mathrm{clamp}\big(\hat m_t / (\sqrt{v_t / (1-\beta_2^t)} + \epsilon), -c, c\big) \\
       &\quad W_t \leftarrow W_{t-1}(1 - \gamma_t \lambda) - \gamma_t u_t \\
       &\textbf{return } W_t
       \end{aligned}

    **Why the correction differs from the paper's Algorithm 1.** The gap to the full EMA momentum
    obeys exactly :math:`e_t = \beta_1 (e_{t-1} + \rho_{t-1})`, so for stationary residuals with mean
    :math:`\bar\rho` it tends to :math:`\beta_1 \bar\rho / (1-\beta_1)`; :math:`m_t + c_t \rho_t` is
    unbiased only for the coefficient above (its finite-:math:`t` form is the exact expected gap).
    The printed line 8, :math:`m_t - \rho_t/(1-\beta_1)`, has bias
    :math:`-(1+\beta_1)\bar\rho/(1-\beta_1)`, worse than no correction. ``correction="none"`` uses
    :math:`m_t`; ``correction="paper"`` reproduces the printed formula for ablations only.

    Args:
        params: an ``nn.Module``, its ``named_parameters()``, an iterable of tensors, or param
            groups (dicts). Frozen parameters of a module are left out.
        lr: learning rate (no default: tune it for your model). Start AdaPM at a tuned AdamW
            lr and AdaPM-mini at half of it, and sweep a factor of 2 either way:
            AdaPM-mini's loss rises quickly above its best lr (the README's "Which lr" gives the sweeps).
        betas: ``(beta1, beta2)``. Default ``(0.9, 0.95)``.
        eps: added to the denominator. Default ``1e-8``.
        weight_decay: decoupled (AdamW) decay; from a model, applied to matrices only. Default ``0.1``.
        second_moment: ``"full"`` (AdaPM) or ``"block"`` (AdaPM-mini): the default for groups.
        rank_ratio: rank of low-rank momentum as a fraction of ``min(m, n)``, in ``(0, 1]``.
        tracker: ``"power"`` (one warm-started power iteration), ``"gd"`` (the paper's 10 steps
            of alternating gradient descent) or ``"fixed"`` (the basis of the last refresh is kept:
            two skinny matmuls per step instead of four; the subspace adapts only at refreshes).
        refresh_every: re-seed low-rank factors from a randomized SVD every this many steps
            (staggered across parameters, deterministic seeds).
        correction: ``"unbiased"`` (default), ``"none"`` or ``"paper"`` (ablation only).
        update_clip: clamp of the normalized update (``None`` to disable). Default ``1.0``.
        clip_scope: which blocks ``update_clip`` applies to: ``"lowrank"`` (default: the low-rank
            blocks, as in the paper's Algorithm 1) or ``"all"``. A group key, so a group or rule may
            set its own; a rule's ``update_clip`` applies to its blocks whatever the scope.
        state_dtype: how the large state tensors (full momentum, low-rank factors, full second moment)
            are stored: ``"fp32"`` (default) or ``"bf16"`` (half the bytes; the math still runs in
            float32 on working copies, written back with seeded stochastic rounding). Block second
            moments and step counters stay float32. A group key, so a param group may set its own.
        lr_ratios: block-wise learning rates: ``"blockwise"`` (embeddings and LM head x10, query and
            key x8, MLP x6, value and attention output x4, norms, biases and unrecognised matrices x1;
            "The Sharpness Disparity Principle in Transformers", ICML 2025) or a dict by role
            (``embedding``, ``output``, ``query``, ``key``, ``value``, ``attn_out``, ``mlp``, ``vector``,
            ``other``; missing roles x1). The ratio scales the group's lr (and with it the decay)
            at every step, so LR schedulers keep the ratios. Default ``None`` (every block x1).
        rules: user partition rules ``[(regex, policy), ...]`` (``policy`` a momentum name or a dict
            with ``momentum``/``second_moment``/``rank_ratio``), tried before the presets. Fused
            segments are matched as ``name[Q]``, ``name[K]``, ``name[V]``.
        foreach: the grouped (multi-tensor) step, torch.optim's ``foreach`` form: same-shape low-rank
            blocks are tracked together with batched matmuls and QR, block second moments are reduced
            per (shape, block layout) group, and the elementwise tail runs as one ``torch._foreach_*``
            op per arithmetic step for all blocks that share their policies, so ops per step grow with
            the number of (policy, shape) groups, not with the number of layers (see
            :mod:`adapm.grouped`). ``None`` (default): on accelerators yes, on CPU no (there the
            per-block path works in cache-sized row chunks, which is faster and allocates no full-size
            temporaries). Both agree to float32 rounding. Sharded (FSDP2) parameters take the
            per-block path.
        fused: run the elementwise tail (momentum and second-moment EMAs, the update) compiled with
            ``torch.compile`` instead of as eager PyTorch ops: one pass over each block's memory
            instead of 5-8, equal up to float32 rounding. On the per-block path one kernel per block;
            on the grouped path one compiled call per bucket of up to 8 same-layout blocks (so the
            first step's compile time does not grow with depth), and with ``tracker="fixed"``
            one per stack of same-shape low-rank blocks for their tracking between refreshes. The
            first step compiles (seconds to minutes; cached on disk afterwards); needs a C++ compiler on CPU, and falls
            back to the eager path with a ``RuntimeWarning`` if compilation fails. Default ``False``.

        strict: what to do when the partition cannot apply to some matrices (no preset matched, or a
            fused weight whose layout is not known for the model) or to any (bare parameters without
            names): ``None`` (default) warns once, naming them and giving the share of AdamW's state
            their fallback (full momentum) costs; ``True`` raises ``ValueError`` instead; ``False`` is
            silent. Param groups that set their own policy keys are taken as deliberate.

    A parameter whose gradient contains inf or NaN is skipped for that step (value and state left
    unchanged) and a ``RuntimeWarning`` names it: one bad batch cannot poison the low-rank factors.
    The check reads one flag per parameter back to the host once per step; with ``fused=True`` on an
    accelerator it does not: the skip is a mask on the device, and the flags are read at the next step
    (or when ``skipped_params`` or ``state_dict()`` is read), which is when the warning comes and the
    skipped parameters' step counters are put back.
    Optimizer state is float32 whatever the parameter dtype.

    Example:
        >>> opt = AdaPM(model, lr=6e-4)  # AdamW's tuned lr (AdaPMMini: about half of it)
        >>> print(opt.partition_report())
    """

    _default_second_moment = "full"
    _defer_check: bool | None = None
    """Whether the finite check is deferred (see :meth:`step`): None (default) where it saves a device
    sync, i.e. ``fused=True`` grouped steps on an accelerator with float32 state; the tests set True to
    run that path on CPU."""
    _cpu_row_chunks = True
    """Chunk the eager tail of low-rank and fused blocks by rows on CPU (accelerators never chunk);
    ``benchmarks/op_count.py`` turns it off to count the ops an accelerator would see."""

    def __init__(
        self,
        params: nn.Module | Iterable[Any],
        lr: float,
        *,
        betas: tuple[float, float] = AdaPMConfig.betas,
        eps: float = AdaPMConfig.eps,
        weight_decay: float = AdaPMConfig.weight_decay,
        second_moment: str | None = AdaPMConfig.second_moment,
        rank_ratio: float = AdaPMConfig.rank_ratio,
        tracker: str = AdaPMConfig.tracker,
        refresh_every: int = AdaPMConfig.refresh_every,
        correction: str = AdaPMConfig.correction,
        update_clip: float | None = AdaPMConfig.update_clip,
        clip_scope: str = AdaPMConfig.clip_scope,
        state_dtype: str = AdaPMConfig.state_dtype,
        lr_ratios: str | Mapping[str, float] | None = AdaPMConfig.lr_ratios,
        rules: Iterable[Any] | None = None,
        fused: bool = AdaPMConfig.fused,
        foreach: bool | None = AdaPMConfig.foreach,
        strict: bool | None = None,
    ) -> None:
        config = AdaPMConfig(
            betas=tuple(betas) if isinstance(betas, (tuple, list)) else betas,
            eps=eps,
            weight_decay=weight_decay,
            second_moment=self._default_second_moment if second_moment is None else second_moment,
            rank_ratio=rank_ratio,
            tracker=tracker,
            refresh_every=refresh_every,
            correction=correction,
            update_clip=update_clip,
            clip_scope=clip_scope,
            state_dtype=state_dtype,
            lr_ratios=lr_ratios,
            fused=fused,
            foreach=foreach,
        )
        defaults: dict[str, Any] = dict(lr=lr, momentum="full", block="auto",
                                        **config.group_defaults(cast(str, config.second_moment)))  # fmt: skip
        check_hyperparameters(defaults, "")
        self.config = config
        """The validated hyperparameters this optimizer was built with (param groups may override them)."""
        ratios = resolve_lr_ratios(lr_ratios)
        self._lr_ratios = ratios
        self._layouts: dict[Tensor, ParamLayout] = {}
        self._group_keys: list[tuple[Any, ...]] = []
        """Per param group, the values of its layout keys its parameters' layouts were built from."""
        self._index: dict[Tensor, int] = {}
        self._shards: dict[Tensor, ShardInfo] = {}
        self._buffers: dict[tuple[Any, ...], Tensor] = {}
        self._views = Views()
        self._scalar_rows = ScalarRows()
        self.fused = fused
        self.foreach = foreach
        self._skipped = 0
        self._skip_total = 0
        self._skip_streak = 0
        self._pending: _Pending | None = None
        self._oks: dict[Tensor, Tensor] = {}

        if strict is not None and not isinstance(strict, bool):
            raise TypeError(f"Invalid strict: {strict!r}; expected True, False or None")
        self._strict = strict
        groups, partitioned = self._make_groups(
            params, rules, cast(str, config.second_moment), rank_ratio, weight_decay, ratios
        )
        super().__init__(groups, defaults)
        if strict is not False:
            self._check_partition(partitioned, strict=bool(strict))

    def _check_partition(self, partitioned: bool | None, strict: bool) -> None:
        """Warn (or with ``strict``, raise) when the partition could not apply to some or all matrices,
        naming them and giving what the fallback costs in optimizer state."""
        report = self.partition_report()
        if not report.adamw_state_bytes:
            return
        total = 100.0 * report.state_bytes / report.adamw_state_bytes
        tail = " strict=False silences this; strict=True makes it an error."
        if partitioned is None:
            return
        if partitioned is False:
            message = (
                f"AdaPM got parameters without names, so its partition cannot apply: every parameter gets full "
                f"momentum ({total:.1f}% of AdamW's optimizer state). Pass the model or model.named_parameters() "
                "to get the partition, or put policy keys ('momentum', 'second_moment') in your param groups." + tail
            )
        else:
            whole = [n for g in self.param_groups if g.get("kept_whole") for n in g["names"]]
            sharded = [n for g in self.param_groups if g.get("kept_whole") == "sharded" for n in g["names"]]
            unknown = [n for n in report.unmatched if n not in whole]
            whole = [n for n in whole if n not in sharded]
            if not whole and not unknown and not sharded:
                return
            fallback = sum(r.state_bytes for r in report.rows if not r.matched)
            parts = []
            if unknown:
                what = "matrix" if len(unknown) == 1 else "matrices"
                parts.append(f"{len(unknown)} {what} matched no preset ({some_names(unknown)})")
            if whole:
                what = "weight" if len(whole) == 1 else "weights"
                parts.append(
                    f"{len(whole)} fused {what} whose layout is not known for this model kept whole "
                    f"({some_names(whole)})"
                )
            if sharded:
                what = "weight" if len(sharded) == 1 else "weights"
                parts.append(
                    f"{len(sharded)} fused {what} kept whole because FSDP2 shards the rows their parts run along "
                    f"({some_names(sharded)}; keep those modules unsharded to split them)"
                )
            message = (
                f"AdaPM: {' and '.join(parts)}: they keep full momentum and a full second moment, "
                f"{100.0 * fallback / report.adamw_state_bytes:.1f}% of AdamW's optimizer state for them "
                f"({total:.1f}% in all). Pass rules=[(pattern, policy), ...] to choose their policies." + tail
            )
        if strict:
            raise ValueError(message)
        warnings.warn(message, UserWarning, stacklevel=3)

    @staticmethod
    def _make_groups(
        params: Any, rules: Any, second_moment: str, rank_ratio: float, weight_decay: float, ratios: Any
    ) -> tuple[list[Any], bool | None]:
        """The param groups, and whether the partition applied: True (from names), False (bare parameters
        or groups without any policy key), None (groups that set their own policies)."""
        model = params if isinstance(params, nn.Module) else None
        named_groups: list[Any] | None = None
        if model is not None:
            for name, module in model.named_modules():
                if isinstance(module, (nn.Embedding, nn.EmbeddingBag)) and module.sparse:
                    raise ValueError(f"AdaPM does not support sparse gradients: module '{name}' has sparse=True")
            named: list[Any] | None = list(model.named_parameters(remove_duplicate=False))
        else:
            if isinstance(params, Tensor):
                raise TypeError(
                    "params argument given to the optimizer should be an iterable of Tensors or dicts, "
                    "or an nn.Module, but got " + torch.typename(params)
                )
            items = [{**x, "params": _as_list(x["params"])} if isinstance(x, dict) and "params" in x else x
                     for x in params]  # fmt: skip
            named = items if bool(items) and all(_is_named(x) for x in items) else None
            named_groups = items if _groups_are_named(items) else None
            if named_groups is not None:
                named = [pair for g in named_groups for pair in g["params"]]
            if named is None:
                if rules is not None or ratios is not None:
                    raise ValueError(
                        f"{'rules' if rules is not None else 'lr_ratios'} need parameter names: pass the model or "
                        "model.named_parameters() instead of plain parameters, or put policy keys in param groups"
                    )
                policy_keys = {"momentum", "second_moment", "segments"}
                own = any(isinstance(x, dict) and policy_keys & set(x) for x in items)
                return items, None if own else False
        groups = partition(
            named,
            model=model,
            rules=rules,
            second_moment=second_moment,
            rank_ratio=rank_ratio,
            weight_decay=weight_decay,
            lr_ratios=ratios,
        )
        if named_groups is not None:
            groups = _apply_group_settings(groups, named_groups)
        return groups, True

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group (validated; its policy keys are resolved per parameter)."""
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, but got {type(param_group).__name__}")
        index = len(self.param_groups)
        unknown = set(param_group) - _GROUP_KEYS - _SCHEDULER_KEYS
        if unknown:
            raise ValueError(
                f"param group {index} has unknown keys {sorted(unknown)}; allowed keys: {sorted(_GROUP_KEYS)}"
            )
        params = _as_list(param_group.get("params"))
        param_group = {**param_group, "params": params}
        if _all_named(params):
            # (name, parameter) pairs: the names go to messages and the report, whatever the other groups hold
            param_group = {**param_group, "params": [p for _, p in params]}
            param_group.setdefault("names", [n for n, _ in params])
        # torch checks the new group against every earlier one, all their parameters each time: quadratic in the
        # groups, and AdaPM makes one a parameter (18,771 in LitGPT's Qwen3-30B-A3B; docs/benchmarks.md, section 7).
        # It checks this group alone here, against an empty list; the index of the parameters added finds repeats.
        earlier, self.param_groups = self.param_groups, []
        try:
            super().add_param_group(param_group)
        finally:
            added, self.param_groups = self.param_groups, earlier
        if any(p in self._index for p in added[0]["params"]):
            raise ValueError("some parameters appear in more than one parameter group")
        self.param_groups.append(added[0])
        group = self.param_groups[-1]
        if isinstance(group["betas"], list):
            group["betas"] = tuple(group["betas"])
        check_hyperparameters(group, f" in param group {index}")
        names = group.get("names")
        if names is not None and (not isinstance(names, list) or len(names) != len(group["params"])):
            raise ValueError(f"param group {index}: 'names' must be a list with one name per parameter")
        start = len(self._index)  # the parameters of the earlier groups
        try:
            for j, p in enumerate(group["params"]):
                name = names[j] if names else f"param_groups[{index}][{j}]"
                if p.is_complex():
                    raise ValueError(f"AdaPM does not support complex parameters: '{name}' is {p.dtype}")
                if not p.is_floating_point():
                    raise ValueError(f"AdaPM needs floating-point parameters: '{name}' is {p.dtype}")
                self._layouts[p] = build_layout(name, tuple(p.shape), group)
                self._index[p] = start + j
        except Exception:
            for p in group["params"]:
                if self._index.get(p, -1) >= start:
                    del self._index[p], self._layouts[p]
            self.param_groups.pop()
            raise
        self._group_keys.append(copy.deepcopy(_layout_keys(group)))

    def _rebuild_layouts(self) -> None:
        self._layouts, self._index, self._shards, self._group_keys = {}, {}, {}, []
        k = 0
        for i, group in enumerate(self.param_groups):
            names = group.get("names")
            for j, p in enumerate(group["params"]):
                name = names[j] if names else f"param_groups[{i}][{j}]"
                self._layouts[p] = build_layout(name, tuple(p.shape), group)
                self._index[p] = k
                k += 1
            self._group_keys.append(copy.deepcopy(_layout_keys(group)))

    def _sync_layouts(self, swaps: bool = True) -> None:
        """Follow edits of a param group's policy keys (``momentum``, ``second_moment``, ``rank_ratio``,
        ``block``, ``lr_ratio``, ``state_dtype``...) made after construction, as torch optimizers follow
        edits of ``lr``: a parameter without state yet takes its new layout (validated); one with state
        takes it where the state stays valid (e.g. a new ``lr_ratio``), and otherwise this raises.

        Raises:
            ValueError: naming the group, the parameter and the changed keys, when the new policy would
                need other state than the parameter holds (its state cannot be carried over).
        """
        if swaps:  # the step finds swapped parameters in its own loop over them (see _follow_replaced)
            known = self._layouts.__contains__
            replaced = [i for i, group in enumerate(self.param_groups) if not all(map(known, group["params"]))]
            if replaced:
                self._follow_replaced(replaced)
        for i, group in enumerate(self.param_groups):
            before = self._group_keys[i]
            if _layout_keys(group) == before:
                continue
            changed = ", ".join(f"{key} {old!r} -> {group.get(key)!r}"
                                for key, old in zip(_LAYOUT_KEYS, before) if group.get(key) != old)  # fmt: skip
            names = group.get("names")
            layouts = {}
            for j, p in enumerate(group["params"]):
                name = names[j] if names else f"param_groups[{i}][{j}]"
                layout = build_layout(name, tuple(p.shape), group)
                old_layout = self._layouts[p]
                state = self.state.get(p)
                if state and (_layout_difference(old_layout, layout) or layout.state_dtype != old_layout.state_dtype):
                    raise ValueError(
                        f"param group {i} ('{name}') was edited after its state was created ({changed}); its "
                        "state depends on these policy keys, so they cannot change mid-training. Set them back, or "
                        "build a new optimizer with the new policy (rules=[...] or param group keys; its "
                        "state starts fresh)"
                    )
                layouts[p] = layout
            self._layouts.update(layouts)
            self._group_keys[i] = copy.deepcopy(_layout_keys(group))

    def _follow_replaced(self, indices: list[int]) -> None:
        """Follow parameters that were swapped for other tensors in ``param_groups`` after construction,
        as Accelerate's FSDP2 ``prepare`` (and so ``Trainer`` with FSDP2) does: it builds the optimizer on
        the whole parameters, shards the model, then puts each sharded parameter where the whole one was.
        A replacement takes its predecessor's name, index and layout. A fused weight whose parts run
        along the rows FSDP2 now shards (or a stack of experts) is kept whole, with full momentum and a
        full second moment, as when the optimizer is built after ``fully_shard``, and a warning names it
        (with ``strict=True``, an error; with ``strict=False``, silence).

        Raises:
            ValueError: naming the parameter, when the one replaced already had state (it cannot be
                carried over to another tensor) or the replacement has another shape; with ``strict=True``,
                when a fused weight would be kept whole. Nothing is changed then.
        """
        starts, start = [], 0
        for group in self.param_groups:
            starts.append(start)
            start += len(group["params"])
        if start != len(self._index):  # a tensor put in place of another keeps its group and position
            raise ValueError(
                f"the param groups hold {start} parameters, not the {len(self._index)} this optimizer was built "
                "with: put replacements in place of the parameters they replace, and add new parameters with "
                "add_param_group"
            )
        owner: dict[int, Tensor] = {k: p for p, k in self._index.items()}
        swaps: list[tuple[int, Tensor, Tensor, bool]] = []  # (group, new, old, kept whole)
        for i in indices:
            for j, p in enumerate(self.param_groups[i]["params"]):
                if p in self._layouts:
                    continue
                old = owner[starts[i] + j]
                layout = self._layouts[old]
                if self.state.get(old):
                    raise ValueError(
                        f"AdaPM: parameter '{layout.name}' was replaced by another tensor after its state was "
                        "created; its state cannot follow. Replace parameters (e.g. Accelerate's prepare with FSDP2) "
                        "before the first step, or build a new optimizer and load its state_dict"
                    )
                if tuple(p.shape) != layout.shape:
                    raise ValueError(
                        f"AdaPM: parameter '{layout.name}' was replaced by a tensor of shape {tuple(p.shape)}, not "
                        f"{layout.shape}; rebuild the optimizer for the new shapes"
                    )
                swaps.append((i, p, old, bool(_rows_cut(layout, shard_info(p, layout.name)))))
        whole = [self._layouts[old].name for _, _, old, cut in swaps if cut]
        strict = getattr(self, "_strict", None)  # not pickled
        message = ""
        if whole:
            what = "weight" if len(whole) == 1 else "weights"
            message = (
                f"AdaPM: {len(whole)} fused {what} kept whole because FSDP2, applied after the optimizer was built, "
                f"shards the rows their parts run along ({some_names(whole)}): they keep full momentum and a full "
                "second moment. Keep those modules unsharded to split them."
            )
            if strict:
                raise ValueError(message + " strict=True makes this an error.")
        ratios = getattr(self, "_lr_ratios", None)  # not pickled
        for i, p, old, cut in swaps:
            group, layout = self.param_groups[i], self._layouts[old]
            for table in (self._layouts, self._shards, self._oks, self.state):
                table.pop(old, None)
            self._index[p] = self._index.pop(old)
            if cut:
                for key in ("segments", "split_dim", "experts"):
                    group.pop(key, None)
                group.update(role="other", momentum="full", second_moment="full", block="auto", family="",
                             matched=False, kept_whole="sharded")  # fmt: skip
                if ratios and "other" in ratios:
                    group["lr_ratio"] = ratios["other"]
                layout = build_layout(layout.name, layout.shape, group)
            self._layouts[p] = layout
            self._group_keys[i] = copy.deepcopy(_layout_keys(group))
        # The grouped step's views and buffers were made for the tensors replaced.
        self._buffers, self._views, self._scalar_rows = {}, Views(), ScalarRows()
        if message and strict is None:
            warnings.warn(message, stacklevel=2)

    def __getstate__(self) -> dict[str, Any]:
        # torch's Optimizer pickles only defaults/state/param_groups; keep the step's own settings too.
        self._drain()
        return {**super().__getstate__(), "fused": self.fused, "foreach": self.foreach}

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Unpickling passes our settings; torch's load_state_dict calls this with state and param groups
        # only, and must not reset them (it used to: a loaded optimizer lost fused=True and foreach=True).
        fused = state.pop("fused", getattr(self, "fused", False))
        foreach = state.pop("foreach", getattr(self, "foreach", None))
        super().__setstate__(state)
        self.fused = fused
        self.foreach = foreach
        self._skipped = 0
        self._skip_total = 0
        self._skip_streak = 0
        self._pending = None
        self._oks = {}
        self._buffers = {}
        self._views = Views()
        self._scalar_rows = ScalarRows()
        self._rebuild_layouts()

    @property
    def skipped_params(self) -> int:
        """Parameters the last ``step()`` skipped (non-finite or overflowing gradients, or factors). With a
        deferred check (``fused=True`` on an accelerator) reading this waits for that step's flags."""
        self._drain()
        return self._skipped

    @skipped_params.setter
    def skipped_params(self, value: int) -> None:
        self._skipped = value

    @property
    def skipped_total(self) -> int:
        """Parameters skipped, summed over every step since this optimizer was built (or unpickled).
        A training loop reads it every few steps for the skips since its last read, where reading
        :attr:`skipped_params` each step would wait for the device each step (with a deferred check)."""
        self._drain()
        return self._skip_total

    @property
    def skipped_streak(self) -> int:
        """Steps in a row, up to the last one, in which every parameter with a gradient was skipped
        (0 if the last step stepped any): a run whose every step is skipped is not training."""
        self._drain()
        return self._skip_streak

    def _count_skips(self, items: int) -> None:
        """Add a settled step's :attr:`skipped_params` (of ``items`` parameters with a gradient) to the
        running counts."""
        self._skip_total += self._skipped
        self._skip_streak = self._skip_streak + 1 if self._skipped >= items else 0

    def state_dict(self) -> dict[str, Any]:
        """As :meth:`torch.optim.Optimizer.state_dict` (a deferred finite check is settled first, so the
        step counters of skipped parameters are right)."""
        self._drain()
        self._sync_layouts()
        return super().state_dict()

    def layout(self, param: Tensor) -> ParamLayout:
        """The resolved layout (segments, policies, state shapes) of one parameter."""
        self._sync_layouts()
        return self._layouts[param]

    def partition_report(self) -> PartitionReport:
        """Which block gets which policy and its state bytes (computed without allocating state)."""
        self._sync_layouts()
        pairs = []
        for group in self.param_groups:
            for p in group["params"]:
                pairs.append((self._layouts[p], bool(group.get("matched", True))))
        return PartitionReport.from_layouts(pairs)

    def init_state(self) -> None:
        """Allocate every parameter's state now instead of at its first step.

        On meta-device parameters this allocates nothing, which is how ``adapm memory`` counts state
        at paper scale through the real allocation code; it also gives checkpoint loaders (e.g.
        ``torch.distributed.checkpoint``) a complete state to load into.
        """
        self._sync_layouts()
        for group in self.param_groups:
            for p in group["params"]:
                if not self.state[p]:
                    self._init_state(p, self._layouts[p], self.state[p])

    # ----------------------------------------------------------------------------------- step

    def _init_state(self, p: Tensor, layout: ParamLayout, state: dict[str, Any]) -> None:
        info = self._shard(p)
        for key, spec in layout.state_specs().items():
            if key == "step":  # on the CPU whatever the device: reading it syncs nothing
                state["step"] = torch.tensor(0.0, dtype=spec.dtype)
            else:
                state[key] = make_state(p, spec.shape, spec.row_dim, info, spec.dtype)

    def _shard(self, p: Tensor) -> ShardInfo:
        info = self._shards.get(p)
        if info is None:
            layout = self._layouts[p]
            info = shard_info(p, layout.name)
            cut = _rows_cut(layout, info)
            if cut == "experts":
                raise NotImplementedError(
                    f"AdaPM: '{layout.name}' is a stack of expert matrices, which FSDP2 shards across experts; "
                    "a per-expert policy needs each expert whole: build the optimizer after fully_shard (the stack "
                    "is then kept whole, with full state) or keep the experts unsharded"
                )
            if cut:
                raise NotImplementedError(
                    f"AdaPM: fused parameter '{layout.name}' holds {cut} along its rows (dim 0), which FSDP2 "
                    "shards across ranks: build the optimizer after fully_shard (the weight is then kept whole, "
                    "with full state), keep that module unsharded, or train it with DDP"
                )
            self._shards[p] = info
        return info

    def _finite_items(self, items: list[tuple[dict[str, Any], Tensor]]) -> list[tuple[dict[str, Any], Tensor]]:
        """Drop (and name in a warning) parameters whose gradient has inf/NaN, or whose square overflows
        float32 (it would make the second moment inf for good), on any rank; and, for the grouped step,
        those whose stored low-rank factors are not finite (e.g. from a corrupted checkpoint). One host
        sync per step for both."""
        finite, owners = self._finite_flags(items)
        return self._settle(items, finite.tolist(), owners)

    def _finite_flags(self, items: list[tuple[dict[str, Any], Tensor]], fold: bool = False) -> tuple[Tensor, list[int]]:
        """On the device: one flag per item (its gradient is finite and its square does not overflow), then
        one per stored low-rank factor (finite), agreed across the ranks that shard a parameter; and the
        ``id`` of each factor's parameter. ``fold``: each factor's flag goes into its parameter's instead
        (a parameter whose stored factors are not finite is skipped whole), so there is one per item."""
        grads = [local(cast(Tensor, p.grad)) for _, p in items]
        owners, factors = self._stored_factors(items)
        # The float32 norm is inf (or above the bound) exactly when some entry is non-finite or the sum
        # of squares overflows, so every per-entry and per-block mean of g^2 stays finite otherwise.
        norms = _norms(grads + factors)
        if factors and fold:  # factor norms times zero (NaN where not finite, else 0) added to their
            # parameter's gradient norm, each parameter once per op
            zeroed = torch._foreach_mul(norms[len(grads) :], 0.0)
            position = {id(p): i for i, (_, p) in enumerate(items)}
            passes: list[tuple[list[Tensor], list[Tensor]]] = []
            seen: dict[int, int] = {}
            for owner, extra in zip(owners, zeroed):
                k = seen[owner] = seen.get(owner, -1) + 1
                if k == len(passes):
                    passes.append(([], []))
                passes[k][0].append(norms[position[owner]])
                passes[k][1].append(extra)
            for into, extras in passes:
                torch._foreach_add_(into, extras)
        finite = torch.stack(norms[: len(grads)]) <= _MAX_GRAD_NORM
        if factors and not fold:
            finite = torch.cat([finite, torch.isfinite(torch.stack(norms[len(grads) :]))])
        for group in {self._shard(p).group for _, p in items} - {None}:  # every rank must decide alike
            finite = agree_all(finite, group)
        return finite, owners

    def _settle(
        self, items: list[tuple[dict[str, Any], Tensor]], flags: list[bool], owners: list[int]
    ) -> list[tuple[dict[str, Any], Tensor]]:
        """The items whose flags (from :meth:`_finite_flags`, read on the host) are all true; the others are
        counted in :attr:`skipped_params` and named in a warning."""
        bad_factors = {owners[i] for i, ok in enumerate(flags[len(items) :]) if not ok}
        flags = flags[: len(items)]
        kept, skipped, corrupted = [], [], []
        for ok, (group, p) in zip(flags, items):
            (corrupted if ok and id(p) in bad_factors else kept if ok else skipped).append((group, p))
        self.skipped_params = len(skipped) + len(corrupted)
        if skipped:
            self._warn_skipped([self._layouts[p].name for _, p in skipped], "non-finite or overflowing gradients")
        if corrupted:
            self._warn_skipped([self._layouts[p].name for _, p in corrupted], "non-finite low-rank factors")
        return kept

    def _stored_factors(self, items: list[tuple[dict[str, Any], Tensor]]) -> tuple[list[int], list[Tensor]]:
        """The stored low-rank factors of the parameters that take the grouped step (floating tensors:
        float32 or bf16 factors, 8-bit factors' block scales), with the ``id`` of each one's parameter."""
        owners: list[int] = []
        factors: list[Tensor] = []
        for _, p in items:
            state = self.state[p]
            if not state or not self._grouped(p):
                continue
            for key in ("lowrank_L", "lowrank_R", scale_key("lowrank_L"), scale_key("lowrank_R")):
                value = state.get(key)
                if isinstance(value, Tensor) and value.is_floating_point() and value.numel():
                    owners.append(id(p))
                    factors.append(local(value))
        return owners, factors

    def _defer(self, items: list[tuple[dict[str, Any], Tensor]]) -> bool:
        """Whether this step checks finiteness on the device and reads the flags back at the next step
        (:meth:`_drain`) instead of now: only where every item takes the grouped step with compiled tails
        (whose masks make a skip cheap) and float32 state (a skipped block's low-precision state would be
        rounded again)."""
        if self._defer_check is False or not self.fused:
            return False
        if self._defer_check is None and items[0][1].device.type == "cpu":
            return False
        return all(self._grouped(p) and not self._layouts[p].low_precision_keys for _, p in items)

    def _deferred_flags(self, items: list[tuple[dict[str, Any], Tensor]]) -> None:
        """The deferred finite check: each item's flag (its gradient and stored factors finite) lands in a
        0-d boolean kept for its parameter (the grouped step masks with it), and the flags start their copy
        to the host, read at the next step (:meth:`_drain`) to settle the step counters and warn."""
        finite, _ = self._finite_flags(items, fold=True)
        for _, p in items:
            if p not in self._oks:  # on the parameter's device, which masks with it
                self._oks[p] = torch.ones((), dtype=torch.bool, device=local(cast(Tensor, p.grad)).device)
        oks = [self._oks[p] for _, p in items]
        if all(ok.device == finite.device for ok in oks):
            torch._foreach_copy_(oks, list(finite.unbind(0)))
        else:  # parameters on several devices (e.g. a model loaded with device_map="auto")
            for ok, flag in zip(oks, finite.unbind(0)):
                ok.copy_(flag)
        self._pend(items, finite)

    def _pend(self, items: list[tuple[dict[str, Any], Tensor]], flags: Tensor) -> None:
        """Keep the items' finite flags (one per item, on the device) to be settled at the next step
        (:meth:`_drain`), their copy to the host started now without blocking."""
        event = None
        if flags.device.type == "cuda":
            flags = flags.to("cpu", non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        self._pending = _Pending(items, flags, event)

    def _drain(self) -> None:
        """Settle a deferred finite check (see :meth:`_deferred_flags`): the skipped parameters' step
        counters go back by one (their step left values and state as they were) and a warning names them.
        On CUDA this waits for the flags' copy, which the device made a step ago."""
        pending = getattr(self, "_pending", None)
        if pending is None:
            return
        self._pending = None
        if pending.event is not None:
            pending.event.synchronize()
        flags = pending.flags.tolist()
        owners: list[int] = []
        factor_flags: list[bool] = []
        if not all(flags):  # which were skipped for their stored factors (read only when some were skipped)
            owners, factors = self._stored_factors([item for ok, item in zip(flags, pending.items) if not ok])
            factor_flags = [bool(torch.isfinite(f).all()) for f in factors]
            corrupted = {owner for owner, ok in zip(owners, factor_flags) if not ok}
            flags = [ok or id(p) in corrupted for ok, (_, p) in zip(flags, pending.items)]
        kept = {id(p) for _, p in self._settle(pending.items, flags + factor_flags, owners)}
        self._count_skips(len(pending.items))
        for _, p in pending.items:
            if id(p) not in kept and self.state[p]:
                self.state[p]["step"] -= 1

    @staticmethod
    def _warn_skipped(names: list[str], why: str) -> None:
        warnings.warn(
            f"AdaPM skipped {len(names)} parameter(s) with {why} this step "
            f"(values and state unchanged): {', '.join(names)}",
            RuntimeWarning,
            stacklevel=4,
        )

    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        """Perform a single optimization step.

        ``torch.compile(opt.step)`` runs this step as ``opt.step()`` does, untraced (see :meth:`_step`);
        ``fused=True`` is what compiles its elementwise work.

        Args:
            closure: a closure that reevaluates the model and returns the loss (optional).
        """
        return self._step(closure)

    @torch.compiler.disable
    @torch.no_grad()
    def _step(self, closure: Any = None) -> Any:
        """The step, never traced by dynamo: traced, it would break its graph at its host reads (the
        non-finite check's flags, the CPU step counters), recompile every step (the bias corrections,
        the correction coefficient and the refresh schedule are Python numbers of the step count) and,
        in torch 2.13, seed every refresh's generator in one step alike (a different randomized SVD
        than the eager step's). Untraced, a compiled ``opt.step`` equals the eager one bit for bit."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        items: list[tuple[dict[str, Any], Tensor]] = []
        self._drain()
        self._sync_layouts(swaps=False)
        self._skipped = 0
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p not in self._layouts:  # swapped in after construction (Accelerate's FSDP2 prepare)
                    self._sync_layouts()
                if p.grad.is_sparse:
                    raise TypeError(
                        f"AdaPM does not support sparse gradients (parameter '{self._layouts[p].name}'); "
                        "use a dense embedding (sparse=False)"
                    )
                if tuple(p.shape) != self._layouts[p].shape:
                    raise RuntimeError(
                        f"AdaPM: parameter '{self._layouts[p].name}' changed shape from {self._layouts[p].shape} "
                        f"to {tuple(p.shape)} after the optimizer was built; rebuild the optimizer for the new "
                        "shapes (its state cannot be carried over)"
                    )
                items.append((group, p))
        if items:
            rejected: list[Tensor] = []
            deferred = self._defer(items)
            if deferred:
                self._deferred_flags(items)
                kept = items
            else:
                kept = self._finite_items(items)
            for _, p in kept:
                if not self.state[p]:
                    self._init_state(p, self._layouts[p], self.state[p])
            # Step counters: one op for all (they live on the CPU, so reading them syncs nothing).
            counters = [self.state[p]["step"] for _, p in kept]
            steps = []
            if counters:
                torch._foreach_add_(counters, 1.0)
                steps = [int(t) for t in torch.stack(counters).tolist()]
            together = []
            for (group, p), t in zip(kept, steps):
                if self._grouped(p):
                    together.append((group, p, t))
                elif not self._step_param(group, p, t):
                    rejected.append(p)
            if together:
                self._grouped_step(together, deferred)
            for p in rejected:
                self.state[p]["step"] -= 1
            if rejected:
                rejected_names = [self._layouts[p].name for p in rejected]
                self._skipped += len(rejected)
                self._warn_skipped(rejected_names, "non-finite low-rank factors")
            if not deferred:  # a deferred check is counted when its flags are read (_drain)
                self._count_skips(len(items))
        return loss

    def _grouped(self, p: Tensor) -> bool:
        """Whether ``p`` takes the grouped step (:mod:`adapm.grouped`): with ``foreach`` (by default off
        CPU), sharded (FSDP2) or not. ``fused`` compiles the tails of either."""
        return self.foreach if self.foreach is not None else p.device.type != "cpu"

    def _grouped_step(self, items: list[tuple[dict[str, Any], Tensor, int]], deferred: bool = False) -> None:
        """Step ``(group, param, t)`` items with the grouped step (no host sync: its low-rank factors were
        checked with the gradients, see :meth:`_finite_items`; ``deferred``: or are being checked, and the
        step is masked on the device by each parameter's flag, see :meth:`_deferred_flags`).

        Parameters or gradients that are not float32 (bf16 training) are stepped on float32 working
        copies; those are made for at most ``GROUP_ELEMENTS`` entries at a time, so the step's transient
        memory stays bounded instead of doubling the model in float32."""
        for chunk in copy_chunks(items, lambda item: self._copy_numel(item[1])):
            self._grouped_chunk(chunk, deferred)

    def _copy_numel(self, p: Tensor) -> int:
        """Entries of the float32 working copies a step of ``p`` makes: of a parameter or gradient that is
        not float32, and of its low-precision state."""
        n = p.numel() * ((p.dtype != torch.float32) + (p.grad is not None and p.grad.dtype != torch.float32))
        layout = self._layouts[p]
        if self.state[p]:
            n += sum(layout.state_specs()[key].numel for key in layout.low_precision_keys)
        return n

    def _grouped_chunk(self, items: list[tuple[dict[str, Any], Tensor, int]], deferred: bool = False) -> None:
        blocks: list[Block] = []
        copies: list[tuple[Tensor, Tensor]] = []
        items = [(group, p, t) for group, p, t in items if p.numel() > 0]
        states, owners, runs, flat = self._working_states([p for _, p, _ in items])
        for group, p, t in items:
            layout = self._layouts[p]
            info = self._shard(p)
            shard = info if info.sharded else None
            state = states[id(p)]
            if shard is not None:  # this rank's rows (the DTensors' local tensors: the same objects each step)
                state = {key: local(value) for key, value in state.items()}
            grad = local(cast(Tensor, p.grad))
            g = grad if grad.dtype == torch.float32 else grad.to(torch.float32)
            views = self._views
            if p.dtype != torch.float32:  # a float32 working copy, new each step, and so are its views
                target = local(p).detach().to(torch.float32)
                copies.append((local(p), target))
                targets = layout.views(target)
            else:
                # Views kept between steps under the parameter (its storage checked, so a replaced storage
                # drops them). The compiled tails take views of a kept detached alias: dynamo cannot trace
                # in-place updates of views of a leaf that requires grad.
                if self.fused or shard is not None:
                    target = views.get(p, "detached", "", lambda p=p: local(p).detach())
                else:
                    target = p
                key = "param" if target is p else "alias"
                targets = [views.get(p, key, s.name, functools.partial(s.view, target)) for s in layout.segments]
            for seg, target_seg, grad_seg in zip(layout.segments, targets, layout.views(g)):
                blocks.append(Block(p, group, layout, seg, t, target_seg, grad_seg, state, views=views, shard=shard,
                                    ok=self._oks[p] if deferred else None))  # fmt: skip
        scalars = None
        if self.fused:  # the compiled tails' scalars of the whole chunk: one copy to the device
            scalars = self._scalar_rows
            scalars.write(blocks)
        step_lowrank(
            [b for b in blocks if b.lowrank],
            lambda b: self._refresh_generator(b.p, b.seg.slot, b.t, b.group["refresh_every"], b.grad.device),
            self,
            scalars,
        )
        rest = [b for b in blocks if not b.lowrank]
        elementwise_tails(rest, second_moment_denominators(rest, self, scalars), self, scalars)
        if copies:
            params, targets = zip(*copies)
            torch._foreach_copy_(list(params), list(targets))
        if flat is not None:  # one rounding per kind of low-precision state in the chunk (flat in depth)
            first, t = owners[0], next(t for _, p, t in items if p is owners[0])
            seed = self._index[first] * 1_000_003 + t
            write_working(runs, flat, None, lambda r: self._rounding(seed + (r + 1) * 500_009, flat.device))

    def _working_states(
        self, params: list[Tensor]
    ) -> tuple[dict[int, dict[str, Any]], list[Tensor], list[Run], Tensor | None]:
        """The grouped step's :meth:`_working_state`: the low-precision state of all ``params`` read into
        one float32 buffer with one copy or decode per kind of storage (views of it replace them in each
        parameter's state dict), so the ops do not grow with the number of parameters. Returns the state
        dicts by ``id(p)``, the parameter of each stored tensor, the runs for
        :func:`~adapm.policies.precision.write_working` and the buffer (None when nothing is low-precision)."""
        states: dict[int, dict[str, Any]] = {}
        entries: list[tuple[Tensor, str, Stored]] = []
        for p in params:
            state = self.state[p]
            stored = self._stored(p)
            states[id(p)] = dict(state) if stored else state
            entries += [(p, key, s) for key, s in stored.items()]
        views, runs, flat = read_working([s for _, _, s in entries])
        for (p, key, _), view in zip(entries, views):
            states[id(p)][key] = view
        return states, [p for p, _, _ in entries], runs, flat

    def _stored(self, p: Tensor) -> dict[str, Stored]:
        """``p``'s state tensors stored in low precision, by key (with their block scales if 8-bit)."""
        layout = self._layouts[p]
        state, specs = self.state[p], layout.state_specs()
        return {
            key: Stored(local(state[key]), local(state[scale_key(key)]) if scale_key(key) in specs else None,
                        specs[key].nonnegative)
            for key in layout.low_precision_keys
        }  # fmt: skip

    def _rounding(self, seed: int, device: torch.device) -> torch.Generator:
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)
        return generator

    def _step_param(self, group: dict[str, Any], p: Tensor, t: int) -> bool:
        """Step one parameter, one block at a time (the single-tensor path, and the reference the grouped
        step is tested against); False if it was skipped (its new low-rank factors were not finite).
        Low-rank blocks compute their corrected momentum in a workspace buffer that the next block reuses;
        on CPU the elementwise tail runs in cache-sized row chunks."""
        layout = self._layouts[p]
        info = self._shard(p)
        if p.numel() == 0:  # as torch.optim.AdamW: the step counts (already done), nothing else to do
            return True
        state, stored = self._working_state(p)
        grad = local(cast(Tensor, p.grad))
        g = grad if grad.dtype == torch.float32 else grad.to(torch.float32)
        beta1, beta2 = group["betas"]
        eps, group_clip, every_block = group["eps"], group["update_clip"], group["clip_scope"] == "all"
        bias_correction1 = 1 - beta1**t
        bias_correction2_sqrt = math.sqrt(1 - beta2**t)

        p_local = local(p)
        target = p_local if p_local.dtype == torch.float32 else p_local.detach().to(torch.float32)
        v = local(state["exp_avg_sq"])
        numerators = self._lowrank_all(group, p, layout, state, g, t, info)
        if numerators is None:
            return False
        for seg in layout.segments:
            gs = seg.view(g)
            lr = group["lr"] * seg.lr_ratio if seg.lr_ratio != 1.0 else group["lr"]
            decay = 1 - lr * group["weight_decay"]
            # A segment's own clip (from a rule) wins; else the group's, where its scope reaches.
            policy = seg.policy
            clip = seg.clip if seg.clip_set else (group_clip if every_block or policy.in_clip_scope else None)
            numerator = seg.as_view(numerators[seg.slot]) if policy.source == "given" else None
            m = seg.as_view(layout.part(local(state["exp_avg"]), "exp_avg", seg)) if policy.source == "ema" else None
            if layout.second_policy.elementwise:
                v_seg, denom = layout.part(v, "exp_avg_sq", seg), None
            else:
                denom = self._block_denominator(layout, seg, gs, v, info, beta2, bias_correction2_sqrt, eps)
                v_seg, denom = None, seg.as_view(denom)
            bc1 = bias_correction1 if policy.bias_correction else 1.0
            target_seg = seg.view(target)
            if self.fused and self._fused_tail(
                target_seg, gs, v_seg, m, numerator, denom,
                fused_scalars(lr=lr, decay=decay, bias_correction1=bc1, bias_correction2_sqrt=bias_correction2_sqrt,
                              eps=eps, update_clip=clip, beta1=beta1, beta2=beta2, device=target.device),
            ):  # fmt: skip
                continue
            # On CPU, row chunks keep temporaries small and cache-resident: fresh multi-MB temporaries
            # per elementwise op (page faults on every allocation) cost more than the arithmetic. On
            # an accelerator they would only multiply kernel launches: one chunk there.
            rows = target_seg.shape[0] if target_seg.dim() else 1
            row_numel = max(1, target_seg[0].numel() if target_seg.dim() else 1)
            chunked = target.device.type == "cpu" and self._cpu_row_chunks
            step_rows = max(1, _CHUNK_ELEMENTS // row_numel) if chunked else rows
            for r0 in range(0, rows, step_rows):
                r1 = r0 + step_rows
                elementwise_update(
                    cast(Tensor, _rows(target_seg, r0, r1, rows)),
                    cast(Tensor, _rows(gs, r0, r1, rows)),
                    v=_rows(v_seg, r0, r1, rows),
                    m=_rows(m, r0, r1, rows),
                    numerator=_rows(numerator, r0, r1, rows),
                    denom=_rows(denom, r0, r1, rows),
                    beta1=beta1,
                    beta2=beta2,
                    lr=lr,
                    decay=decay,
                    bias_correction1=bc1,
                    bias_correction2_sqrt=bias_correction2_sqrt,
                    eps=eps,
                    update_clip=clip,
                )
        if target is not p_local:
            p_local.copy_(target)
        self._write_back(p, stored, t)
        return True

    def _working_state(self, p: Tensor) -> tuple[dict[str, Any], list[tuple[list[Run], Tensor]]]:
        """``p``'s state with each tensor stored in low precision (``state_dtype``) replaced by a float32
        working copy (of the local shard), and what :meth:`_write_back` needs to store them once the step
        succeeds (a skipped step writes nothing: the stored state stays as it was)."""
        stored = self._stored(p)
        if not stored:
            return self.state[p], []
        work = dict(self.state[p])
        pending = []
        for key, s in stored.items():
            views, runs, flat = read_working([s])
            work[key] = views[0]
            pending.append((runs, cast(Tensor, flat)))
        return work, pending

    def _write_back(self, p: Tensor, pending: list[tuple[list[Run], Tensor]], t: int) -> None:
        """Store the float32 working copies into their low-precision state, stochastically rounded from
        a generator seeded by the parameter, the key and the step (a resumed run rounds the same way)."""
        for i, (runs, flat) in enumerate(pending):
            seed = self._index[p] * 1_000_003 + (i + 1) * 500_009 + t
            write_working(runs, flat, None, lambda r, seed=seed, device=flat.device: self._rounding(seed, device))

    def _fused_tail(
        self,
        target: Tensor,
        grad: Tensor,
        v: Tensor | None,
        m: Tensor | None,
        numerator: Tensor | None,
        denom: Tensor | None,
        scalars: Tensor,
    ) -> bool:
        """The compiled elementwise tail; False (and ``fused`` switched off, with a warning) if
        ``torch.compile`` cannot build it here, so the caller runs the eager tail instead."""
        try:
            fused_elementwise_update(target, grad, v=v, m=m, numerator=numerator, denom=denom, scalars=scalars)
        except Exception as err:  # compilation failures surface as many exception types
            self.disable_fused(err)
            return False
        return True

    def disable_fused(self, err: Exception) -> None:
        """Switch ``fused`` off for good, with a warning naming why (``torch.compile`` failed)."""
        self.fused = False
        warnings.warn(
            f"AdaPM(fused=True): torch.compile could not build the fused update ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}); falling back to the eager update. "
            "On CPU a C++ compiler (g++) is needed; pass fused=False to silence this.",
            RuntimeWarning,
            stacklevel=5,
        )

    def _workspace(self, like: Tensor, slot: int = 0) -> Tensor:
        """A float32 buffer shaped like ``like``, reused across parameters and steps (``slot`` tells apart
        buffers that must coexist)."""
        key = (tuple(like.shape), like.device, slot)
        buf = self._buffers.get(key)
        if buf is None:
            buf = self._buffers[key] = torch.empty(like.shape, dtype=torch.float32, device=like.device)
        return buf

    def _flat_workspace(self, like: Tensor) -> Tensor:
        """A flat float32 buffer of at least ``like.numel()`` entries, grown as needed, reused."""
        key = ("flat", like.device)
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < like.numel():
            buf = self._buffers[key] = torch.empty(like.numel(), dtype=torch.float32, device=like.device)
        return buf

    def _block_denominator(
        self,
        layout: ParamLayout,
        seg: Any,
        g: Tensor,
        v: Tensor,
        info: ShardInfo,
        beta2: float,
        bc2_sqrt: float,
        eps: float,
    ) -> Tensor:
        """Update the segment's block second moments; return ``sqrt(vhat) + eps`` as a small tensor that
        broadcasts to the segment's (local) matrix shape."""
        vb = layout.part(v, "exp_avg_sq", seg)
        g = seg.matrix(g)
        if not info.sharded:
            buffer = self._flat_workspace(g) if needs_square_buffer(tuple(g.shape), *seg.block) else None
            block_second_moment(vb, g, beta2, *seg.block, workspace=buffer)
        else:
            sums = info.reduce(local_block_sums(g, *seg.block, seg.n_blocks, info.offset))
            vb.mul_(beta2).add_(sums / block_entries(seg.shape, *seg.block), alpha=1.0 - beta2)
        values = (vb.sqrt() / bc2_sqrt).add_(eps)
        return broadcast_blocks(values, tuple(g.shape), *seg.block, info.offset if info.sharded else None)

    def _lowrank_all(
        self,
        group: dict[str, Any],
        p: Tensor,
        layout: ParamLayout,
        state: dict[str, Any],
        g: Tensor,
        t: int,
        info: ShardInfo,
    ) -> list[Tensor] | None:
        """Track every low-rank segment of ``p``; return their corrected momenta by slot, or None (state
        untouched) if any new factor is not finite."""
        segments = [seg for seg in layout.segments if seg.policy.source == "given"]
        if not segments:
            return []
        left_all, right_all = local(state["lowrank_L"]), state["lowrank_R"]
        results = []
        for seg in segments:
            gs = seg.matrix(seg.view(g))
            left = layout.part(left_all, "lowrank_L", seg)
            right = layout.part(right_all, "lowrank_R", seg)
            # A fused parameter's segments need their own buffers: all are kept until the update.
            out = self._workspace(gs, seg.slot) if layout.fused else self._workspace(gs)
            results.append((left, right, *self._lowrank(group, p, seg.slot, left, right, gs, t, info, out)))
        flags = [torch.isfinite(new_l).all() & torch.isfinite(new_r).all() for *_, new_l, new_r in results]
        # Finite inputs give finite factors (the trackers are scale-safe); this guards the rest.
        if not bool(torch.stack(flags).all()):
            return None
        numerators = []
        for left, right, corrected, new_left, new_right in results:
            left.copy_(new_left)
            right.copy_(new_right)
            numerators.append(corrected)
        return numerators

    def _lowrank(
        self,
        group: dict[str, Any],
        p: Tensor,
        slot: int,
        left: Tensor,
        right: Tensor,
        g: Tensor,
        t: int,
        info: ShardInfo,
        out: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor]:
        generator = self._refresh_generator(p, slot, t, group["refresh_every"], g.device)
        refresh = generator is not None
        return lowrank_momentum(
            left,
            right,
            g,
            group["betas"][0],
            t,
            tracker=group["tracker"],
            correction=group["correction"],
            refresh=refresh,
            generator=generator,
            reduce=info.reduce if info.sharded else None,
            out=out,
            global_rows=info.global_shape[0] if info.sharded else None,
        )

    def _refresh_generator(self, p: Tensor, slot: int, t: int, period: int, device: torch.device) -> Any:
        """The seeded generator of a refresh (a randomized SVD) of ``p``'s low-rank segment ``slot`` at step
        ``t``, or None when the factors are tracked this step. Golden-ratio offsets spread the refreshes
        evenly over the period whatever the parameter count."""
        if not (t == 1 or (t - self._refresh_offset(p, period)) % period == 0):
            return None
        generator = torch.Generator(device=device)
        generator.manual_seed(self._index[p] * 1_000_003 + slot * 7_919 + t)
        return generator

    def _refresh_offset(self, p: Tensor, period: int) -> int:
        """The step (modulo ``period``) at which ``p``'s low-rank segments refresh."""
        return int(((self._index[p] + 1) * _GOLDEN) % 1.0 * period)

    # ----------------------------------------------------------------------------- checkpoints

    def load_state_dict(self, state_dict: dict[str, Any], *, convert_state_dtype: bool = False) -> None:
        """Load a state dict, first checking that its partition, state shapes and ``state_dtype`` match
        this optimizer.

        Args:
            state_dict: from :meth:`state_dict`.
            convert_state_dtype: load state saved with another ``state_dtype`` by converting it to this
                optimizer's (to ``bf16``: rounded to nearest; to ``fp32``: exact). Without it such a
                state dict is refused.

        Raises:
            ValueError: naming the first param group or parameter whose policy, state shapes or state
                dtype differ.
        """
        self._drain()
        saved_groups = state_dict["param_groups"]
        if any("momentum" not in group for group in saved_groups):
            raise ValueError(
                "loaded state dict is not an AdaPM optimizer's (its param groups have no 'momentum' policy, as "
                "torch.optim.AdamW's have not): AdaPM cannot continue another optimizer's state. Load a state "
                "dict saved by AdaPM on this model, or start the optimizer fresh (do not load it)"
            )
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"loaded state dict has {len(saved_groups)} param groups, this optimizer has {len(self.param_groups)}"
            )
        saved_state = state_dict["state"]
        for i, (ours, saved) in enumerate(zip(self.param_groups, saved_groups)):
            theirs, mine = saved.get("state_dtype", "fp32"), ours.get("state_dtype", "fp32")
            if theirs != mine and not convert_state_dtype:
                raise ValueError(
                    f"loaded state dict's param group {i} stores its state as state_dtype={theirs!r}, this "
                    f"optimizer as {mine!r}: build the optimizer with state_dtype={theirs!r}, or convert with "
                    "load_state_dict(state_dict, convert_state_dtype=True)"
                )
            betas = saved.get("betas")
            checked = {**ours, **saved, "betas": tuple(betas) if isinstance(betas, list) else betas}
            check_hyperparameters(checked, f" in loaded param group {i}")
            if len(ours["params"]) != len(saved["params"]):
                raise ValueError(
                    f"loaded param group {i} has {len(saved['params'])} parameters, this optimizer's has "
                    f"{len(ours['params'])}"
                )
            for p, pid in zip(ours["params"], saved["params"]):
                layout = self._layouts[p]
                for key in _POLICY_GROUP_KEYS:
                    if saved.get(key) != ours.get(key):
                        raise ValueError(
                            f"loaded state dict does not match parameter '{layout.name}': {key} is "
                            f"{saved.get(key)!r} in the checkpoint but {ours.get(key)!r} here"
                        )
                merged = {**ours, **{k: v for k, v in saved.items() if k != "params"}}
                saved_layout = build_layout(layout.name, layout.shape, merged)
                difference = _layout_difference(saved_layout, layout)
                if difference:
                    raise ValueError(
                        f"loaded state dict does not match parameter '{layout.name}': {difference}; build the "
                        "optimizer with the checkpoint's settings (rank_ratio, rules, second_moment) to load it"
                    )
                entry = saved_state.get(pid)
                if entry is None:
                    continue
                expected = saved_layout.state_shapes()
                got = {k: tuple(v.shape) for k, v in entry.items() if isinstance(v, Tensor)}
                if got != expected:
                    raise ValueError(
                        f"loaded state dict does not match parameter '{layout.name}' of shape {layout.shape}: "
                        f"state shapes {got} but expected {expected}"
                    )
        if convert_state_dtype:  # the groups keep this optimizer's state_dtype; the values are cast below
            groups = [{**saved, "state_dtype": ours.get("state_dtype", "fp32")}
                      for ours, saved in zip(self.param_groups, saved_groups)]  # fmt: skip
            state_dict = {**state_dict, "param_groups": groups}
        super().load_state_dict(state_dict)
        self._rebuild_layouts()
        # torch casts floating state to the parameter dtype; AdaPM state keeps its declared dtype.
        for group, saved in zip(self.param_groups, saved_groups):
            for p, pid in zip(group["params"], saved["params"]):
                if pid not in saved_state:
                    continue
                layout = self._layouts[p]
                values = {k: v for k, v in saved_state[pid].items() if isinstance(v, Tensor)}
                theirs = saved.get("state_dtype", "fp32")
                if theirs != layout.state_dtype:
                    stored_as = build_layout(layout.name, layout.shape, {**group, "state_dtype": theirs})
                    values = _convert_state(values, stored_as, layout)
                specs = layout.state_specs()
                self.state[p] = {key: value.to(device="cpu" if key == "step" else p.device, dtype=specs[key].dtype)
                                 for key, value in values.items()}  # fmt: skip


@dataclass
class _Pending:
    """A deferred finite check whose flags the host has not read yet (see :meth:`AdaPM._deferred_flags`)."""

    items: list[tuple[dict[str, Any], Tensor]]
    flags: Tensor
    """Per item (gradient and stored factors finite): on the host (copied without blocking on CUDA), or
    on the device."""
    event: Any
    """The CUDA event after the copy (None elsewhere)."""


def _convert_state(values: dict[str, Tensor], saved: ParamLayout, ours: ParamLayout) -> dict[str, Tensor]:
    """One parameter's state stored as ``saved`` lays it out, stored as ``ours`` does: low-precision
    tensors decoded to float32 and stored again, rounded to nearest (exact into float32)."""
    values = dict(values)
    for key in saved.low_precision_keys:
        scales = values.pop(scale_key(key), None)
        values[key] = Stored(values[key], scales, saved.state_specs()[key].nonnegative).decode()
    specs = ours.state_specs()
    for key in ours.low_precision_keys:
        value, spec = values[key].float(), specs[key]
        stored = torch.empty(value.shape, dtype=spec.dtype, device=value.device)
        scales = None
        if scale_key(key) in specs:
            scales = torch.empty(specs[scale_key(key)].shape, dtype=torch.float32, device=value.device)
            values[scale_key(key)] = scales
        Stored(stored, scales, spec.nonnegative).encode_(value, None)
        values[key] = stored
    return values


def _norms(tensors: list[Tensor]) -> list[Tensor]:
    """The float32 2-norm of each tensor, all on the first one's device: one foreach op per device (a
    model spread over several devices, e.g. loaded with ``device_map="auto"``, has its flags gathered
    on one)."""
    devices: dict[torch.device, list[int]] = {}
    for i, t in enumerate(tensors):
        devices.setdefault(t.device, []).append(i)
    if len(devices) <= 1:
        return list(torch._foreach_norm(tensors, 2, dtype=torch.float32))  # type: ignore[call-arg]
    home = tensors[0].device
    norms: list[Tensor] = list(tensors)
    for indices in devices.values():
        found = torch._foreach_norm([tensors[i] for i in indices], 2, dtype=torch.float32)  # type: ignore[call-arg]
        for i, norm in zip(indices, found):
            norms[i] = norm.to(home)
    return norms


def _layout_difference(saved: ParamLayout, ours: ParamLayout) -> str:
    """The first field in which two layouts of one parameter differ, as 'X in the checkpoint vs Y here'."""
    if len(saved.segments) != len(ours.segments):
        return f"{len(saved.segments)} segment(s) in the checkpoint vs {len(ours.segments)} here"
    for a, b in zip(saved.segments, ours.segments):
        where = f"segment '{b.name}'" if ours.fused else "its"
        for field in ("momentum", "rank", "shape", "block", "n_blocks"):
            if getattr(a, field) != getattr(b, field):
                return f"{where} {field} is {getattr(a, field)!r} in the checkpoint vs {getattr(b, field)!r} here"
    theirs, mine = ({k: v for k, v in layout.state_shapes().items() if not is_scale_key(k)} for layout in (saved, ours))
    if theirs != mine:
        return f"state shapes {theirs} in the checkpoint vs {mine} here"
    return ""


class AdaPMMini(AdaPM):
    r"""AdaPM-mini: :class:`AdaPM` with Adam-mini's block-wise second moments by default.

    Same signature as :class:`AdaPM`; ``second_moment`` defaults to ``"block"``: one second-moment
    value per attention head (query, key), per output neuron (value, attention output, MLP), per token
    (embeddings, LM head) and per tensor (norms, biases).
    """

    _default_second_moment = "block"


def state_bytes(optimizer: Optimizer) -> int:
    """Bytes of every tensor held in ``optimizer.state`` by this process (any torch optimizer; tensors
    inside lists, dicts and plain objects such as GaLore's projectors count too; a sharded DTensor
    counts its local shard)."""

    def count(value: Any) -> int:
        if isinstance(value, Tensor):
            value = local(value)
            return value.numel() * value.element_size()
        if isinstance(value, Mapping):
            return sum(count(v) for v in value.values())
        if isinstance(value, (list, tuple)):
            return sum(count(v) for v in value)
        if hasattr(value, "__dict__"):  # e.g. GaLore keeps its projection matrix in a projector object
            return sum(count(v) for v in vars(value).values())
        return 0

    return sum(count(s) for s in optimizer.state.values())
