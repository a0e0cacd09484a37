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
