"""Plots logged with every run (PNG artifacts under ``plots/``), drawn with matplotlib's Agg backend.

    from pipeline.tracking import plots
    plots.sample_grid(exp, "out/plots/samples.png")           # exported samples + labels, read back
    plots.curves({"train/loss": [(0, 2.1), (1, 1.3)], "val/loss": [...]}, "loss", "out/plots/loss.png")
    y_true, y_pred = plots.predict(model, val_loader, device)
    plots.confusion(y_true, y_pred, class_names, "out/plots/confusion_matrix.png")
    plots.log_training_plots(tracked_run, model, val_loader, device, class_names, "out/plots")

``sample_grid`` reads samples through the export's own Dataset, so it shows what training will see
(a check of the export, not of the source). ``log_training_plots`` draws the loss and accuracy
curves from the per-epoch metrics the run logged to MLflow, and the confusion matrix of the
trained model on val (one extra pass over val after training, outside the training loop). With
more than ``MAX_CLASSES`` classes the matrix keeps the most frequent true classes of val.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

MAX_CLASSES = 30
GRID = 16


def _figure(width: float, height: float, layout: str | None = "constrained"):
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    return Figure(figsize=(width, height), dpi=100, layout=layout)


def _save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def _short(name: str, n: int = 18) -> str:
    return name if len(name) <= n else name[: n - 1] + "…"


def _pick(labels: np.ndarray, n: int) -> np.ndarray:
    """Up to ``n`` sample ids, taking classes in turn so the grid shows as many classes as it can."""
    per_class = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    ids: list[int] = []
    for rank in range(n):
        for members in per_class:
            if rank < len(members) and len(ids) < n:
                ids.append(int(members[rank]))
    return np.array(sorted(ids), dtype=np.int64)


def _show(ax, sample: np.ndarray) -> None:
    x = np.asarray(sample)
    if x.ndim == 3 and x.shape[-1] not in (1, 3, 4):
        x = x[..., 0]
    if x.ndim == 3 and x.shape[-1] == 1:
        x = x[..., 0]
    if x.ndim == 1:
        ax.plot(x, lw=0.8)
        ax.set_xticks([])
        ax.set_yticks([])
        return
    if x.ndim > 3:
        x = x.reshape(x.shape[0], -1)
    if x.dtype == np.uint8:
        lo, hi = 0.0, 255.0
    else:  # floats of any range: stretch each image to its own min..max
        x = x.astype(np.float32)
        lo, hi = float(x.min()), float(x.max())
    if x.ndim == 3:  # colour: imshow needs [0, 1] floats or uint8
        x = np.clip((x - lo) / max(hi - lo, 1e-12), 0, 1)
        ax.imshow(x, interpolation="nearest")
    else:
        ax.imshow(x, cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1, interpolation="nearest")
    ax.axis("off")


def sample_grid(exp, path, n: int = GRID) -> Path:
    """A grid of exported samples, read back through the export's Dataset, titled with their labels."""
    ids = _pick(exp.labels, n)
    ds = exp.dataset(ids)
    cols = min(len(ids), 8)
    rows = -(-len(ids) // cols)
    # a fixed grid (constrained layout would double the cost: this plot is drawn for every run)
    height = 1.8 * rows + 0.4
    fig = _figure(1.6 * cols, height, layout=None)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.02, top=1 - 0.55 / height, wspace=0.1, hspace=0.35)
    axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
    names = exp.spec.class_names
    for ax, i in zip(axes, range(len(ids))):
        x, y = ds[i]
        _show(ax, x.numpy() if isinstance(x, torch.Tensor) else np.asarray(x))
        label = names[y] if 0 <= y < len(names) else str(y)
        ax.set_title(f"#{ids[i]}: {_short(label)}", fontsize=8)
    for ax in axes[len(ids) :]:
        ax.axis("off")
    fig.suptitle(f"{exp.manifest['name']}: {len(ids)} exported samples with their labels", fontsize=9)
    return _save(fig, path)


def curves(series: dict[str, list[tuple[int, float]]], ylabel: str, path) -> Path:
    """One line per metric over epochs; ``series`` maps a metric name to (step, value) pairs."""
    fig = _figure(6, 4)
    ax = fig.subplots()
    for name, points in series.items():
        if points:
            steps, values = zip(*sorted(points))
            ax.plot([s + 1 for s in steps], values, marker="o", label=name)
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(ylabel)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return _save(fig, path)


@torch.no_grad()
def predict(model, loader, device) -> tuple[np.ndarray, np.ndarray]:
    """True labels and the model's predicted classes over ``loader`` (one pass, eval mode)."""
    model.eval()
    truth, pred = [], []
    for x, y in loader:
        out = model(x.to(device, non_blocking=True))
        truth.append(np.asarray(y))
        pred.append(out.argmax(1).cpu().numpy())
    if not truth:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    return np.concatenate(truth).astype(np.int64), np.concatenate(pred).astype(np.int64)


def confusion_counts(y_true, y_pred, num_classes: int) -> np.ndarray:
    """``m[t, p]``: number of samples of true class t predicted as p."""
    idx = np.asarray(y_true, np.int64) * num_classes + np.asarray(y_pred, np.int64)
    return np.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def top_confusion(y_true, y_pred, num_classes: int, limit: int) -> tuple[np.ndarray, np.ndarray]:
    """(kept classes, their confusion counts): the ``limit`` most frequent true classes, without ever
    building the dense num_classes^2 matrix (5,749 LFW classes would take 264 MB)."""
    y_true, y_pred = np.asarray(y_true, np.int64), np.asarray(y_pred, np.int64)
    if num_classes <= limit:
        return np.arange(num_classes), confusion_counts(y_true, y_pred, num_classes)
    keep = np.sort(np.argsort(-np.bincount(y_true, minlength=num_classes), kind="stable")[:limit])
    pos = np.full(num_classes, -1, np.int64)
    pos[keep] = np.arange(len(keep))
    both = (pos[y_true] >= 0) & (pos[y_pred] >= 0)
    return keep, confusion_counts(pos[y_true[both]], pos[y_pred[both]], len(keep))


def confusion(y_true, y_pred, class_names, path) -> Path:
    k = len(class_names)
    keep, m = top_confusion(y_true, y_pred, k, MAX_CLASSES)
    title = f"confusion matrix on val ({len(y_true)} samples, accuracy {np.mean(y_true == y_pred):.3f})"
    if k > MAX_CLASSES:
        title += f"\n{MAX_CLASSES} most frequent of {k} classes"
    size = min(3 + 0.35 * len(keep), 14)
    fig = _figure(size + 1, size)
    ax = fig.subplots()
    im = ax.imshow(m, cmap="Blues")
    fig.colorbar(im, ax=ax, shrink=0.8, label="samples")
    labels = [_short(class_names[i]) for i in keep]
    ax.set_xticks(range(len(keep)), labels, rotation=90, fontsize=7)
    ax.set_yticks(range(len(keep)), labels, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if len(keep) <= 15:
        top = m.max() if m.size else 0
        for (t, p), v in np.ndenumerate(m):
            ax.text(
                p, t, str(v), ha="center", va="center", fontsize=7, color="white" if v > top / 2 else "black"
            )
    ax.set_title(title, fontsize=9)
    return _save(fig, path)


def _history(tr, key: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in tr.client.get_metric_history(tr.run_id, key)]


def log_training_plots(tr, model, val_loader, device, class_names, out_dir) -> list[Path]:
    """Draw loss/accuracy curves and the val confusion matrix into ``out_dir``; log them under plots/."""
    out_dir = Path(out_dir)
    paths = [
        curves({k: _history(tr, k) for k in ("train/loss", "val/loss")}, "loss", out_dir / "loss.png"),
        curves(
            {k: _history(tr, k) for k in ("train/accuracy", "val/accuracy")},
            "accuracy",
            out_dir / "accuracy.png",
        ),
        confusion(*predict(model, val_loader, device), list(class_names), out_dir / "confusion_matrix.png"),
    ]
    for path in paths:
        tr.log_artifact(path, "plots")
    return paths
