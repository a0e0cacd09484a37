"""Shared helpers of the benchmark scripts: machine description and Markdown tables."""

from __future__ import annotations

from typing import Any

from adapm.train.compare import machine_info

__all__ = ["machine_info", "markdown_table"]


def markdown_table(rows: list[dict[str, Any]], columns: list[tuple[str, str]]) -> str:
    """A Markdown table of ``rows`` with ``(key, format)`` columns; missing values print as '-'."""
    lines = ["| " + " | ".join(key for key, _ in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = []
        for key, fmt in columns:
            value = row.get(key)
            cells.append("-" if value is None else fmt.format(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
