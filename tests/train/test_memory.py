"""Memory accounting: the meta-device count is the real count; paper-scale tables."""

from __future__ import annotations

import warnings

import pytest
import torch

import adapm
from adapm.train.config import OPTIMIZER_NAMES, OptimConfig
from adapm.train.memory import count_state_bytes, format_memory_table, memory_table
from adapm.train.models import build_model
from adapm.train.optimizers import build_optimizer


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
@pytest.mark.parametrize("preset", ["gpt2-1m", "llama-1m"])
def test_meta_count_equals_real_state_after_a_step(name: str, preset: str) -> None:
    meta = build_model(preset, 300, 32, device="meta")
    counted = count_state_bytes(meta, name)
    torch.manual_seed(0)
    real = build_model(preset, 300, 32)
    opt = build_optimizer(real, OptimConfig(optimizer=name))
    x = torch.randint(0, 300, (2, 16))
    real(input_ids=x, labels=x).loss.backward()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt.step()
    assert counted == adapm.state_bytes(opt) > 0


def test_paper_scale_table_beside_table2() -> None:
    rows = {r.optimizer: r for r in memory_table("gpt2-1.5b")}
    assert rows["adamw"].paper_bytes == 12.48e9
    assert rows["adamw"].state_bytes == pytest.approx(12.48e9, rel=0.01)
    assert rows["adam-mini"].ratio_to_adamw == pytest.approx(0.5, abs=0.01)
    assert rows["adapm-mini"].ratio_to_adamw < 0.08
    assert rows["adapm"].state_bytes == pytest.approx(rows["adapm"].paper_bytes, rel=0.05)
    text = format_memory_table("gpt2-1.5b", list(rows.values()))
    assert "paper Table 2" in text and "| adapm-mini |" in text


def test_training_memory_adds_weights_gradients_state_and_activations(capsys: pytest.CaptureFixture[str]) -> None:
    from adapm.cli import main
    from adapm.train.memory import meta_model, training_memory

    rows = training_memory("gpt2-124m", ("adamw", "adapm-mini"), 4, 512, "bf16")
    params = sum(p.numel() for p in meta_model("gpt2-124m").parameters())
    adamw, mini = rows
    assert adamw.weights == adamw.gradients == 2 * params  # bf16
    assert adamw.optimizer_state == 2 * 2 * params + 4 * 148  # torch keeps bf16 moments and a float32 step
    assert mini.optimizer_state < adamw.optimizer_state / 10  # float32 state, but 5% of it
    assert adamw.activations_estimate == mini.activations_estimate > 0
    assert adamw.total == adamw.weights + adamw.gradients + adamw.optimizer_state + adamw.activations_estimate
    assert main(["memory", "--model", "gpt2-124m", "--batch-size", "4", "--seq-len", "512", "--dtype", "bf16",
                 "--optimizers", "adamw,adapm-mini"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "activations counted from the model's forward on the meta device" in out and "| activations |" in out
    assert {r.activations_method for r in rows} == {"counted"}
    assert main(["memory", "--model", "gpt2-124m", "--attention", "eager", "--optimizers", "adamw"]) == 0
    assert "batch 1 x 1024 tokens" in (out := capsys.readouterr().out) and "eager attention's s x s scores" in out
    with pytest.raises(ValueError, match="Invalid --dtype: 'int4'"):
        training_memory("gpt2-124m", ("adamw",), 1, 8, "int4")
    with pytest.raises(ValueError, match="Invalid --attention: 'flash'"):
        training_memory("gpt2-124m", ("adamw",), 1, 8, "bf16", "flash")
    # Eager attention keeps the s x s scores: the gap grows with the square of the sequence length.
    eager = training_memory("gpt2-124m", ("adamw",), 1, 2048, "bf16", "eager")[0].activations_estimate
    sdpa = training_memory("gpt2-124m", ("adamw",), 1, 2048, "bf16", "sdpa")[0].activations_estimate
    assert eager > 2 * sdpa


def _saved_bytes_of_a_real_forward(model: torch.nn.Module, ids: torch.Tensor) -> int:
    """What a real forward and loss on the CPU save for backward: distinct storages, parameters excluded."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, labels=ids)
    return sum(n for ptr, n in storages.items() if ptr not in params)


@pytest.mark.parametrize("family", ["gpt2", "llama", "mixtral"])
def test_counted_activations_are_what_a_real_forward_saves(family: str) -> None:
    import transformers as tf

    from adapm.train.memory import activation_bytes

    def make(attention: str) -> torch.nn.Module:
        if family == "gpt2":
            return tf.GPT2LMHeadModel(tf.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=300, n_positions=256,
                                                    resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                                    attn_implementation=attention))  # fmt: skip
        if family == "mixtral":  # bf16: its grouped expert matmuls run on the meta device in bf16 only
            return tf.MixtralForCausalLM(tf.MixtralConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                                          num_attention_heads=4, num_key_value_heads=2,
                                                          num_local_experts=4, vocab_size=300,
                                                          attn_implementation=attention)).bfloat16()  # fmt: skip
        return tf.LlamaForCausalLM(tf.LlamaConfig(hidden_size=64, intermediate_size=172, num_hidden_layers=2,
                                                  num_attention_heads=4, num_key_value_heads=2, vocab_size=300,
                                                  attn_implementation=attention))  # fmt: skip

    torch.manual_seed(0)
    ids = torch.randint(0, 300, (2, 256))
    for attention in ("eager", "sdpa"):
        real = make(attention).train()
        with torch.device("meta"):
            meta = make(attention)
        counted, method = activation_bytes(meta, 2, 256, attention)
        measured = _saved_bytes_of_a_real_forward(real, ids)
        assert method == "counted"
        if attention == "eager":  # the meta device runs this very code: the same tensors
            assert counted == measured, (family, counted, measured)
        else:  # the CPU's fused sdpa kernel keeps its own extras (log-sum-exp) and not the eager code's others
            assert abs(counted - measured) < 0.15 * measured, (family, counted, measured)


def test_a_forward_that_cannot_run_on_meta_falls_back_to_the_formula(tmp_path) -> None:
    import json

    from adapm.train.memory import training_memory

    full, _ = FAMILY_CONFIGS["t5-base"]  # T5's forward needs a decoder_start_token_id this config lacks
    path = tmp_path / "config.json"
    path.write_text(json.dumps(full))
    eager, sdpa = (training_memory(str(path), ("adapm-mini",), 1, 4096, "bf16", a)[0] for a in ("eager", "sdpa"))
    assert eager.activations_method == sdpa.activations_method == "formula"
    assert eager.activations_estimate > sdpa.activations_estimate > 1e9
    mixtral, _ = FAMILY_CONFIGS["mixtral-8x7b"]  # fp32 experts do not run on the meta device, bf16 ones do
    path.write_text(json.dumps(mixtral))
    methods = [training_memory(str(path), ("adamw",), 1, 512, d)[0].activations_method for d in ("fp32", "bf16")]
    assert methods == ["formula", "counted"]


# Real-size configs as a user's config.json would give them (no weights needed), and a tiny version of each.
FAMILY_CONFIGS = {
    "pythia-1b": ({"model_type": "gpt_neox", "hidden_size": 2048, "num_hidden_layers": 16, "num_attention_heads": 8,
                   "intermediate_size": 8192, "vocab_size": 50304, "rotary_pct": 0.25},
                  {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64,
                   "vocab_size": 80}),
    "phi-3-mini": (
        {"model_type": "phi3", "hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 32,
         "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32064, "pad_token_id": 0},
        {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
         "intermediate_size": 64, "vocab_size": 80},
    ),
    "mixtral-8x7b": ({"model_type": "mixtral", "hidden_size": 4096, "intermediate_size": 14336,
                      "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                      "num_local_experts": 8, "num_experts_per_tok": 2, "vocab_size": 32000},
                     {"hidden_size": 32, "intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 4,
                      "num_key_value_heads": 2, "num_local_experts": 4, "vocab_size": 80}),
    "t5-base": ({"model_type": "t5", "d_model": 768, "d_ff": 3072, "d_kv": 64, "num_layers": 12, "num_heads": 12,
                 "vocab_size": 32128},
                {"d_model": 32, "d_ff": 64, "d_kv": 8, "num_layers": 2, "num_heads": 4, "vocab_size": 80}),
}  # fmt: skip


@pytest.mark.parametrize("family", sorted(FAMILY_CONFIGS))
def test_memory_of_a_config_json_is_what_a_real_step_allocates(family: str, tmp_path) -> None:
    import json

    from transformers import AutoConfig

    from adapm.train.memory import meta_model, model_from_config

    full, tiny = FAMILY_CONFIGS[family]
    path = tmp_path / "config.json"
    path.write_text(json.dumps(full))
    rows = {r.optimizer: r for r in memory_table(str(path), ("adamw", "adapm-mini"))}
    assert rows["adamw"].state_bytes > 1e9  # counted at full size, on the meta device
    assert rows["adapm-mini"].ratio_to_adamw < 0.08  # every matrix recognised, fused ones split
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "config.json").write_text(json.dumps({**full, **tiny}))
    meta = meta_model(str(tmp_path / "dir"))
    torch.manual_seed(0)
    real = model_from_config(AutoConfig.from_pretrained(str(tmp_path / "dir")), device="cpu")
    for name in ("adamw", "adapm", "adapm-mini"):
        counted = count_state_bytes(meta, name)
        opt = build_optimizer(real, OptimConfig(optimizer=name, lr=1e-3))
        for p in real.parameters():
            p.grad = torch.randn_like(p)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            opt.step()
        assert adapm.state_bytes(opt) == counted, (family, name)
        opt.zero_grad()
    with pytest.raises(ValueError, match=r"config\.json file"):
        meta_model(str(tmp_path / "missing"))


def test_a_baseline_that_fails_on_the_model_is_left_out_by_name(
    tmp_path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The official Adam-mini (1.1.1) fails on DeepSeek-V2's latent attention: `adapm memory` counts
    the others and says which one it left out and why, in one line."""
    import transformers as T

    from adapm.cli import main

    T.DeepseekV2Config(
        hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, vocab_size=80, q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8,
        qk_nope_head_dim=16, v_head_dim=12, n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1,
    ).save_pretrained(tmp_path)  # fmt: skip
    config = str(tmp_path / "config.json")
    with pytest.warns(RuntimeWarning, match=r"adam-mini left out: the adam-mini package fails on this model \("):
        rows = memory_table(config, ("adamw", "adam-mini", "adapm-mini"))
    assert [r.optimizer for r in rows] == ["adamw", "adapm-mini"]
    assert main(["memory", "--model", config, "--optimizers", "adamw,adam-mini,adapm-mini", "--batch-size", "2"]) == 0
    out, err = capsys.readouterr()
    assert "| adapm-mini |" in out and "| adam-mini |" not in out
    assert [line for line in err.splitlines() if "left out" in line] == [
        next(line for line in err.splitlines() if line.startswith("adapm memory: adam-mini left out: the adam-mini"))
    ]
