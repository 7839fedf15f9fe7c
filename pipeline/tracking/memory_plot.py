"""The memory timeline of a run as a PNG: memory vs time, epochs marked, one line per process kind.

    from pipeline.tracking.memory_plot import plot_timeline
    plot_timeline(sampler.samples, sampler.epoch_marks, "memory_timeline.png", budget_mb=2000)

Solid lines are ``used`` memory (anonymous + shared PSS) of the main process, of the DataLoader
workers together, and their total; the dashed line is mapped file pages (page cache the kernel can
drop); dotted verticals mark epoch starts; a red line marks the budget. On CUDA a second panel shows
allocated and reserved device memory.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_timeline(samples, epoch_marks, path, budget_mb: float | None = None, title: str = "") -> Path:
    path = Path(path)
    if not samples:
        raise ValueError("no memory samples to plot")
    t0 = samples[0].t
    t = [s.t - t0 for s in samples]
    cuda = any(s.cuda_allocated_mb is not None for s in samples)
    fig, axes = plt.subplots(2 if cuda else 1, 1, figsize=(9, 7 if cuda else 5), sharex=True, squeeze=False)
    ax = axes[0][0]
    ax.plot(t, [s.used_mb for s in samples], color="black", lw=1.8, label="used, total (memory/used_mb)")
    ax.plot(t, [s.used_main_mb for s in samples], color="tab:blue", lw=1.2, label="used, main process")
    if any(s.workers for s in samples):  # gaps while no worker is alive
        nan = float("nan")
        used_w = [s.used_workers_mb if s.workers else nan for s in samples]
        uss_w = [s.uss_workers_mb if s.workers else nan for s in samples]
        ax.plot(t, used_w, color="tab:orange", lw=1.2, label="used, workers")
        ax.plot(t, uss_w, color="tab:orange", lw=0.8, ls=":", label="USS, workers (private pages)")
    ax.plot(
        t, [s.mapped_file_mb for s in samples], color="tab:gray", lw=1.0, ls="--", label="mapped file pages"
    )
    if budget_mb is not None:
        ax.axhline(budget_mb, color="tab:red", lw=1.0, label=f"budget {budget_mb:g} MB")
    ax.set_ylabel("MB")
    ax.set_ylim(bottom=0)
    axes_all = [a[0] for a in axes]
    if cuda:
        cx = axes[1][0]
        cx.plot(t, [s.cuda_allocated_mb or 0 for s in samples], color="tab:green", label="CUDA allocated")
        cx.plot(t, [s.cuda_reserved_mb or 0 for s in samples], color="tab:olive", ls="--", label="reserved")
        cx.set_ylabel("MB")
        cx.legend(loc="upper left", fontsize=8)
    for epoch, start in epoch_marks:
        for a in axes_all:
            a.axvline(start - t0, color="tab:purple", lw=0.8, ls=":")
        ax.annotate(
            f"epoch {epoch}",
            (start - t0, 1),
            xycoords=("data", "axes fraction"),
            fontsize=7,
            rotation=90,
            va="top",
            ha="right",
            color="tab:purple",
        )
    below = {} if cuda else {"loc": "upper center", "bbox_to_anchor": (0.5, -0.12), "ncol": 3}
    ax.legend(fontsize=8, **below)
    ax.set_title(title or "memory timeline")
    axes_all[-1].set_xlabel("seconds since sampling started")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
