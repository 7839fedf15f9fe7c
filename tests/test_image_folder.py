"""source=image_folder: listing, broken files, links that try to leave the root, export reuse, a real job."""

from __future__ import annotations

import logging
import os

import numpy as np
import pytest
from hydra.errors import ConfigCompositionException
from mlflow.tracking import MlflowClient
from PIL import Image

from pipeline.config.validate import ConfigError, validate
from pipeline.data.export import export
from pipeline.data.sources import build_source
from pipeline.data.sources.image_folder import ImageFolderError
from tests.conftest import compose_cfg, run_cli, sqlite_uri
from tests.image_folders import BROKEN, CLASSES, make_image_folder

PLOTS = {"plots/samples.png", "plots/loss.png", "plots/accuracy.png", "plots/confusion_matrix.png"}


def _cfg(tmp_path, root, *overrides):
    return compose_cfg(tmp_path, ["source=image_folder", f"source.root={root}", *overrides])


def _truncated_jpeg(path):
    """A JPEG whose header is intact and whose pixel data stops at 70%."""
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(path.with_suffix(".full.jpg"))
    data = path.with_suffix(".full.jpg").read_bytes()
    path.with_suffix(".full.jpg").unlink()
    path.write_bytes(data[: int(len(data) * 0.7)])


def test_lists_classes_skips_the_broken_file_and_reads_chunk_by_chunk(tmp_path, caplog):
    root = make_image_folder(tmp_path / "imgs", per_class=6)
    (root / "circle" / "notes.txt").write_text("not an image, wrong extension: ignored")
    (root / ".hidden").mkdir()
    cfg = _cfg(tmp_path, root, "source.size=[16,20]", "source.chunk_size=5")
    validate(cfg)
    with caplog.at_level(logging.WARNING):
        src = build_source(cfg.source)
    spec = src.spec
    assert spec.class_names == CLASSES and spec.num_classes == 3
    assert spec.num_samples == 18 and spec.shape == (16, 20) and spec.dtype == "uint8"
    assert str(root / BROKEN) in caplog.text  # named, then skipped

    chunks = list(src.chunks())
    assert [len(y) for _, y in chunks] == [5, 5, 5, 3]
    x = np.concatenate([c[0] for c in chunks])
    y = np.concatenate([c[1] for c in chunks])
    assert x.shape == (18, 16, 20) and np.bincount(y).tolist() == [6, 6, 6]
    with Image.open(root / "circle" / "000.jpg") as img:  # first file of the first class
        want = np.asarray(img.convert("L").resize((20, 16), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(x[0], want)


def test_rgb_mode(tmp_path):
    root = make_image_folder(tmp_path / "imgs", per_class=2, broken=False)
    src = build_source(_cfg(tmp_path, root, "source.mode=RGB", "source.size=[8,8]").source)
    x, _ = next(iter(src.chunks()))
    assert src.spec.shape == (8, 8, 3) and x.shape == (6, 8, 8, 3)
    assert x[0, 4, 4, 0] > 150 > x[0, 4, 4, 1]  # the red disc of the first circle


def test_on_error_fail_names_the_unreadable_file(tmp_path):
    root = make_image_folder(tmp_path / "imgs", per_class=2)
    with pytest.raises(ImageFolderError, match=r"broken\.png.*not a readable image.*on_error=fail"):
        build_source(_cfg(tmp_path, root, "source.on_error=fail").source)


def test_links_cannot_lead_outside_the_root(tmp_path, caplog):
    root = make_image_folder(tmp_path / "imgs", per_class=2, broken=False)
    outside = make_image_folder(tmp_path / "elsewhere", per_class=2, broken=False)
    os.symlink(outside / "circle" / "000.jpg", root / "square" / "escape.jpg")  # file link out
    os.symlink(outside / "stripes", root / "zebra")  # class folder link out
    os.symlink(root / "missing.png", root / "circle" / "dangling.png")  # points nowhere
    os.symlink(root / "circle" / "000.jpg", root / "circle" / "alias.jpg")  # inside: allowed
    os.symlink(outside, root / "circle" / "subdir")  # folder link inside a class: not followed
    with caplog.at_level(logging.WARNING):
        src = build_source(_cfg(tmp_path, root).source)
    assert src.spec.class_names == CLASSES  # "zebra" left out
    listed = {e.path.name for e in src.entries}
    assert "alias.jpg" in listed and not {"escape.jpg", "dangling.png"} & listed
    assert src.spec.num_samples == 7
    for name in ("escape.jpg", "zebra", "dangling.png"):
        assert name in caplog.text
    real_outside = str(outside.resolve())
    assert all(not str(e.path.resolve()).startswith(real_outside) for e in src.entries)

    with pytest.raises(ImageFolderError, match="outside source.root"):
        build_source(_cfg(tmp_path, root, "source.on_error=fail").source)


def test_root_may_itself_be_a_link(tmp_path):
    root = make_image_folder(tmp_path / "imgs", per_class=2, broken=False)
    os.symlink(root, tmp_path / "link")
    assert build_source(_cfg(tmp_path, tmp_path / "link").source).spec.num_samples == 6


def test_header_check_leaves_truncated_data_to_the_export_full_check_skips_it(tmp_path):
    root = make_image_folder(tmp_path / "imgs", per_class=2, broken=False)
    _truncated_jpeg(root / "circle" / "cut.jpg")
    src = build_source(_cfg(tmp_path, root, "source.check=header").source)
    assert src.spec.num_samples == 7  # its header is fine
    with pytest.raises(ImageFolderError, match=r"cut\.jpg passed the listing check.*source\.check=full"):
        list(src.chunks())
    src = build_source(_cfg(tmp_path, root, "source.check=full").source)
    assert src.spec.num_samples == 6 and len(np.concatenate([y for _, y in src.chunks()])) == 6


def test_a_changed_folder_gives_a_new_export(tmp_path):
    root = make_image_folder(tmp_path / "imgs", per_class=3)
    cfg = _cfg(tmp_path, root, "storage=npy", "source.size=[8,8]")
    first = export(cfg.source, cfg.storage, cfg.paths.data_dir)
    again = export(cfg.source, cfg.storage, cfg.paths.data_dir)
    assert again.reused and again.root == first.root
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / "square" / "new.png")
    changed = export(cfg.source, cfg.storage, cfg.paths.data_dir)
    assert not changed.reused and changed.root != first.root and changed.spec.num_samples == 10


@pytest.mark.parametrize(
    "override,key",
    [
        ("source.size=[0,8]", "source.size"),
        ("source.size=[8]", "source.size"),
        ("source.extensions=[]", "source.extensions"),
        ("source.chunk_size=0", "source.chunk_size"),
    ],
)
def test_bad_values_are_named(tmp_path, override, key):
    with pytest.raises(ConfigError, match=rf"Invalid config: {key}="):
        validate(_cfg(tmp_path, tmp_path, override))


@pytest.mark.parametrize(
    "override,valid",
    [
        ("source.mode=CMYK", "[L, RGB]"),
        ("source.on_error=ignore", "[skip, fail]"),
        ("source.check=none", "[full, header]"),
    ],
)
def test_closed_choices_fail_at_composition_naming_the_valid_ones(tmp_path, override, valid):
    with pytest.raises(ConfigCompositionException) as info:
        _cfg(tmp_path, tmp_path, override)
    assert f"expected one of {valid}" in str(info.value.__cause__)


def test_root_is_required_and_must_exist(tmp_path):
    with pytest.raises(ConfigError, match=r"source\.root='\?\?\?' -- set it"):
        validate(compose_cfg(tmp_path, ["source=image_folder"]))
    with pytest.raises(ConfigError, match=r"source\.root=.*nope.*must be an existing folder"):
        validate(_cfg(tmp_path, tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ImageFolderError, match="no class sub-folders"):
        build_source(_cfg(tmp_path, tmp_path / "empty").source)


def test_job_trains_on_an_image_folder_with_a_broken_file(tmp_path):
    """Done-when: a real job (in process) on a folder built here, one file broken; plots logged."""
    from pipeline.job import run

    root = make_image_folder(tmp_path / "imgs", per_class=20)
    cfg = _cfg(
        tmp_path,
        root,
        "source.mode=RGB",
        "source.size=[24,24]",
        "model=cnn",
        "trainer.epochs=8",
        "trainer.lr=0.005",
        "loader.batch_size=16",
    )
    final = run(cfg)
    client = MlflowClient(sqlite_uri(tmp_path))
    (r,) = client.search_runs([client.get_experiment_by_name("pipeline").experiment_id])
    assert r.info.status == "FINISHED"
    assert r.data.params["data.num_samples"] == "60"  # 61 files, the broken one skipped
    assert final["val/accuracy"] >= 0.75, final  # 3 classes: chance is 0.33
    plots = {a.path for a in client.list_artifacts(r.info.run_id, "plots")}
    assert PLOTS <= plots


@pytest.mark.slow
def test_cli_on_an_image_folder_logs_the_skipped_file_and_the_whole_log(tmp_path):
    root = make_image_folder(tmp_path / "imgs", per_class=6)
    proc = run_cli(tmp_path, "source=image_folder", f"source.root={root}", "trainer.epochs=2")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout + proc.stderr
    assert "broken.png" in out and "%|" not in out  # named; no progress bar when output is not a TTY
    client = MlflowClient(sqlite_uri(tmp_path))
    (r,) = client.search_runs([client.get_experiment_by_name("pipeline").experiment_id])
    assert {"cli.log"} <= {a.path for a in client.list_artifacts(r.info.run_id)}
    log_text = open(client.download_artifacts(r.info.run_id, "cli.log", str(tmp_path))).read()
    assert "broken.png" in log_text and "epoch 2/2" in log_text
