"""adapm.compile_step: the step's device work traced whole (one graph, no break), equal to opt.step()."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import adapm

from conftest import tiny_gpt2, tiny_llama


def _grads(a: torch.nn.Module, b: torch.nn.Module, seed: int, dtype: torch.dtype = torch.float32) -> None:
    torch.manual_seed(seed)
    for pa, pb in zip(a.parameters(), b.parameters()):
        g = (torch.randn(pa.shape) * 1e-2).to(dtype)
        pa.grad, pb.grad = g.clone(), g.clone()


def _state_diff(oa: adapm.AdaPM, ob: adapm.AdaPM, a: torch.nn.Module, b: torch.nn.Module) -> float:
    worst = 0.0
    for pa, pb in zip(a.parameters(), b.parameters()):
        for key, x in oa.state[pa].items():
            y = ob.state[pb][key]
            scale = x.abs().max().clamp_min(1e-30)
            worst = max(worst, float((x.float() - y.float()).abs().max() / scale))
    return worst


def _max_rel(a: torch.nn.Module, b: torch.nn.Module) -> float:
    return max(float((x.float() - y.float()).abs().max() / x.float().abs().max())
               for x, y in zip(a.parameters(), b.parameters()))  # fmt: skip


def _twins(make, cls, steps: int, seed: int, backend="aot_eager", **options):
    """Two copies of a model with ``cls`` optimizers (``foreach=True``, ``lr=1e-2``, ``options``): ``a`` stepped
    eagerly, ``b`` with compile_step; ``steps`` steps on the same gradients (seeds from ``seed``)."""
    a = make()
    b = copy.deepcopy(a)
    oa = cls(a, lr=1e-2, foreach=True, **options)
    ob = cls(b, lr=1e-2, foreach=True, **options)
    step = adapm.compile_step(ob, backend=backend)
    for s in range(steps):
        _grads(a, b, seed + s)
        oa.step()
        step()
    return a, b, oa, ob, step


CASES = [
    ("gpt2", adapm.AdaPMMini, "power", torch.float32),
    ("gpt2", adapm.AdaPM, "fixed", torch.float32),
    ("llama", adapm.AdaPMMini, "gd", torch.float32),
    ("llama", adapm.AdaPM, "power", torch.bfloat16),
]


@pytest.mark.parametrize(("kind", "cls", "tracker", "dtype"), CASES, ids=lambda x: getattr(x, "__name__", str(x)))
def test_compiled_step_equals_the_eager_step_with_one_graph_for_every_step(kind, cls, tracker, dtype):
    """Seven steps with a refresh every 3 (staggered: some block refreshes on most steps): parameters and
    every state tensor equal opt.step()'s to float32 rounding; one graph for all steps after the first
    (eager) one, compiled once and not again (backend ``aot_eager``: dynamo's full trace and AOT
    functionalization without Inductor's code generation, which the next test runs)."""
    a = tiny_gpt2() if kind == "gpt2" else tiny_llama()
    a = a.to(dtype)
    b = copy.deepcopy(a)
    oa = cls(a, lr=1e-2, foreach=True, tracker=tracker, refresh_every=3)
    ob = cls(b, lr=1e-2, foreach=True, tracker=tracker, refresh_every=3)
    graphs = []

    def backend(gm, inputs):
        graphs.append(gm)
        return gm.forward

    step = adapm.compile_step(ob, backend=backend)
    for s in range(7):
        _grads(a, b, 100 + s, dtype)
        oa.step()
        step()
    assert step.eager_steps == 1 and step.compiles == 1 and len(graphs) == 1
    assert int(ob.state[next(b.parameters())]["step"]) == 7
    if dtype == torch.float32:
        assert _max_rel(a, b) < 2e-5
        assert _state_diff(oa, ob, a, b) < 5e-4
    else:  # the float32 results differ by rounding, so a bf16 value may be one bf16 step apart
        assert _max_rel(a, b) < 2e-2
    assert ob.skipped_params == 0


def test_compiled_step_traces_whole_with_no_graph_break():
    """torch._dynamo.explain of the graph: one graph, zero breaks, on copies of the inputs. (Inductor's
    code for the graph is checked in tests/train/test_loop.py::test_compile_step_trains_as_the_eager_step,
    and with CUDA graphs in tests/test_cuda.py; one Inductor compile in the suite keeps it fast.)"""
    a = tiny_llama(n_layer=1)
    b = copy.deepcopy(a)
    oa = adapm.AdaPMMini(a, lr=1e-2, foreach=True, refresh_every=2)
    ob = adapm.AdaPMMini(b, lr=1e-2, foreach=True, refresh_every=2)
    step = adapm.compile_step(ob, backend="aot_eager")
    with pytest.raises(RuntimeError, match="take a first step"):
        _grads(a, b, 0)
        step.explain()
    for s in range(4):
        _grads(a, b, 10 + s)
        oa.step()
        step()
        if s == 1:
            before = [p.clone() for p in b.parameters()]
            report = step.explain()
            assert report.graph_count == 1 and report.graph_break_count == 0, report.break_reasons
            assert all(torch.equal(x, y) for x, y in zip(before, b.parameters()))  # explain ran on copies
    assert _max_rel(a, b) < 2e-5


def test_compiled_step_skips_a_non_finite_gradient_on_the_device_and_names_it_at_the_next_step():
    """A NaN gradient: that parameter and its state stay as they were (masked in the graph), the others
    step as opt.step() steps them (it skips the same parameter), and the flags are read at the next
    step or ``skipped_params``: the warning names it and its step count goes back."""
    a, b, oa, ob, step = _twins(tiny_llama, adapm.AdaPMMini, 3, 20, refresh_every=3)
    _grads(a, b, 30)
    name = "model.layers.0.self_attn.q_proj.weight"
    bad = dict(b.named_parameters())[name]
    dict(a.named_parameters())[name].grad[0, 0] = float("nan")
    bad.grad[0, 0] = float("nan")
    kept = {k: v.clone() for k, v in ob.state[bad].items()}
    value = bad.detach().clone()
    with pytest.warns(RuntimeWarning, match="q_proj"):
        oa.step()
    step()
    with pytest.warns(RuntimeWarning, match=r"skipped 1 parameter.*model\.layers\.0\.self_attn\.q_proj\.weight"):
        assert ob.skipped_params == 1
    assert torch.equal(bad.detach(), value)
    assert all(torch.equal(ob.state[bad][k], v) for k, v in kept.items())
    for s in range(2):
        _grads(a, b, 40 + s)
        oa.step()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            step()
    assert _max_rel(a, b) < 2e-5
    assert int(ob.state[bad]["step"]) == int(oa.state[dict(a.named_parameters())[name]]["step"]) == 5


def test_compiled_step_refuses_what_it_does_not_step_and_naming_why():
    with pytest.raises(TypeError, match=r"adapm\.AdaPM"):
        adapm.compile_step(torch.optim.AdamW(tiny_llama().parameters()))
    model = tiny_llama()
    opt = adapm.AdaPMMini(model, lr=1e-3, state_dtype="bf16")
    step = adapm.compile_step(opt, backend="aot_eager")
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    step()  # the first step runs opt.step()
    with pytest.raises(ValueError, match=r"state_dtype='bf16'.*state_dtype='fp32'"):
        step()


def test_compiled_steps_checkpoint_and_resume_through_the_optimizer():
    """The optimizer keeps the state the graph writes: its state_dict after compiled steps resumes (eager
    or compiled) on the same trajectory."""
    a, b, oa, ob, _ = _twins(tiny_gpt2, adapm.AdaPM, 3, 50, refresh_every=2)
    c = copy.deepcopy(b)
    oc = adapm.AdaPM(c, lr=1e-2, foreach=True, refresh_every=2)
    oc.load_state_dict(copy.deepcopy(ob.state_dict()))
    resumed = adapm.compile_step(oc, backend="aot_eager")
    for s in range(3):
        torch.manual_seed(60 + s)
        grads = [torch.randn(p.shape) * 1e-2 for p in a.parameters()]
        for model in (a, c):
            for p, g in zip(model.parameters(), grads):
                p.grad = g.clone()
        oa.step()
        resumed()
    assert resumed.eager_steps == 0
    assert _max_rel(a, c) < 2e-5


def test_a_graph_that_cannot_be_compiled_falls_back_to_the_eager_step_with_a_warning():
    """A backend that fails: a RuntimeWarning naming the error, nothing written by the failed call (the step
    counters are put back), and every step from then on is opt.step(), equal to a plain eager run."""
    a = tiny_llama()
    b = copy.deepcopy(a)
    oa = adapm.AdaPMMini(a, lr=1e-2, foreach=True)
    ob = adapm.AdaPMMini(b, lr=1e-2, foreach=True)

    def broken(gm, inputs):
        raise RuntimeError("no C++ compiler here")

    step = adapm.compile_step(ob, backend=broken)
    for s in range(3):
        _grads(a, b, 70 + s)
        oa.step()
        if s == 1:
            with pytest.warns(RuntimeWarning, match="could not be compiled.*no C\\+\\+ compiler here"):
                step()
        else:
            step()
    assert step.eager_steps == 3 and isinstance(step.failed, Exception)
    assert _max_rel(a, b) == 0.0
    assert int(ob.state[next(b.parameters())]["step"]) == 3
