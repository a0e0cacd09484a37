"""The examples run as their docstrings say (the distributed one, minutes of two processes, is run by
hand: its output is the table in docs/distributed.md)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_partition_report_example_prints_reports_and_real_size_totals() -> None:
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error"}
    proc = subprocess.run([sys.executable, str(EXAMPLES / "partition_report.py")], capture_output=True, text=True,
                          env=env, timeout=300, check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "## AdaPMMini on a 1-layer HF GPT-2" in proc.stdout
    shares = [float(x) for x in re.findall(r"([\d.]+)% of AdamW's", proc.stdout)]
    assert len(shares) >= 6 and all(0.0 < x < 100.0 for x in shares), proc.stdout[-2000:]
