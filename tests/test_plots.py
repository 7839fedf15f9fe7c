"""Run plots: drawn from real exports and real predictions (a CLI run logs them: test_job.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.data.export import export
from pipeline.tracking import plots
from tests.conftest import compose_cfg

PLOTS = {"plots/samples.png", "plots/loss.png", "plots/accuracy.png", "plots/confusion_matrix.png"}


def _png(path) -> np.ndarray:
    with Image.open(path) as img:
        assert img.format == "PNG"
        return np.asarray(img.convert("L"))


def _not_blank(pixels: np.ndarray) -> None:
    assert pixels.shape[0] > 200 and pixels.shape[1] > 300
    assert pixels.std() > 10  # something drawn, not an empty canvas


def test_confusion_counts():
    m = plots.confusion_counts([0, 0, 1, 2, 2, 2], [0, 1, 1, 2, 2, 0], 3)
    assert m.tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 2]]


def test_pick_takes_classes_in_turn():
    labels = np.array([0] * 10 + [1] * 2 + [2] * 10)
    ids = plots._pick(labels, 8)
    assert len(ids) == 8 and set(labels[ids]) == {0, 1, 2} and (labels[ids] == 1).sum() == 2


@pytest.mark.parametrize(
    "overrides",
    [
        ["source=digits", "storage=npy"],  # floats [0, 1], 8x8
        ["source=synthetic", "source.num_samples=64", "source.shape=[12,10,3]", "source.dtype=uint8"],
        ["source=synthetic", "source.num_samples=64", "source.shape=[30]"],  # not an image: a line
    ],
    ids=["digits", "rgb-uint8", "vector"],
)
def test_sample_grid_reads_the_export_back(tmp_path, overrides):
    cfg = compose_cfg(tmp_path, overrides)
    exp = export(cfg.source, cfg.storage, cfg.paths.data_dir)
    path = plots.sample_grid(exp, tmp_path / "plots" / "samples.png")
    _not_blank(_png(path))


def test_top_confusion_is_the_dense_matrix_of_the_most_frequent_classes():
    rng = np.random.default_rng(0)
    y_true, y_pred = rng.integers(0, 50, 2000), rng.integers(0, 50, 2000)
    keep, m = plots.top_confusion(y_true, y_pred, 50, 30)
    dense = plots.confusion_counts(y_true, y_pred, 50)
    expected = np.sort(np.argsort(-dense.sum(1), kind="stable")[:30])
    assert keep.tolist() == expected.tolist() and (m == dense[np.ix_(keep, keep)]).all()
    keep, m = plots.top_confusion(y_true, y_pred, 50, 60)  # all of them
    assert len(keep) == 50 and (m == dense).all()


def test_curves_and_confusion(tmp_path):
    series = {"train/loss": [(1, 1.0), (0, 2.0), (2, 0.5)], "val/loss": [(0, 2.1), (1, 1.2), (2, 0.9)]}
    _not_blank(_png(plots.curves(series, "loss", tmp_path / "loss.png")))
    rng = np.random.default_rng(0)
    y = rng.integers(0, 5, 200)
    _not_blank(
        _png(plots.confusion(y, np.where(rng.random(200) < 0.7, y, 0), list("abcde"), tmp_path / "c.png"))
    )
    many = [f"person_{i}" for i in range(300)]  # LFW-like: only the most frequent classes are drawn
    y = rng.integers(0, 300, 2000)
    _not_blank(_png(plots.confusion(y, y, many, tmp_path / "many.png")))


def test_predict_matches_the_model():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    x = torch.randn(10, 4)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, torch.arange(10) % 3), batch_size=4
    )
    y_true, y_pred = plots.predict(model, loader, torch.device("cpu"))
    assert y_true.tolist() == [i % 3 for i in range(10)]
    assert y_pred.tolist() == model(x).argmax(1).tolist()
