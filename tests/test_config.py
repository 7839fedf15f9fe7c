"""Config groups compose, types are checked at compose time, and bad values are refused early."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from omegaconf.errors import ValidationError

from pipeline.config.validate import ConfigError, validate
from tests.conftest import CONF_DIR, compose_cfg, run_cli, run_command

GROUPS = [
    *("source", "storage", "split", "loader", "transform", "model", "trainer", "tracking", "paths"),
    "experiment",
]


# options with a required key: the extra overrides they need to validate ({root} = the test's tmp_path)
REQUIRED = {("source", "image_folder"): ["source.root={root}"]}


def _options():
    for group in GROUPS:
        for path in sorted((Path(CONF_DIR) / group).glob("*.yaml")):
            yield group, path.stem


@pytest.mark.parametrize("group,option", list(_options()))
def test_every_option_composes_and_validates(tmp_path, group, option):
    extra = [o.format(root=tmp_path) for o in REQUIRED.get((group, option), [])]
    cfg = compose_cfg(tmp_path, [f"{group}={option}", *extra])
    OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
    validate(cfg)
    if group not in ("experiment",):
        assert group in cfg


def test_default_config_values(tmp_path):
    cfg = compose_cfg(tmp_path)
    assert cfg.source.name == "digits" and cfg.storage.name == "pt"
    assert cfg.split.ratio == 0.8 and cfg.loader.batch_size == 64 and cfg.loader.shuffle
    assert cfg.paths.data_dir == f"{tmp_path}/outputs/data"
    assert cfg.tracking.uri == f"sqlite:///{tmp_path}/outputs/mlflow.db"


def test_tracking_uri_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert compose_cfg(tmp_path).tracking.uri == "http://127.0.0.1:5999"


def test_seed_lfw_experiment_matches_the_blog_post(tmp_path):
    cfg = compose_cfg(tmp_path, ["experiment=seed_lfw"])
    assert (cfg.source.name, cfg.storage.name) == ("lfw", "pt")
    assert (cfg.split.ratio, cfg.loader.batch_size, cfg.loader.shuffle, cfg.trainer.epochs) == (
        0.8,
        64,
        True,
        5,
    )
    # float storage, no augmentation, no normalisation; and the export keeps its pre-uint8 name
    assert (cfg.storage.dtype, cfg.transform.name, cfg.transform.normalize) == ("source", "none", False)
    from pipeline.data.export import fingerprint

    storage = {k: v for k, v in cfg.storage.items() if k != "dtype"}
    assert fingerprint(cfg.source, cfg.storage) == fingerprint(cfg.source, storage)


@pytest.mark.parametrize(
    "override",
    ["loader.batch_size=abc", "source=synthetic source.num_samples=many", "trainer.lr=fast"],
)
def test_wrong_type_fails_at_compose_time(tmp_path, override):
    with pytest.raises((ValidationError, ConfigCompositionException)):
        compose_cfg(tmp_path, override.split())


def test_unknown_key_fails_at_compose_time(tmp_path):
    with pytest.raises((ValidationError, ConfigCompositionException)):
        compose_cfg(tmp_path, ["loader.batchsize=32"])


@pytest.mark.parametrize(
    "overrides,key",
    [
        (["loader.batch_size=0"], "loader.batch_size"),
        (["loader.batch_size=-3"], "loader.batch_size"),
        (["split.ratio=0"], "split.ratio"),
        (["split.ratio=1.0"], "split.ratio"),
        (["split.ratio=1.5"], "split.ratio"),
        (["loader.num_workers=-1"], "loader.num_workers"),
        (["loader.prefetch_factor=0"], "loader.prefetch_factor"),
        (["loader.pin_memory=sometimes"], "loader.pin_memory"),
        (["trainer.epochs=0"], "trainer.epochs"),
        (["trainer.lr=0"], "trainer.lr"),
        (["trainer.device=tpu"], "trainer.device"),
        (["source=synthetic", "source.num_samples=1"], "source.num_samples"),
        (["source=synthetic", "source.shape=[0,4]"], "source.shape"),
        (["source=synthetic", "source.shape=[10]", "model=cnn"], "source.shape"),
        (["model.hidden=[]"], "model.hidden"),
        (["source=lfw", "source.resize=0"], "source.resize"),
    ],
)
def test_validate_names_the_bad_key(tmp_path, overrides, key):
    cfg = compose_cfg(tmp_path, overrides)
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert err.value.key == key
    assert key in str(err.value)


@pytest.mark.parametrize(
    "override,needle",
    [
        ("loader.batch_size=0", "loader.batch_size=0"),
        ("split.ratio=1.5", "split.ratio=1.5"),
        ("loader.num_workers=-1", "loader.num_workers=-1"),
        ("source=bogus", "source"),
        ("storage=bogus", "storage"),
    ],
)
def test_cli_refuses_bad_values_before_any_export(tmp_path, override, needle):
    proc = run_cli(tmp_path, override)
    assert proc.returncode != 0
    assert needle in proc.stderr
    assert not (tmp_path / "outputs" / "data").exists()


@pytest.mark.parametrize(
    "args", [["--cfg", "job"], ["--help"], ["loader.batch_size=0"], ["trainer.optimizer=x"]]
)
def test_printing_the_config_or_a_config_error_imports_neither_torch_nor_mlflow(tmp_path, args):
    """`pipeline --cfg job`, `--help` and a bad value answer in well under a second: the job's heavy
    imports come only once the config is valid."""
    code = (
        "import sys\n"
        f"sys.argv = ['pipeline', *{args!r}]\n"
        "from pipeline.cli import main\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "print('HEAVY', sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'mlflow', 'sklearn'}))\n"
    )
    proc = run_command(tmp_path, [sys.executable, "-c", code], timeout=60)
    assert "HEAVY []" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-2000:]
