"""A picture of a `medmoe bench` report: MoE layer times per path, decode tokens/s against the floor."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

PATHS = ("ours", "loop", "official", "floor")


def plot_report(report: dict, path: str) -> bool:
    """Write the figure to `path`; False when the report has nothing to draw."""
    panels = [k for k in ("moe_layer", "decode") if k in report]
    if not panels:
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
    for ax, key in zip(axes[0], panels):
        if key == "moe_layer":
            rows = report[key]["rows"]
            width = 0.8 / len(PATHS)
            for i, name in enumerate(PATHS):
                ax.bar([j + i * width for j in range(len(rows))], [r["fwd_bwd_ms"][name] for r in rows], width, label=name)
            ax.set_xticks([j + 0.4 - width / 2 for j in range(len(rows))], [str(r["tokens"]) for r in rows])
            ax.set_yscale("log")
            ax.set(xlabel="tokens", ylabel="fwd+bwd ms (median)", title="one Med-MoE layer, Phi-2 size")
        else:
            rows = report[key]["rows"]
            labels = [f"batch {r['batch']}" for r in rows]
            for i, (name, field) in enumerate((("plain loop", "plain_tokens_per_s"), ("static + graph", "tokens_per_s"),
                                               ("memory floor", "floor_tokens_per_s"))):
                ax.bar([j + i * 0.27 for j in range(len(rows))], [r[field] for r in rows], 0.27, label=name)
            ax.set_xticks([j + 0.27 for j in range(len(rows))], labels)
            ax.set(ylabel="tokens/s", title="decode, Phi-2-size Med-MoE, 576-token image prompt")
        ax.legend(fontsize=8)
    fig.suptitle(report.get("device", ""), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
