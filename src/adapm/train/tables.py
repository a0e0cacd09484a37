"""The one Markdown table writer of the harness, the benchmarks and the experiments."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from adapm.partition.report import format_bytes


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, ...]]) -> str:
    """A Markdown table of ``rows``. Each column is ``(key, format)`` (the key is the heading) or
    ``(key, heading, format)``; the format is a ``str.format`` pattern, or ``"bytes"`` for
    human-readable bytes; missing values print as '-'; numeric formats are right-aligned."""
    cols = [(c[0], c[0], c[1]) if len(c) == 2 else (c[0], c[1], c[2]) for c in columns]
    lines = [
        "| " + " | ".join(heading for _, heading, _ in cols) + " |",
        "|" + "".join("---:|" if fmt != "{}" else "---|" for _, _, fmt in cols),
    ]
    for row in rows:
        cells = []
        for key, _, fmt in cols:
            value = row.get(key)
            if value is None:
                cells.append("-")
            elif fmt == "bytes":
                cells.append(format_bytes(value))
            else:
                cells.append(fmt.format(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
