"""Paper Table 1: which blocks need which momentum. Five partitions of the same AdaPM optimizer (full
second moments, the same lr and clip), final validation loss on a GPT-2 and a Llama preset:

* all full: every block full momentum (Adam-like)
* QKV,MLP full; Em,O none: momentum dropped only where the paper says it is not needed
* QKV,MLP low-rank; Em,O none: the value block low-rank too
* AdaPM: V full; Q,K,MLP low-rank; Em,O none (the paper's choice, our default)
* none: no momentum anywhere (RMSprop-like)

    python experiments/table1_partition.py --out docs/results     # gpt2-1m and llama-1m, 300 steps, 3 seeds
    python experiments/table1_partition.py --quick                # smoke test
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    QKV_MLP_WEIGHTS,
    VALUE_WEIGHTS,
    Arm,
    aggregate,
    markdown,
    parser,
    pyplot,
    run_grid,
    settings,
    write_outputs,
)

ARMS = [
    Arm("all full", options={"rules": [[".*", "full"]]}),
    Arm("QKV,MLP full; Em,O none", options={"rules": [[QKV_MLP_WEIGHTS, "full"]]}),
    Arm("QKV,MLP low-rank; Em,O none", options={"rules": [[VALUE_WEIGHTS, "lowrank"]]}),
    Arm("AdaPM: V full; QK,MLP low-rank; Em,O none"),
    Arm("none anywhere", options={"rules": [[".*", "none"]]}),
]
PAPER = {"all full": 2.962, "QKV,MLP full; Em,O none": 2.964, "QKV,MLP low-rank; Em,O none": 3.143,
         "AdaPM: V full; QK,MLP low-rank; Em,O none": 2.997, "none anywhere": None}  # fmt: skip
"""The paper's Table 1 (GPT-2 124M final loss; it has no 'none anywhere' row)."""


def main() -> None:
    args = parser(__doc__, "table1_partition", "gpt2-1m,llama-1m", seeds=3).parse_args()
    s = settings(args)
    runs = run_grid(ARMS, s)
    rows = aggregate(runs, reference_arm="all full")
    for row in rows:
        row["paper"] = PAPER.get(row["arm"])
    columns = [("model", "model", "{}"), ("arm", "partition", "{}"), ("mean_val_loss", "val loss (mean)", "{:.4f}"),
               ("std_val_loss", "std", "{:.4f}"), ("minus_reference", "minus all-full", "{:+.4f}"),
               ("seeds", "seeds", "{}"), ("state_bytes", "state bytes", "{:,}"),
               ("paper", "paper (GPT-2 124M)", "{:.3f}")]  # fmt: skip
    table = markdown(rows, columns)
    png = write_outputs(args, {"settings": s, "arms": ARMS, "summary": rows, "runs": runs}, table)
    plt = pyplot()
    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models):
        sub = [r for r in rows if r["model"] == model]
        ax.barh([r["arm"] for r in sub], [r["mean_val_loss"] for r in sub], xerr=[r["std_val_loss"] for r in sub])
        lo = min(r["mean_val_loss"] for r in sub)
        ax.set_xlim(lo - 0.15, max(r["mean_val_loss"] for r in sub) + 0.1)
        ax.invert_yaxis()
        ax.set_title(f"{model}: final val loss ({s['steps']} steps, {s['seeds']} seeds)")
    fig.tight_layout()
    fig.savefig(png, dpi=110)


if __name__ == "__main__":
    main()
