"""Shared helpers of the benchmark scripts: machine description, Markdown tables, saved results."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from adapm.train.compare import machine_info
from adapm.train.tables import markdown_table

__all__ = ["machine_info", "markdown_table", "saved_rows"]


def saved_rows(parser: argparse.ArgumentParser, path: Path, script: str) -> list[dict[str, Any]]:
    """The rows of a file that ``script --json`` wrote (for ``--from-json``); a usage error naming the file
    if it is not one."""
    try:
        return json.loads(path.read_text())["rows"]
    except (OSError, ValueError, KeyError) as err:
        parser.error(f"--from-json {path}: not a --json file of {script} ({type(err).__name__})")
