"""Smoke test of every paper-reproduction script in --quick mode: it runs, and writes its JSON (with
every run and the machine), its Markdown table and its PNG."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ["table1_partition", "fig4a_correction", "fig4b_sensitivity", "fig4c_mini", "fig5a_scaling"]


@pytest.mark.parametrize("name", SCRIPTS)
def test_experiment_quick(name: str, tmp_path: Path) -> None:
    script = ROOT / "experiments" / f"{name}.py"
    cmd = [sys.executable, str(script), "--quick", "--jobs", "1", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / f"{name}.json").read_text())
    assert result["experiment"] == name and result["machine"]["torch"]
    assert result["runs"] and all(r["final_val_loss"] > 0 for r in result["runs"])
    arms = {r["arm"] for r in result["runs"]}
    assert arms == {r["arm"] for r in result["summary"]} and len(arms) >= 3
    assert (tmp_path / f"{name}.png").stat().st_size > 10_000
    assert "|" in (tmp_path / f"{name}.md").read_text()


@pytest.mark.parametrize("name", ["fig4a_correction", "fig4c_mini"])
def test_replot_redraws_the_png_from_the_committed_json(name: str, tmp_path: Path) -> None:
    """--replot draws NAME.png from NAME.json alone (here the committed results, copied), running nothing;
    without a JSON it says which file it needs."""
    (tmp_path / f"{name}.json").write_text((ROOT / "docs" / "results" / f"{name}.json").read_text())
    cmd = [sys.executable, str(ROOT / "experiments" / f"{name}.py"), "--replot", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / f"{name}.png").stat().st_size > 10_000
    assert not (tmp_path / f"{name}.md").exists()  # nothing was run or rewritten
    empty = tmp_path / "empty"
    proc = subprocess.run([*cmd[:-1], str(empty)], capture_output=True, text=True, check=False, timeout=300)
    assert proc.returncode != 0 and f"{name}.json" in proc.stderr and "run the experiment first" in proc.stderr
