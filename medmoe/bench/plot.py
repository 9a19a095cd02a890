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


def _cdf(ax, values, label) -> None:
    xs = sorted(values)
    if xs:
        ax.plot(xs, [(i + 1) / len(xs) for i in range(len(xs))], label=label)


def plot_serve(report: dict, path: str) -> bool:
    """`--what serve`: TTFT and inter-token latency CDFs per client count, aggregate tokens/s per client count."""
    runs = report.get("runs") or []
    if not runs:
        return False
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for run in runs:
        label = f"{run['clients']} client{'s' * (run['clients'] > 1)}"
        _cdf(axes[0], run["samples_ms"]["ttft"], label)
        _cdf(axes[1], run["samples_ms"]["itl"], label)
    axes[0].set(xlabel="time to first token (ms)", ylabel="fraction of requests", title="TTFT CDF")
    axes[1].set(xlabel="inter-token latency (ms)", ylabel="fraction of gaps", title="ITL CDF", xscale="log")
    for ax in axes[:2]:
        if ax.get_legend_handles_labels()[0]:  # runs without answers draw no curve
            ax.legend(fontsize=8)
    axes[2].bar([str(r["clients"]) for r in runs], [r["tokens_per_s"] for r in runs])
    axes[2].set(xlabel="concurrent clients", ylabel="completion tokens/s (aggregate)", title="throughput")
    fig.suptitle(f"{report.get('model', '')} on {report.get('device', '')}, {runs[0]['max_tokens']}-token answers",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def plot_soak(report: dict, path: str) -> bool:
    """`--what soak`: the server's RSS over time (load window shaded) and good requests' latency."""
    samples = report.get("rss_samples") or []
    if not samples:
        return False
    fig, (ax, hist) = plt.subplots(1, 2, figsize=(11, 4))
    ax.plot([t for t, _ in samples], [mb for _, mb in samples])
    start_s, end_s = report["load_window_s"]
    ax.axvspan(start_s, end_s, alpha=0.15, color="tab:orange", label="load (then requests in flight finish)")
    ax.axvline(start_s + report["seconds"], lw=0.8, color="tab:orange", label="clients stop starting requests")
    start = report["rss_mb"]["start"]
    ax.axhline(start * 1.1, ls="--", lw=0.8, color="grey", label="start + 10%")
    ax.set(xlabel="s", ylabel="server RSS (MiB)", title="server memory")
    ax.legend(fontsize=8)
    hist.hist(report.get("good_latency_samples_ms") or [0], bins=40)
    hist.set(xlabel="latency of good requests (ms)", ylabel="requests",
             title=f"{report['good']['requests']} good, {report['good']['failed']} failed")
    fig.suptitle(f"{report.get('model', '')} on {report.get('device', '')}: {sum(report['clients'].values())} "
                 f"clients, {report['seconds']:g} s", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
