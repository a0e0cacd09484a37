"""SFT data: the built-in dataset is real installed text; JSONL formats; response-only labels."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from adapm.train.config import DataConfig
from adapm.train.data import load_texts, load_tokenizer
from adapm.train.sft_data import IGNORE_INDEX, builtin_examples, load_records, tokenize


def test_builtin_examples_are_stdlib_docstrings() -> None:
    import json as json_module

    examples = builtin_examples()
    assert len(examples) > 200
    assert examples == builtin_examples()  # deterministic
    dumps = next(e for e in examples if "`json.dumps`" in e["prompt"])
    assert dumps["response"].split()[:3] == " ".join(json_module.dumps.__doc__.split()).split()[:3]
    assert all(len(e["response"].split()) >= 6 for e in examples)


def test_jsonl_formats_and_errors(tmp_path: Path) -> None:
    good = tmp_path / "d.jsonl"
    chat = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                         {"role": "assistant", "content": "Hello."}]}  # fmt: skip
    good.write_text(json.dumps({"prompt": "a", "response": "b"}) + "\n\n" + json.dumps(chat) + "\n")
    assert len(load_records(good)) == 2
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "only a question"}]}) + "\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:1: expected"):
        load_records(bad)
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_records(tmp_path / "missing.jsonl")
    # A .json array of records (Alpaca-style files), errors naming the item.
    (tmp_path / "d.json").write_text(json.dumps([{"prompt": "a", "response": "b"}, chat]))
    assert load_records(tmp_path / "d.json") == [{"prompt": "a", "response": "b"}, chat]
    (tmp_path / "bad.json").write_text(json.dumps([{"prompt": "a", "response": "b"}, {"instruction": "x"}]))
    with pytest.raises(ValueError, match=r"bad\.json\[1\]: expected"):
        load_records(tmp_path / "bad.json")


def test_loss_only_on_response_tokens(play_text: Path, cache_dir: Path) -> None:
    cfg = DataConfig(data=str(play_text), vocab_size=300, cache_dir=str(cache_dir))
    tokenizer, _ = load_tokenizer(cfg, load_texts(play_text))
    record = {"prompt": "Who is the Prince of Denmark?", "response": "Hamlet, son to the late king."}
    out = tokenize(tokenizer, record, max_length=512)
    assert len(out["input_ids"]) == len(out["labels"])
    n_prompt = sum(1 for label in out["labels"] if label == IGNORE_INDEX)
    response_ids = [t for t, label in zip(out["input_ids"], out["labels"]) if label != IGNORE_INDEX]
    assert n_prompt > 0 and response_ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(response_ids[:-1]) == record["response"]
    assert "Question: Who is the Prince" in tokenizer.decode(out["input_ids"][:n_prompt])
    assert len(tokenize(tokenizer, record, max_length=10)["input_ids"]) == 10


def test_chat_template_is_applied_and_masked(play_text: Path, cache_dir: Path) -> None:
    cfg = DataConfig(data=str(play_text), vocab_size=300, cache_dir=str(cache_dir))
    tokenizer, _ = load_tokenizer(cfg, load_texts(play_text))
    tokenizer.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    record = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who?"},
                           {"role": "assistant", "content": "Hamlet."}]}  # fmt: skip
    out = tokenize(tokenizer, record, max_length=512)
    n_prompt = sum(1 for label in out["labels"] if label == IGNORE_INDEX)
    assert tokenizer.decode(out["input_ids"][:n_prompt]) == "<system>Be brief.\n<user>Who?\n<assistant>"
    assert tokenizer.decode([t for t in out["labels"] if t != IGNORE_INDEX][:-1]) == "Hamlet."
