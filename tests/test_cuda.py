"""The CUDA path: run only where a GPU is present (``pytest -m cuda``); skipped on CPU-only machines.

``benchmarks/gpu_check.py`` runs these first when a GPU is at hand."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import adapm

from conftest import batches, tiny_gpt2, tiny_llama, train

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize("cls", [adapm.AdaPM, adapm.AdaPMMini])
@pytest.mark.parametrize("make", [tiny_gpt2, tiny_llama])
def test_cuda_matches_cpu(cls: type[adapm.AdaPM], make) -> None:
    """The same training run on CPU and CUDA: equal losses; parameters within one step's size everywhere
    and within a tenth of it on average. Not closer: the devices' forward passes round differently, the
    refreshes' random sketches come from each device's own generator (so the tracked bases differ a
    little), and an Adam-type update turns rounding noise in tiny gradients into steps of up to ``lr``.
    Seen on an H200 after 6 steps: at most 0.34 ``lr`` apart, 0.024 ``lr`` on average. The grouped step
    is held to float32 rounding against the per-block step on the same device below."""
    data = batches(96, 6)
    cpu, gpu = make(), make().cuda()
    opt_cpu, opt_gpu = cls(cpu, lr=2e-3), cls(gpu, lr=2e-3)
    assert opt_gpu.foreach is None  # the grouped step is the default on CUDA
    losses_cpu = train(cpu, opt_cpu, data)
    losses_gpu = train(gpu, opt_gpu, [x.cuda() for x in data])
    assert losses_gpu == pytest.approx(losses_cpu, rel=1e-4)
    for a, b in zip(cpu.parameters(), gpu.parameters()):
        diff = (a - b.cpu()).abs()
        assert diff.max() < 2e-3 and diff.mean() < 2e-3 / 10, (diff.max(), diff.mean())
    assert all(v.device.type == "cuda" for s in opt_gpu.state.values() for k, v in s.items() if k != "step")


def _same_gradients(models: list[torch.nn.Module], seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for params in zip(*(m.parameters() for m in models)):
        g = torch.randn(params[0].shape, generator=gen) * 1e-2
        for p in params:
            p.grad = g.to(device=p.device, dtype=p.dtype)


@pytest.mark.parametrize("cls", [adapm.AdaPM, adapm.AdaPMMini])
@pytest.mark.parametrize("tracker", ["power", "fixed"])
def test_grouped_step_matches_the_per_block_step_on_cuda(cls: type[adapm.AdaPM], tracker: str) -> None:
    """On one device, with the same gradients and the same refresh sketches, the grouped step (the CUDA
    default) equals the single-tensor reference to float32 rounding."""
    grouped, single = tiny_llama().cuda(), tiny_llama().cuda()
    opts = [cls(grouped, lr=2e-3, tracker=tracker), cls(single, lr=2e-3, tracker=tracker, foreach=False)]
    for step in range(8):
        _same_gradients([grouped, single], step)
        for opt in opts:
            opt.step()
    for a, b in zip(grouped.parameters(), single.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("foreach", [False, True])
def test_a_model_spread_over_devices_steps_like_one_on_a_single_device(foreach: bool) -> None:
    """Parameters on several devices (as ``device_map="auto"`` places a model too big for one GPU; here
    half on the CPU, half on CUDA): the finite flags gather on one device, the grouped step stacks only
    blocks of one device, and the steps match a run on the CPU alone (within the devices' rounding, as
    in test_cuda_matches_cpu); a non-finite gradient on either device skips only its parameter."""
    spread, ref = tiny_llama(), tiny_llama()
    spread.model.layers[1].cuda()
    spread.lm_head.cuda()
    devices = {p.device.type for p in spread.parameters()}
    assert devices == {"cpu", "cuda"}
    opt = adapm.AdaPMMini(spread, lr=2e-3, foreach=foreach)
    opt_ref = adapm.AdaPMMini(ref, lr=2e-3, foreach=foreach)
    for step in range(6):
        _same_gradients([spread, ref], step)
        opt.step()
        opt_ref.step()
    for a, b in zip(spread.parameters(), ref.parameters()):
        diff = (a.detach().cpu() - b.detach()).abs()
        assert diff.max() < 2e-3 and diff.mean() < 2e-3 / 10, (diff.max(), diff.mean())
    on_cuda = spread.model.layers[1].mlp.up_proj.weight
    on_cpu = spread.model.layers[0].mlp.up_proj.weight
    _same_gradients([spread], 6)
    on_cuda.grad[0, 0] = float("nan")
    before = on_cuda.detach().clone(), on_cpu.detach().clone()
    with pytest.warns(RuntimeWarning, match=r"layers\.1\.mlp\.up_proj"):
        opt.step()
    assert torch.equal(before[0], on_cuda) and not torch.equal(before[1], on_cpu) and opt.skipped_params == 1
    with pytest.raises(ValueError, match="several devices"):
        adapm.compile_step(opt)()


def test_bf16_parameters_keep_float32_state_on_cuda() -> None:
    model = tiny_llama().cuda().to(torch.bfloat16)
    opt = adapm.AdaPMMini(model, lr=2e-3)
    losses = train(model, opt, [x.cuda() for x in batches(96, 6)])
    assert losses[-1] < losses[0]
    assert all(v.dtype == torch.float32 for s in opt.state.values() for v in s.values())
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


def test_nonfinite_gradient_is_skipped_on_cuda() -> None:
    model = tiny_gpt2().cuda()
    opt = adapm.AdaPM(model, lr=2e-3)
    x = batches(96, 1)[0].cuda()
    model(input_ids=x, labels=x).loss.backward()
    weight = model.transformer.h[0].mlp.c_fc.weight
    weight.grad[0, 0] = float("nan")
    before = weight.detach().clone()
    with pytest.warns(RuntimeWarning, match="c_fc"):
        opt.step()
    assert torch.equal(before, weight) and opt.skipped_params == 1


@pytest.mark.parametrize("state_dtype", ["bf16", "int8"])
def test_low_precision_state_on_cuda(state_dtype: str) -> None:
    """bf16 and 8-bit state live on the GPU (codes, scales and the rounding's generators), train like
    float32 state, and a checkpoint resumes bit-identically there."""
    data = [x.cuda() for x in batches(96, 8)]
    ref, ours = tiny_llama().cuda(), tiny_llama().cuda()
    losses_ref = train(ref, adapm.AdaPM(ref, lr=3e-3), data)
    opt = adapm.AdaPM(ours, lr=3e-3, state_dtype=state_dtype)
    losses = train(ours, opt, data[:4])
    # A snapshot: state_dict() holds the live state tensors, which the next steps update in place.
    saved = {"model": {k: v.clone() for k, v in ours.state_dict().items()}, "optim": copy.deepcopy(opt.state_dict())}
    losses += train(ours, opt, data[4:])
    assert losses == pytest.approx(losses_ref, abs=2e-3)
    stored = torch.bfloat16 if state_dtype == "bf16" else torch.uint8
    weight = ours.model.layers[0].mlp.up_proj.weight
    assert opt.state[weight]["exp_avg_sq"].dtype == stored and opt.state[weight]["exp_avg_sq"].is_cuda
    resumed = tiny_llama(seed=5).cuda()
    resumed.load_state_dict(saved["model"])
    opt_b = adapm.AdaPM(resumed, lr=3e-3, state_dtype=state_dtype)
    opt_b.load_state_dict(saved["optim"])
    train(resumed, opt_b, data[4:])
    for a, b in zip(ours.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("cls", [adapm.AdaPM, adapm.AdaPMMini])
def test_fused_grouped_step_does_not_synchronize_with_the_host(cls: type[adapm.AdaPM]) -> None:
    """``fused=True`` on CUDA: no step makes the host wait for the device (torch's sync debug mode raises
    on any synchronizing call), a NaN gradient is still skipped on the device, and reading
    ``skipped_params`` afterwards names it. The eager grouped step syncs once per step instead (its
    finite check), as torch's foreach AdamW does under a GradScaler."""
    model = tiny_gpt2(n_layer=4).cuda()
    opt = cls(model, lr=1e-3, fused=True, tracker="fixed", refresh_every=1000)
    weight = model.transformer.h[0].mlp.c_fc.weight
    gen = torch.Generator(device="cuda").manual_seed(0)

    def grads(nan: bool) -> None:
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=gen, device="cuda")
        if nan:
            weight.grad[0, 0] = float("nan")

    for _ in range(3):  # compiles, and the first refreshes (randomized SVDs) happen here
        grads(False)
        opt.step()
    torch.cuda.synchronize()
    before = weight.detach().clone()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", RuntimeWarning)
            for step in range(4):
                grads(step == 1)
                opt.step()
                if step == 1:
                    after_skip = weight.detach().clone()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(after_skip, before) and not torch.equal(weight, before)
    named = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(named) == 1 and "h.0.mlp.c_fc.weight" in named[0]  # read at the step after the skip
    assert opt.skipped_params == 0


@pytest.mark.parametrize("cls", [adapm.AdaPM, adapm.AdaPMMini])
def test_compiled_step_on_cuda_equals_the_eager_step_without_host_syncs(cls: type[adapm.AdaPM]) -> None:
    """adapm.compile_step with CUDA graphs (``mode="reduce-overhead"``) on bf16 parameters: equal to the
    eager grouped step to bf16 rounding over steps with refreshes, one graph, and no device-to-host sync
    in a compiled step (its finite check's flags are read a step later)."""
    a = tiny_llama().cuda().to(torch.bfloat16)
    b = copy.deepcopy(a)
    oa, ob = cls(a, lr=2e-3, refresh_every=3), cls(b, lr=2e-3, refresh_every=3)
    step = adapm.compile_step(ob, mode="reduce-overhead")
    for seed in range(7):
        _same_gradients([a, b], seed)
        oa.step()
        step()
    assert step.compiles == 1
    for x, y in zip(a.parameters(), b.parameters()):
        assert float((x.float() - y.float()).abs().max() / x.float().abs().max()) < 2e-2
    _same_gradients([a, b], 99)
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert not [w for w in caught if "synchroniz" in str(w.message)]
