"""Paper Figure 4b: sensitivity of AdaPM to the low-rank ratio (2, 5, 10, 50% of min(m, n)) and to the
refresh period of the randomized-SVD re-initialisation (10, 50, 100, 1000 steps; 1000 > the run length
means never refreshed), one knob at a time around the defaults (5%, 100). AdamW is the reference.

    python experiments/fig4b_sensitivity.py --out docs/results   # gpt2-1m, 300 steps, 2 seeds
    python experiments/fig4b_sensitivity.py --quick
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Arm, aggregate, markdown, parser, pyplot, run_grid, settings, write_outputs

RANKS = (0.02, 0.05, 0.1, 0.5)
REFRESH = (10, 50, 100, 1000)
ARMS = [Arm("adamw", optimizer="adamw")]
ARMS += [Arm(f"rank {r:.0%}", options={"rank_ratio": r}) for r in RANKS]
ARMS += [Arm(f"refresh {k}", options={"refresh_every": k}) for k in REFRESH if k != 100]  # 100 = "rank 5%"


def main() -> None:
    args = parser(__doc__, "fig4b_sensitivity", "gpt2-1m").parse_args()
    s = settings(args)
    runs = run_grid(ARMS, s)
    rows = aggregate(runs, reference_arm="adamw")
    columns = [("model", "model", "{}"), ("arm", "arm", "{}"), ("mean_val_loss", "val loss (mean)", "{:.4f}"),
               ("std_val_loss", "std", "{:.4f}"), ("minus_reference", "minus AdamW", "{:+.4f}"),
               ("seeds", "seeds", "{}"), ("state_bytes", "state bytes", "{:,}")]  # fmt: skip
    png = write_outputs(args, {"settings": s, "arms": ARMS, "summary": rows, "runs": runs}, markdown(rows, columns))
    by_arm = {r["arm"]: r for r in rows if r["model"] == rows[0]["model"]}
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    panels = [
        (axes[0], [100 * r for r in RANKS], [by_arm[f"rank {r:.0%}"] for r in RANKS], "low-rank ratio (%)"),
        (axes[1], list(REFRESH), [by_arm["rank 5%" if k == 100 else f"refresh {k}"] for k in REFRESH],
         "refresh period (steps)"),
    ]  # fmt: skip
    for ax, xs, sub, label in panels:
        ax.errorbar(xs, [r["mean_val_loss"] for r in sub], yerr=[r["std_val_loss"] for r in sub], marker="o")
        ax.axhline(by_arm["adamw"]["mean_val_loss"], color="gray", ls="--", label="AdamW")
        ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("final validation loss")
        ax.legend()
        ax.grid(alpha=0.3)
    fig.suptitle(f"Figure 4b: sensitivity ({rows[0]['model']}, {s['steps']} steps, {s['seeds']} seeds)")
    fig.tight_layout()
    fig.savefig(png, dpi=110)


if __name__ == "__main__":
    main()
