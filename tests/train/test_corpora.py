"""Named corpora: the reST-to-text conversion and the python-docs build, on real reStructuredText."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from adapm.cli import main
from adapm.train.corpora import build_python_docs, rst_to_text
from adapm.train.data import load_texts

PAGE = """\
:mod:`json` --- JSON encoder and decoder
========================================

.. module:: json
   :synopsis: Encode and decode the JSON format.

**Source code:** :source:`Lib/json/__init__.py`

`JSON (JavaScript Object Notation) <https://json.org>`_ is a lightweight data interchange format.
Use :func:`json.dumps` to serialize ``obj`` and :func:`~json.loads` to parse it.

.. versionadded:: 3.1

   >>> import json
   >>> json.dumps(['foo', {'bar': ('baz', None, 1.0, 2)}])
"""


def test_rst_to_text_keeps_prose_and_code_and_drops_markup() -> None:
    text = rst_to_text(PAGE)
    assert "json --- JSON encoder and decoder" in text
    assert "JSON (JavaScript Object Notation) is a lightweight" in text
    assert "Use json.dumps to serialize obj and json.loads to parse it." in text
    assert ">>> json.dumps(['foo'" in text
    for markup in ("====", ".. module::", ":synopsis:", ":func:", "``", "versionadded", "<https"):
        assert markup not in text


def test_python_docs_build_and_use(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = tmp_path / "_sources" / "library"
    source.mkdir(parents=True)
    (source / "json.rst.txt").write_text(PAGE * 20)
    (source / "os.rst.txt").write_text(PAGE.replace("json", "os") * 20)
    out = tmp_path / "pd.jsonl"
    assert main(["corpus", "python-docs", "--source", str(tmp_path / "_sources"), "--out", str(out)]) == 0
    assert "2 pages" in capsys.readouterr().out
    pages = [json.loads(line)["text"] for line in out.read_text().splitlines()]
    assert len(pages) == 2 and "json.dumps" in pages[0] and "os.dumps" in pages[1]
    # --data python-docs reads the cached build.
    cache = tmp_path / "cache"
    build_python_docs(cache / "corpora" / "python-docs.jsonl", tmp_path / "_sources")
    assert load_texts("python-docs", cache) == pages


def test_python_docs_without_sources_names_the_install(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"no \.rst\.txt pages"):
        build_python_docs(tmp_path / "x.jsonl", tmp_path)
    assert main(["corpus", "python-docs", "--source", str(tmp_path), "--out", str(tmp_path / "x.jsonl")]) == 2
