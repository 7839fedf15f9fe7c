"""The loader bench's figures, written out: ``results.csv`` (one row per point), the table it logs and
``results.png`` (samples/s per point, log scale, with the ratios to the baselines).

A new column is a name in ``COLUMNS`` (and, to show it, a row of ``TABLE``); pipeline/bench/loader.py puts
its value in each row.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

RAM = "numpy_ram"  # the in-RAM gather's rows
COLUMNS = [
    "storage",
    "num_workers",
    "batch_size",
    "prefetch",
    "decode_threads",
    "samples_per_s",
    "pass_samples_per_s",
    "mb_per_s",
    "bytes_per_sample",
    "peak_used_mb",
    "peak_mapped_file_mb",
    "first_batch_ms",
    "passes",
    "seconds",
    "shuffle_quality",
    "export_seconds",
    "ratio_vs_pt",
    "ratio_vs_ram",
    "cache",
    "memory_limit_mb",
    "disk_read_mb",
    "read_amplification",
    "ratio_vs_disk",
    "disk_mb_per_s",
    "cgroup_peak_mb",
]


def label(row: dict) -> str:
    if row["storage"] == RAM:
        return f"{RAM} b{row['batch_size']}"
    threads = f" t{row['decode_threads']}" if row.get("decode_threads") else ""
    return f"{row['storage']} w{row['num_workers']} b{row['batch_size']} p{row['prefetch']}{threads}"


def describe(row: dict) -> str:
    return (
        f"{label(row):28s} {row['samples_per_s']:>12,.0f} samples/s  "
        f"first batch {row['first_batch_ms']:.1f} ms  "
        f"peak used {row['peak_used_mb']:.0f} MB, mapped {row['peak_mapped_file_mb']:.0f} MB, "
        f"{row['cache']}, disk {row['disk_read_mb']:.1f} MB/pass ({row['read_amplification']:.2f}x)"
    )


def write_csv(rows: list[dict], path: Path) -> Path:
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()})
    return path


TABLE = [  # header, width, format
    ("samples/s", 11, "{samples_per_s:,.0f}"),
    ("w/ start", 10, "{pass_samples_per_s:,.0f}"),
    ("MB/s", 7, "{mb_per_s:,.0f}"),
    ("B/sample", 8, "{bytes_per_sample:,.0f}"),
    ("vs pt", 8, "{ratio_vs_pt:.1f}x"),
    ("vs RAM", 7, "{ratio_vs_ram:.2f}x"),
    ("vs disk", 8, "{ratio_vs_disk:.2f}x"),
    ("disk MB", 8, "{disk_read_mb:.1f}"),
    ("read amp", 8, "{read_amplification:.2f}x"),
    ("used MB", 8, "{peak_used_mb:.0f}"),
    ("mapped MB", 9, "{peak_mapped_file_mb:.0f}"),
    ("1st ms", 7, "{first_batch_ms:.1f}"),
    ("shuffle", 7, "{shuffle_quality:.2f}"),
]


def format_table(rows: list[dict]) -> str:
    lines = [f"{'config':28s}" + "".join(f" {h:>{w}s}" for h, w, _ in TABLE)]
    for r in rows:
        lines.append(f"{label(r):28s}" + "".join(f" {f.format(**r):>{w}s}" for _, w, f in TABLE))
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(rows, key=lambda r: r["samples_per_s"])
    names = sorted({r["storage"] for r in rows})
    colors = {n: plt.get_cmap("tab10")(i % 10) for i, n in enumerate(names)}
    fig, ax = plt.subplots(figsize=(10, 0.45 * len(rows) + 1.8))
    ypos = np.arange(len(rows))
    ax.barh(ypos, [r["samples_per_s"] for r in rows], color=[colors[r["storage"]] for r in rows])
    ax.set_yticks(ypos, [label(r) for r in rows])
    ax.set_xscale("log")
    ax.set_xlabel("samples/s (log scale; w = workers, b = batch size, p = thread prefetch depth)")
    ax.set_title(title)
    top = max(r["samples_per_s"] for r in rows)
    ax.set_xlim(right=top * 8)
    for y, r in zip(ypos, rows):
        ax.text(
            r["samples_per_s"] * 1.05,
            y,
            f"{r['samples_per_s']:,.0f}  ({r['ratio_vs_pt']:.3g}x pt, {r['ratio_vs_ram']:.2g}x RAM)",
            va="center",
            fontsize=8,
        )
    ax.grid(axis="x", which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
