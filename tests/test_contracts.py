"""The extension contracts (pipeline/data/storage/base.py, pipeline/data/sources/base.py): a storage format
and a source defined here, in the test, registered from code, run the real job end to end; the code calls
hooks through the contracts, never by probing names, and the data layer does not reach into training."""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from pipeline.config.checks import at_least
from pipeline.config.schema import SourceConfig, StorageConfig
from pipeline.data.sources import SampleSpec, SourceKind, chunked, register_source, sources
from pipeline.data.storage import formats, get_format, register_format
from pipeline.data.storage.base import BatchedDataset, StorageFormat, Writer
from tests.conftest import compose_cfg, sqlite_uri

REPO = Path(__file__).resolve().parents[1]


# ---- a storage format: every sample's bytes appended to one file, read back by offset ----


@dataclass
class TinyConfig(StorageConfig):
    name: str = "tiny"
    pad: int = at_least(0, 0)  # zero bytes written before the samples (a write option: in the fingerprint)


class TinyWriter(Writer):
    def __init__(self, root: Path, spec, cfg) -> None:
        self.fh = open(Path(root) / "tiny.bin", "wb")
        self.fh.write(b"\0" * int(cfg.pad))

    def write(self, x: np.ndarray, y: np.ndarray) -> None:
        self.fh.write(np.ascontiguousarray(x).tobytes())

    def close(self) -> None:
        self.fh.close()


class TinyDataset(BatchedDataset):
    def __init__(self, root: Path, spec, labels, ids, cfg) -> None:
        super().__init__(spec, labels, ids)
        raw = np.fromfile(Path(root) / "tiny.bin", dtype=np.uint8)
        pad = len(raw) - spec.num_samples * spec.sample_bytes  # the writer's option, known from the file
        self.x = raw[pad:].view(spec.dtype).reshape(spec.num_samples, *spec.shape)

    def read_into(self, request, out: np.ndarray) -> None:
        out[...] = self.x[self.ids[request.positions]]


class Tiny(StorageFormat):
    name = "tiny"
    config = TinyConfig

    def writer(self, root, spec, cfg) -> TinyWriter:
        return TinyWriter(root, spec, cfg)

    def dataset(self, root, spec, labels, ids, cfg, files=None) -> TinyDataset:
        return TinyDataset(root, spec, labels, ids, cfg)


# ---- a source: two classes of constant images, sized by the config ----


@dataclass
class StripesConfig(SourceConfig):
    name: str = "stripes"
    num_samples: int = at_least(4, 64)


class StripesSource:
    def __init__(self, n: int) -> None:
        y = np.arange(n, dtype=np.int64) % 2
        self.x = (np.repeat(y[:, None, None], 6, axis=1).repeat(5, axis=2) * 0.5).astype(np.float32)
        self.x += np.linspace(0, 0.1, n, dtype=np.float32)[:, None, None]
        self.y = y
        self.spec = SampleSpec(n, (6, 5), "float32", 2, ("even", "odd"))

    def chunks(self):
        return chunked(self.x, self.y, chunk=10)


class Stripes(SourceKind):
    name = "stripes"
    config = StripesConfig

    def build(self, cfg) -> StripesSource:
        return StripesSource(int(cfg.num_samples))

    def count(self, cfg) -> int:
        return int(cfg.num_samples)


@pytest.fixture(scope="module")
def registered():
    register_format(Tiny())
    register_source(Stripes())
    yield
    # the registries are per process; the names stay known to later tests, which never use them


def test_a_format_and_a_source_defined_here_run_the_real_job(tmp_path, registered):
    from mlflow.tracking import MlflowClient

    from pipeline.job import run

    assert "tiny" in formats() and "stripes" in sources() and get_format("tiny").read_options == ()
    overrides = [
        "source=stripes",
        "source.num_samples=80",
        "storage=tiny",
        "storage.pad=3",
        "trainer.epochs=2",
    ]
    final = run(compose_cfg(tmp_path, [*overrides, "tracking.log_model=false", "loader.batch_size=16"]))
    assert final["train/samples_seen"] == 2 * 64 and final["val/accuracy"] > 0.9  # trivially learnable
    exports = sorted((tmp_path / "outputs" / "data").glob("stripes-tiny-*"))
    assert len(exports) == 1 and (exports[0] / "tiny.bin").stat().st_size == 3 + 80 * 6 * 5 * 4
    again = run(compose_cfg(tmp_path, [*overrides, "tracking.log_model=false", "loader.batch_size=16"]))
    learned = ("train/loss", "val/loss", "val/accuracy", "train/samples_seen")
    assert [again[k] for k in learned] == [final[k] for k in learned]  # the export reused, same numbers
    client = MlflowClient(sqlite_uri(tmp_path))
    runs = client.search_runs([client.get_experiment_by_name("pipeline").experiment_id])
    assert sorted(r.data.tags["data.reused"] for r in runs) == ["false", "true"]


def test_a_registered_format_is_validated_like_the_others(tmp_path, registered):
    from pipeline.config.validate import ConfigError, validate

    with pytest.raises(ConfigError, match=r"storage\.pad=-1 -- must be an integer >= 0"):
        validate(compose_cfg(tmp_path, ["source=stripes", "storage=tiny", "storage.pad=-1"]))
    with pytest.raises(ConfigError, match=r"source\.num_samples=2"):
        validate(compose_cfg(tmp_path, ["source=stripes", "source.num_samples=2", "storage=tiny"]))
    with pytest.raises(ConfigError, match=r"storage\.dtype=.uint8.*not 8-bit"):  # the base contract's check
        validate(compose_cfg(tmp_path, ["source=stripes", "storage=tiny", "storage.dtype=uint8"]))
    with pytest.raises(TypeError, match="StorageFormat"):
        register_format(TinyConfig())  # not a format


HOOKS = {
    "check",
    "check_fits",
    "batch_sampler",
    "collate_fn",
    "WORKERS_HINT",
    "for_rank",
    "num_samples",
    "set_epoch",
    "identity",
    "count",
    "uint8_divisor",
    "after_sync",
    "stored_bytes",
    "digests",
    "READ_OPTIONS",
    "LAYOUT",
    "epoch_order",
    "order",
    "share_with_workers",
    "__getitems__",
    "read_into",
    "part_writer",
    "part_args",
    "commit",
    "pieces",
    "read_piece",
    "build_parallel",
}


def _sources(root: Path):
    for path in sorted(root.rglob("*.py")):
        yield path, ast.parse(path.read_text(), str(path))


def test_no_hook_is_probed_by_name():
    """Formats', datasets' and samplers' hooks are called through their contracts: no ``getattr(x, "hook")``
    or ``hasattr(x, "hook")`` for any of them anywhere in the package."""
    probes = []
    for path, tree in _sources(REPO / "pipeline"):
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id in ("getattr", "hasattr")
                and len(node.args) >= 2
                and isinstance(node.args[1], ast.Constant)
                and node.args[1].value in HOOKS
            ):
                probes.append(
                    f"{path.relative_to(REPO)}:{node.lineno}: {node.func.id}(..., {node.args[1].value!r})"
                )
    assert probes == []


def test_the_data_layer_does_not_import_training():
    found = []
    for path, tree in _sources(REPO / "pipeline" / "data"):
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            found += [
                f"{path.relative_to(REPO)}:{node.lineno}: {n}"
                for n in names
                if n.startswith("pipeline.training")
            ]
    assert found == []
