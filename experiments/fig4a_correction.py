"""Paper Figure 4a: does the residual correction matter? AdaPM with the `unbiased` correction (ours,
docs/algorithm.md), with `none` (plain low-rank momentum), and with the formula printed in the paper's
Algorithm 1 (`paper`, an experiment-only option), at low-rank ratios 5% and 50%; plus the `gd` tracker
(the paper's) and our cheaper `fixed` tracker against the default `power` tracker. AdamW is the reference.

    python experiments/fig4a_correction.py --out docs/results   # gpt2-1m, 300 steps, 2 seeds
    python experiments/fig4a_correction.py --quick
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    Arm,
    aggregate,
    curves_with_bands,
    markdown,
    parser,
    pyplot,
    run_grid,
    run_title,
    saved_payload,
    settings,
    write_outputs,
)

ARMS = [Arm("adamw", optimizer="adamw")]
for _ratio in (0.05, 0.5):
    for _correction in ("unbiased", "none", "paper"):
        ARMS.append(Arm(f"{_correction} r={_ratio:.0%}", options={"correction": _correction, "rank_ratio": _ratio}))
    ARMS.append(Arm(f"unbiased gd r={_ratio:.0%}", options={"tracker": "gd", "rank_ratio": _ratio}))
    ARMS.append(Arm(f"unbiased fixed r={_ratio:.0%}", options={"tracker": "fixed", "rank_ratio": _ratio}))


def main() -> None:
    args = parser(__doc__, "fig4a_correction", "gpt2-1m").parse_args()
    if args.replot:
        payload = saved_payload(args)
        plot_curves(args.out / f"{args.name}.png", payload["runs"], payload["settings"], TITLE)
        return
    s = settings(args)
    runs = run_grid(ARMS, s)
    rows = aggregate(runs, reference_arm="adamw")
    columns = [("model", "model", "{}"), ("arm", "arm", "{}"), ("mean_val_loss", "val loss (mean)", "{:.4f}"),
               ("std_val_loss", "std", "{:.4f}"), ("minus_reference", "minus AdamW", "{:+.4f}"),
               ("seeds", "seeds", "{}"), ("state_bytes", "state bytes", "{:,}")]  # fmt: skip
    png = write_outputs(args, {"settings": s, "arms": ARMS, "summary": rows, "runs": runs}, markdown(rows, columns))
    plot_curves(png, runs, s, TITLE)


TITLE = "Figure 4a: residual correction and tracker"


def plot_curves(png: Path, runs: list[dict], s: dict, title: str) -> None:
    """Validation-loss curves per arm (first model): the mean over seeds and their min-max band."""
    plt = pyplot()
    model = runs[0]["model"]
    fig, ax = plt.subplots(figsize=(10, 5))
    arms = list(dict.fromkeys(r["arm"] for r in runs))
    styles = {arm: "--" if "none" in arm else (":" if "paper" in arm else "-") for arm in arms}
    curves_with_bands(ax, runs, model, arms, styles)
    ax.set_title(f"{title}\n{run_title(runs, model, s)}", fontsize=10)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
