"""Paper Figure 5a: does AdaPM keep up with AdamW as models grow? AdamW, AdaPM and AdaPM-mini on four
Llama sizes (0.9M to 10M parameters, 2048-token vocabulary: the largest whose runs fit this 2-core
machine's time budget) at equal steps and tokens, final validation loss against parameter count.

    python experiments/fig5a_scaling.py --out docs/results   # llama-1m/2m/5m/10m, 150 steps, 1 seed
    python experiments/fig5a_scaling.py --quick
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Arm, aggregate, markdown, parser, pyplot, run_grid, settings, write_outputs

ARMS = [Arm("adamw", optimizer="adamw"), Arm("adapm", optimizer="adapm"), Arm("adapm-mini", optimizer="adapm-mini")]


def main() -> None:
    args = parser(__doc__, "fig5a_scaling", "llama-1m,llama-2m,llama-5m,llama-10m", steps=150, seeds=1).parse_args()
    s = settings(args)
    runs = run_grid(ARMS, s)
    rows = aggregate(runs, reference_arm="adamw")
    columns = [("model", "model", "{}"), ("parameters", "parameters", "{:,}"), ("arm", "optimizer", "{}"),
               ("mean_val_loss", "val loss (mean)", "{:.4f}"), ("std_val_loss", "std", "{:.4f}"),
               ("minus_reference", "minus AdamW", "{:+.4f}"), ("seeds", "seeds", "{}"),
               ("state_bytes", "state bytes", "{:,}")]  # fmt: skip
    png = write_outputs(args, {"settings": s, "arms": ARMS, "summary": rows, "runs": runs}, markdown(rows, columns))
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for arm in ARMS:
        sub = sorted((r for r in rows if r["arm"] == arm.name), key=lambda r: r["parameters"])
        ax.errorbar([r["parameters"] for r in sub], [r["mean_val_loss"] for r in sub],
                    yerr=[r["std_val_loss"] for r in sub], marker="o", label=arm.name)  # fmt: skip
    ax.set_xscale("log")
    ax.set_xlabel("parameters")
    ax.set_ylabel("final validation loss")
    ax.set_title(f"Figure 5a: scaling ({s['steps']} steps, {s['seeds']} seed(s))")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=110)


if __name__ == "__main__":
    main()
