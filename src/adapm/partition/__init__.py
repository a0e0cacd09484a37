"""Which parameter gets which policy: presets, user rules, per-parameter layouts and the report."""

from adapm.partition.layout import ParamLayout, Segment, build_layout
from adapm.partition.presets import PAPER_MOMENTUM, PRESET_RULES, ROLES, PresetRule
from adapm.partition.report import PartitionReport, ReportRow, format_bytes
from adapm.partition.rules import Rule, head_dim_of, parse_rules, partition

__all__ = [
    "PAPER_MOMENTUM",
    "PRESET_RULES",
    "ROLES",
    "ParamLayout",
    "PartitionReport",
    "PresetRule",
    "ReportRow",
    "Rule",
    "Segment",
    "build_layout",
    "format_bytes",
    "head_dim_of",
    "parse_rules",
    "partition",
]
