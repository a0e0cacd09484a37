"""Data: every input format, clear errors, the cached tokenizer and token ids, deterministic batches."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from adapm.train.config import DataConfig
from adapm.train.data import get_batch, load_texts, load_tokenizer, prepare_data, train_tokenizer


def test_embedded_corpus_is_the_shakespeare_plays() -> None:
    texts = load_texts(None)
    assert len(texts) == 38
    assert sum(len(t) for t in texts) > 4_000_000
    assert any(t.startswith("# Hamlet") for t in texts)


def test_local_formats(tmp_path: Path, play_text: Path) -> None:
    lines = play_text.read_text().split("\n\n")[:50]
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "a.txt").write_text(lines[0])
    (folder / "b.md").write_text(lines[1])
    (folder / "skip.bin").write_bytes(b"\x00\x01")
    assert load_texts(folder) == [lines[0], lines[1]]
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(lines)) + "\n\n")
    assert load_texts(jsonl) == [t for t in lines if t.strip()]

    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": lines}), tmp_path / "d.parquet")
    assert load_texts(tmp_path / "d.parquet") == [t for t in lines if t.strip()]

    import datasets

    datasets.Dataset.from_dict({"text": lines}).save_to_disk(str(tmp_path / "saved"))
    assert load_texts(tmp_path / "saved") == [t for t in lines if t.strip()]
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": lines[:3]})}).save_to_disk(
        str(tmp_path / "saved_dict")
    )
    assert load_texts(tmp_path / "saved_dict") == [t for t in lines[:3] if t.strip()]


def test_bad_inputs_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no such file or directory"):
        load_texts(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(ValueError, match=r"empty\.txt contains no text"):
        load_texts(tmp_path / "empty.txt")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1.txt: not valid UTF-8 at byte 3"):
        load_texts(tmp_path / "latin1.txt")
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"txt": "no"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: each record must be an object with a string field 'text'"):
        load_texts(tmp_path / "bad.jsonl")
    (tmp_path / "broken.jsonl").write_text('{"text": \n')
    with pytest.raises(ValueError, match=r"broken.jsonl:1: invalid JSON"):
        load_texts(tmp_path / "broken.jsonl")
    (tmp_path / "nothing").mkdir()
    with pytest.raises(ValueError, match="holds no"):
        load_texts(tmp_path / "nothing")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": [1, 2]}), tmp_path / "ints.parquet")
    with pytest.raises(ValueError, match=r"ints\.parquet: the 'body' column must hold strings \(--text-field\)"):
        load_texts(tmp_path / "ints.parquet", text_field="body")


def test_jsonl_lines_end_at_newlines_only(tmp_path: Path) -> None:
    """JSON strings may hold U+2028, U+2029 and U+0085 unescaped (``json.dumps(ensure_ascii=False)``
    writes them so); a byte order mark, CRLF line ends and an upper-case suffix are read too, and an
    invalid byte is reported with its offset in the file."""
    texts = ["line\u2028separator", "next\x85line and \u2029paragraph", "plain"]
    data = "\ufeff" + "\r\n".join(json.dumps({"text": t}, ensure_ascii=False) for t in texts) + "\r\n"
    (tmp_path / "d.jsonl").write_text(data, encoding="utf-8", newline="")
    assert load_texts(tmp_path / "d.jsonl") == texts
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "UPPER.JSONL").write_text(data, encoding="utf-8", newline="")
    assert load_texts(folder) == texts  # the records, not the file as one text
    first = json.dumps({"text": "ok"}).encode() + b"\n"
    (tmp_path / "bad.jsonl").write_bytes(first + b'{"text": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=rf"bad\.jsonl: not valid UTF-8 at byte {len(first) + 13}"):
        load_texts(tmp_path / "bad.jsonl")


def test_json_files_hold_an_array_or_json_lines(tmp_path: Path) -> None:
    """A ``.json`` file is a JSON array of records, or JSON Lines (``datasets``' ``to_json`` writes
    those); it was read as one plain text, brackets and keys included."""
    records = [{"text": "first document"}, {"text": "second one"}]
    (tmp_path / "array.json").write_text(json.dumps(records, indent=2))
    assert load_texts(tmp_path / "array.json") == ["first document", "second one"]
    (tmp_path / "lines.json").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert load_texts(tmp_path / "lines.json") == ["first document", "second one"]
    (tmp_path / "bad.json").write_text(json.dumps([{"text": "ok"}, {"body": "no"}]))
    with pytest.raises(ValueError, match=r"bad\.json\[1\]: each record must be an object with a string field 'text'"):
        load_texts(tmp_path / "bad.json")
    (tmp_path / "broken.json").write_text('[{"text": "ok"},\n{"text": ]')
    with pytest.raises(ValueError, match=r"broken\.json:2: invalid JSON"):
        load_texts(tmp_path / "broken.json")


def test_tokenizer_is_trained_once_and_cached(play_text: Path, tmp_path: Path) -> None:
    cfg = DataConfig(data=str(play_text), vocab_size=300, cache_dir=str(tmp_path))
    texts = load_texts(play_text)
    tok, key = load_tokenizer(cfg, texts)
    assert len(tok) == 300
    assert tok.decode(tok("To be, or not to be")["input_ids"]) == "To be, or not to be"
    again, key2 = load_tokenizer(cfg, texts)
    assert key == key2 and again.get_vocab() == tok.get_vocab()
    # A user tokenizer directory is used as is.
    user = DataConfig(data=str(play_text), tokenizer=str(tmp_path / "tokenizers" / key), cache_dir=str(tmp_path))
    theirs, _ = load_tokenizer(user, texts)
    assert theirs.get_vocab() == tok.get_vocab()
    with pytest.raises(FileNotFoundError, match="--tokenizer: no such directory"):
        load_tokenizer(DataConfig(tokenizer=str(tmp_path / "nope")), texts)


def test_prepare_data_split_cache_and_batches(play_text: Path, tmp_path: Path) -> None:
    cfg = DataConfig(data=str(play_text), vocab_size=300, seq_len=32, cache_dir=str(tmp_path))
    data = prepare_data(cfg)
    assert isinstance(data.train, np.memmap) and data.train.dtype == np.uint16
    n = len(data.train) + len(data.val)
    assert abs(len(data.val) - 0.05 * n) <= 1
    assert data.val.max() < 300
    assert 3.0 < data.unigram_loss() < np.log(300)
    cached = prepare_data(cfg)
    assert cached.cache_dir == data.cache_dir and np.array_equal(cached.train, data.train)
    a = get_batch(data.train, 4, 32, 0, 5, 0)
    assert a.shape == (4, 32) and a.dtype.is_floating_point is False
    assert np.array_equal(a, get_batch(data.train, 4, 32, 0, 5, 0))
    assert not np.array_equal(a, get_batch(data.train, 4, 32, 0, 6, 0))


def test_tokenizing_streams_in_batches_and_pieces_with_the_ids_of_whole_documents(
    play_text: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Long documents are tokenized (and the BPE trained) in pieces, and documents in batches, so memory
    stays flat for large corpora; the tokenizer and the token ids are those of whole documents."""
    from adapm.train import data as data_module

    hamlet = play_text.read_text()
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a_hamlet.txt").write_text(hamlet)
    (corpus / "b_short.txt").write_text("To be, or not to be: that is the question.\n" * 40)
    whole = DataConfig(data=str(corpus), vocab_size=300, seq_len=32, cache_dir=str(tmp_path / "whole"))
    tok, _ = load_tokenizer(whole, load_texts(corpus))
    expected = [i for text in load_texts(corpus) for i in [*tok(text, add_special_tokens=False)["input_ids"], 0]]
    assert tok.eos_token_id == 0
    reference = prepare_data(whole)
    assert np.concatenate([reference.train, reference.val]).tolist() == expected

    monkeypatch.setattr(data_module, "PIECE_CHARS", 3000)  # Hamlet: ~60 pieces
    monkeypatch.setattr(data_module, "_BATCH_CHARS", 20_000)  # ~10 batches
    assert len(list(data_module._pieces(hamlet))) > 40
    assert "".join(data_module._pieces(hamlet)) == hamlet
    streamed = prepare_data(DataConfig(data=str(corpus), vocab_size=300, seq_len=32, cache_dir=str(tmp_path / "s")))
    assert streamed.tokenizer.get_vocab() == tok.get_vocab()
    assert np.array_equal(streamed.train, reference.train) and np.array_equal(streamed.val, reference.val)
    assert sorted(p.name for p in streamed.cache_dir.iterdir()) == ["meta.json", "train.bin", "val.bin"]

    # The cuts are exact for tiktoken-style pre-tokenization too (Llama 3's pattern on the same BPE).
    from tokenizers import Regex, Tokenizer, pre_tokenizers

    tiktoken_style = Tokenizer.from_str(tok.backend_tokenizer.to_str())
    pattern = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")  # fmt: skip
    tiktoken_style.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(pattern), behavior="isolated"), pre_tokenizers.ByteLevel(use_regex=False)]
    )
    pieces = [i for piece in data_module._pieces(hamlet) for i in tiktoken_style.encode(piece).ids]
    assert pieces == tiktoken_style.encode(hamlet).ids


def test_too_little_text(tmp_path: Path) -> None:
    (tmp_path / "short.txt").write_text("to be or not to be " * 20)
    with pytest.raises(ValueError, match=r"only \d+ tokens; need at least"):
        prepare_data(DataConfig(data=str(tmp_path / "short.txt"), vocab_size=300, seq_len=128, cache_dir=str(tmp_path)))


def test_text_field_selects_the_jsonl_field(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"body": "first document"}\n{"body": "second one"}\n')
    assert load_texts(path, text_field="body") == ["first document", "second one"]
    with pytest.raises(ValueError, match=r"string field 'text' \(--text-field\)"):
        load_texts(path)


def test_training_a_tokenizer_prints_nothing_in_a_batch_job(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """No progress bars (which print bare newlines) when stderr is not a terminal, as under pytest."""
    texts = [f"line {i} of a small corpus, with words that repeat and repeat" for i in range(200)]
    tok = train_tokenizer(texts, 300, tmp_path / "tok")
    assert len(tok) <= 300 and tok.eos_token == "<|endoftext|>"
    out, err = capfd.readouterr()
    assert out == "" and err == ""


def test_a_directory_of_token_ids_trains_like_the_text_it_was_made_from(
    play_text: Path, cache_dir: Path, tmp_path: Path
) -> None:
    """``train.bin``/``val.bin`` (nanoGPT's layout, or our own cache) are taken as they are: with our
    cache's ``meta.json``, the run equals the run on the text; without it (nanoGPT's uint16 ids), the
    vocabulary is the largest id + 1, or the ``--tokenizer``'s."""
    import shutil

    from adapm.train.loop import pretrain

    from conftest import tiny_config

    text_run = tiny_config(play_text, cache_dir, tmp_path / "text", save_model=False)
    from_text = prepare_data(text_run.data)
    ids_run = tiny_config(play_text, cache_dir, tmp_path / "ids", save_model=False)
    ids_run.data.data = str(from_text.cache_dir)  # train.bin, val.bin and meta.json
    from_ids = prepare_data(ids_run.data)
    assert from_ids.tokenizer is None and from_ids.vocab_size == from_text.vocab_size == 300
    assert np.array_equal(from_ids.train, from_text.train) and np.array_equal(from_ids.val, from_text.val)
    assert from_ids.unigram_loss() == from_text.unigram_loss()
    a, b = pretrain(text_run), pretrain(ids_run)
    assert (a["final_val_loss"], a["final_train_loss"]) == (b["final_val_loss"], b["final_train_loss"])

    nanogpt = tmp_path / "nanogpt"
    nanogpt.mkdir()
    for name in ("train.bin", "val.bin"):
        shutil.copy(from_text.cache_dir / name, nanogpt / name)
    largest = int(max(from_text.train.max(), from_text.val.max()))
    assert prepare_data(DataConfig(data=str(nanogpt))).vocab_size == largest + 1
    tok_dir = tmp_path / "tok"
    from_text.tokenizer.save_pretrained(str(tok_dir))
    assert prepare_data(DataConfig(data=str(nanogpt), tokenizer=str(tok_dir))).vocab_size == 300

    (nanogpt / "meta.json").write_text(json.dumps({"vocab_size": largest}))
    with pytest.raises(ValueError, match=rf"holds token id {largest}, outside the {largest} tokens of .*meta\.json"):
        prepare_data(DataConfig(data=str(nanogpt)))
    (nanogpt / "meta.json").unlink()
    with open(nanogpt / "val.bin", "ab") as f:
        f.write(b"\x00")
    with pytest.raises(ValueError, match=r"val\.bin: \d+ bytes is not a whole number of uint16 ids.*meta\.json"):
        prepare_data(DataConfig(data=str(nanogpt)))
    for meta, error in (("{", "not valid JSON"), ('{"dtype": "float32"}', "'float32' is not an unsigned integer"),
                        ('{"dtype": "banana"}', "'banana' is not an unsigned integer")):
        (nanogpt / "meta.json").write_text(meta)
        with pytest.raises(ValueError, match=rf"meta\.json: .*{error}"):
            prepare_data(DataConfig(data=str(nanogpt)))
    (nanogpt / "meta.json").unlink()
    for name in ("train.bin", "val.bin"):
        (nanogpt / name).write_bytes(b"")
    with pytest.raises(ValueError, match="too few tokens for seq_len"):
        prepare_data(DataConfig(data=str(nanogpt)))


def test_documents_are_read_from_disk_a_line_at_a_time_at_each_pass(tmp_path: Path) -> None:
    """Preparing a corpus never holds it whole: its documents come from disk as they are iterated (here a
    bad line further down is met only when the iteration reaches it), and anew at each pass."""
    from adapm.train.data import documents

    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "first"}\n{"text": "second"}\nnot json\n')
    docs = documents(path)
    first = iter(docs)
    assert [next(first), next(first)] == ["first", "second"]
    with pytest.raises(ValueError, match=r"d\.jsonl:3: invalid JSON"):
        next(first)
    path.write_text('{"text": "third"}\n')
    assert list(docs) == ["third"]  # a new pass reads the file again
