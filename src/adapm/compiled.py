"""A step traced whole: :func:`compile_step` runs all of a step's device work as one compiled graph.

``opt.step()`` keeps Python in the loop: it picks stacks, refreshes and scalars each step from the step
counts, and checks gradients for inf/NaN on the host. That suits a CPU and costs launches on a GPU.
:func:`compile_step` splits the step in two:

* **a host plan**, built once per set of parameters with gradients: which segments stack together
  (by shape and policies, never by step count), which state tensors each reads and writes, and the
  row of each segment in a table of scalars. Each step the host only writes that table (learning
  rates, bias corrections, correction coefficients and which low-rank slots refresh, all from the
  CPU step counters: no device sync) with one copy to the device, and draws the refreshes' Gaussian
  test matrices from the same seeded generators as ``opt.step()`` (one ``randn`` per refreshing block);
* **one pure function of tensors** (parameters, gradients, state, the table, the test matrices),
  compiled with ``fullgraph=True``: the finite check of every gradient and stored factor (as flags on
  the device, read back at the next step, so a skipped parameter costs no host round trip), the
  low-rank tracking of every stack as batched matmuls, the refreshes, the block second moments and
  every elementwise tail, masked per parameter by its flag.

Refreshes are staggered across blocks (about one in ``refresh_every`` refreshes each step), so a
stack's graph refreshes a fixed number of slots every step: the most that fall due together in that
stack (one to a few), padded with slots whose result is discarded. That keeps one graph for all steps
at the cost of that many randomized SVDs per stack and step. When more fall due at once than the plan has
slots for (e.g. after a skipped step), the plan grows and is compiled again.

The first step of a parameter (which allocates its state and seeds every factor) runs ``opt.step()``.
Supported: unsharded parameters of any float dtype (non-float32 parameters and gradients are stepped
in float32 in the graph and written back) with float32 state; every momentum, second-moment and
tracker policy. Equal to ``opt.step()`` to float32 rounding.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import Tensor

from adapm.grouped import GROUP_ELEMENTS, Views, host_to_device, tail_values
from adapm.partition.layout import ParamLayout, Segment
from adapm.policies.correction import correction_coefficient
from adapm.policies.trackers import TRACKER, factors_from_sketch, rsvd_width
from adapm.policies.update import _FUSED_KERNELS, block_moment, scalar_values, tail_body

__all__ = ["CompiledStep", "compile_step"]

COLUMNS = 11
"""Scalars per segment row: :func:`adapm.policies.update.scalar_values`' eight, then ``1 - beta1``,
``c_t`` (the correction coefficient) and the fixed tracker's ``a = (1 + c_t)(1 - beta1)``."""


@dataclass
class _Stack:
    """Same-shape low-rank segments tracked together (at most ``GROUP_ELEMENTS`` entries)."""

    members: list[tuple[int, int, Segment]]
    """``(parameter position, segment position, segment)`` of each member."""
    tracker: str
    rows: list[int]
    """Each member's row in the scalar table."""
    slots: int = 1
    """Refreshes per step this stack's graph can do (see the module docstring)."""
    width: int = 0
    """Columns of a refresh's test matrix."""


@dataclass
class _Plan:
    """What one compiled graph steps: the parameters (in order), their layouts and the stacks."""

    layouts: list[ParamLayout]
    keys: list[tuple[str, ...]]
    """The state keys passed for each parameter (float32 tensors; ``step`` stays on the host)."""
    rows: list[list[int]]
    """Each parameter's segments' rows in the scalar table."""
    stacks: list[_Stack]
    n_rows: int
    compiled: Any = None
    omegas: list[Tensor] = field(default_factory=list)
    """Each stack's test matrices ``(slots, cols, width)``, kept on the device between steps."""
    aliases: list[Tensor] = field(default_factory=list)
    """Detached aliases of the parameters (see :meth:`CompiledStep._inputs`)."""

    def run(self, params: list[Tensor], grads: list[Tensor], states: list[list[Tensor]], table: Tensor,
            omegas: list[Tensor]) -> Tensor:  # fmt: skip
        """The step's device work (traced whole; see the module docstring). Returns the parameters' flags
        (True: stepped; False: a non-finite gradient or stored factor, left as it was)."""
        from adapm.optim import _MAX_GRAD_NORM

        n = self.n_rows
        scalars = table[: n * COLUMNS].view(n, COLUMNS)
        schedule = table[n * COLUMNS :]
        state = [dict(zip(keys, values)) for keys, values in zip(self.keys, states)]
        oks = []
        for i, g in enumerate(grads):
            ok = torch.linalg.vector_norm(g, dtype=torch.float32) <= _MAX_GRAD_NORM
            for key in ("lowrank_L", "lowrank_R"):
                if key in state[i]:
                    ok = ok & torch.isfinite(state[i][key]).all()
            oks.append(ok)
        # Segment views of the parameters and gradients; a segment that is not float32 is stepped on a
        # float32 copy of its own (so the transient memory is a segment's, not the model's, in float32).
        targets = [layout.views(p) for layout, p in zip(self.layouts, params)]
        grad_views = [[x.float() for x in layout.views(g)] for layout, g in zip(self.layouts, grads)]
        numerators: dict[tuple[int, int], Tensor] = {}
        offset = 0
        for k, stack in enumerate(self.stacks):  # each stack's tails right after its tracking: its
            # momenta are freed before the next stack is built, as in the grouped step
            offset = self._track(stack, grad_views, state, oks, scalars, schedule, offset, omegas[k], numerators)
            for i, j, _ in stack.members:
                self._tail(i, j, targets, grad_views, state, oks, scalars, numerators.pop((i, j)))
        for i, layout in enumerate(self.layouts):
            for j, seg in enumerate(layout.segments):
                if seg.policy.source != "given":
                    self._tail(i, j, targets, grad_views, state, oks, scalars, None)
        return torch.stack(oks)

    def _tail(self, i: int, j: int, targets: list[list[Tensor]], grad_views: list[list[Tensor]],
              state: list[dict[str, Tensor]], oks: list[Tensor], scalars: Tensor,
              given: Tensor | None) -> None:  # fmt: skip
        """Segment ``j`` of parameter ``i``: its block second moments (if block-wise) and its elementwise
        tail, in place (on a float32 copy written back, for a parameter that is not float32)."""
        layout = self.layouts[i]
        seg, target, grad = layout.segments[j], targets[i][j], grad_views[i][j]
        s = scalars[self.rows[i][j], :8]
        source = seg.policy.source
        if source == "ema":
            numerator = seg.as_view(layout.part(state[i]["exp_avg"], "exp_avg", seg))
        else:
            numerator = given if given is not None else grad
        full = layout.second_policy.elementwise
        second = layout.part(state[i]["exp_avg_sq"], "exp_avg_sq", seg)
        if not full:
            second = seg.as_view(block_moment(second, grad, s, (seg.shape, *seg.block), oks[i]))
        work = target if target.dtype == torch.float32 else target.float()
        tail_body(_FUSED_KERNELS[source == "ema", full], source == "ema", full, work, grad, numerator, second, s,
                  oks[i])  # fmt: skip
        if work is not target:
            target.copy_(work)

    def _track(self, stack: _Stack, grad_views: list[list[Tensor]], state: list[dict[str, Tensor]], oks: list[Tensor],
               scalars: Tensor, schedule: Tensor, offset: int, omega: Tensor,
               numerators: dict[tuple[int, int], Tensor]) -> int:  # fmt: skip
        """Track one stack (and refresh its due slots); set its members' corrected momenta."""
        members = stack.members
        layouts = self.layouts
        g = torch.stack([seg.matrix(grad_views[i][j]) for i, j, seg in members])
        lefts = [layouts[i].part(state[i]["lowrank_L"], "lowrank_L", seg) for i, _, seg in members]
        rights = [layouts[i].part(state[i]["lowrank_R"], "lowrank_R", seg) for i, _, seg in members]
        left, right = torch.stack(lefts), torch.stack(rights)
        mask = torch.stack([oks[i] for i, _, _ in members]).view(-1, 1, 1)
        rows = scalars[stack.rows]
        weight, c, a = (rows[:, j].view(-1, 1, 1) for j in (8, 9, 10))
        beta1 = rows[:, 6].view(-1, 1, 1)
        policy = TRACKER[stack.tracker]
        if policy.keeps_basis:  # a g + Q (R_t - a P), see adapm.policies.momentum._fixed_basis_momentum
            p = left.mT @ g
            new_right = torch.where(mask, torch.lerp(right, p, weight), right)
            new_left = left
            numerator = a * g + left @ (new_right - a * p)
        else:
            m = beta1 * (left @ right) + weight * g
            tracked_left, tracked_right = policy.track(m, left, right)
            new_left = torch.where(mask, tracked_left, left)
            new_right = torch.where(mask, tracked_right, right)
            numerator = m + c * (m - new_left @ new_right)
        # Refreshes: the due slots (then padding slots, discarded) from the old factors.
        k = stack.slots
        slots = schedule[offset : offset + k].long()
        due = schedule[offset + k : offset + 2 * k].view(-1, 1, 1) > 0
        sel_left, sel_right, sel_g = left[slots], right[slots], g[slots]
        sel_beta1, sel_weight, sel_c = beta1[slots], weight[slots], c[slots]
        sel_ok = mask[slots] & due
        m_sel = sel_beta1 * (sel_left @ sel_right) + sel_weight * sel_g
        m_sel = torch.where(sel_ok, m_sel, 0.0)  # a padding or skipped slot's inputs may be non-finite
        rank = left.shape[-1]
        fresh_left, fresh_right = factors_from_sketch(m_sel, omega, rank, balanced=policy.balanced)
        fresh_numerator = m_sel + sel_c * (m_sel - fresh_left @ fresh_right)
        new_left = new_left.index_copy(0, slots, torch.where(sel_ok, fresh_left, new_left[slots]))
        new_right = new_right.index_copy(0, slots, torch.where(sel_ok, fresh_right, new_right[slots]))
        numerator = numerator.index_copy(0, slots, torch.where(sel_ok, fresh_numerator, numerator[slots]))
        for n, (i, j, seg) in enumerate(members):
            lefts[n].copy_(new_left[n])
            rights[n].copy_(new_right[n])
            numerators[i, j] = seg.as_view(numerator[n])
        return offset + 2 * k


class CompiledStep:
    """``opt.step()`` with its device work as one compiled graph per plan (see :mod:`adapm.compiled`).

    Call it where you would call ``opt.step()``; ``opt`` stays the optimizer to checkpoint, schedule
    and inspect (its state is the same tensors)."""

    def __init__(self, optimizer: Any, **compile_options: Any) -> None:
        from adapm.optim import AdaPM

        if not isinstance(optimizer, AdaPM):
            raise TypeError(
                f"compile_step: expected an adapm.AdaPM or AdaPMMini optimizer, got {type(optimizer).__name__}"
            )
        self.optimizer = optimizer
        self.compile_options = {"fullgraph": True, "dynamic": False, **compile_options}
        self._plans: dict[tuple[Any, ...], _Plan] = {}
        self._tables: dict[torch.device, Tensor] = {}
        self.eager_steps = 0
        """Steps that ran ``opt.step()`` (a parameter's first step)."""
        self.compiles = 0
        """Plans built (each is one graph, compiled at its first call)."""
        self.failed: Exception | None = None
        """Why the graph could not be compiled (then every step runs ``opt.step()``, with a warning once)."""

    @torch.no_grad()
    def __call__(self, closure: Callable[[], Any] | None = None) -> Any:
        opt = self.optimizer
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        items = self._items()
        if not items:
            return loss
        if self.failed is not None or any(not opt.state[p] for _, p in items):  # first steps: state
            self.eager_steps += 1  # allocated, factors seeded (or the graph could not be built)
            opt.step()
            return loss
        opt._sync_layouts()
        self._check(items)
        opt._drain()
        opt._skipped = 0
        counters = [opt.state[p]["step"] for _, p in items]
        torch._foreach_add_(counters, 1.0)
        steps = [int(t) for t in torch.stack(counters).tolist()]  # CPU tensors: no device sync
        plan, table, draws = self._plan(items, steps)
        args = self._inputs(plan, items, table, draws)
        if plan.compiled is None:
            plan.compiled = torch.compile(plan.run, **self.compile_options)
            self.compiles += 1
        try:
            with torch._dynamo.config.patch(recompile_limit=64):
                flags = plan.compiled(*args)
        except Exception as err:  # compilation failures surface as many exception types; nothing was written
            torch._foreach_add_(counters, -1.0)
            self.failed = err
            why = " ".join(str(err).split())[:400]
            warnings.warn(f"compile_step: the step's graph could not be compiled ({type(err).__name__}: {why}); "
                          "stepping with opt.step() from now on", RuntimeWarning, stacklevel=2)  # fmt: skip
            self.eager_steps += 1
            opt.step()
            return loss
        opt._pend(items, flags)  # read at the next step, as the deferred check of fused=True
        return loss

    def _inputs(self, plan: _Plan, items: list[tuple[dict[str, Any], Tensor]], table: list[float],
                draws: list[list[tuple[int, torch.Generator]]]) -> tuple[Any, ...]:  # fmt: skip
        """The graph's arguments: the table copied to the device (from pinned memory on CUDA) and
        the due refreshes' test matrices drawn into their slots."""
        device = items[0][1].device
        device_table = self._tables.get(device)
        if device_table is None or device_table.numel() != len(table):
            device_table = self._tables[device] = torch.empty(len(table), dtype=torch.float32, device=device)
        # A fresh pinned buffer each step (torch's caching host allocator keeps it until the copy is done;
        # a reused one could be overwritten before the device has read it), into the kept table.
        device_table.copy_(host_to_device(table, device))
        for omegas, ready in zip(plan.omegas, draws):
            for slot, generator in ready:
                omega = omegas[slot]
                torch.randn(omega.shape, generator=generator, dtype=omega.dtype, device=omega.device, out=omega)
        opt = self.optimizer
        states = [[opt.state[p][k] for k in keys] for (_, p), keys in zip(items, plan.keys)]
        # Detached aliases of the parameters, kept between steps (the same tensors each step, so guards on
        # them hold) unless a parameter's storage was replaced.
        aliases = plan.aliases
        if len(aliases) != len(items) or any(a.data_ptr() != p.data_ptr() for a, (_, p) in zip(aliases, items)):
            plan.aliases = [p.detach() for _, p in items]
            if self.compile_options.get("mode") in ("reduce-overhead", "max-autotune"):  # CUDA graphs: the
                # tensors the graph writes in place must keep their addresses
                for x in plan.aliases + [x for xs in states for x in xs] + [device_table, *plan.omegas]:
                    torch._dynamo.mark_static_address(x)
        return plan.aliases, [p.grad for _, p in items], states, device_table, plan.omegas

    @torch.no_grad()
    def explain(self) -> Any:
        """``torch._dynamo.explain`` of the graph the next step would run, on copies of its inputs (the
        parameters, gradients and state are left alone): ``graph_count``, ``graph_break_count`` and
        ``break_reasons``. Needs every parameter with a gradient to have taken a first step."""
        opt = self.optimizer
        items = self._items()
        if not items or any(not opt.state[p] for _, p in items):
            raise RuntimeError("CompiledStep.explain: take a first step (it allocates the state) before explaining")
        self._check(items)
        steps = [int(opt.state[p]["step"]) + 1 for _, p in items]
        plan, table, draws = self._plan(items, steps)
        params, grads, states, device_table, omegas = self._inputs(plan, items, table, draws)
        states = [[x.clone() for x in xs] for xs in states]
        copies = [p.clone() for p in params], [g.clone() for g in grads], states, device_table.clone(), omegas
        return torch._dynamo.explain(plan.run)(*copies)

    def _items(self) -> list[tuple[dict[str, Any], Tensor]]:
        """``(group, param)`` of every parameter with a gradient, in the optimizer's order."""
        return [(group, p) for group in self.optimizer.param_groups for p in group["params"] if p.grad is not None]

    def _check(self, items: list[tuple[dict[str, Any], Tensor]]) -> None:
        opt = self.optimizer
        devices = sorted({str(p.device) for _, p in items})
        if len(devices) > 1:
            raise ValueError(
                f"compile_step: the parameters are on several devices ({', '.join(devices)}); the compiled step "
                "takes one: use opt.step() (fused=True compiles its tails)"
            )
        for _, p in items:
            layout = opt._layouts[p]
            if p.grad is not None and p.grad.is_sparse:
                raise TypeError(f"compile_step: parameter '{layout.name}' has a sparse gradient; use a dense one")
            if opt._shard(p).sharded:
                raise ValueError(
                    f"compile_step: parameter '{layout.name}' is sharded (FSDP2); the compiled step takes "
                    "unsharded parameters: use opt.step() (fused=True compiles its tails)"
                )
            if layout.low_precision_keys:
                raise ValueError(
                    f"compile_step: parameter '{layout.name}' keeps state_dtype={layout.state_dtype!r}; the "
                    "compiled step takes float32 state (state_dtype='fp32'), or use opt.step()"
                )

    def _plan(self, items: list[tuple[dict[str, Any], Tensor]],
              steps: list[int]) -> tuple[_Plan, list[float], list[list[tuple[int, torch.Generator]]]]:  # fmt: skip
        """This step's plan (built or reused), its table (the scalar rows, then per stack the slots its
        graph refreshes and their due flags) and, per stack, the due refreshes' ``(slot, generator)``."""
        opt = self.optimizer
        key = tuple((id(p), p.dtype, cast(Tensor, p.grad).dtype, group["tracker"], group["correction"])
                    for group, p in items)  # fmt: skip
        plan = self._plans.get(key) or self._build(items)
        due = [[(n, generator) for n, (i, _, seg) in enumerate(stack.members)
                if (generator := opt._refresh_generator(items[i][1], seg.slot, steps[i], items[i][0]["refresh_every"],
                                                        items[i][1].device)) is not None]
               for stack in plan.stacks]  # fmt: skip
        if any(len(d) > stack.slots for d, stack in zip(due, plan.stacks)):  # more due together: a bigger graph
            plan = self._build(items, [max(stack.slots, len(d)) for d, stack in zip(due, plan.stacks)])
        self._plans[key] = plan
        table: list[float] = []
        for (group, p), t in zip(items, steps):
            beta1 = group["betas"][0]
            c = correction_coefficient(group["correction"], beta1, t)
            for seg in opt._layouts[p].segments:
                b1, b2, lr, decay, bc1, bc2s, eps, clip = tail_values(group, seg, t)
                table += scalar_values(lr=lr, decay=decay, bias_correction1=bc1, bias_correction2_sqrt=bc2s, eps=eps,
                                       update_clip=clip, beta1=b1, beta2=b2)  # fmt: skip
                table += [1.0 - beta1, c, (1.0 + c) * (1.0 - beta1)]
        draws = []
        for stack, ready in zip(plan.stacks, due):
            slots = [j for j, _ in ready]
            slots += [j for j in range(len(stack.members)) if j not in slots][: stack.slots - len(slots)]
            table += [float(j) for j in slots] + [1.0 if n < len(ready) else 0.0 for n in range(stack.slots)]
            draws.append([(n, generator) for n, (_, generator) in enumerate(ready)])
        return plan, table, draws

    def _build(self, items: list[tuple[dict[str, Any], Tensor]], slots: list[int] | None = None) -> _Plan:
        opt = self.optimizer
        layouts = [opt._layouts[p] for _, p in items]
        # Packed low-rank factors (views of one buffer, see adapm.grouped.factor_stack) are given their own
        # storage: the graph's inputs must not alias.
        for _, p in items:
            state = opt.state[p]
            for key in ("lowrank_L", "lowrank_R"):
                value = state.get(key)
                if isinstance(value, Tensor) and value._base is not None:
                    state[key] = value.clone()
                    opt._views = Views()
        for layout in layouts:  # computed here, not first in the graph (a cached property takes a lock)
            _ = layout._tiling, layout._parts, layout.low_precision_keys
        keys = [tuple(k for k in layout.state_specs() if k != "step") for layout in layouts]
        rows: list[list[int]] = []
        n = 0
        for layout in layouts:
            rows.append(list(range(n, n + len(layout.segments))))
            n += len(layout.segments)
        groups: dict[tuple[Any, ...], list[_Stack]] = {}
        for i, ((group, p), layout) in enumerate(zip(items, layouts)):
            for j, (seg, row) in enumerate(zip(layout.segments, rows[i])):
                if seg.policy.source != "given":
                    continue
                kind = groups.setdefault((seg.shape, seg.view_shape, seg.rank, group["tracker"], p.device), [])
                if not kind or (len(kind[-1].members) + 1) * math.prod(seg.shape) > GROUP_ELEMENTS:
                    kind.append(_Stack([], group["tracker"], []))  # stacks of at most GROUP_ELEMENTS entries
                kind[-1].members.append((i, j, seg))
                kind[-1].rows.append(row)
        stacks = [stack for kind in groups.values() for stack in kind]
        plan = _Plan(layouts, keys, rows, stacks, n)
        for k, stack in enumerate(stacks):
            i, _, seg = stack.members[0]
            stack.width = rsvd_width(seg.rank, *seg.shape)
            stack.slots = slots[k] if slots is not None else max(1, self._together(stack, items))
            device = items[i][1].device
            plan.omegas.append(torch.zeros(stack.slots, seg.shape[1], stack.width, device=device))
        return plan

    def _together(self, stack: _Stack, items: list[tuple[dict[str, Any], Tensor]]) -> int:
        """The most members of ``stack`` whose refreshes fall due at one step (at equal step counts)."""
        phases: dict[tuple[int, int], int] = {}
        for i, _, _ in stack.members:
            group, p = items[i]
            phase = (self.optimizer._refresh_offset(p, group["refresh_every"]), group["refresh_every"])
            phases[phase] = phases.get(phase, 0) + 1
        return max(phases.values(), default=1)


def compile_step(optimizer: Any, **compile_options: Any) -> CompiledStep:
    """``optimizer``'s step with all of its device work traced as one graph (``torch.compile`` with
    ``fullgraph=True``): see :mod:`adapm.compiled`. ``compile_options`` go to ``torch.compile`` (e.g.
    ``mode="reduce-overhead"`` on CUDA for CUDA graphs, ``backend=...``).

    Example::

        opt = adapm.AdaPMMini(model, lr=1e-3)
        step = adapm.compile_step(opt)
        for batch in data:
            loss = model(**batch).loss
            loss.backward()
            step()
            opt.zero_grad()
    """
    return CompiledStep(optimizer, **compile_options)
