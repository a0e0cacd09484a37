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
from common import Arm, aggregate, markdown, parser, pyplot, run_grid, settings, write_outputs

from adapm.train.memory import PAPER_TABLE2, memory_table

ARMS = [Arm("adamw", optimizer="adamw"), Arm("adam-mini", optimizer="adam-mini"),
        Arm("adapm", optimizer="adapm"), Arm("adapm-mini", optimizer="adapm-mini")]  # fmt: skip


def main() -> None:
    args = parser(__doc__, "fig4c_mini", "gpt2-1m,llama-1m", seeds=3).parse_args()
    s = settings(args)
    runs = run_grid(s["models"], ARMS, s["seeds"], s["steps"], s["batch_size"], s["jobs"], s["threads"])
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
    plt = pyplot()
    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, len(models) + 1, figsize=(5 * (len(models) + 1), 4), squeeze=False)
    for ax, model in zip(axes[0], models):
        for arm in ARMS:
            curves = [r["val_curve"] for r in runs if r["arm"] == arm.name and r["model"] == model]
            steps = [p[0] for p in curves[0]]
            ax.plot(steps, [sum(c[i][1] for c in curves) / len(curves) for i in range(len(steps))], marker="o",
                    label=arm.name)  # fmt: skip
        ax.set_title(f"{model}: validation loss")
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    ax = axes[0][-1]
    big = [r for r in paper_scale if r["model"] == "gpt2-1.5b"]
    ax.bar([r["arm"] for r in big], [r["state_bytes"] / 1e9 for r in big])
    ax.set_title("GPT-2 1.5B optimizer state (GB)")
    fig.tight_layout()
    fig.savefig(png, dpi=110)


if __name__ == "__main__":
    main()
