"""Helpers for the reproducibility tests: run a job in-process and read back its MLflow records."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import compose_cfg, sqlite_uri

# small and quick: digits, one .npy per sample, a small MLP with dropout (so the global torch RNG
# matters), no model artifact unless a test asks for it
FAST = [
    "storage=npy",
    "model.hidden=[32]",
    "model.dropout=0.2",
    "loader.batch_size=128",
    "tracking.log_model=false",
]
COMPARED = ("train/loss", "train/accuracy", "val/loss", "val/accuracy")


def client(root: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=sqlite_uri(root))


def run_job(root: Path, overrides: list[str], run_dir: str = "run") -> str:
    """Run one job in this process with outputs under ``root``; return its MLflow run id."""
    from pipeline.job import run

    cfg = compose_cfg(root, [*FAST, f"paths.output_dir={root}/{run_dir}", *overrides])
    run(cfg)
    return run_id_for(root, root / run_dir)


def run_id_for(root: Path, output_dir: Path) -> str:
    c = client(root)
    exps = [e.experiment_id for e in c.search_experiments()]
    runs = c.search_runs(exps, filter_string=f"tags.`pipeline.output_dir` = '{output_dir}'")
    assert len(runs) == 1, f"expected one run for {output_dir}, found {len(runs)}"
    return runs[0].info.run_id


def histories(root: Path, run_id: str, keys=COMPARED) -> dict[str, list[tuple[int, float]]]:
    """Per-epoch history of each metric: [(step, value), ...] sorted by step."""
    c = client(root)
    return {k: sorted((m.step, m.value) for m in c.get_metric_history(run_id, k)) for k in keys}


def epochs(loader, n: int = 2) -> list[list[tuple]]:
    """``n`` epochs of ``loader`` as lists of cloned ``(x, y)`` batches."""
    return [[(x.clone(), y.clone()) for x, y in loader] for _ in range(n)]


def same_batches(a, b) -> bool:
    """Two ``epochs()`` results hold the same batches, bit for bit, in the same order."""
    import torch

    return len(a) == len(b) and all(
        len(ea) == len(eb)
        and all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(ea, eb))
        for ea, eb in zip(a, b)
    )
