"""`adapm rlhf` (ReMax): prompts, batched generation against Hugging Face's own, the REINFORCE sign,
zero KL at the start, rewards (VADER and a reward-model directory), the run directory and resume."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from adapm.train.checkpoint import load_checkpoint
from adapm.train.config import FinetuneModelConfig, OptimConfig, RLHFConfig, TrainConfig
from adapm.train.pretrained import load_causal_lm, load_tokenizer
from adapm.train.rlhf import (
    PROMPT_INSTRUCTION,
    ReMax,
    builtin_prompts,
    encode_prompts,
    generate,
    load_prompts,
    make_reward,
    response_logprobs,
    rlhf,
)


def rlhf_config(model_dir: Path, out: Path, reward: str = "vader", **train: object) -> RLHFConfig:
    kwargs = dict(steps=4, batch_size=3, eval_every=2, log_every=1, checkpoint_every=2, progress=False, threads=1)
    kwargs.update(train)
    return RLHFConfig(
        optimizers="adapm",
        out=str(out),
        reward=reward,
        max_new_tokens=6,
        val_prompts=3,
        model=FinetuneModelConfig(model=str(model_dir)),
        optim=OptimConfig(lr=3e-3),
        train=TrainConfig(**kwargs),  # type: ignore[arg-type]
    )


def test_builtin_prompts_are_shakespeare_openings() -> None:
    prompts = builtin_prompts()
    assert len(prompts) > 1000 and prompts == builtin_prompts()
    assert all(p.startswith(PROMPT_INSTRUCTION) for p in prompts)
    assert f"{PROMPT_INSTRUCTION}Who's there?" not in prompts  # fewer than 5 words
    assert all(5 <= len(p[len(PROMPT_INSTRUCTION) :].split()) <= 14 for p in prompts)


def test_load_prompts_formats_and_errors(tmp_path: Path) -> None:
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "Tell me a story."}) + "\n")
    (tmp_path / "p.txt").write_text("one\n\ntwo\n")
    assert load_prompts(tmp_path / "p.jsonl") == ["Tell me a story."]
    assert load_prompts(tmp_path / "p.txt") == ["one", "two"]
    (tmp_path / "bad.jsonl").write_text(json.dumps({"text": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:1: expected an object with a 'prompt'"):
        load_prompts(tmp_path / "bad.jsonl")
    with pytest.raises(FileNotFoundError, match="--prompts: no such file"):
        load_prompts(tmp_path / "missing.txt")
    # A .json array of such objects (it was read as text, one "prompt" per line of JSON).
    (tmp_path / "p.json").write_text(json.dumps([{"prompt": "Tell me a story."}, {"prompt": "And another."}]))
    assert load_prompts(tmp_path / "p.json") == ["Tell me a story.", "And another."]


def test_bad_prompts_fail_once_before_any_run(tiny_lm_dir: Path, tmp_path: Path) -> None:
    """Side by side, missing prompts or too few for --val-prompts is one error before any run starts."""
    (tmp_path / "p.txt").write_text("one\ntwo\n")
    cases = [("missing.txt", FileNotFoundError, "--prompts: no such file"),
             ("p.txt", ValueError, "--val-prompts 3: need more prompts than that, got 2")]  # fmt: skip
    for prompts, error, match in cases:
        cfg = rlhf_config(tiny_lm_dir, tmp_path / "side")
        cfg.optimizers, cfg.prompts = "adamw,adapm", str(tmp_path / prompts)
        with pytest.raises(error, match=match):
            rlhf(cfg)
        assert not (tmp_path / "side").exists()


def test_batched_generation_matches_hf_generate(tiny_lm_dir: Path) -> None:
    """Left padding, positions and the KV cache: greedy responses of a padded batch equal Hugging
    Face's generate() on each prompt alone."""
    model, tok = load_causal_lm(tiny_lm_dir).eval(), load_tokenizer(tiny_lm_dir)
    prompts = ["To be, or not to be", "My lord", "The king is dead, long live the king and all his"]
    ids, mask = encode_prompts(tok, prompts, max_length=64)
    assert mask[1, 0] == 0 and mask[1, -1] == 1  # left padded
    out, out_mask = generate(model, ids, mask, 8, tok.eos_token_id, tok.pad_token_id, greedy=True)
    for i, prompt in enumerate(prompts):
        single = torch.tensor([tok(prompt, add_special_tokens=False)["input_ids"]])
        ref = model.generate(single, max_new_tokens=8, do_sample=False, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id)[0, single.shape[1]:]  # fmt: skip
        n = int(out_mask[i].sum())
        assert out[i, :n].tolist() == ref[:n].tolist()
    logp = response_logprobs(model, ids, mask, out, out_mask)
    greedy_logits = torch.stack(
        [model(input_ids=torch.tensor([tok(p, add_special_tokens=False)["input_ids"]])).logits[0, -1] for p in prompts]
    )
    torch.testing.assert_close(logp[:, 0], torch.log_softmax(greedy_logits, -1).max(-1).values, atol=1e-4, rtol=1e-4)


def test_remax_step_raises_the_likelihood_of_rewarded_samples(tiny_lm_dir: Path) -> None:
    """Advantage +1 for every sample (the sample is rewarded first, the greedy response second): one
    SGD step on the loss must make the sampled responses more likely; KL is exactly 0 at the start."""
    calls = []

    def reward(prompts: list[str], responses: list[str]) -> list[float]:
        calls.append(len(calls))
        return [1.0 if len(calls) % 2 == 1 else 0.0] * len(responses)

    cfg = rlhf_config(tiny_lm_dir, Path("unused"), batch_size=4)
    cfg.kl_coef = 0.0
    tok = load_tokenizer(tiny_lm_dir)
    policy, reference = load_causal_lm(tiny_lm_dir), load_causal_lm(tiny_lm_dir).requires_grad_(False)
    remax = ReMax(cfg, tok, reference, reward, builtin_prompts()[:40], torch.device("cpu"))
    torch.manual_seed(0)
    result = remax.step(policy, step=0, micro=0, rank=None)
    assert result.metrics["reward"] == 1.0 and result.metrics["greedy_reward"] == 0.0
    assert result.metrics["kl"] == 0.0
    result.loss.backward()
    # The same sampled batch again (it is determined by seed, step and micro-batch): its log-likelihood
    # before and after one SGD step on the loss.
    rng = np.random.default_rng([cfg.train.seed, 0, 0])
    picks = rng.choice(len(remax.train_prompts), size=4, replace=False)
    gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
    ids, mask = remax._encode([remax.train_prompts[i] for i in picks])
    sample, sample_mask = remax._generate(policy, ids, mask, False, gen)
    before = float((response_logprobs(policy, ids, mask, sample, sample_mask) * sample_mask).sum())
    with torch.no_grad():
        for p in policy.parameters():
            p -= 1e-2 * p.grad
    after = float((response_logprobs(policy, ids, mask, sample, sample_mask) * sample_mask).sum())
    assert after > before


def test_rlhf_run_directory_and_resume(tiny_lm_dir: Path, tmp_path: Path) -> None:
    rows = rlhf(rlhf_config(tiny_lm_dir, tmp_path / "a", save_model=False))
    run = tmp_path / "a" / "adapm"
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert metrics[0]["step"] == 0 and metrics[0]["val_kl"] == 0.0
    assert {"reward", "greedy_reward", "kl", "length", "val_reward", "val_sample_reward", "val_kl"} <= set(metrics[-1])
    assert all(0 < m["length"] <= 6 for m in metrics[1:])
    summary = json.loads((run / "summary.json").read_text())
    assert summary["task"] == "rlhf" and summary["primary"] == "val_reward" and -1 <= summary["final_val_reward"] <= 1
    assert rows[0]["final_val_kl"] == summary["final_val_kl"] and summary["final_val_kl"] != 0.0
    rlhf(rlhf_config(tiny_lm_dir, tmp_path / "b", save_model=False, stop_at=2))
    rlhf(rlhf_config(tiny_lm_dir, tmp_path / "b", save_model=False, resume=True))
    a, b = load_checkpoint(run / "checkpoint.pt"), load_checkpoint(tmp_path / "b" / "adapm" / "checkpoint.pt")
    for k, v in a["model"].items():
        torch.testing.assert_close(b["model"][k], v, rtol=0, atol=0)


def test_reward_model_directory(tiny_lm_dir: Path, tmp_path: Path) -> None:
    """A reward model is any local sequence classifier: here a tiny GPT-2 with one output."""
    from transformers import GPT2Config, GPT2ForSequenceClassification

    tok = load_tokenizer(tiny_lm_dir)
    torch.manual_seed(0)
    config = GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=len(tok), n_positions=256, num_labels=1,
                        pad_token_id=tok.pad_token_id)  # fmt: skip
    GPT2ForSequenceClassification(config).save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    score = make_reward(str(tmp_path / "rm"))
    values = score(["To be", "To be"], ["or not to be", "a king"])
    assert len(values) == 2 and values[0] != values[1]
    rlhf(rlhf_config(tiny_lm_dir, tmp_path / "run", reward=str(tmp_path / "rm"), steps=1, save_model=False))
    assert json.loads((tmp_path / "run" / "adapm" / "summary.json").read_text())["reward"] == str(tmp_path / "rm")
    with pytest.raises(FileNotFoundError, match=r"--reward: .* neither 'vader' nor"):
        rlhf(rlhf_config(tiny_lm_dir, tmp_path / "x", reward=str(tmp_path / "nothing")))
