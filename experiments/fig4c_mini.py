"""Paper Figure 4c and Table 2: AdaPM-mini against Adam-mini and AdamW, final validation loss and
optimizer-state bytes on small presets (trained), plus the state bytes at the paper's scale (Llama 350M,
GPT-2 1.5B; counted on the meta device, nothing allocated) beside the paper's Table 2.

    python experiments/fig4c_mini.py --out docs/results   # gpt2-1m and llama-1m, 300 steps, 3 seeds
    python experiments/fig4c_mini.py --quick
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

from adapm.train.memory import PAPER_TABLE2, memory_table

ARMS = [Arm("adamw", optimizer="adamw"), Arm("adam-mini", optimizer="adam-mini"),
        Arm("adapm", optimizer="adapm"), Arm("adapm-mini", optimizer="adapm-mini")]  # fmt: skip


def main() -> None:
    args = parser(__doc__, "fig4c_mini", "gpt2-1m,llama-1m", seeds=3).parse_args()
    if args.replot:
        plot(args.out / f"{args.name}.png", saved_payload(args))
        return
    s = settings(args)
    runs = run_grid(ARMS, s)
    rows = aggregate(runs, reference_arm="adamw")
    adamw = {r["model"]: r["state_bytes"] for r in rows if r["arm"] == "adamw"}
    for r in rows:
        r["state_vs_adamw"] = r["state_bytes"] / adamw[r["model"]]
    paper_scale = []
    for model in PAPER_TABLE2:
        for m in memory_table(model, ("adamw", "adam-mini", "adapm", "adapm-mini")):
            paper_scale.append({"model": model, "arm": m.optimizer, "state_bytes": m.state_bytes,
                                "state_vs_adamw": m.ratio_to_adamw, "paper_bytes": m.paper_bytes})  # fmt: skip
    columns = [("model", "model", "{}"), ("arm", "optimizer", "{}"), ("mean_val_loss", "val loss (mean)", "{:.4f}"),
               ("std_val_loss", "std", "{:.4f}"), ("minus_reference", "minus AdamW", "{:+.4f}"),
               ("seeds", "seeds", "{}"), ("state_bytes", "state bytes", "{:,}"),
               ("state_vs_adamw", "state vs AdamW", "{:.1%}")]  # fmt: skip
    mem_columns = [("model", "model", "{}"), ("arm", "optimizer", "{}"), ("state_bytes", "state bytes", "{:,}"),
                   ("state_vs_adamw", "vs AdamW", "{:.1%}"), ("paper_bytes", "paper Table 2", "{:,.0f}")]  # fmt: skip
    table = markdown(rows, columns) + "\n\nAt the paper's scale (meta device):\n\n" + markdown(paper_scale, mem_columns)
    payload = {"settings": s, "arms": ARMS, "summary": rows, "paper_scale": paper_scale, "runs": runs}
    png = write_outputs(args, payload, table)
    plot(png, payload)


def plot(png: Path, payload: dict) -> None:
    """Validation-loss curves per model (mean over seeds, min-max band) and the optimizer state at the
    paper's scale in % of AdamW's."""
    plt = pyplot()
    runs, s = payload["runs"], payload["settings"]
    arms = [a.name if isinstance(a, Arm) else a["name"] for a in payload["arms"]]  # Arm, or from the JSON
    models = list(dict.fromkeys(r["model"] for r in runs))
    fig, axes = plt.subplots(1, len(models) + 1, figsize=(6 * (len(models) + 1), 4.5), squeeze=False)
    for ax, model in zip(axes[0], models):
        curves_with_bands(ax, runs, model, arms)
        ax.legend(fontsize=8)  # four arms: inside, where the curves end high
        ax.set_title(run_title(runs, model, s), fontsize=9)
    ax = axes[0][-1]
    big = [r for r in payload["paper_scale"] if r["model"] == "gpt2-1.5b"]
    bars = ax.bar([r["arm"] for r in big], [100 * r["state_vs_adamw"] for r in big], color="tab:gray")
    ax.bar_label(bars, labels=[f"{100 * r['state_vs_adamw']:.1f}%" for r in big], fontsize=8)
    ax.set_ylabel("optimizer state, % of AdamW")
    ax.set_title("GPT-2 1.5B optimizer state (meta device)", fontsize=9)
    ax.grid(alpha=0.3, axis="y")
    fig.suptitle("Figure 4c: AdaPM-mini against Adam-mini and AdamW")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
