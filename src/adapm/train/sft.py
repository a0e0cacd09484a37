"""Supervised fine-tuning (`adapm sft`): a pretrained causal LM on prompt/response examples, the loss on
response tokens only, with a fixed held-out split for eval loss and perplexity.

Runs on the shared loop (:func:`adapm.train.loop.run`): the same run directory, checkpoints with exact
resume, progress bar, metrics and DDP/FSDP2 under torchrun as pretraining. With several optimizers,
:func:`sft` trains each in a fresh process and writes the side-by-side summary.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from adapm.train import parallel
from adapm.train.config import SFTConfig, SFTDataConfig
from adapm.train.data import held_out_split
from adapm.train.loop import StepResult, Task, autocast
from adapm.train.pretrained import clamp_length, load_causal_lm, load_tokenizer
from adapm.train.sft_data import IGNORE_INDEX, builtin_examples, load_records, tokenize


@dataclass
class SFTData:
    """Tokenized examples (``input_ids``/``labels`` lists) of the train and held-out splits."""

    train: list[dict[str, list[int]]]
    val: list[dict[str, list[int]]]
    pad_id: int
    source: str


def split_records(records: list[Any], val_fraction: float) -> tuple[list[Any], list[Any]]:
    """A fixed shuffled split: (train, held-out), each non-empty."""
    if len(records) < 2:
        raise ValueError(f"--data: need at least 2 examples for a train and a held-out split, got {len(records)}")
    return held_out_split(records, min(len(records) - 1, max(1, round(val_fraction * len(records)))))


def prepare_sft_data(cfg: SFTDataConfig, tokenizer: Any) -> SFTData:
    """Load (or build) the records, split them and tokenize them with response-only labels."""
    if cfg.data is None:
        records, source = builtin_examples(), "built-in: Python standard-library docstrings"
    else:
        records, source = load_records(cfg.data), str(cfg.data)
    train, val = split_records(records, cfg.val_fraction)

    def encode(rows: list[Any]) -> list[dict[str, list[int]]]:
        encoded = [tokenize(tokenizer, r, cfg.max_length) for r in rows]
        return [e for e in encoded if any(label != IGNORE_INDEX for label in e["labels"])]

    train_ids, val_ids = encode(train), encode(val)
    if not train_ids or not val_ids:
        raise ValueError(
            f"--max-length {cfg.max_length} leaves no response tokens in the "
            f"{'training' if not train_ids else 'held-out'} examples; raise --max-length"
        )
    return SFTData(train_ids, val_ids, tokenizer.pad_token_id, source)


def collate(examples: list[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (padding labelled IGNORE_INDEX)."""
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[i, :n] = torch.tensor(e["input_ids"])
        labels[i, :n] = torch.tensor(e["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def sample_batch(examples: list[Any], batch_size: int, seed: int, *key: int) -> list[Any]:
    """``batch_size`` examples drawn without replacement, determined by ``(seed, *key)`` (exact resume)."""
    rng = np.random.default_rng([seed, *key])
    picks = rng.choice(len(examples), size=min(batch_size, len(examples)), replace=False)
    return [examples[i] for i in picks]


def response_loss_sum(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over the labelled (response) tokens, and their count."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    targets = batch["labels"][:, 1:]
    loss = F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return loss, int((targets != IGNORE_INDEX).sum())


@torch.no_grad()
def evaluate_sft(
    model: nn.Module, data: SFTData, batch_size: int, bf16: bool = False, device: torch.device | None = None
) -> dict[str, float]:
    """Token-weighted eval loss over every held-out example, and its perplexity."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(data.val), batch_size):
        batch = collate(data.val[i : i + batch_size], data.pad_id)
        if device is not None:
            batch = {k: v.to(device) for k, v in batch.items()}
        with autocast(bf16, device):
            loss, n = response_loss_sum(model, batch)
        total, count = total + float(loss), count + n
    model.train(was_training)
    loss = total / max(count, 1)
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0))}


def sft_task(cfg: SFTConfig, model_dir: Path, par: parallel.Parallel) -> Task:
    """Fine-tuning as a :class:`adapm.train.loop.Task` (the examples are tokenized here)."""
    tc = cfg.train
    tokenizer = load_tokenizer(model_dir)
    max_length = clamp_length(model_dir, cfg.data.max_length, "--max-length")
    data = prepare_sft_data(dataclasses.replace(cfg.data, max_length=max_length), tokenizer)

    def step(model: nn.Module, step: int, micro: int) -> StepResult:
        key = (step, micro) if not par.enabled else (step, micro, par.rank)
        batch = collate(sample_batch(data.train, tc.batch_size, tc.seed, *key), data.pad_id)
        tokens = int(batch["attention_mask"].sum())  # counted on the host, before the copy
        batch = {k: v.to(par.device) for k, v in batch.items()}
        with autocast(tc.bf16, par.device):
            loss = model(**batch).loss
        return StepResult(loss, tokens)

    return Task(
        kind="sft",
        model_name=str(model_dir) if cfg.model.model else "SmolLM2-135M-Instruct",
        build_model=lambda: load_causal_lm(model_dir),
        step=step,
        evaluate=lambda model: evaluate_sft(model, data, tc.batch_size, tc.bf16, par.device),
        config=cfg.to_dict(),
        derived={
            "model_dir": str(model_dir),
            "data_source": data.source,
            "train_examples": len(data.train),
            "val_examples": len(data.val),
        },
        save_extra=tokenizer.save_pretrained,
        eval_at_start=True,
    )


def sft(cfg: SFTConfig) -> list[dict[str, Any]]:
    """`adapm sft`: one run per optimizer of ``cfg.optimizers`` (several: side by side, each in a fresh
    process), then ``cfg.out/summary.json``, ``summary.md`` and plots. Returns the summary rows."""
    from adapm.train.compare import finetune_side_by_side

    if cfg.data.data is not None:  # a bad file is one error here, not one per optimizer's run
        split_records(load_records(cfg.data.data), cfg.data.val_fraction)
    return finetune_side_by_side(cfg, "sft", sft_task)
