"""The partition report: which block gets which policy, and what its state costs."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

from adapm.partition.layout import ParamLayout, Segment


@dataclass(frozen=True)
class ReportRow:
    """One parameter, or one segment of a fused parameter."""

    name: str
    shape: tuple[int, ...]
    momentum: str
    second_moment: str
    rank: int
    state_bytes: int
    role: str = ""
    block: str = ""
    matched: bool = True
    where: str = ""
    """For a segment of a fused weight: which part of the weight it is (e.g. ``rows 16:32 of every 48``)."""


def _where(seg: Segment) -> str:
    """The part of its fused weight a segment is, in the weight's own indices."""
    expert = f"expert {seg.index} " if seg.index is not None else ""
    if seg.dim is None:
        return expert.strip() or "whole"
    unit = ("rows", "cols")[seg.dim] if seg.dim < 2 else f"dim {seg.dim}"
    span = f"{unit} {seg.start}:{seg.start + seg.length}"
    return f"{expert}{span}" + (f" of every {seg.period} (x{seg.groups})" if seg.groups > 1 else "")


def _block_text(layout: ParamLayout, dim: int | None, size: int) -> str:
    if layout.second_policy.elementwise:
        return "entry"
    if dim is None:
        return "tensor"
    unit = "row" if dim == 0 else "col"
    return f"{unit}" if size == 1 else f"{size} {unit}s"


@dataclass
class PartitionReport:
    """Rows plus totals; ``str(report)`` is a readable table.

    Attributes:
        rows: one :class:`ReportRow` per parameter or fused segment.
        adamw_state_bytes: what ``torch.optim.AdamW`` keeps for the same float32 parameters
            (``exp_avg`` + ``exp_avg_sq`` + a 4-byte step per parameter).
    """

    rows: list[ReportRow] = field(default_factory=list)
    adamw_state_bytes: int = 0

    @classmethod
    def from_layouts(cls, layouts: Iterable[tuple[ParamLayout, bool]]) -> PartitionReport:
        """Build from ``(layout, matched)`` pairs in optimizer order."""
        report = cls()
        for layout, matched in layouts:
            numel = math.prod(layout.shape)
            report.adamw_state_bytes += 8 * numel + 4
            for seg in layout.segments:
                report.rows.append(
                    ReportRow(
                        name=seg.name,
                        shape=seg.shape,
                        momentum=seg.momentum,
                        second_moment=layout.second_moment,
                        rank=seg.rank,
                        state_bytes=layout.segment_state_bytes(seg),
                        role=seg.role,
                        block=_block_text(layout, *seg.block),
                        matched=matched,
                        where=_where(seg) if layout.fused else "",
                    )
                )
        return report

    @property
    def state_bytes(self) -> int:
        """Total optimizer-state bytes (equals :func:`adapm.state_bytes` once every state exists)."""
        return sum(row.state_bytes for row in self.rows)

    @property
    def ratio_to_adamw(self) -> float:
        """``state_bytes / adamw_state_bytes``."""
        return self.state_bytes / self.adamw_state_bytes if self.adamw_state_bytes else 0.0

    @property
    def unmatched(self) -> list[str]:
        """Names of matrices that matched no preset or rule (kept on Adam's full/full policy)."""
        return [row.name for row in self.rows if not row.matched]

    def by_momentum(self) -> dict[str, int]:
        """State bytes per momentum policy."""
        totals: dict[str, int] = {}
        for row in self.rows:
            totals[row.momentum] = totals.get(row.momentum, 0) + row.state_bytes
        return totals

    def __str__(self) -> str:
        header = ("block", "shape", "part", "role", "momentum", "rank", "2nd moment", "state")
        lines = [
            (
                row.name + (" (!)" if not row.matched else ""),
                "x".join(str(s) for s in row.shape) or "scalar",
                row.where or "-",
                row.role,
                row.momentum,
                str(row.rank) if row.rank else "-",
                f"{row.second_moment}/{row.block}",
                format_bytes(row.state_bytes),
            )
            for row in self.rows
        ]
        widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h) for i, h in enumerate(header)]
        fmt = "  ".join(f"{{:<{w}}}" for w in widths[:-1]) + f"  {{:>{widths[-1]}}}"
        out = [fmt.format(*header), "  ".join("-" * w for w in widths)]
        out += [fmt.format(*line) for line in lines]
        out.append("")
        out.append(
            f"total state {format_bytes(self.state_bytes)} vs AdamW {format_bytes(self.adamw_state_bytes)}"
            f" ({100 * self.ratio_to_adamw:.1f}% of AdamW, {len(self.rows)} blocks)"
        )
        if self.unmatched:
            out.append(
                f"(!) {len(self.unmatched)} matrices matched no preset or rule and keep full momentum and "
                f"full second moment: {some_names(self.unmatched)}. Pass rules=[(pattern, policy), ...] to change that."
            )
        return "\n".join(out)


def some_names(names: list[str], shown: int = 5) -> str:
    """``names`` joined with commas, the first ``shown`` of them and a count of the rest (a LoRA model
    or an unknown architecture can have hundreds)."""
    if len(names) <= shown:
        return ", ".join(names)
    return f"{', '.join(names[:shown])} and {len(names) - shown} more; partition_report() marks them all with (!)"


def format_bytes(n: int) -> str:
    """Human-readable byte count in powers of 1000 (as the paper's Table 2)."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"
