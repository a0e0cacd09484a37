"""Drop-in use with Hugging Face's Trainer, TRL's SFTTrainer and Accelerate: train, checkpoint, resume with
the optimizer state restored (the resumed run ends where the uninterrupted one does)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import adapm

from conftest import tiny_llama

pytest.importorskip("accelerate")


class _Counting(torch.utils.data.Dataset):
    """Learnable sequences (counting modulo the vocabulary), as dicts the Trainer understands."""

    def __init__(self, n: int = 48, seq: int = 16) -> None:
        g = torch.Generator().manual_seed(0)
        start = torch.randint(0, 96, (n, 1), generator=g)
        self.data = (start + torch.arange(seq)) % 96

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.data[i], "labels": self.data[i]}


def _args(out: Path, **kw: object):
    from transformers import TrainingArguments

    base = dict(
        output_dir=str(out),
        max_steps=8,
        per_device_train_batch_size=4,
        learning_rate=3e-3,
        save_steps=4,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        seed=0,
        data_seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    base.update(kw)
    return TrainingArguments(**base)


def test_hf_trainer_trains_saves_and_resumes(tmp_path: Path) -> None:
    from transformers import Trainer

    straight = tiny_llama()
    trainer = Trainer(model=straight, args=_args(tmp_path / "a"), train_dataset=_Counting(),
                      optimizers=(adapm.AdaPM(straight, lr=3e-3), None))  # fmt: skip
    result = trainer.train()
    assert result.training_loss < 4.5
    checkpoint = tmp_path / "a" / "checkpoint-4"
    assert (checkpoint / "optimizer.pt").exists()
    saved = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    assert any("lowrank_L" in s for s in saved["state"].values())

    resumed = tiny_llama(seed=7)
    trainer2 = Trainer(model=resumed, args=_args(tmp_path / "b"), train_dataset=_Counting(),
                       optimizers=(adapm.AdaPM(resumed, lr=3e-3), None))  # fmt: skip
    trainer2.train(resume_from_checkpoint=str(checkpoint))
    for a, b in zip(straight.parameters(), resumed.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_hf_trainer_with_a_peft_model_saves_and_resumes(tmp_path: Path) -> None:
    """LoRA with a head trained whole (``modules_to_save``): Trainer saves the adapter and AdaPM-mini's state, and a
    run resumed from the checkpoint into a differently initialised adapter ends where the straight one does."""
    peft = pytest.importorskip("peft")
    from transformers import Trainer

    def model(seed: int) -> torch.nn.Module:
        base = tiny_llama()
        torch.manual_seed(seed)  # the adapter's initialisation
        config = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"])
        return peft.get_peft_model(base, config)

    straight = model(0)
    opt = adapm.AdaPMMini(straight, lr=3e-3, strict=True)
    assert {g["role"] for g in opt.param_groups} == {"adapter", "output"}
    trainer = Trainer(model=straight, args=_args(tmp_path / "a"), train_dataset=_Counting(), optimizers=(opt, None))
    assert trainer.train().training_loss < 4.5
    checkpoint = tmp_path / "a" / "checkpoint-4"
    assert (checkpoint / "adapter_model.safetensors").exists()
    saved = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    assert len(saved["state"]) == len(opt.param_groups)

    resumed = model(7)
    assert not all(torch.equal(a, b) for a, b in zip(straight.parameters(), resumed.parameters()))
    trainer2 = Trainer(model=resumed, args=_args(tmp_path / "b"), train_dataset=_Counting(),
                       optimizers=(adapm.AdaPMMini(resumed, lr=3e-3), None))  # fmt: skip
    trainer2.train(resume_from_checkpoint=str(checkpoint))
    for a, b in zip(straight.parameters(), resumed.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_trl_sft_trainer(tmp_path: Path, play_text: Path, cache_dir: Path) -> None:
    pytest.importorskip("trl")
    import datasets
    from trl import SFTConfig, SFTTrainer

    from adapm.train.config import DataConfig
    from adapm.train.data import load_texts, load_tokenizer

    texts = load_texts(play_text)
    tokenizer, _ = load_tokenizer(DataConfig(data=str(play_text), vocab_size=300, cache_dir=str(cache_dir)), texts)
    tokenizer.pad_token = tokenizer.eos_token
    lines = [line.strip() for line in texts[0].splitlines() if len(line.strip()) > 30][:64]
    train = datasets.Dataset.from_dict({"text": lines})
    model = tiny_llama(vocab=len(tokenizer))
    opt = adapm.AdaPMMini(model, lr=3e-3)
    config = SFTConfig(output_dir=str(tmp_path / "sft"), max_steps=6, per_device_train_batch_size=4, max_length=32,
                       logging_steps=1, save_steps=3, report_to=[], use_cpu=True, disable_tqdm=True)  # fmt: skip
    trainer = SFTTrainer(model=model, args=config, train_dataset=train, processing_class=tokenizer,
                         optimizers=(opt, None))  # fmt: skip
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses[-1] < losses[0]
    assert (tmp_path / "sft" / "checkpoint-6" / "optimizer.pt").exists()
    resumed = tiny_llama(vocab=len(tokenizer), seed=3)
    trainer2 = SFTTrainer(model=resumed, args=config, train_dataset=train, processing_class=tokenizer,
                          optimizers=(adapm.AdaPMMini(resumed, lr=3e-3), None))  # fmt: skip
    trainer2.train(resume_from_checkpoint=str(tmp_path / "sft" / "checkpoint-3"))
    for a, b in zip(model.parameters(), resumed.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_hf_trainer_keeps_block_wise_lr_ratios(tmp_path: Path) -> None:
    """Trainer's scheduler rescales every group's lr from its initial lr; the block-wise ratios live in
    their own group key, so they survive the schedule, and a run with them differs from one without."""
    from transformers import Trainer

    finals = {}
    for ratios in (None, "blockwise"):
        model = tiny_llama()
        opt = adapm.AdaPMMini(model, lr=1e-3, lr_ratios=ratios)
        trainer = Trainer(model=model, args=_args(tmp_path / str(ratios), save_steps=100), train_dataset=_Counting(),
                          optimizers=(opt, None))  # fmt: skip
        trainer.train()
        lrs = {g["lr"] for g in opt.param_groups}
        assert len(lrs) == 1  # the scheduled base lr, the same for every group
        if ratios:
            assert {g.get("lr_ratio") for g in opt.param_groups} == {10.0, 8.0, 6.0, 4.0, 1.0}
        finals[ratios] = model.model.embed_tokens.weight.detach().clone()
    assert not torch.equal(finals[None], finals["blockwise"])


def test_hf_trainer_builds_adapm_from_optimizer_cls_and_kwargs(tmp_path: Path) -> None:
    """Trainer builds the optimizer itself from ``optimizer_cls_and_kwargs``: with the model in the kwargs
    AdaPM gets names and its partition; with Trainer's bare param groups it warns that it cannot apply."""
    from transformers import Trainer

    model = tiny_llama()
    trainer = Trainer(model=model, args=_args(tmp_path / "a", save_steps=100), train_dataset=_Counting(),
                      optimizer_cls_and_kwargs=(adapm.AdaPMMini, {"model": model, "lr": 3e-3}))  # fmt: skip
    result = trainer.train()
    opt = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # accelerate may wrap it
    assert isinstance(opt, adapm.AdaPMMini)
    assert opt.partition_report().ratio_to_adamw < 0.3 and result.training_loss < 4.5
    bare = Trainer(model=tiny_llama(), args=_args(tmp_path / "b", max_steps=1), train_dataset=_Counting(),
                   optimizer_cls_and_kwargs=(adapm.AdaPMMini, {"lr": 3e-3}))  # fmt: skip
    with pytest.warns(UserWarning, match="without names, so its partition cannot apply"):
        bare.train()


def test_accelerate_prepare_save_state_and_load_state_resume_exactly(tmp_path: Path) -> None:
    """Accelerate's prepare wraps AdaPM (and its scheduler); save_state after 4 steps and load_state in a new
    Accelerator continue to the same losses and weights, bit for bit, as 8 steps straight. (FSDP2's prepare,
    which also swaps the optimizer's parameters, is in tests/distributed/test_scaleout.py.)"""
    from accelerate import Accelerator

    from conftest import batches

    data = batches(96, 8)

    def run(start: int, stop: int, save: Path | None = None, load: Path | None = None):
        accelerator = Accelerator(cpu=True)
        model = tiny_llama()
        opt = adapm.AdaPMMini(model, lr=3e-3)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
        model, opt, sched = accelerator.prepare(model, opt, sched)
        if load is not None:
            accelerator.load_state(str(load))
        losses = []
        for x in data[start:stop]:
            loss = model(input_ids=x, labels=x).loss
            accelerator.backward(loss)
            opt.step()
            sched.step()
            opt.zero_grad()
            losses.append(loss.item())
        if save is not None:
            accelerator.save_state(str(save))
        return losses, [p.detach().clone() for p in model.parameters()], opt.optimizer

    straight, weights, opt = run(0, 8)
    first, _, _ = run(0, 4, save=tmp_path / "state")
    second, resumed, resumed_opt = run(4, 8, load=tmp_path / "state")
    assert isinstance(opt, adapm.AdaPMMini) and opt.partition_report().ratio_to_adamw < 0.3
    assert first + second == straight and straight[-1] < straight[0]
    assert all(torch.equal(a, b) for a, b in zip(weights, resumed))
    assert all(float(s["step"]) == 8 for s in resumed_opt.state.values())


def _peft(model: torch.nn.Module, **kw: object) -> torch.nn.Module:
    peft = pytest.importorskip("peft")
    return peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, **kw))


STEPS = {"per-block": {}, "grouped": {"foreach": True}, "fused": {"foreach": True, "fused": True}}


@pytest.mark.parametrize("step", list(STEPS))
@pytest.mark.parametrize("cls", [adapm.AdaPM, adapm.AdaPMMini])
def test_peft_lora_adapters_keep_adamws_state_and_train_as_adamw(cls: type, step: str) -> None:
    """LoRA's factors are adapters: no warning (even with ``strict=True``), full momentum and a full second moment,
    so AdaPM and AdaPM-mini on a LoRA model are AdamW (the clip reaches no full block): bit for bit on the per-block
    and grouped steps, to float rounding on the fused one (as fused AdamW against for-loop AdamW)."""
    import warnings

    from conftest import batches, train

    targets = ["q_proj", "v_proj", "up_proj", "embed_tokens"]
    ref, ours = _peft(tiny_llama(), target_modules=targets), _peft(tiny_llama(), target_modules=targets)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an unmatched matrix would warn (strict=True: raise)
        opt = cls(ours, lr=3e-3, strict=True, **STEPS[step])
    trained = [p for p in ref.parameters() if p.requires_grad]
    assert len(opt.param_groups) == len(trained) == 2 * 3 * 2 + 2  # 2 layers x 3 LoRA layers x A, B; embedding A, B
    assert {(g["role"], g["momentum"], g["second_moment"]) for g in opt.param_groups} == {("adapter", "full", "full")}
    assert {g["family"] for g in opt.param_groups} == {"peft"}
    adamw = torch.optim.AdamW(trained, lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    data = batches(96, 12)
    losses_ref, losses = train(ref, adamw, data), train(ours, opt, data)
    assert losses[-1] < losses[0]
    if step == "fused":
        torch.testing.assert_close(losses, losses_ref, rtol=1e-6, atol=0)
        for a, b in zip(ref.parameters(), ours.parameters()):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
        return
    assert losses == losses_ref
    assert all(torch.equal(a, b) for a, b in zip(ref.parameters(), ours.parameters()))


def _tuners() -> dict[str, object]:
    peft = pytest.importorskip("peft")
    qv = ["q_proj", "v_proj"]
    return {
        "dora": lambda: peft.LoraConfig(r=4, use_dora=True, target_modules=qv),  # 1-D magnitudes beside the factors
        "loha": lambda: peft.LoHaConfig(r=4, target_modules=qv),
        "lokr": lambda: peft.LoKrConfig(r=4, target_modules=qv),
        "ia3": lambda: peft.IA3Config(target_modules=["q_proj", "down_proj"], feedforward_modules=["down_proj"]),
        "oft": lambda: peft.OFTConfig(r=0, oft_block_size=8, target_modules=qv),
        "boft": lambda: peft.BOFTConfig(boft_block_size=4, target_modules=qv),  # 4-D rotations
        "vera": lambda: peft.VeraConfig(r=4, target_modules=["q_proj", "o_proj"]),  # 1-D scalings only
        "vblora": lambda: peft.VBLoRAConfig(r=4, num_vectors=16, vector_length=4, target_modules=qv),  # 3-D logits
        # prompt learning: the virtual tokens (a PEFT module's, not a tuner layer's), LLaMA-Adapter's prompts (3-D)
        "prompt": lambda: peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
        "prefix": lambda: peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
        "adaption": lambda: peft.AdaptionPromptConfig(task_type="CAUSAL_LM", adapter_len=4, adapter_layers=2),
    }


@pytest.mark.parametrize(
    "tuner", ["dora", "loha", "lokr", "ia3", "oft", "boft", "vera", "vblora", "prompt", "prefix", "adaption"]
)
def test_every_peft_tuners_tensors_are_adapters_and_train_as_adamw(tuner: str) -> None:
    """Whatever the tuner, each tensor its layers declare (``adapter_layer_names``), and each matrix of prompt
    learning's modules, is an adapter, of any shape: no warning, AdamW's state, and AdaPM-mini trains as AdamW bit for
    bit (decay on matrices, none on 1-D tensors, as on every 1-D parameter; LLaMA-Adapter's gates are vectors of one
    entry, where a block second moment is the full one)."""
    import warnings

    from peft import get_peft_model

    from conftest import batches, train

    config = _tuners()[tuner]
    ref, ours = get_peft_model(tiny_llama(), config()), get_peft_model(tiny_llama(), config())  # type: ignore[operator]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt = adapm.AdaPMMini(ours, lr=3e-3, strict=True)
    assert {(g["role"], g["momentum"], g["second_moment"], g["family"]) for g in opt.param_groups if
            g["params"][0].dim() >= 2 or tuner != "adaption"} == {("adapter", "full", "full", "peft")}  # fmt: skip
    gates = [g for g in opt.param_groups if g["params"][0].dim() < 2 and tuner == "adaption"]  # a gate per layer: (1,)
    assert [g["role"] for g in gates] == ["vector"] * len(gates)
    trained = [p for p in ref.parameters() if p.requires_grad]
    assert len(trained) == len(opt.param_groups) > 0
    adamw = torch.optim.AdamW(
        [{"params": [p for p in trained if p.dim() >= 2]}, {"params": [p for p in trained if p.dim() < 2],
         "weight_decay": 0.0}], lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1
    )  # fmt: skip
    data = batches(96, 6)
    assert train(ours, opt, data) == train(ref, adamw, data)
    assert all(torch.equal(a, b) for a, b in zip(ref.parameters(), ours.parameters()))


def test_modules_peft_trains_whole_keep_their_roles() -> None:
    """A module in ``modules_to_save`` (PEFT trains a copy of it, ``lm_head.modules_to_save.default.weight``) is
    partitioned as the module itself: GPT-2's fused ``c_attn`` split into Q, K, V, its embedding and Llama's head
    without momentum. The rows of ``trainable_token_indices`` are an embedding's."""
    from conftest import tiny_gpt2

    def policies(opt: adapm.AdaPM) -> dict[str, tuple]:
        found = {}
        for g in opt.param_groups:
            name = g["names"][0].replace("base_model.model.", "").replace(".modules_to_save.default", "")
            segments = tuple((s["name"], s["role"], s["momentum"], s["block"]) for s in g.get("segments", ()))
            found[name] = (g["role"], g["momentum"], g["second_moment"], g["block"], segments, g["family"])
        return found

    whole = adapm.AdaPMMini(tiny_gpt2(), lr=1e-3, strict=True)
    wrapped = adapm.AdaPMMini(_peft(tiny_gpt2(), target_modules=["c_fc"], modules_to_save=["c_attn", "wte"],
                                    fan_in_fan_out=True), lr=1e-3, strict=True)  # fmt: skip
    ours, theirs = policies(wrapped), policies(whole)
    for name in ("transformer.wte.weight", "transformer.h.0.attn.c_attn.weight", "transformer.h.1.attn.c_attn.bias"):
        assert ours[name] == theirs[name], name
    assert [s[:3] for s in ours["transformer.h.0.attn.c_attn.weight"][4]] == [
        ("Q", "query", "lowrank"), ("K", "key", "lowrank"), ("V", "value", "full")
    ]  # fmt: skip
    assert ours["transformer.h.1.mlp.c_fc.lora_B.default.weight"][:3] == ("adapter", "full", "full")

    llama = adapm.AdaPMMini(_peft(tiny_llama(), target_modules=["q_proj"], modules_to_save=["lm_head"],
                                  trainable_token_indices=[1, 2]), lr=1e-3, strict=True)  # fmt: skip
    roles = {g["names"][0].split("base_model.model.")[1]: (g["role"], g["momentum"]) for g in llama.param_groups}
    assert roles["lm_head.modules_to_save.default.weight"] == ("output", "none")
    assert roles["model.embed_tokens.token_adapter.trainable_tokens_delta.default"] == ("embedding", "none")
    assert roles["model.layers.0.self_attn.q_proj.lora_A.default.weight"] == ("adapter", "full")

    # LN tuning trains copies of norms: vectors, as the norms themselves.
    from peft import LNTuningConfig, get_peft_model

    norms = adapm.AdaPMMini(get_peft_model(tiny_llama(), LNTuningConfig(target_modules=["input_layernorm"])), lr=1e-3)
    assert {(g["role"], g["second_moment"], g["block"], g["weight_decay"]) for g in norms.param_groups} == {
        ("vector", "block", "tensor", 0.0)
    }
    assert len(norms.param_groups) == 2

    # Prompt learning's rule names PEFT's modules: SAM's own ``prompt_encoder`` is not an adapter.
    from transformers import SamConfig, SamModel

    with torch.device("meta"):
        sam = adapm.AdaPMMini(SamModel(SamConfig()), lr=1e-3, strict=False)
    prompt = [g["role"] for g in sam.param_groups if g["names"][0].startswith("prompt_encoder.")]
    assert len(prompt) > 5 and "adapter" not in prompt

    # A rule written for the model takes the module PEFT trains whole (its fused segments too).
    ruled = adapm.AdaPM(_peft(tiny_gpt2(), target_modules=["c_fc"], modules_to_save=["c_attn"], fan_in_fan_out=True),
                        lr=1e-3, rules=[(r"h\.0\.attn\.c_attn\.weight\[K\]$", "full")])  # fmt: skip
    fused = [g for g in ruled.param_groups if "h.0.attn.c_attn.modules_to_save.default.weight" in g["names"][0]]
    assert [s["momentum"] for s in fused[0]["segments"]] == ["lowrank", "full", "full"]
