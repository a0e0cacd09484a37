"""Hugging Face Hub ids resolved from the local cache only: nothing is ever downloaded.

``--data org/name`` (a dataset repository) and ``--model org/name`` (a model repository) work when the
repository is already in the Hugging Face cache (``HF_HUB_CACHE``, by default
``~/.cache/huggingface/hub``), e.g. from an earlier ``huggingface-cli download`` on a machine with
network access; otherwise the error names the id and the cache that was searched.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
"""``org/name``, as the Hub spells repository ids."""


FILE_SUFFIXES = frozenset({".txt", ".md", ".json", ".jsonl", ".parquet", ".csv", ".arrow", ".yaml", ".yml", ".pt"})
"""Suffixes that make ``dir/name.jsonl`` a (missing) local file rather than a repository id."""


def looks_like_hub_id(value: str) -> bool:
    """Whether ``value`` has the form of a Hub repository id (and is neither an existing local path nor
    a file name such as ``data/train.jsonl``)."""
    path = Path(value).expanduser()
    return bool(HUB_ID.match(value)) and path.suffix.lower() not in FILE_SUFFIXES and not path.exists()


def cached_snapshot(repo_id: str, repo_type: str, flag: str) -> Path:
    """The local snapshot of ``repo_id`` (``repo_type`` ``model`` or ``dataset``) from the cache.

    Raises:
        FileNotFoundError: not in the cache; names the id, the cache directory and what to do.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, repo_type=repo_type, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError, ValueError) as exc:
        raise FileNotFoundError(
            f"{flag}: {repo_id!r} is neither a local path nor a {repo_type} repository in the Hugging Face cache "
            f"({constants.HF_HUB_CACHE}); nothing is downloaded here: fetch it where there is network access "
            f"(huggingface-cli download {'--repo-type dataset ' if repo_type == 'dataset' else ''}{repo_id}) and "
            "copy the cache, or pass a local path"
        ) from exc
