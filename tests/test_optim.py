"""The AdaPM optimizer shell: equivalences, torch.optim behaviour, checkpoints and bad input."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import adapm

from conftest import batches, max_rel_diff, tiny_gpt2, tiny_llama, train


def _decay_groups(model: nn.Module) -> list[dict]:
    return [
        {"params": [p for p in model.parameters() if p.dim() >= 2]},
        {"params": [p for p in model.parameters() if p.dim() < 2], "weight_decay": 0.0},
    ]


def test_full_full_groups_reproduce_torch_adamw_over_100_steps() -> None:
    data = batches(96, 100)
    ref, ours = tiny_gpt2(), tiny_gpt2()
    adamw = torch.optim.AdamW(_decay_groups(ref), lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    opt = adapm.AdaPM(_decay_groups(ours), lr=3e-3, update_clip=None)
    assert all(g["momentum"] == "full" and g["second_moment"] == "full" for g in opt.param_groups)
    losses_ref, losses = train(ref, adamw, data), train(ours, opt, data)
    assert losses[-1] < losses[0] - 0.5
    assert losses_ref == losses
    # Same operations in the same order as torch's for-loop AdamW: bit-identical, not just close.
    assert all(torch.equal(a, b) for a, b in zip(ref.parameters(), ours.parameters()))


def test_model_with_full_rules_reproduces_adamw_with_matrix_decay() -> None:
    data = batches(96, 30)
    ref, ours = tiny_llama(), tiny_llama()
    adamw = torch.optim.AdamW(_decay_groups(ref), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    opt = adapm.AdaPM(ours, lr=3e-3, update_clip=None, rules=[(".", "full")])
    train(ref, adamw, data)
    train(ours, opt, data)
    assert max_rel_diff(ref, ours) < 1e-5


def test_block_second_moment_matches_official_adam_mini_on_llama() -> None:
    from adam_mini import Adam_mini

    data = batches(96, 30)
    ref, ours = tiny_llama(), tiny_llama()
    c = ref.config
    official = Adam_mini(
        ref.named_parameters(),
        lr=3e-3,
        betas=(0.9, 0.95),
        eps=1e-8,
        weight_decay=0.1,
        dim=c.hidden_size,
        n_heads=c.num_attention_heads,
        n_kv_heads=c.num_key_value_heads,
        verbose=False,
    )
    # Full momentum everywhere so that both partition alike; block second moments as Adam-mini.
    opt = adapm.AdaPMMini(ours, lr=3e-3, update_clip=None, rules=[(".", "full")])
    losses_ref, losses = train(ref, official, data), train(ours, opt, data)
    assert max(abs(a - b) for a, b in zip(losses_ref, losses)) < 1e-5
    assert max_rel_diff(ref, ours) < 1e-5


@pytest.mark.parametrize("cls", [adapm.AdaPM, adapm.AdaPMMini])
@pytest.mark.parametrize("tracker", ["power", "gd", "fixed"])
def test_adapm_trains_real_models(cls: type[adapm.AdaPM], tracker: str) -> None:
    for make in (tiny_gpt2, tiny_llama):
        model = make()
        opt = cls(model, lr=3e-3, tracker=tracker, refresh_every=5)
        losses = train(model, opt, batches(96, 40))
        assert losses[-1] < losses[0] - 0.3, losses
        assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.skipif(shutil.which(os.environ.get("CXX", "g++")) is None, reason="torch.compile on CPU needs g++")
@pytest.mark.parametrize("cls", [adapm.AdaPM, adapm.AdaPMMini])
@pytest.mark.parametrize(("tracker", "foreach"), [("power", False), ("fixed", False), ("power", True), ("fixed", True)])
def test_fused_matches_eager_on_real_models(cls: type[adapm.AdaPM], tracker: str, foreach: bool) -> None:
    """fused=True (compiled elementwise tail) follows the eager trajectory to float32 rounding, on
    GPT-2 (fused QKV segments, non-contiguous) and Llama, with every momentum policy present, on the
    per-block path (one kernel per block) and on the grouped path (one compiled call per group)."""
    for make in (tiny_gpt2, tiny_llama):
        eager_model, fused_model = make(), make()
        eager = cls(eager_model, lr=3e-3, tracker=tracker, refresh_every=4, foreach=foreach)
        fused = cls(fused_model, lr=3e-3, tracker=tracker, refresh_every=4, fused=True, foreach=foreach)
        data = batches(96, 8)
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # no silent fallback to eager
            losses_fused = train(fused_model, fused, data)
        losses_eager = train(eager_model, eager, data)
        assert fused.fused
        assert losses_fused == pytest.approx(losses_eager, abs=1e-4)
        assert _rel_diff_but_key_bias(eager_model, fused_model) < 1e-3


def _rel_diff_but_key_bias(a: torch.nn.Module, b: torch.nn.Module) -> float:
    """:func:`max_rel_diff` leaving out GPT-2's key bias (the middle third of ``c_attn.bias``). Its gradient is
    zero in exact arithmetic (adding the same q.b to every key's logit leaves the softmax unchanged), so what
    it gets is rounding noise, which Adam's normalization turns into lr-sized steps that differ with the order
    of float operations (the compiled tail's vector width, which varies with the CPU)."""
    worst = 0.0
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        if name.endswith("attn.c_attn.bias"):
            third = x.shape[0] // 3
            keep = torch.cat([torch.arange(third), torch.arange(2 * third, 3 * third)])
            x, y = x[keep], y[keep]
        worst = max(worst, float((x - y).abs().max() / x.abs().max()))
    return worst


@pytest.mark.skipif(shutil.which(os.environ.get("CXX", "g++")) is None, reason="torch.compile on CPU needs g++")
@pytest.mark.parametrize(("tracker", "foreach"), [("power", False), ("power", True), ("fixed", True)])
def test_fused_with_int8_state_matches_eager(tracker: str, foreach: bool) -> None:
    """The compiled tail runs on the float32 working copies of 8-bit state like on float32 state: the
    same trajectory as the eager step with the same state, to the rounding both draw alike."""
    eager_model, fused_model = tiny_llama(), tiny_llama()
    kwargs = dict(lr=3e-3, refresh_every=4, foreach=foreach, state_dtype="int8", tracker=tracker)
    eager, fused = adapm.AdaPM(eager_model, **kwargs), adapm.AdaPM(fused_model, fused=True, **kwargs)
    data = batches(96, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no silent fallback to eager
        losses_fused = train(fused_model, fused, data)
    losses_eager = train(eager_model, eager, data)
    assert fused.fused
    assert losses_fused == pytest.approx(losses_eager, abs=1e-3)
    weight = fused_model.model.layers[0].mlp.up_proj.weight
    assert fused.state[weight]["exp_avg_sq"].dtype == torch.uint8


@pytest.mark.parametrize("foreach", [False, True])
def test_compiled_step_equals_the_eager_step(foreach: bool) -> None:
    """``torch.compile(opt.step)`` is a step, bit for bit: traced, the refreshes' randomized SVDs all drew
    from one seed and every step recompiled; the step now runs untraced under ``torch.compile``."""
    torch._dynamo.reset()
    eager_model, compiled_model = tiny_llama(), tiny_llama()
    kwargs = dict(lr=3e-3, refresh_every=3, foreach=foreach)  # refreshes of several blocks in one step
    eager, compiled = adapm.AdaPM(eager_model, **kwargs), adapm.AdaPM(compiled_model, **kwargs)
    step = torch.compile(compiled.step)
    for x in batches(96, 5):
        for model in (eager_model, compiled_model):
            model.zero_grad(set_to_none=True)
            model(input_ids=x, labels=x).loss.backward()
        eager.step()
        step()
    for a, b in zip(eager_model.parameters(), compiled_model.parameters()):
        assert torch.equal(a, b)
    weight = compiled_model.model.layers[0].mlp.up_proj.weight
    assert compiled.state[weight]["step"] == 5
    assert torch.equal(
        compiled.state[weight]["lowrank_L"], eager.state[eager_model.model.layers[0].mlp.up_proj.weight]["lowrank_L"]
    )


@pytest.mark.parametrize("foreach", ["False", "True", "deferred"])
def test_fused_falls_back_to_eager_when_no_compiler(tmp_path: Path, foreach: str) -> None:
    """A machine without a working C++ compiler: a clear warning, then the eager update, unchanged (on
    the per-block and the grouped path, and on the grouped path with the finite check deferred as on a
    GPU, whose masks the eager fallback then reads on the host)."""
    script = """
import warnings, json, torch, adapm, sys
sys.path.insert(0, sys.argv[1])
from conftest import batches, tiny_gpt2, train
foreach = sys.argv[2] != "False"
a, b = tiny_gpt2(), tiny_gpt2()
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    opt = adapm.AdaPM(a, lr=3e-3, fused=True, foreach=foreach)
    opt._defer_check = sys.argv[2] == "deferred"
    train(a, opt, batches(96, 3))
train(b, adapm.AdaPM(b, lr=3e-3, foreach=foreach), batches(96, 3))
same = all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
print(json.dumps({"same": same, "fused": opt.fused, "messages": messages}))
"""
    env = {**os.environ, "CXX": str(tmp_path / "no-such-compiler"), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "c")}
    proc = subprocess.run([sys.executable, "-c", script, str(Path(__file__).parent), str(foreach)], capture_output=True,
                          text=True, env=env, timeout=600, check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["same"] and not result["fused"]
    assert len(result["messages"]) == 1 and "AdaPM(fused=True)" in result["messages"][0]
    assert "falling back to the eager update" in result["messages"][0]


def test_lr_scheduler_set_to_none_and_missing_grads() -> None:
    model = tiny_gpt2()
    opt = adapm.AdaPM(model, lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1 + step))
    train(model, opt, batches(96, 3), scheduler=sched)
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-2 / 4)
    # A parameter without gradient is skipped and gets no state.
    model.transformer.wpe.weight.grad = None
    before = model.transformer.wpe.weight.clone()
    loss = model(input_ids=batches(96, 1)[0]).logits.sum()
    loss.backward()
    model.transformer.wpe.weight.grad = None
    opt.step()
    assert torch.equal(before, model.transformer.wpe.weight)
    fresh = tiny_gpt2()
    opt2 = adapm.AdaPM(fresh, lr=1e-3)
    fresh.transformer.h[0].attn.c_attn.weight.grad = torch.ones_like(fresh.transformer.h[0].attn.c_attn.weight)
    opt2.step()
    assert len(opt2.state) == 1


def test_bf16_parameters_keep_float32_state() -> None:
    model = tiny_gpt2().to(torch.bfloat16)
    before = model.transformer.h[0].mlp.c_fc.weight.clone()
    opt = adapm.AdaPMMini(model, lr=1e-2)
    for x in batches(96, 3):
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    assert not torch.equal(before, model.transformer.h[0].mlp.c_fc.weight)
    assert model.transformer.h[0].mlp.c_fc.weight.dtype == torch.bfloat16
    for state in opt.state.values():
        assert all(v.dtype == torch.float32 for v in state.values())
    # ... and stays float32 through a checkpoint round trip (torch would cast it to bf16).
    opt2 = adapm.AdaPMMini(model, lr=1e-2)
    opt2.load_state_dict(opt.state_dict())
    assert all(v.dtype == torch.float32 for s in opt2.state.values() for v in s.values())


def test_add_param_group_with_policy_keys() -> None:
    model = tiny_gpt2()
    extra = nn.Linear(16, 12)
    opt = adapm.AdaPM(model, lr=1e-3)
    opt.add_param_group({"params": [extra.weight], "momentum": "lowrank", "rank_ratio": 0.25, "names": ["extra"]})
    assert opt.layout(extra.weight).segments[0].rank == 3
    extra.weight.grad = torch.randn_like(extra.weight)
    opt.step()
    assert opt.state[extra.weight]["lowrank_L"].shape == (12, 3)
    with pytest.raises(ValueError, match="unknown keys \\['momentun'\\]"):
        opt.add_param_group({"params": [extra.bias], "momentun": "full"})
    # torch's named params: the name shows in the report and in messages.
    more = nn.Linear(4, 4, bias=False)
    opt.add_param_group({"params": more.named_parameters(prefix="more"), "lr": 1e-4})
    assert opt.layout(more.weight).name == "more.weight" and "more.weight" in str(opt.partition_report())


def test_a_rejected_param_group_leaves_the_optimizer_as_it_was() -> None:
    """A parameter already in a group, or a group that fails part-way (its second parameter is an integer tensor),
    is refused with torch's message, and nothing of it stays: a later group's parameters take the next indices (the
    seeds of their random state) and the step runs."""
    model = tiny_gpt2()
    opt = adapm.AdaPM(model, lr=1e-3)
    before = (len(opt.param_groups), dict(opt._index))
    with pytest.raises(ValueError, match="some parameters appear in more than one parameter group"):
        opt.add_param_group({"params": [model.transformer.h[0].mlp.c_fc.weight]})
    extra = nn.Linear(6, 5)
    with pytest.raises(ValueError, match=r"floating-point parameters: 'param_groups\[\d+\]\[1\]'"):
        opt.add_param_group({"params": [extra.weight, nn.Parameter(torch.ones(3, dtype=torch.long),
                                                                     requires_grad=False)]})  # fmt: skip
    assert (len(opt.param_groups), opt._index) == before and extra.weight not in opt._layouts
    opt.add_param_group({"params": [extra.weight, extra.bias]})
    n = len(before[1])
    assert [opt._index[extra.weight], opt._index[extra.bias]] == [n, n + 1]
    for p in [*model.parameters(), extra.weight, extra.bias]:
        p.grad = torch.randn_like(p)
    opt.step()
    assert opt.state[extra.weight]


@pytest.mark.parametrize("foreach", [None, True])
def test_parameters_swapped_in_param_groups_before_the_first_step_are_followed(foreach: bool | None) -> None:
    """Accelerate's FSDP2 prepare puts other tensors where the optimizer's parameters were (the sharded ones;
    tests/distributed covers that case). Here the tensors are a copy of the model: the optimizer built on
    the original then trains the copy exactly as one built on the copy does, names and layouts included."""
    import copy

    model = tiny_llama()
    twin, ref = copy.deepcopy(model), copy.deepcopy(model)
    opt = adapm.AdaPMMini(model, lr=3e-3, foreach=foreach)
    swap = dict(zip(model.parameters(), twin.parameters()))
    for group in opt.param_groups:
        group["params"] = [swap[p] for p in group["params"]]
    data = batches(96, 4)
    ref_opt = adapm.AdaPMMini(ref, lr=3e-3, foreach=foreach)
    assert train(twin, opt, data) == train(ref, ref_opt, data)
    assert max_rel_diff(twin, ref) == 0.0
    assert opt.state_dict()["state"].keys() == ref_opt.state_dict()["state"].keys()
    assert str(opt.partition_report()) == str(ref_opt.partition_report())
    assert not any(p in opt.state or p in opt._layouts for p in model.parameters())


def test_parameters_swapped_after_their_state_exists_or_with_another_shape_are_refused_by_name() -> None:
    model = tiny_gpt2()
    opt = adapm.AdaPM(model, lr=1e-3)
    group = next(g for g in opt.param_groups if g["names"][0] == "transformer.h.0.mlp.c_fc.weight")
    kept = group["params"][0]

    def other(shape: tuple[int, ...]) -> nn.Parameter:  # the step finds a swapped tensor once it has a gradient
        p = nn.Parameter(torch.zeros(shape))
        p.grad = torch.ones(shape)
        return p

    group["params"] = [other((3, 3))]
    with pytest.raises(ValueError, match=r"'transformer.h.0.mlp.c_fc.weight' was replaced by a tensor of shape"):
        opt.step()
    with pytest.raises(ValueError, match=r"'transformer.h.0.mlp.c_fc.weight' was replaced by a tensor of shape"):
        opt.state_dict()  # and whatever reads the layouts, gradient or not
    group["params"] = [kept]
    train(model, opt, batches(96, 1))
    group["params"] = [other(tuple(kept.shape))]
    with pytest.raises(ValueError, match=r"'transformer.h.0.mlp.c_fc.weight' was replaced by another tensor after"):
        opt.step()
    group["params"] = [kept, other((2, 2))]
    with pytest.raises(ValueError, match=r"param groups hold \d+ parameters, not the \d+ .*add_param_group"):
        opt.step()


def _state_bytes_io(obj: object) -> io.BytesIO:
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return buf


@pytest.mark.parametrize("cls", [adapm.AdaPM, adapm.AdaPMMini])
def test_resume_is_bit_identical_and_weights_only_loadable(cls: type[adapm.AdaPM]) -> None:
    data = batches(96, 12)
    kwargs = dict(lr=3e-3, refresh_every=4)
    straight = tiny_gpt2()
    opt = cls(straight, **kwargs)
    train(straight, opt, data)

    first = tiny_gpt2()
    opt_a = cls(first, **kwargs)
    train(first, opt_a, data[:6])
    ckpt = torch.load(_state_bytes_io({"model": first.state_dict(), "optim": opt_a.state_dict()}), weights_only=True)

    resumed = tiny_gpt2(seed=123)
    resumed.load_state_dict(ckpt["model"])
    opt_b = cls(resumed, **kwargs)
    opt_b.load_state_dict(ckpt["optim"])
    train(resumed, opt_b, data[6:])
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_loading_a_mismatched_partition_names_the_parameter() -> None:
    model = tiny_gpt2()
    opt = adapm.AdaPM(model, lr=1e-3)
    train(model, opt, batches(96, 1))
    sd = opt.state_dict()
    other = adapm.AdaPM(model, lr=1e-3, rules=[(r"c_attn", "full")])
    with pytest.raises(ValueError, match=r"transformer\.h\.0\.attn\.c_attn\.weight"):
        other.load_state_dict(sd)
    other_rank = adapm.AdaPM(model, lr=1e-3, rank_ratio=0.5)
    with pytest.raises(ValueError, match=r"does not match parameter 'transformer\.h\.0\.attn\.c_attn\.weight'"):
        other_rank.load_state_dict(sd)
    bigger = adapm.AdaPM(tiny_gpt2(n_embd=64), lr=1e-3)
    with pytest.raises(ValueError, match=r"does not match parameter 'transformer\.wte\.weight'"):
        bigger.load_state_dict(sd)
    fewer = adapm.AdaPM(tiny_gpt2(n_layer=1), lr=1e-3)
    with pytest.raises(ValueError, match="param groups"):
        fewer.load_state_dict(sd)
    adamw = torch.optim.AdamW(model.parameters(), lr=1e-3)
    train(model, adamw, batches(96, 1))
    with pytest.raises(ValueError, match="is not an AdaPM optimizer's"):
        opt.load_state_dict(adamw.state_dict())


def test_nonfinite_gradient_is_skipped_with_a_warning_and_does_not_poison_state() -> None:
    model = tiny_gpt2()
    opt = adapm.AdaPM(model, lr=3e-3)
    data = batches(96, 6)
    train(model, opt, data[:2])
    weight = model.transformer.h[0].mlp.c_fc.weight
    loss = model(input_ids=data[2], labels=data[2]).loss
    loss.backward()
    weight.grad[0, 0] = float("nan")
    before = weight.clone()
    state_before = {k: v.clone() for k, v in opt.state[weight].items()}
    other_before = model.transformer.h[1].mlp.c_fc.weight.clone()
    with pytest.warns(RuntimeWarning, match=r"transformer\.h\.0\.mlp\.c_fc\.weight"):
        opt.step()
    opt.zero_grad()
    assert torch.equal(before, weight)
    assert all(torch.equal(state_before[k], v) for k, v in opt.state[weight].items())
    assert not torch.equal(other_before, model.transformer.h[1].mlp.c_fc.weight)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train(model, opt, data[3:])
    assert all(torch.isfinite(v).all() for s in opt.state.values() for v in s.values())


def _param_list() -> list[nn.Parameter]:
    return list(nn.Linear(4, 3).parameters())


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(lr=-1.0), ValueError, "Invalid learning rate: -1.0"),
        (dict(betas=(1.0, 0.95)), ValueError, "Invalid beta parameter at index 0: 1.0"),
        (dict(betas=(0.9, -0.1)), ValueError, "Invalid beta parameter at index 1"),
        (dict(eps=-1e-8), ValueError, "Invalid epsilon value"),
        (dict(weight_decay=-0.1), ValueError, "Invalid weight_decay value"),
        (dict(rank_ratio=0.0), ValueError, "Invalid rank_ratio"),
        (dict(rank_ratio=1.5), ValueError, "Invalid rank_ratio"),
        (dict(second_moment="diag"), ValueError, "Invalid second_moment policy: 'diag'"),
        (dict(tracker="svd"), ValueError, "Invalid tracker: 'svd'"),
        (dict(correction="yes"), ValueError, "Invalid correction: 'yes'"),
        (dict(refresh_every=0), ValueError, "Invalid refresh_every"),
        (dict(update_clip=-1.0), ValueError, "Invalid update_clip"),
        (dict(momentum=0.9), TypeError, "unexpected keyword argument 'momentum'"),
        (dict(rules=[(".", "full")]), ValueError, "rules need parameter names"),
        (dict(lr="1e-3"), TypeError, "lr must be a float"),
        (dict(fused="yes"), TypeError, "Invalid fused: 'yes'"),
        (dict(state_dtype="int4"), ValueError, r"Invalid state_dtype: 'int4'; expected one of \('fp32', 'bf16', 'int8"),
    ],
)
def test_bad_hyperparameters(kwargs: dict, error: type[Exception], match: str) -> None:
    kwargs = {"lr": 1e-3, **kwargs}
    with pytest.raises(error, match=match):
        adapm.AdaPM(_param_list(), **kwargs)


def test_bad_groups_and_rules() -> None:
    layer = nn.Linear(4, 3)
    with pytest.raises(ValueError, match=r"Invalid momentum policy in param group 0: 'half'"):
        adapm.AdaPM([{"params": [layer.weight], "momentum": "half"}], lr=1e-3)
    with pytest.raises(ValueError, match=r"lowrank' needs a matrix, but parameter 'bias'"):
        adapm.AdaPM([{"params": [layer.bias], "momentum": "lowrank", "names": ["bias"]}], lr=1e-3)
    with pytest.raises(ValueError, match=r"lowrank' needs a matrix, but parameter 'transformer.h.0.ln_1.weight'"):
        adapm.AdaPM(tiny_gpt2(), lr=1e-3, rules=[(r"ln_1", "lowrank")])
    with pytest.raises(ValueError, match="unknown keys"):
        adapm.AdaPM([{"params": [layer.weight], "lr_scale": 2.0}], lr=1e-3)
    with pytest.raises(ValueError, match="Invalid rule pattern"):
        adapm.AdaPM(tiny_gpt2(), lr=1e-3, rules=[("(", "full")])
    with pytest.raises(ValueError, match="Invalid momentum policy in rule"):
        adapm.AdaPM(tiny_gpt2(), lr=1e-3, rules=[("wte", "some")])
    with pytest.raises(ValueError, match="unknown policy keys"):
        adapm.AdaPM(tiny_gpt2(), lr=1e-3, rules=[("wte", {"rank": 3})])
    with pytest.raises(TypeError, match="rules must be a list"):
        adapm.AdaPM(tiny_gpt2(), lr=1e-3, rules="wte")
    with pytest.raises(ValueError, match="Invalid rank_ratio in param group 0"):
        adapm.AdaPM([{"params": [layer.weight], "rank_ratio": 2}], lr=1e-3)


def test_sparse_and_complex_are_rejected() -> None:
    emb = nn.Embedding(10, 4, sparse=True)
    with pytest.raises(ValueError, match="sparse=True"):
        adapm.AdaPM(emb, lr=1e-3)
    opt = adapm.AdaPM(emb.parameters(), lr=1e-3)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(TypeError, match=r"sparse gradients \(parameter 'param_groups\[0\]\[0\]'\)"):
        opt.step()
    z = nn.Parameter(torch.zeros(3, dtype=torch.complex64))
    with pytest.raises(ValueError, match="complex parameters"):
        adapm.AdaPM([z], lr=1e-3)


# ------------------------------------------------------------------ faults found by hostile inputs


def _step_with_random_grads(opt: torch.optim.Optimizer, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for group in opt.param_groups:
        for p in group["params"]:
            p.grad = torch.randn(p.shape, generator=g)
    opt.step()


@pytest.mark.parametrize("fused", [False, True])
def test_deepcopy_and_pickle_round_trip_then_step(fused: bool) -> None:
    import copy
    import pickle

    model = tiny_gpt2()
    opt = adapm.AdaPMMini(model, lr=1e-3, fused=fused)
    train(model, opt, batches(96, 1))
    copies = [copy.deepcopy(opt), copy.deepcopy((model, opt))[1], pickle.loads(pickle.dumps(opt))]
    for clone in copies:
        assert clone.fused == opt.fused
        _step_with_random_grads(clone)
        assert all(s["step"].item() == 2 for s in clone.state.values())
    # The copies step the same way as the original does.
    _step_with_random_grads(opt)
    for a, b in zip(opt.param_groups, copies[0].param_groups):
        assert all(torch.equal(x, y) for x, y in zip(a["params"], b["params"]))


def test_zero_size_parameters_step_as_in_torch_adamw() -> None:
    params = [nn.Parameter(torch.empty(0, 5)), nn.Parameter(torch.empty(0))]
    low = nn.Parameter(torch.empty(0, 5))
    opt = adapm.AdaPM([{"params": params}, {"params": [low], "momentum": "lowrank"}], lr=1e-3)
    ref = torch.optim.AdamW([nn.Parameter(torch.empty(0, 5))], lr=1e-3)
    for o in (opt, ref):
        _step_with_random_grads(o)
        _step_with_random_grads(o)
    assert [s["step"].item() for s in opt.state.values()] == [2.0, 2.0, 2.0]
    assert all(s["step"].item() == 2.0 for s in ref.state.values())
    layer = nn.Sequential(nn.Linear(8, 0), nn.Linear(8, 4))
    for cls in (adapm.AdaPM, adapm.AdaPMMini):
        opt = cls(layer, lr=1e-3)
        layer[1](layer[0](torch.randn(2, 8)).sum() + torch.randn(2, 8)).sum().backward()
        opt.step()
        assert all(torch.isfinite(p).all() for p in layer.parameters())


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("tracker", ["power", "gd", "fixed"])
def test_huge_finite_gradients_never_poison_parameters_or_state(tracker: str, foreach: bool) -> None:
    torch.manual_seed(0)
    weight = nn.Parameter(torch.randn(48, 40))
    vector = nn.Parameter(torch.randn(40))
    opt = adapm.AdaPM(
        [{"params": [weight], "momentum": "lowrank"}, {"params": [vector]}], lr=1e-3, tracker=tracker, refresh_every=3,
        foreach=foreach,
    )  # fmt: skip
    # Below the bound where g^2 overflows, the step runs (and tracking must stay finite); above it, the
    # parameter is skipped like a non-finite one, naming it.
    for scale, skipped in ((1.0, False), (1e17, False), (1e20, True), (1e30, True), (1.0, False), (1e17, False)):
        weight.grad = torch.randn(48, 40) * scale
        vector.grad = torch.randn(40)
        before = {k: v.clone() for k, v in opt.state[weight].items()}
        if skipped:
            with pytest.warns(RuntimeWarning, match=r"param_groups\[0\]\[0\]"):
                opt.step()
            assert opt.skipped_params == 1
            assert all(torch.equal(before[k], v) for k, v in opt.state[weight].items())
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                opt.step()
            assert opt.skipped_params == 0
        for p in (weight, vector):
            assert torch.isfinite(p).all()
            assert all(torch.isfinite(v).all() for v in opt.state[p].values())


@pytest.mark.parametrize("foreach", [False, True])
def test_huge_gradients_on_gpt2_keep_every_optimizer_finite(foreach: bool) -> None:
    data = batches(96, 10)
    for cls in (adapm.AdaPM, adapm.AdaPMMini):
        model = tiny_gpt2()
        opt = cls(model, lr=1e-3, foreach=foreach)
        for x in data:
            model(input_ids=x, labels=x).loss.backward()
            for p in model.parameters():
                p.grad.mul_(1e25)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                opt.step()
            opt.zero_grad()
        assert all(torch.isfinite(p).all() for p in model.parameters())
        assert all(torch.isfinite(v).all() for s in opt.state.values() for v in s.values())


def test_loaded_hyperparameters_are_validated() -> None:
    model = tiny_gpt2()
    opt = adapm.AdaPM(model, lr=1e-3)
    train(model, opt, batches(96, 1))
    sd = opt.state_dict()
    sd["param_groups"][3]["betas"] = (2.0, 0.5)
    fresh = adapm.AdaPM(model, lr=1e-3)
    with pytest.raises(ValueError, match=r"Invalid beta parameter at index 0 in loaded param group 3: 2\.0"):
        fresh.load_state_dict(sd)
    assert not fresh.state


def test_a_parameter_reshaped_after_construction_is_named() -> None:
    model = tiny_gpt2()
    opt = adapm.AdaPM(model, lr=1e-3)
    weight = model.transformer.h[0].mlp.c_fc.weight
    weight.data = weight.data.reshape(-1, 8)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    with pytest.raises(RuntimeError, match=r"'transformer\.h\.0\.mlp\.c_fc\.weight' changed shape from .* rebuild"):
        opt.step()


@pytest.mark.parametrize("foreach", [False, True])
def test_policy_keys_edited_in_param_groups_take_effect_or_fail_clearly(foreach: bool) -> None:
    """Edits of a group's policy keys after construction are followed, as torch follows edits of ``lr``:
    before the first step any policy, afterwards what the state allows (an lr ratio); a policy that
    needs other state is refused by name, and the step changes nothing."""
    data = batches(96, 4)
    model, ref_model = tiny_llama(), tiny_llama()
    opt = adapm.AdaPMMini(model, lr=1e-2, foreach=foreach)
    for group in opt.param_groups:
        if "q_proj" in group["names"][0]:
            group["momentum"] = "none"
    ref = adapm.AdaPMMini(ref_model, lr=1e-2, foreach=foreach, rules=[(r"q_proj", "none")])
    assert opt.partition_report().state_bytes == ref.partition_report().state_bytes
    train(model, opt, data[:2])
    train(ref_model, ref, data[:2])
    q = model.model.layers[0].self_attn.q_proj.weight
    assert "lowrank_L" not in opt.state[q] and adapm.state_bytes(opt) == adapm.state_bytes(ref)
    for group in opt.param_groups:  # with state: a new lr ratio is followed at once
        group["lr_ratio"] = 2.0
    for group in ref.param_groups:
        group["lr"] *= 2.0
    train(model, opt, data[2:])
    train(ref_model, ref, data[2:])
    assert max_rel_diff(model, ref_model) < 1e-6
    opt.load_state_dict(opt.state_dict())  # its own checkpoint loads back

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for group in opt.param_groups:
        if "q_proj" in group["names"][0]:
            group["momentum"] = "lowrank"
    match = r"param group \d+ \('model\.layers\.0\.self_attn\.q_proj\.weight'\) was edited after its state was " \
        r"created \(momentum 'none' -> 'lowrank'\).*build a new optimizer"
    with pytest.raises(ValueError, match=match):
        train(model, opt, data[:1])
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    with pytest.raises(ValueError, match=match):  # nor can a checkpoint of the edited groups be written
        opt.state_dict()


def test_rank_mismatch_on_load_names_the_differing_field() -> None:
    model = tiny_gpt2(n_embd=64)
    opt = adapm.AdaPM(model, lr=1e-3)
    train(model, opt, batches(96, 1))
    other = adapm.AdaPM(model, lr=1e-3, rank_ratio=0.5)
    with pytest.raises(ValueError, match=r"segment '.*c_attn\.weight\[Q\]' rank is 4 in the checkpoint vs 32 here"):
        other.load_state_dict(opt.state_dict())


# ------------------------------------------------------------------ clip scope and block-wise lr


def test_defaults_reproduce_torch_adamw_on_full_blocks_bit_for_bit() -> None:
    """The clip's default scope is the low-rank blocks: full/full groups are AdamW at the defaults."""
    data = batches(96, 20)
    ref, ours = tiny_gpt2(), tiny_gpt2()
    adamw = torch.optim.AdamW(_decay_groups(ref), lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    opt = adapm.AdaPM(_decay_groups(ours), lr=3e-3)
    assert train(ref, adamw, data) == train(ours, opt, data)
    assert all(torch.equal(a, b) for a, b in zip(ref.parameters(), ours.parameters()))


def _one_update(clip_scope: str, momentum: str, **kwargs: object) -> float:
    p = nn.Parameter(torch.zeros(4, 8))
    opt = adapm.AdaPM(
        [{"params": [p], "momentum": momentum, "second_moment": "block", "weight_decay": 0.0}],
        lr=1.0, clip_scope=clip_scope, **kwargs,
    )  # fmt: skip
    grad = torch.full((4, 8), 0.01)
    grad[0, 0] = 10.0  # one entry far above its block's root mean square: |u| >> 1 there
    p.grad = grad
    opt.step()
    return float(p.detach().abs().max())


def test_clip_scope() -> None:
    assert _one_update("lowrank", "none") > 2.0  # a 'none' block is not clipped by default
    assert _one_update("all", "none") == pytest.approx(1.0)
    assert _one_update("lowrank", "lowrank") <= 1.0 + 1e-6
    with pytest.raises(ValueError, match="Invalid clip_scope: 'some'"):
        adapm.AdaPM([nn.Parameter(torch.zeros(2))], lr=1.0, clip_scope="some")


def test_a_rule_sets_a_blocks_own_clip_whatever_the_scope() -> None:
    model = tiny_gpt2()
    opt = adapm.AdaPM(model, lr=1e-3, rules=[adapm.Rule(r"\.wte\.", update_clip=0.5),
                                               (r"c_attn\.weight\[Q\]", {"update_clip": None})])  # fmt: skip
    wte = next(g for g in opt.param_groups if g["names"] == ["transformer.wte.weight"])
    assert wte["update_clip"] == 0.5 and wte["clip_scope"] == "all"
    c_attn = opt.layout(model.transformer.h[0].attn.c_attn.weight)
    assert [(s.clip_set, s.clip) for s in c_attn.segments] == [(True, None), (False, None), (False, None)]
    train(model, opt, batches(96, 2))


def test_blockwise_lr_ratios_by_role_and_in_fused_segments() -> None:
    model = tiny_gpt2()
    opt = adapm.AdaPMMini(model, lr=1e-3, lr_ratios="blockwise")
    ratio = {g["names"][0]: g.get("lr_ratio") for g in opt.param_groups}
    assert ratio["transformer.wte.weight"] == 10.0 and ratio["transformer.h.0.ln_1.weight"] == 1.0
    assert ratio["transformer.h.0.mlp.c_fc.weight"] == 6.0 and ratio["transformer.h.0.attn.c_proj.weight"] == 4.0
    fused = opt.layout(model.transformer.h[0].attn.c_attn.weight)
    assert [s.lr_ratio for s in fused.segments] == [8.0, 8.0, 4.0]
    custom = adapm.AdaPM(model, lr=1e-3, lr_ratios={"mlp": 2.0})
    assert {g.get("lr_ratio") for g in custom.param_groups if g["role"] == "mlp"} == {2.0}
    with pytest.raises(ValueError, match=r"unknown role\(s\) \['ffn'\]"):
        adapm.AdaPM(model, lr=1e-3, lr_ratios={"ffn": 2.0})
    with pytest.raises(ValueError, match="Invalid lr_ratios: 'sharp'"):
        adapm.AdaPM(model, lr=1e-3, lr_ratios="sharp")
    with pytest.raises(ValueError, match="lr_ratios need parameter names"):
        adapm.AdaPM(model.parameters(), lr=1e-3, lr_ratios="blockwise")


def test_blockwise_lr_equals_adamw_with_per_role_lrs_under_a_scheduler() -> None:
    """On full/full blocks, lr_ratios is AdamW with each role's lr multiplied, and a scheduler keeps
    the ratios (it scales the base lr; the ratio applies at every step)."""
    data = batches(96, 12)
    ref, ours = tiny_llama(), tiny_llama()
    opt = adapm.AdaPM(ours, lr=1e-3, rules=[(".", "full")], lr_ratios="blockwise")
    groups = []
    for g, p_ref in zip(opt.param_groups, ref.parameters()):
        groups.append({"params": [p_ref], "lr": 1e-3 * adapm.BLOCKWISE_LR_RATIOS[g["role"]],
                       "weight_decay": g["weight_decay"]})  # fmt: skip
    adamw = torch.optim.AdamW(groups, lr=1e-3, betas=(0.9, 0.95))
    schedule = lambda step: 1.0 / (1 + step)  # noqa: E731
    train(ref, adamw, data, torch.optim.lr_scheduler.LambdaLR(adamw, schedule))
    train(ours, opt, data, torch.optim.lr_scheduler.LambdaLR(opt, schedule))
    assert max_rel_diff(ref, ours) < 1e-5
    assert all(g["lr"] == pytest.approx(1e-3 / 13) for g in opt.param_groups)  # base lr, scheduled
    sd = opt.state_dict()
    assert {g.get("lr_ratio") for g in sd["param_groups"]} == {10.0, 8.0, 6.0, 4.0, 1.0}


# ------------------------------------------------------------------ the grouped (multi-tensor) step


@pytest.mark.parametrize("cls", [adapm.AdaPM, adapm.AdaPMMini])
@pytest.mark.parametrize("make", [tiny_gpt2, tiny_llama])
def test_grouped_step_equals_the_per_block_reference(cls: type[adapm.AdaPM], make) -> None:
    """foreach=True (the accelerator default: stacked low-rank tracking, grouped block second moments,
    foreach tails) against the per-block path, to float32 rounding (batched and single matmuls and QR
    may round differently), for every tracker, with the clip on every block too, block-wise lrs,
    refreshes and bias-corrected steps of several ages."""
    data = batches(96, 8)
    settings = ({}, {"clip_scope": "all", "lr_ratios": "blockwise", "refresh_every": 3}, {"tracker": "gd"},
                {"tracker": "fixed", "refresh_every": 4})  # fmt: skip
    for kwargs in settings:
        ref, ours = make(), make()
        opt_ref = cls(ref, lr=2e-3, foreach=False, **kwargs)
        opt = cls(ours, lr=2e-3, foreach=True, **kwargs)
        # The gd tracker's ten alternating steps amplify round-off (1e-6 per step, tested alone in
        # tests/policies/test_trackers.py); the others stay at float32 rounding.
        tol = 2e-3 if kwargs.get("tracker") == "gd" else 1e-5
        assert train(ref, opt_ref, data) == pytest.approx(train(ours, opt, data), rel=tol / 10)
        assert max_rel_diff(ref, ours) < tol, kwargs
        if "tracker" in kwargs:
            continue
        for p_ref, p in zip(ref.parameters(), ours.parameters()):
            for key, value in opt.state[p].items():
                expected = opt_ref.state[p_ref][key]
                if key == "lowrank_L" and kwargs.get("tracker", "power") != "gd":
                    # An orthonormal basis is unique up to column signs: compare the projectors.
                    value, expected = value @ value.mT, expected @ expected.mT
                torch.testing.assert_close(value, expected, rtol=1e-4, atol=1e-6, msg=f"{key} {kwargs}")


def test_grouped_full_blocks_reproduce_torch_adamw() -> None:
    data = batches(96, 10)
    ref, ours = tiny_gpt2(), tiny_gpt2()
    adamw = torch.optim.AdamW(_decay_groups(ref), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1, foreach=False)
    opt = adapm.AdaPM(_decay_groups(ours), lr=3e-3, foreach=True)
    assert train(ref, adamw, data) == train(ours, opt, data)
    assert all(torch.equal(a, b) for a, b in zip(ref.parameters(), ours.parameters()))
    with pytest.raises(TypeError, match="Invalid foreach: 'yes'"):
        adapm.AdaPM(_decay_groups(ours), lr=1e-3, foreach="yes")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- bf16 state


@pytest.mark.parametrize("cls", [adapm.AdaPM, adapm.AdaPMMini])
@pytest.mark.parametrize("foreach", [False, True])
def test_bf16_state_halves_the_large_state_and_trains_like_fp32(cls: type[adapm.AdaPM], foreach: bool) -> None:
    """state_dtype="bf16": full momentum, low-rank factors and full second moment in bfloat16, the rest
    float32; half the bytes of those tensors; the same training curve to about 1e-3 over 8 steps."""
    data = batches(96, 8)
    ref, ours = tiny_llama(), tiny_llama()
    opt_ref = cls(ref, lr=3e-3, foreach=foreach)
    opt = cls(ours, lr=3e-3, foreach=foreach, state_dtype="bf16")
    losses_ref, losses = train(ref, opt_ref, data), train(ours, opt, data)
    assert losses == pytest.approx(losses_ref, abs=2e-3)
    low = {"exp_avg", "lowrank_L", "lowrank_R"} | ({"exp_avg_sq"} if cls is adapm.AdaPM else set())
    for state in opt.state.values():
        for key, value in state.items():
            assert value.dtype == (torch.bfloat16 if key in low else torch.float32), key
    big = sum(v.numel() for s in opt.state.values() for k, v in s.items() if k in low)
    assert adapm.state_bytes(opt_ref) - adapm.state_bytes(opt) == 2 * big
    assert opt.partition_report().state_bytes == adapm.state_bytes(opt)  # the report counts what is stored


@pytest.mark.parametrize("cls", [adapm.AdaPM, adapm.AdaPMMini])
@pytest.mark.parametrize("foreach", [False, True])
def test_int8_state_stores_codes_and_block_scales_and_trains_like_fp32(cls: type[adapm.AdaPM], foreach: bool) -> None:
    """state_dtype="int8": each large state tensor as 8-bit codes (one byte per entry) plus a float32
    scale per block of at most 256 entries of a row; 1-D state of a row-sharded parameter stays float32;
    the same training curve to about 1e-3 over 8 steps."""
    data = batches(96, 8)
    ref, ours = tiny_llama(), tiny_llama()
    opt_ref = cls(ref, lr=3e-3, foreach=foreach)
    opt = cls(ours, lr=3e-3, foreach=foreach, state_dtype="int8")
    losses_ref, losses = train(ref, opt_ref, data), train(ours, opt, data)
    assert losses == pytest.approx(losses_ref, abs=2e-3)
    low = {"exp_avg", "lowrank_L", "lowrank_R"} | ({"exp_avg_sq"} if cls is adapm.AdaPM else set())
    saved = 0
    for state in opt.state.values():
        for key, value in state.items():
            if key in low and value.dim() >= 2:
                assert value.dtype == torch.uint8, key
                scales = state[f"{key}_absmax"]
                assert scales.dtype == torch.float32
                assert scales.shape == (*value.shape[:-1], value.shape[-1] // min(256, value.shape[-1]))
                saved += 3 * value.numel() - 4 * scales.numel()
            elif not key.endswith("_absmax"):
                assert value.dtype == torch.float32, key
    assert saved > 0 and adapm.state_bytes(opt_ref) - adapm.state_bytes(opt) == saved
    assert opt.partition_report().state_bytes == adapm.state_bytes(opt)  # the report counts what is stored


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("state_dtype", ["bf16", "int8"])
def test_low_precision_state_resumes_bit_identically(state_dtype: str, foreach: bool) -> None:
    """The stochastic rounding is seeded by parameter, key and step: a resumed run equals a straight one."""
    data = batches(96, 8)
    kwargs = dict(lr=3e-3, refresh_every=3, state_dtype=state_dtype, foreach=foreach)
    straight = tiny_gpt2()
    train(straight, adapm.AdaPMMini(straight, **kwargs), data)
    first = tiny_gpt2()
    opt_a = adapm.AdaPMMini(first, **kwargs)
    train(first, opt_a, data[:4])
    ckpt = torch.load(_state_bytes_io({"model": first.state_dict(), "optim": opt_a.state_dict()}), weights_only=True)
    resumed = tiny_gpt2(seed=123)
    resumed.load_state_dict(ckpt["model"])
    opt_b = adapm.AdaPMMini(resumed, **kwargs)
    opt_b.load_state_dict(ckpt["optim"])
    assert opt_b.foreach is foreach  # loading keeps the optimizer's own step settings
    stored = torch.bfloat16 if state_dtype == "bf16" else torch.uint8
    assert opt_b.state[resumed.transformer.h[0].mlp.c_fc.weight]["lowrank_L"].dtype == stored
    train(resumed, opt_b, data[4:])
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_a_checkpoint_of_another_state_dtype_is_refused_or_converted() -> None:
    model = tiny_gpt2()
    opt = adapm.AdaPM(model, lr=1e-3)
    train(model, opt, batches(96, 2))
    saved = opt.state_dict()
    low = adapm.AdaPM(model, lr=1e-3, state_dtype="bf16")
    with pytest.raises(ValueError, match=r"state_dtype='fp32', this optimizer as 'bf16'.*convert_state_dtype=True"):
        low.load_state_dict(saved)
    assert not low.state  # nothing loaded
    low.load_state_dict(saved, convert_state_dtype=True)
    weight = model.transformer.h[0].mlp.c_fc.weight
    assert low.state[weight]["exp_avg_sq"].dtype == torch.bfloat16
    assert torch.equal(low.state[weight]["exp_avg_sq"], opt.state[weight]["exp_avg_sq"].to(torch.bfloat16))
    assert low.param_groups[0]["state_dtype"] == "bf16"
    train(model, low, batches(96, 1))
    back = adapm.AdaPM(model, lr=1e-3)
    back.load_state_dict(low.state_dict(), convert_state_dtype=True)
    assert back.state[weight]["exp_avg_sq"].dtype == torch.float32


def test_an_int8_checkpoint_is_refused_or_converted_both_ways() -> None:
    """int8 state converts to and from fp32 and bf16: decoded to float32, stored again rounded to nearest
    (to 8 bits: within half a code step of the value, relative to its block's scale)."""
    model = tiny_gpt2()
    opt = adapm.AdaPM(model, lr=1e-3)
    train(model, opt, batches(96, 2))
    weight = model.transformer.h[0].mlp.c_fc.weight
    low = adapm.AdaPM(model, lr=1e-3, state_dtype="int8")
    with pytest.raises(ValueError, match=r"state_dtype='fp32', this optimizer as 'int8'.*convert_state_dtype=True"):
        low.load_state_dict(opt.state_dict())
    low.load_state_dict(opt.state_dict(), convert_state_dtype=True)
    assert set(low.state[weight]) == {"step", "exp_avg_sq", "exp_avg_sq_absmax", "lowrank_L", "lowrank_L_absmax",
                                      "lowrank_R", "lowrank_R_absmax"}  # fmt: skip
    for key in ("exp_avg_sq", "lowrank_L"):
        exact, codes = opt.state[weight][key], low.state[weight][key]
        scales = low.state[weight][f"{key}_absmax"]
        assert codes.dtype == torch.uint8 and torch.equal(scales, exact.abs().amax(-1, keepdim=True).expand_as(scales))
        back = adapm.AdaPM(model, lr=1e-3)
        back.load_state_dict(low.state_dict(), convert_state_dtype=True)
        assert set(back.state[weight]) == {"step", "exp_avg_sq", "lowrank_L", "lowrank_R"}
        decoded = back.state[weight][key]
        assert decoded.dtype == torch.float32
        # the tables' codes are at most 1/15 of the value apart (1/8 below the top power of two)
        assert bool(((decoded - exact).abs() <= exact.abs() / 15 + 1e-6 * scales.amax()).all())
    train(model, low, batches(96, 1))
    half = adapm.AdaPM(model, lr=1e-3, state_dtype="bf16")
    half.load_state_dict(low.state_dict(), convert_state_dtype=True)
    assert half.state[weight]["lowrank_R"].dtype == torch.bfloat16 and "lowrank_R_absmax" not in half.state[weight]
    again = adapm.AdaPM(model, lr=1e-3, state_dtype="int8")
    again.load_state_dict(half.state_dict(), convert_state_dtype=True)
    train(model, again, batches(96, 1))
    assert torch.isfinite(weight).all()


def test_a_rule_sets_the_state_dtype_of_its_parameters() -> None:
    """state_dtype per rule: the matched parameters store their large state so, the rest as the optimizer
    says; a fused parameter takes one state_dtype for all its segments, and mixed rules are an error."""
    model = tiny_gpt2()
    rules = [(r"mlp\.c_fc", {"state_dtype": "int8"}), (r"c_attn\.weight\[[QKV]\]", {"state_dtype": "bf16"})]
    opt = adapm.AdaPMMini(model, lr=1e-3, rules=rules)
    train(model, opt, batches(96, 2))
    block = model.transformer.h[0]
    assert opt.state[block.mlp.c_fc.weight]["lowrank_L"].dtype == torch.uint8
    assert opt.state[block.mlp.c_fc.bias]["exp_avg"].dtype == torch.float32  # 1-D: stays float32
    assert opt.state[block.attn.c_attn.weight]["exp_avg"].dtype == torch.bfloat16
    assert opt.state[block.mlp.c_proj.weight]["lowrank_L"].dtype == torch.float32  # the optimizer's fp32
    assert opt.partition_report().state_bytes == adapm.state_bytes(opt)
    with pytest.raises(ValueError, match=r"c_attn.weight': its state is one tensor per key.*one state_dtype"):
        adapm.AdaPMMini(model, lr=1e-3, rules=[(r"c_attn\.weight\[V\]", {"state_dtype": "bf16"})])
    with pytest.raises(ValueError, match=r"Invalid state_dtype in rule 'c_fc': 'int4'"):
        adapm.AdaPMMini(model, lr=1e-3, rules=[("c_fc", {"state_dtype": "int4"})])


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 1e30])
@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("state_dtype", ["bf16", "int8"])
def test_one_bad_batch_cannot_poison_low_precision_state(bad: float, foreach: bool, state_dtype: str) -> None:
    model = tiny_gpt2()
    opt = adapm.AdaPMMini(model, lr=3e-3, state_dtype=state_dtype, foreach=foreach)
    data = batches(96, 5)
    train(model, opt, data[:2])
    model(input_ids=data[2], labels=data[2]).loss.backward()
    for p in model.parameters():
        p.grad.mul_(bad)  # every gradient: inf, NaN, or 1e30 (its square overflows float32)
    before = {p: {k: v.clone() for k, v in opt.state[p].items()} for p in model.parameters()}
    with pytest.warns(RuntimeWarning, match="skipped"):
        opt.step()
    opt.zero_grad()
    for p in model.parameters():
        assert all(torch.equal(before[p][k], v) for k, v in opt.state[p].items())
    train(model, opt, data[3:])
    assert all(torch.isfinite(v).all() for s in opt.state.values() for v in s.values())


@pytest.mark.parametrize("make", [tiny_gpt2, tiny_llama])
def test_named_param_groups_get_the_partition_and_keep_their_settings(make) -> None:
    """torch's named param groups (``{"params": [(name, p), ...]}``), e.g. weight decay for matrices
    only, get the same partition as ``model.named_parameters()``, and each group's settings apply."""
    data = batches(96, 8)
    ref, ours = make(), make()
    # The same parameter order (matrices, then vectors): a low-rank tracker's start depends on it.
    order = sorted(ref.named_parameters(), key=lambda np: np[1].dim() < 2)
    opt_ref = adapm.AdaPMMini(order, lr=3e-3, weight_decay=0.1)  # the partition exempts vectors from decay
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "parameters without names" warning
        opt = adapm.AdaPMMini(
            [
                {"params": [(n, p) for n, p in ours.named_parameters() if p.dim() >= 2], "weight_decay": 0.1},
                {"params": [(n, p) for n, p in ours.named_parameters() if p.dim() < 2], "weight_decay": 0.0},
            ],
            lr=3e-3,
        )
    assert opt.partition_report().state_bytes == opt_ref.partition_report().state_bytes
    assert {g["names"][0]: g["momentum"] for g in opt.param_groups} == {
        g["names"][0]: g["momentum"] for g in opt_ref.param_groups
    }
    train(ref, opt_ref, data)
    train(ours, opt, data)
    assert max_rel_diff(ref, ours) < 1e-6

    # A group's own settings win over the partition's: here lr and momentum of the vectors' group.
    model = make()
    opt = adapm.AdaPM(
        [
            {"params": [(n, p) for n, p in model.named_parameters() if p.dim() >= 2]},
            {"params": [(n, p) for n, p in model.named_parameters() if p.dim() < 2], "lr": 1e-4, "momentum": "none"},
        ],
        lr=3e-3,
    )
    vectors = [g for g in opt.param_groups if g["role"] == "vector"]
    assert vectors and all(g["lr"] == 1e-4 and g["momentum"] == "none" for g in vectors)
    assert {g["lr"] for g in opt.param_groups if g["role"] != "vector"} == {3e-3}


def test_per_group_scheduler_arguments_reach_the_users_groups_through_user_group() -> None:
    """AdaPM's param groups are the partition's (one per parameter); each records the index of the
    user's group it came from, so per-group scheduler arguments (a list of lr lambdas, OneCycleLR's
    max_lr) map onto them, and LambdaLR's state dict stays loadable."""
    data = batches(96, 4)
    model, ref_model = tiny_llama(), tiny_llama()

    def groups(m: nn.Module, lrs: tuple[float, float]) -> list[dict]:
        return [{"params": [(n, p) for n, p in m.named_parameters() if p.dim() >= 2], "lr": lrs[0]},
                {"params": [(n, p) for n, p in m.named_parameters() if p.dim() < 2], "lr": lrs[1]}]  # fmt: skip

    opt = adapm.AdaPMMini(groups(model, (3e-3, 3e-3)), lr=3e-3)
    assert {g["user_group"] for g in opt.param_groups} == {0, 1} and len(opt.param_groups) > 2
    factors = (lambda step: 1.0, lambda step: 0.25)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, [factors[g["user_group"]] for g in opt.param_groups])
    ref = adapm.AdaPMMini(groups(ref_model, (3e-3, 3e-3 * 0.25)), lr=3e-3)
    train(model, opt, data, scheduler)
    train(ref_model, ref, data)
    assert max_rel_diff(model, ref_model) < 1e-6
    adapm.AdaPMMini(groups(tiny_llama(), (3e-3, 3e-3)), lr=3e-3).load_state_dict(opt.state_dict())
    one_cycle = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=[(1e-3, 1e-4)[g["user_group"]] for g in opt.param_groups], total_steps=10
    )
    assert {g["max_lr"] for g in one_cycle.optimizer.param_groups} == {1e-3, 1e-4}


def test_named_and_unnamed_param_groups_cannot_be_mixed() -> None:
    model = tiny_llama()
    with pytest.raises(ValueError, match="param group 1 has parameters without names"):
        adapm.AdaPM(
            [
                {"params": [(n, p) for n, p in model.named_parameters() if p.dim() >= 2]},
                {"params": [p for p in model.parameters() if p.dim() < 2]},
            ],
            lr=1e-3,
        )


def test_param_groups_may_hold_generators() -> None:
    """As in torch, a group's params may be a generator, named or not (read once)."""
    model = tiny_llama()
    named = adapm.AdaPMMini([{"params": model.named_parameters(), "weight_decay": 0.0}], lr=1e-3)
    reference = adapm.AdaPMMini(model.named_parameters(), lr=1e-3)
    assert named.partition_report().state_bytes == reference.partition_report().state_bytes
    assert all(g["weight_decay"] == 0.0 for g in named.param_groups)
    with pytest.warns(UserWarning, match="without names"):
        plain = adapm.AdaPM([{"params": model.parameters()}], lr=1e-3)
    assert sum(len(g["params"]) for g in plain.param_groups) == len(list(model.parameters()))
