"""Hugging Face Hub ids resolved from a real local cache (HF_HUB_CACHE), never downloaded."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _cache_repo(cache: Path, repo_type: str, repo_id: str) -> Path:
    """A repository laid out as the Hub client caches it: refs/main -> snapshots/<commit>/."""
    root = cache / f"{repo_type}s--{repo_id.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(COMMIT)
    snapshot = root / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    return snapshot


def _run(code: str, cache: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)


def test_dataset_and_model_ids_resolve_from_the_cache(tmp_path: Path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    cache = tmp_path / "hub"
    data = _cache_repo(cache, "dataset", "someone/tiny-stories") / "data"
    data.mkdir()
    (data / "train.jsonl").write_text("\n".join(json.dumps({"story": f"tale number {i}"}) for i in range(3)))
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=4, vocab_size=64)).save_pretrained(
        _cache_repo(cache, "model", "someone/tiny-gpt2")
    )
    proc = _run(
        "from adapm.train.data import load_texts; print(load_texts('someone/tiny-stories', text_field='story'))",
        cache,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "tale number 2" in proc.stdout
    proc = _run("from adapm.cli import main; main(['memory', '--model', 'someone/tiny-gpt2'])", cache)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "adapm-mini" in proc.stdout
    proc = _run("from adapm.train.pretrained import resolve_model_dir; print(resolve_model_dir('someone/tiny-gpt2'))",
                cache)  # fmt: skip
    assert proc.returncode == 0 and COMMIT in proc.stdout


def test_an_id_that_is_not_cached_names_the_id_and_the_cache(tmp_path: Path) -> None:
    cache = tmp_path / "empty"
    cache.mkdir()
    proc = _run("from adapm.train.data import load_texts; load_texts('someone/absent')", cache)
    assert proc.returncode != 0
    assert "'someone/absent' is neither a local path nor a dataset repository in the Hugging Face cache" in proc.stderr
    assert str(cache) in proc.stderr and "nothing is downloaded" in proc.stderr


def test_a_missing_file_is_a_missing_file_not_a_hub_id(tmp_path: Path) -> None:
    from adapm.train.hub import looks_like_hub_id

    assert looks_like_hub_id("someone/tiny-stories") and looks_like_hub_id("org/model.v2")
    for value in ("data/train.jsonl", "corpus/plays.txt", "d/shard.parquet"):
        assert not looks_like_hub_id(value), value
    cache = tmp_path / "empty"
    cache.mkdir()
    proc = _run("from adapm.train.data import load_texts; load_texts('data/train.jsonl')", cache)
    assert proc.returncode != 0
    assert "--data: no such file or directory: data/train.jsonl" in proc.stderr
