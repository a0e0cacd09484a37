"""The grouped (multi-tensor) step: stacking, block second moments, skips, dtypes, ops per step."""

from __future__ import annotations

import copy
import io
import os
import re
import shutil
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import adapm
from adapm.grouped import block_sq_means, stacks
from adapm.policies.second_moment import block_second_moment

from conftest import batches, max_rel_diff, tiny_gpt2, tiny_llama, train


def test_stacks_respect_the_budget_and_never_split_a_parameter() -> None:
    model = tiny_gpt2(n_layer=3)
    opt = adapm.AdaPM(model, lr=1e-3, foreach=True)
    train(model, opt, batches(96, 1))
    from adapm.grouped import Block

    blocks = []
    for group in opt.param_groups:
        for p in group["params"]:
            layout = opt.layout(p)
            for seg in layout.segments:
                if seg.momentum == "lowrank":
                    g = seg.view(torch.zeros(p.shape))
                    blocks.append(Block(p, group, layout, seg, 1, g, g, opt.state[p]))
    q_and_k = [b for b in blocks if b.seg.shape == (32, 32)]
    assert len(q_and_k) == 6  # query and key segments of three fused c_attn weights
    per_block = q_and_k[0].grad.numel()
    assert [len(s) for s in stacks(q_and_k, limit=10**9)] == [6]
    # A budget of three blocks would cut a layer's query from its key: the cut moves to the layer boundary.
    cut = stacks(q_and_k, limit=3 * per_block)
    assert [len(s) for s in cut] == [2, 2, 2]
    assert all(s[0].p is s[1].p for s in cut)
    assert [len(s) for s in stacks(q_and_k, limit=1)] == [2, 2, 2]  # a parameter larger than the budget


@pytest.mark.parametrize("block", [(0, 1), (1, 1), (1, 8), (0, 4), (None, 1)])
def test_stacked_block_means_equal_each_block_alone(block: tuple[int | None, int]) -> None:
    gen = torch.Generator().manual_seed(0)
    grads = torch.randn(3, 16, 32, generator=gen)
    means = block_sq_means(grads, block)
    for i in range(3):
        v = torch.zeros(means.shape[1])
        torch.testing.assert_close(block_second_moment(v, grads[i], 0.0, *block), means[i])


_NO_CXX = shutil.which(os.environ.get("CXX", "g++")) is None


@pytest.mark.parametrize(
    "foreach", [False, True, pytest.param("deferred", marks=pytest.mark.skipif(_NO_CXX, reason="needs g++"))]
)
def test_non_finite_factors_skip_the_parameter_on_both_paths(foreach: bool | str) -> None:
    """Factors that turn non-finite (here: a corrupted checkpoint's NaN factors) skip their parameter,
    value and state unchanged, and name it; the other parameters step. ``deferred``: the grouped fused
    step that checks on the device and names the parameter when the flags are read."""
    model = tiny_gpt2()
    opt = adapm.AdaPM(model, lr=1e-3, foreach=bool(foreach), fused=foreach == "deferred", refresh_every=1000)
    opt._defer_check = foreach == "deferred"
    data = batches(96, 3)
    train(model, opt, data[:1])
    weight = model.transformer.h[0].mlp.c_fc.weight
    opt.state[weight]["lowrank_R"].fill_(float("nan"))
    before = weight.detach().clone()
    other = model.transformer.h[1].mlp.c_fc.weight.detach().clone()
    state = {k: v.clone() for k, v in opt.state[weight].items()}
    with pytest.warns(RuntimeWarning, match=r"non-finite low-rank factors.*h\.0\.mlp\.c_fc\.weight"):
        train(model, opt, data[1:2])
        assert opt.skipped_params == 1
    assert torch.equal(weight, before)
    for key, value in opt.state[weight].items():
        torch.testing.assert_close(value, state[key], rtol=0, atol=0, equal_nan=True, msg=key)
    assert not torch.equal(model.transformer.h[1].mlp.c_fc.weight, other)



@pytest.mark.parametrize(
    "path", [False, True, pytest.param("deferred", marks=pytest.mark.skipif(_NO_CXX, reason="needs g++"))]
)
def test_skip_counts_add_up_over_steps_without_reading_each_step(path: bool | str) -> None:
    """``skipped_total`` sums the skips of every step and ``skipped_streak`` counts the steps in a row
    that skipped every parameter, read every few steps: on the per-block step, the grouped one, and the
    deferred check, whose last step is settled by the read."""
    torch.manual_seed(0)
    weight, vector = nn.Parameter(torch.randn(16, 12)), nn.Parameter(torch.randn(12))
    opt = adapm.AdaPM(
        [{"params": [weight], "momentum": "lowrank"}, {"params": [vector]}], lr=1e-3, foreach=bool(path),
        fused=path == "deferred",
    )  # fmt: skip
    opt._defer_check = path == "deferred"
    reads = []
    for i, bad in enumerate(((), (vector,), (weight, vector), (), (weight, vector), (weight, vector), (weight,))):
        for p in (weight, vector):
            p.grad = torch.full_like(p, float("nan")) if any(p is q for q in bad) else torch.randn_like(p)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            opt.step()
            if i in (3, 5, 6):
                reads.append((opt.skipped_total, opt.skipped_streak))
    assert reads == [(3, 0), (7, 2), (8, 0)]
    assert opt.skipped_params == 1

@pytest.mark.parametrize("cls", [adapm.AdaPM, adapm.AdaPMMini])
def test_bf16_parameters_keep_float32_state_on_the_grouped_step(cls: type[adapm.AdaPM]) -> None:
    data = batches(96, 4)
    ref, ours = tiny_llama().to(torch.bfloat16), tiny_llama().to(torch.bfloat16)
    train(ref, cls(ref, lr=2e-3, foreach=False), data)
    opt = cls(ours, lr=2e-3, foreach=True)
    train(ours, opt, data)
    for a, b in zip(ref.parameters(), ours.parameters()):
        assert b.dtype == torch.bfloat16
        torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-3)
    assert {v.dtype for s in opt.state.values() for v in s.values()} == {torch.float32}


def _ops(opt: adapm.AdaPM) -> tuple[int, int]:
    """Top-level aten ops of one step, all and those that launch work, counted as
    ``benchmarks/op_count.py`` counts them."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    try:
        from op_count import kernel_ops, top_level_ops
    finally:
        sys.path.pop(0)
    total, top = top_level_ops(opt.step)
    return total, kernel_ops(top)


@pytest.mark.parametrize("cls", [adapm.AdaPM, adapm.AdaPMMini])
def test_grouped_step_ops_do_not_grow_with_depth(cls: type[adapm.AdaPM]) -> None:
    """Ops per step grow with the number of (policy, shape) groups, not with layers: 2 and 8 layers of
    one width dispatch nearly the same number of kernels and of ops in all, views included (those of
    the parameters and state are kept between steps; a fused q/k/v gradient is split in one op), while
    refreshes are pushed out of the window."""
    counts, totals = [], []
    for layers, foreach in ((2, True), (8, True), (8, False)):
        model = tiny_gpt2(n_layer=layers)
        opt = cls(model, lr=1e-3, foreach=foreach, refresh_every=1000)
        gen = torch.Generator().manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for _ in range(3):
                for p in model.parameters():
                    p.grad = torch.randn(p.shape, generator=gen)
                opt.step()
        total, kernels = _ops(opt)
        counts.append(kernels)
        totals.append(total)
    assert counts[1] <= counts[0] * 1.1, counts
    assert totals[1] <= totals[0] * 1.1, totals
    assert counts[1] * 5 < counts[2], counts  # the per-block path: ops per parameter


def test_a_plain_linear_stack_groups_by_shape() -> None:
    layers = nn.Sequential(*[nn.Linear(24, 24) for _ in range(4)])
    groups = [{"params": [layer.weight for layer in layers], "momentum": "lowrank"},
              {"params": [layer.bias for layer in layers]}]  # fmt: skip
    ref = nn.Sequential(*[nn.Linear(24, 24) for _ in range(4)])
    ref.load_state_dict(layers.state_dict())
    ref_groups = [{"params": [layer.weight for layer in ref], "momentum": "lowrank"},
                  {"params": [layer.bias for layer in ref]}]  # fmt: skip
    opt, opt_ref = adapm.AdaPM(groups, lr=1e-2, foreach=True), adapm.AdaPM(ref_groups, lr=1e-2, foreach=False)
    x = torch.randn(8, 24, generator=torch.Generator().manual_seed(0))
    for _ in range(5):
        for model, o in ((layers, opt), (ref, opt_ref)):
            model(x).square().mean().backward()
            o.step()
            o.zero_grad()
    for a, b in zip(layers.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_the_step_holds_one_stack_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """A stack's momenta are freed before the next stack is built, so the step's transient memory is one
    stack: with room for two of eight same-shape low-rank matrices per stack, each new stack of gradients
    finds every earlier one released (observed on the step's own torch.stack calls)."""
    import weakref

    from torch.overrides import TorchFunctionMode

    import adapm.grouped

    monkeypatch.setattr(adapm.grouped, "GROUP_ELEMENTS", 2 * 128 * 128)
    layers = nn.Sequential(*[nn.Linear(128, 128, bias=False) for _ in range(8)])
    opt = adapm.AdaPM([{"params": list(layers.parameters()), "momentum": "lowrank"}], lr=1e-3, foreach=True,
                      refresh_every=1000)  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    stacks: list[weakref.ref] = []
    alive_at_creation: list[int] = []

    class Watch(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            out = func(*args, **(kwargs or {}))
            if func is torch.stack and isinstance(out, torch.Tensor) and out.shape[1:] == (128, 128):
                alive_at_creation.append(sum(ref() is not None for ref in stacks))
                stacks.append(weakref.ref(out))
            return out

    for step in range(2):
        for p in layers.parameters():
            p.grad = torch.randn(p.shape, generator=gen)
        if step == 1:
            with Watch():
                opt.step()
        else:
            opt.step()
    assert len(stacks) == 4  # four stacks of two gradients
    assert alive_at_creation == [0, 0, 0, 0]


def test_bf16_working_copies_are_bounded_and_chunking_changes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """bf16 parameters are stepped on float32 working copies of at most ``GROUP_ELEMENTS`` entries at a
    time (not the whole model in float32 at once), with the same result as one chunk."""
    import weakref

    from torch.overrides import TorchFunctionMode

    import adapm.grouped

    data = batches(96, 3)
    ref, ours = tiny_llama().to(torch.bfloat16), tiny_llama().to(torch.bfloat16)
    train(ref, adapm.AdaPMMini(ref, lr=2e-3, foreach=True), data[:2])
    budget = 3 * max(p.numel() for p in ours.parameters())
    monkeypatch.setattr(adapm.grouped, "GROUP_ELEMENTS", budget)
    opt = adapm.AdaPMMini(ours, lr=2e-3, foreach=True)
    train(ours, opt, data[:1])
    copies: list[weakref.ref] = []
    alive: list[int] = []

    class Watch(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            out = func(*args, **(kwargs or {}))
            converted = func is torch.Tensor.to and isinstance(out, torch.Tensor) and out.dtype == torch.float32
            if converted and args[0].dtype == torch.bfloat16:
                copies.append(weakref.ref(out))
                alive.append(sum(r().numel() for r in copies if r() is not None))
            return out

    x = data[1]
    ours(input_ids=x, labels=x).loss.backward()
    with Watch():
        opt.step()
    opt.zero_grad()
    assert len(copies) == 2 * sum(1 for _ in ours.parameters())  # each parameter and gradient, once
    assert max(alive) <= budget, (max(alive), budget)
    assert sum(p.numel() for p in ours.parameters()) * 2 > 2 * budget  # the budget did cut the model
    for a, b in zip(ref.parameters(), ours.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize("cls", [adapm.AdaPM, adapm.AdaPMMini])
def test_cholesky_qr_trains_as_householder_qr(cls: type[adapm.AdaPM], monkeypatch: pytest.MonkeyPatch) -> None:
    """The grouped step with Cholesky QR (the default off CPU), run here on CPU, takes the same steps as
    with Householder QR (CPU's default) to float32 rounding: only the bases' signs may differ."""
    from adapm.policies.trackers import QR_METHOD

    data = batches(96, 6)
    results = []
    for method in ("householder", "cholesky"):
        monkeypatch.setitem(QR_METHOD, "cpu", method)
        model = tiny_llama()
        results.append((train(model, cls(model, lr=2e-3, foreach=True), data), model))
    (losses_h, model_h), (losses_c, model_c) = results
    assert losses_c == pytest.approx(losses_h, rel=1e-5)
    for a, b in zip(model_h.parameters(), model_c.parameters()):
        diff = (a - b).abs()
        assert diff.max() < 2e-3 and diff.mean() < 2e-3 / 1000, (diff.max(), diff.mean())


@pytest.mark.parametrize("fused", [False, pytest.param(True, marks=pytest.mark.skipif(_NO_CXX, reason="needs g++"))])
def test_kept_views_follow_new_storage_and_loaded_state(fused: bool) -> None:
    """The grouped step keeps views of parameters and state between steps (with ``fused``, of a kept
    detached alias of each parameter); when a parameter's storage is replaced (``p.data = ...``, as
    ``module.to`` does) or a state dict is loaded, it makes new ones, so training goes on exactly as
    without the replacement."""
    data = batches(96, 6)
    ref, ours = tiny_gpt2(), tiny_gpt2()
    kwargs = dict(lr=2e-3, foreach=True, fused=fused)
    opt_ref, opt = adapm.AdaPMMini(ref, **kwargs), adapm.AdaPMMini(ours, **kwargs)
    train(ref, opt_ref, data)
    train(ours, opt, data[:2])
    kept = len(opt._views._views)
    for p in ours.parameters():
        p.data = p.data.clone()
    train(ours, opt, data[2:4])
    assert len(opt._views._views) == kept  # replaced, not added to: no view keeps an old storage alive
    saved = copy.deepcopy(opt.state_dict())
    for state in opt.state.values():
        for value in state.values():
            value.zero_()  # a loaded state dict must replace these, kept views included
    opt.load_state_dict(saved)
    train(ours, opt, data[4:])
    for a, b in zip(ref.parameters(), ours.parameters()):
        assert torch.equal(a, b)


def _stack_ops(opt: adapm.AdaPM, model: nn.Module, x: torch.Tensor) -> int:
    """The ``aten::stack`` ops of one step."""
    from torch.profiler import ProfilerActivity, profile

    model(input_ids=x, labels=x).loss.backward()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        opt.step()
    opt.zero_grad(set_to_none=True)
    return sum(event.name == "aten::stack" for event in prof.events())


@pytest.mark.parametrize("tracker", ["power", "fixed"])
def test_low_rank_factors_are_packed_per_stack_and_repacked_when_a_gradient_is_missing(tracker: str) -> None:
    """After the first grouped step each stack's low-rank factors live in one buffer (each parameter's
    state a view of it), so later steps take them as a view and write them back with one copy: two
    ``stack`` ops fewer per stack and step. A step where one parameter has no gradient stacks the others
    afresh. Training equals the per-block path to float32 rounding throughout, no kept view or stack
    holds a replaced tensor, and a checkpoint of packed state resumes bit for bit."""
    data = batches(96, 9)
    ref, ours = tiny_llama(n_layer=3), tiny_llama(n_layer=3)
    kwargs = dict(lr=2e-3, tracker=tracker, refresh_every=3)
    opt_ref, opt = adapm.AdaPM(ref, foreach=False, **kwargs), adapm.AdaPM(ours, foreach=True, **kwargs)
    train(ref, opt_ref, data[:2])
    train(ours, opt, data[:2])
    lowrank = [p for p in ours.parameters() if "lowrank_L" in opt.state[p]]
    buffers = {opt.state[p][key].untyped_storage().data_ptr() for p in lowrank for key in ("lowrank_L", "lowrank_R")}
    queries = [layer.self_attn.q_proj.weight for layer in ours.model.layers]
    assert len({opt.state[q]["lowrank_L"].untyped_storage().data_ptr() for q in queries}) == 1
    assert 2 <= len(buffers) < len(lowrank)  # one L and one R buffer per stack of same-shape blocks
    # one step with a query projection's gradient missing (its layer frozen for a step), on both paths
    for model, o in ((ref, opt_ref), (ours, opt)):
        model(input_ids=data[2], labels=data[2]).loss.backward()
        model.model.layers[1].self_attn.q_proj.weight.grad = None
        o.step()
        o.zero_grad(set_to_none=True)
    train(ref, opt_ref, data[3:5])
    train(ours, opt, data[3:5])
    assert max_rel_diff(ref, ours) < 1e-5
    current = {id(v) for state in opt.state.values() for v in state.values()} | {id(p) for p in ours.parameters()}
    assert all(id(base) in current for base, _, _ in opt._views._views.values())
    in_state = {v.untyped_storage().data_ptr() for p in lowrank for v in opt.state[p].values()}
    assert all(stack.untyped_storage().data_ptr() in in_state for stack in opt._views._stacks.values())
    # packed against unpacked: the factors' stacks are gone from the step
    unpacked = copy.deepcopy(ours)
    opt_unpacked = adapm.AdaPM(unpacked, foreach=True, **kwargs)
    opt_unpacked.load_state_dict(copy.deepcopy(opt.state_dict()))
    try:
        adapm.grouped._repoint, saved_repoint = (lambda *args: False), adapm.grouped._repoint
        _stack_ops(opt_unpacked, unpacked, data[5])  # (a loaded state dict is packed by its first step)
        without = _stack_ops(opt_unpacked, unpacked, data[6])
    finally:
        adapm.grouped._repoint = saved_repoint
    resumed = copy.deepcopy(ours)
    opt_resumed = adapm.AdaPM(resumed, foreach=True, **kwargs)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    opt_resumed.load_state_dict(torch.load(buffer))
    _stack_ops(opt, ours, data[5])
    packed = _stack_ops(opt, ours, data[6])
    # (the parameter that missed a step now has a step count of its own: a stack of its own)
    buffers = {opt.state[p][key].untyped_storage().data_ptr() for p in lowrank for key in ("lowrank_L", "lowrank_R")}
    assert without - packed == len(buffers)
    train(resumed, opt_resumed, data[5:7])
    train(ours, opt, data[7:])
    train(resumed, opt_resumed, data[7:])
    for a, b in zip(ours.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


@pytest.mark.skipif(_NO_CXX, reason="torch.compile on CPU needs g++")
def test_fused_grouped_step_compiles_once_whatever_refreshes() -> None:
    """Blocks due for a refresh are tracked alone but stay in their stack's tail, so the compiled tails
    see the same lists on every step: the kernels built on the first step (where every block refreshes)
    serve the later ones (where a few do). Before, each pattern of refreshes built new kernels."""
    torch._dynamo.reset()
    model = tiny_gpt2(n_layer=4)
    opt = adapm.AdaPMMini(model, lr=1e-3, foreach=True, fused=True, refresh_every=4)
    data = batches(96, 9)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no fallback to eager
        train(model, opt, data[:1])
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        train(model, opt, data[1:])
    assert graphs > 0
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs


@pytest.mark.skipif(_NO_CXX, reason="torch.compile on CPU needs g++")
def test_a_deeper_model_compiles_no_new_graph(monkeypatch) -> None:
    """The compiled calls of the fused step on an accelerator (the tails and the block moments) take
    buckets of same-layout blocks, so a model twice as deep reuses the graphs of the shallower one: the
    first step's compile time does not grow with depth. (Buckets of 2 here, so that 2 layers make whole
    buckets; one call for all layers made 11 new graphs for the longer lists. The fixed tracker's batched
    call, not taken here, compiles once per stack size: one graph of the same size whatever the depth.)"""
    import adapm.policies.update as update

    monkeypatch.setattr(update, "_BUCKET", 2)
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters["stats"]
    graphs = []
    for n_layer in (2, 4):
        model = tiny_gpt2(n_layer=n_layer)
        opt = adapm.AdaPMMini(model, lr=1e-3, foreach=True, fused=True, refresh_every=1000)
        opt._defer_check = True  # the accelerator's path, on CPU
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # no fallback to eager
            train(model, opt, batches(96, 3))
        graphs.append(counters["unique_graphs"])
    assert graphs[0] > 0
    assert graphs[1] == graphs[0]


@pytest.mark.parametrize("cls", [adapm.AdaPM, adapm.AdaPMMini])
def test_the_grouped_step_reads_back_from_the_device_once(cls: type[adapm.AdaPM], monkeypatch) -> None:
    """The grouped step reads tensors back to the host twice per step, however many stacks and refreshes:
    once for the finite check of the gradients and stored factors (on a GPU, the step's one sync) and
    once for the step counters (CPU tensors on every device). Counted on CPU as the calls that read a
    tensor's values into Python."""
    model = tiny_gpt2(n_layer=4)
    opt = cls(model, lr=1e-3, foreach=True, refresh_every=4)  # some blocks refresh on every step
    gen = torch.Generator().manual_seed(0)
    reads = []
    for name in ("tolist", "item", "__bool__", "__float__", "__int__"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, _name=name):
            reads.append(_name)
            return _original(self, *args)

        monkeypatch.setattr(torch.Tensor, name, counted)
    for step in range(6):
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=gen)
        reads.clear()
        opt.step()
        assert reads == ["tolist", "tolist"], (step, reads)


def test_the_fused_step_copies_its_scalars_to_the_device_once() -> None:
    """The compiled tails take their scalars (lr, bias corrections, ...) from tensors kept between steps
    and rewritten from one host-to-device table per step, whatever the number of stacks and groups;
    before, each stack made its own table and a clone per group."""
    torch._dynamo.reset()
    model = tiny_gpt2(n_layer=4)
    opt = adapm.AdaPM(model, lr=1e-3, foreach=True, fused=True, tracker="fixed", refresh_every=1000)
    gen = torch.Generator().manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no fallback to eager
        for _ in range(3):
            for p in model.parameters():
                p.grad = torch.randn(p.shape, generator=gen)
            opt.step()
        rows = [id(t) for t in opt._scalar_rows.rows.values()]
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
        try:
            from op_count import top_level_ops
        finally:
            sys.path.pop(0)
        _, top = top_level_ops(opt.step)
    assert len(rows) > 2  # several groups of scalars (e.g. low-rank, full and no momentum)
    assert top.get("aten::lift_fresh", 0) == 1 and "aten::clone" not in top, top
    assert top.get("aten::_foreach_copy_", 0) >= 1
    assert [id(t) for t in opt._scalar_rows.rows.values()] == rows  # the same tensors, rewritten


@pytest.mark.skipif(_NO_CXX, reason="torch.compile on CPU needs g++")
@pytest.mark.parametrize(("cls", "model_fn", "tracker"), [(adapm.AdaPM, tiny_gpt2, "power"),
                                                          (adapm.AdaPMMini, tiny_gpt2, "power"),
                                                          (adapm.AdaPMMini, tiny_llama, "fixed")])  # fmt: skip
def test_the_deferred_check_skips_on_the_device_and_settles_at_the_next_read(cls, model_fn, tracker) -> None:
    """The fused grouped step on an accelerator does not read the finite flags back in the step that made
    them: parameters with a NaN gradient are masked on the device (values and state exactly as they were,
    through refreshes too), and the flags are read at the next step or at ``skipped_params``/
    ``state_dict()``, which put the skipped parameters' step counters back and warn. Run here on CPU
    (``_defer_check=True``) against the eager grouped step that checks on the host."""
    torch._dynamo.reset()
    model = model_fn()
    twin = copy.deepcopy(model)
    kwargs = dict(lr=1e-2, foreach=True, refresh_every=3, tracker=tracker)
    ref, dev = cls(model, **kwargs), cls(twin, fused=True, **kwargs)
    dev._defer_check = True
    named = dict(twin.named_parameters())
    # a low-rank matrix, one with full momentum (or a fused q/k/v weight), and a norm
    pattern = r"(h|layers)\.0\.mlp\.(c_fc|up_proj)|h\.1\.attn\.c_attn|layers\.1\.self_attn\.v_proj|ln_f|model\.norm"
    bad = [n for n in named if re.search(rf"({pattern})\.weight$", n)]
    assert len(bad) == 3
    gen = torch.Generator().manual_seed(0)
    for step in range(7):
        for (name, p), q in zip(model.named_parameters(), twin.parameters()):
            g = torch.randn(p.shape, generator=gen)
            if step == 3 and name in bad:
                g.view(-1)[0] = float("nan")
            p.grad, q.grad = g, g.clone()
        before = {n: (named[n].detach().clone(), {k: v.clone() for k, v in dev.state[named[n]].items()}) for n in bad}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # the host check's warning
            ref.step()
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # no warning (and no fallback to eager) in the step
            dev.step()
        assert dev._pending is not None  # this step's flags are not read yet
        if step == 3:
            for n in bad:
                assert torch.equal(named[n], before[n][0]), n
                for key, value in dev.state[named[n]].items():
                    if key != "step":
                        assert torch.equal(value, before[n][1][key]), (n, key)
            with pytest.warns(RuntimeWarning, match="skipped 3 parameter"):
                assert dev.skipped_params == 3
        for (name, p), q in zip(model.named_parameters(), twin.parameters()):
            torch.testing.assert_close(q, p, msg=name)
            for key, value in ref.state[p].items():
                torch.testing.assert_close(dev.state[q][key], value, msg=f"{name} {key}")
    steps = {i: int(s["step"]) for i, s in dev.state_dict()["state"].items()}
    assert steps == {i: int(s["step"]) for i, s in ref.state_dict()["state"].items()}
    assert sorted(steps.values()).count(6) == 3 and max(steps.values()) == 7
