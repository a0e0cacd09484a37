"""The CUDA path: run only where a GPU is present (``pytest -m cuda``); skipped on CPU-only machines.

``benchmarks/gpu_check.py`` runs these first when a GPU is at hand."""

from __future__ import annotations

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
    data = batches(96, 6)
    cpu, gpu = make(), make().cuda()
    opt_cpu, opt_gpu = cls(cpu, lr=2e-3), cls(gpu, lr=2e-3)
    assert opt_gpu.foreach is None  # the grouped step is the default on CUDA
    losses_cpu = train(cpu, opt_cpu, data)
    losses_gpu = train(gpu, opt_gpu, [x.cuda() for x in data])
    assert losses_gpu == pytest.approx(losses_cpu, rel=1e-4)
    for a, b in zip(cpu.parameters(), gpu.parameters()):
        assert torch.allclose(a, b.cpu(), rtol=1e-3, atol=1e-5)
    assert all(v.device.type == "cuda" for s in opt_gpu.state.values() for k, v in s.items() if k != "step")


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
