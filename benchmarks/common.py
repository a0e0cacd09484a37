"""Shared helpers of the benchmark scripts: machine description and Markdown tables."""

from __future__ import annotations

from adapm.train.compare import machine_info
from adapm.train.tables import markdown_table

__all__ = ["machine_info", "markdown_table"]


