"""Config groups compose; types, unknown keys and closed choices fail at compose time; every other bad
value is refused by ``validate`` before any work, naming the key, the value and what is valid; the CLI
answers --help, --cfg job and config errors without importing torch or MLflow."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf import OmegaConf

from pipeline.config.validate import ConfigError, validate
from tests.conftest import CONF_DIR, compose_cfg, run_cli, run_command

GROUPS = ["source", "storage", "transform", "model", "experiment"]  # the others have keys, no options

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
    assert cfg.source.name == "digits" and cfg.storage.name == "shards"
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


def test_defaults_and_reasonable_values_pass(tmp_path):
    for overrides in (
        [],
        ["source=synthetic", "source.num_samples=10", "split.ratio=0.5", "loader.batch_size=5"],
        ["loader.batch_size=1437", "loader.drop_last=true"],
    ):
        validate(compose_cfg(tmp_path, overrides))


# ---- values composition cannot judge: validate() names key, value and what is valid ----

# override(s), key named in the error, a fragment of "what is valid"
BAD = [
    (["loader.batch_size=0"], "loader.batch_size", "integer >= 1"),
    (["loader.batch_size=-8"], "loader.batch_size", "integer >= 1"),
    (["loader.num_workers=-1"], "loader.num_workers", "integer >= 0"),
    (["loader.prefetch_factor=0"], "loader.prefetch_factor", "integer >= 1"),
    (["loader.pin_memory=maybe"], "loader.pin_memory", "one of"),
    (["split.ratio=1.0"], "split.ratio", "strictly between 0 and 1"),
    (["split.ratio=1.5"], "split.ratio", "strictly between 0 and 1"),
    (["split.ratio=0"], "split.ratio", "strictly between 0 and 1"),
    (["split.ratio=-0.2"], "split.ratio", "strictly between 0 and 1"),
    # digits has 1797 samples: int(1797 * 0.0005) = 0 train samples
    (["split.ratio=0.0005"], "split.ratio", "leaves train empty for the 1797 samples"),
    (["source=synthetic", "source.num_samples=3", "split.ratio=0.3"], "split.ratio", "leaves train empty"),
    # 1437 train samples with the default ratio 0.8
    (["loader.batch_size=1500", "loader.drop_last=true"], "loader.batch_size", "<= the 1437 train samples"),
    (["trainer.epochs=0"], "trainer.epochs", "integer >= 1"),
    (["trainer.lr=0"], "trainer.lr", "finite number > 0"),
    (["trainer.lr=-0.1"], "trainer.lr", "finite number > 0"),
    (["trainer.lr=inf"], "trainer.lr", "finite number > 0"),
    (["trainer.lr=nan"], "trainer.lr", "finite number > 0"),
    (["trainer.weight_decay=-1"], "trainer.weight_decay", ">= 0"),
    (["trainer.momentum=-0.5"], "trainer.momentum", ">= 0"),
    (["trainer.device=tpu"], "trainer.device", "auto | cpu | cuda"),
    (["source=synthetic", "source.shape=[0,5]"], "source.shape", "integers >= 1"),
    (["source=synthetic", "source.shape=[]"], "source.shape", "non-empty list"),
    (["source=synthetic", "source.num_samples=1"], "source.num_samples", "integer >= 2"),
    (["source=synthetic", "source.num_classes=0"], "source.num_classes", "integer >= 1"),
    (["source=synthetic", "source.block_size=0"], "source.block_size", "integer >= 1"),
    (["source=synthetic", "source.noise=-1"], "source.noise", ">= 0"),
    (["source=synthetic", "source.shape=[4]", "model=cnn"], "source.shape", "model=cnn needs images"),
    (["source=lfw", "source.resize=0"], "source.resize", "(0, 1]"),
    (["source=lfw", "source.min_faces_per_person=-1"], "source.min_faces_per_person", "integer >= 0"),
    (["source=lfw", "source.download_timeout_s=0"], "source.download_timeout_s", "> 0"),
    (["source=lfw", "source.download_retries=-1"], "source.download_retries", "integer >= 0"),
    (["model.hidden=[]"], "model.hidden", "non-empty list"),
    (["model.dropout=1.0"], "model.dropout", "[0, 1)"),
    (["model=cnn", "model.channels=[16,0]"], "model.channels", "integers >= 1"),
    (["tracking.uri=''"], "tracking.uri", "non-empty string"),
    (["tracking.experiment=' '"], "tracking.experiment", "non-empty string"),
]


@pytest.mark.parametrize("overrides,key,valid", BAD, ids=[" ".join(b[0]) for b in BAD])
def test_bad_value_names_key_value_and_what_is_valid(tmp_path, overrides, key, valid):
    cfg = compose_cfg(tmp_path, overrides)
    with pytest.raises(ConfigError) as info:
        validate(cfg)
    err = info.value
    assert err.key == key
    assert f"{key}=" in str(err) and valid in str(err)
    print(f"{' '.join(overrides)} -> {err}")


def test_memory_budget_too_small_to_start(tmp_path):
    # the budget key belongs to the memory feature's schema: add it to an untyped copy
    cfg = OmegaConf.create(OmegaConf.to_container(compose_cfg(tmp_path), resolve=True))
    cfg.trainer.memory_budget_mb = 5
    with pytest.raises(
        ConfigError, match=r"trainer.memory_budget_mb=5 -- too small to start: .* already uses \d+ MB"
    ):
        validate(cfg)
    cfg.trainer.memory_budget_mb = -1
    with pytest.raises(ConfigError, match="trainer.memory_budget_mb=-1"):
        validate(cfg)
    cfg.trainer.memory_budget_mb = 1_000_000
    validate(cfg)


# ---- types, unknown keys, closed choices and group options: refused while composing ----


@pytest.mark.parametrize(
    "override,fragments",
    [
        ("loader.batch_size=abc", ["loader.batch_size", "abc", "Integer"]),
        ("split.ratio=high", ["split.ratio", "high", "Float"]),
        ("trainer.lr=fast", ["trainer.lr", "fast", "Float"]),
        ("source.num_samples=many", ["source.num_samples", "many", "Integer"]),
        ("loader.drop_last=sometimes", ["loader.drop_last", "sometimes", "valid bool"]),
        ("loader.bogus=1", ["loader.bogus", "Key 'bogus' not in 'LoaderConfig'"]),
        ("loader.batchsize=32", ["loader.batchsize", "Key 'batchsize' not in 'LoaderConfig'"]),
        # closed choices are Enums: the valid ones are named at once
        (
            "loader.multiprocessing_context=thread",
            ["thread", "expected one of [auto, fork, spawn, forkserver]"],
        ),
        ("trainer.optimizer=rmsprop", ["rmsprop", "expected one of [adam, adamw, sgd]"]),
        ("source.dtype=complex64", ["complex64", "expected one of [float16, float32, float64, uint8]"]),
    ],
)
def test_wrong_type_or_unknown_key_fails_at_composition(tmp_path, override, fragments):
    with pytest.raises(ConfigCompositionException) as info:
        compose_cfg(
            tmp_path, ["source=synthetic", override] if override.startswith("source.") else [override]
        )
    text = f"{info.value} {info.value.__cause__}"
    for fragment in fragments:
        assert fragment in text, text
    print(f"{override} -> {text}")


@pytest.mark.parametrize("group", ["source", "storage"])
def test_unknown_group_option_names_the_group_and_its_options(tmp_path, group):
    with pytest.raises(MissingConfigException) as info:
        compose_cfg(tmp_path, [f"{group}=bogus"])
    assert f"{group}/bogus" in str(info.value)
    assert {"source": "digits", "storage": "memmap"}[group] in str(info.value)


# ---- the real CLI: one smoke test of each way a config can be refused, and what it imports ----


@pytest.mark.fresh_store
def test_cli_rejects_bad_value_before_any_data_or_tracking_work(tmp_path):
    proc = run_cli(tmp_path, "split.ratio=0.0005", "trainer.epochs=1", timeout=120)
    assert proc.returncode != 0
    assert "split.ratio=0.0005 -- leaves train empty for the 1797 samples" in proc.stderr, proc.stderr[-2000:]
    outputs = tmp_path / "outputs"
    assert not (outputs / "data").exists() and not (outputs / "mlflow.db").exists()

    proc = run_cli(tmp_path, "storage=bogus", timeout=120)
    assert proc.returncode != 0
    assert "Could not find 'storage/bogus'" in proc.stderr and "Available options in 'storage'" in proc.stderr
    assert not (outputs / "data").exists() and not (outputs / "mlflow.db").exists()
    print(proc.stderr.strip().splitlines()[:4])


# --help, --cfg job, a bad value (validate) and a bad choice (composition), in one fresh interpreter
IMPORT_CHECK = """
import sys
from pipeline.cli import main
for args in ([["--cfg", "job"], ["--help"], ["loader.batch_size=0"], ["trainer.optimizer=x"]]):
    sys.argv = ["pipeline", *args]
    try:
        main()
    except SystemExit as stop:
        print("EXIT", args, stop.code)
    heavy = {"torch", "mlflow", "sklearn", "matplotlib"}
    print("HEAVY", args, sorted({m.split(".")[0] for m in sys.modules} & heavy))
    print("PIPELINE", args, sorted(m for m in sys.modules if m.startswith("pipeline")))
"""
HEAVY = ["torch", "mlflow", "sklearn", "matplotlib"]


def test_printing_the_config_or_a_config_error_imports_neither_torch_nor_mlflow(tmp_path):
    """`pipeline --cfg job`, `--help` and a bad value answer in well under a second: the job's heavy
    imports come only once the config is valid. Composing imports the config package and the sources' and
    storage formats' modules (their schemas live there) with numpy, but no torch, MLflow, scikit-learn or
    matplotlib, and none of training, tracking or the job."""
    proc = run_command(tmp_path, [sys.executable, "-c", IMPORT_CHECK], timeout=60)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "name: digits" in proc.stdout and "== Configuration groups ==" in proc.stdout  # --cfg, --help
    assert "EXIT ['--help'] 0" in proc.stdout
    assert "EXIT ['loader.batch_size=0'] 1" in proc.stdout and "loader.batch_size=0" in proc.stderr
    assert "EXIT ['trainer.optimizer=x'] 1" in proc.stdout and "expected one of" in proc.stderr
    for args in (["--cfg", "job"], ["--help"], ["loader.batch_size=0"], ["trainer.optimizer=x"]):
        assert f"HEAVY {args} []" in proc.stdout, out[-3000:]
        line = next(ln for ln in proc.stdout.splitlines() if ln.startswith(f"PIPELINE {args}"))
        loaded = line.split("] ", 1)[1]
        for room in ("pipeline.training", "pipeline.tracking.recorder", "pipeline.job", "pipeline.stages"):
            assert f"'{room}" not in loaded, (args, room, loaded)
