"""pipeline-tune end to end: facts, trials of the real step, the honest fallback, the answer in every form
(the report, the config file, the record that ``auto`` reads, the MLflow runs), and the CLI."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from tests.conftest import CONF_DIR, run_command
from tests.image_folders import make_image_folder
from tests.run_helpers import client

TINY = ["model.hidden=[32]", "trainer.epochs=1", "tracking.log_model=false", "progress=false"]


def compose_tune(root: Path, overrides: list[str]):
    from pipeline.tune import schema

    schema.register()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(
            config_name="tune",
            overrides=[f"paths.root={root}", f"paths.output_dir={root}/tune-run", *overrides],
        )


def test_the_tune_node_adds_to_the_jobs_config_without_resetting_it(tmp_path):
    from pipeline.config.checks import ConfigError
    from pipeline.tune import schema

    cfg = compose_tune(tmp_path, ["storage=memmap", "loader.batch_size=32", "split.ratio=0.7"])
    assert cfg.storage.name == "memmap" and cfg.loader.batch_size == 32 and cfg.split.ratio == 0.7
    assert cfg.tune.budget_s == 120 and cfg.tune.storages is None
    assert cfg.tune.output == f"{tmp_path}/conf/local/tuned.yaml"
    assert schema.allowed_storages(cfg) == ["memmap"]
    schema.validate(cfg)
    for bad, words in (
        (["tune.storages=[shards,nope]"], "tune.storages=.* -- names from .*unknown: \\['nope'\\]"),
        (["tune.budget_s=3"], "tune.budget_s=3.0 -- seconds >= 10"),
        (["loader.num_workers=-1"], "loader.num_workers=-1 -- auto or an integer >= 0"),
    ):
        with pytest.raises(ConfigError, match=words):
            schema.validate(compose_tune(tmp_path, bad))


def test_a_tune_that_cannot_beat_the_default_says_so_and_everything_it_answers_is_usable(tmp_path):
    """Photo-like images stored encoded with flip_crop: per-sample work, so settings survive the rules and are
    tried, and the best one duels the default. No setting can be 900% faster (``tune.min_gain=9``): the
    answer is the default, said in words, and the config file, the record and the MLflow runs say the same."""
    from pipeline.tune import cli, record

    images = make_image_folder(tmp_path / "imgs", per_class=40, broken=False)
    job = ["source=image_folder", f"source.root={images}", "source.size=[40,48]", "storage=encoded"]
    job += ["transform=flip_crop", "loader.batch_size=16", "split.stratify=false", *TINY]
    out = tmp_path / "tuned.yaml"
    cfg = compose_tune(tmp_path, [*job, "tune.budget_s=12", "tune.min_gain=9", f"tune.output={out}"])
    answer, run_id = cli.run(cfg, user_overrides=job)

    assert not answer.beat_default and answer.chosen == answer.default and answer.overrides == []
    assert answer.command == "pipeline " + " ".join(job)  # the user's own job, unchanged
    assert answer.seconds <= cfg.tune.budget_s  # measuring and trials kept to the budget
    tried = {t.candidate for t in answer.trials if t.ok}
    assert answer.default in tried
    # others survived the rules: tried, or -- on a busy machine, where windows take longer -- left untried for
    # the budget (the report lists them), never pruned away
    assert len(tried) >= 2 or answer.untried, answer.trials
    # the screening's leader, if any was faster than the default there, lost its duel against the 900% bar
    assert all(d.gain is not None and d.gain < 9 for _c, d in answer.duels)
    rules = {rule for _c, rule, _why in answer.pruned}
    assert "no_memory_buffers_when_cached" in rules  # a tiny export fits the page cache
    exported = [p.name for p in (tmp_path / "outputs" / "data").iterdir() if p.is_dir() and p.name[0] != "."]
    assert len(exported) == 1 and exported[0].startswith("image_folder-encoded-")  # tune.storages: null

    # the config file: nothing to change, and it composes as `pipeline local=tuned` would
    text = out.read_text()
    assert text.startswith("# @package _global_") and "No setting beat the default" in text
    local = tmp_path / "searchpath" / "local"
    local.mkdir(parents=True)
    (local / "tuned.yaml").write_text(text)
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        tuned = compose(
            "config", overrides=[*job, "local=tuned", f"hydra.searchpath=[file://{local.parent}]"]
        )
    assert OmegaConf.to_container(tuned.loader) == OmegaConf.to_container(cfg.loader)

    # MLflow: the parent's description holds the answer, the reasons, the trials and the facts
    c = client(tmp_path)
    parent = c.get_run(run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["pipeline.role"] == "tune"
    note = parent.data.tags["mlflow.note.content"]
    for words in ("No setting beat the default", "**Why**", "**Trials**", "**Facts**", "Kept the default"):
        assert words in note, words
    assert parent.data.tags["tune.beat_default"] == "false"
    assert parent.data.params["fact.data.decoded"] == "True"
    children = c.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{run_id}'")
    assert len(children) == len(answer.trials)
    assert all("perf/train_samples_per_s" in r.data.metrics for r in children if r.info.status == "FINISHED")
    assert {r.data.tags["tune.stage"] for r in children} == {"trial"} | ({"duel"} if answer.duels else set())

    # the record: a job asking for auto gets the tune's answer (the default's settings)
    found = record.read(cfg.paths.outputs, answer.facts.machine.fingerprint(), answer.exports["encoded"],
                        record.shape_of(cfg))  # fmt: skip
    assert found["run_id"] == run_id and found["settings"]["loader.num_workers"] == answer.default.num_workers
    from pipeline import stages

    auto = compose_tune(tmp_path, [*job, "loader.num_workers=auto", "loader.decode_threads=auto"])
    exp = stages.export_data(auto)
    train, val = stages.make_loaders(auto, exp, stages.split_data(auto, exp), torch.device("cpu"))
    train.close(), val.close()
    assert train.num_workers == answer.default.num_workers
    assert train.resolved["loader.resolved.from"].startswith(f"tune {run_id}")


@pytest.mark.slow
def test_pipeline_tune_cli_end_to_end(tmp_path):
    """The command, in a subprocess: a bad value fails at once; a tune allowed two formats exports both and
    no other; its last line is a `pipeline` command, which runs."""
    argv = [sys.executable, "-m", "pipeline.tune"]
    bad = run_command(tmp_path, [*argv, "tune.storages=[shards,nope]"], timeout=120)
    assert bad.returncode != 0 and "tune.storages" in bad.stdout + bad.stderr
    assert not (tmp_path / "outputs" / "data").exists()  # refused before any work

    out = tmp_path / "tuned.yaml"
    job = ["storage=shards", *TINY]
    proc = run_command(
        tmp_path,
        [*argv, *job, "tune.budget_s=15", "tune.storages=[memmap]", f"tune.output={out}"],
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("pipeline ") and all(o in last.split() for o in job)
    exports = sorted(p.name.split("-")[1] for p in (tmp_path / "outputs" / "data").iterdir() if "-" in p.name)
    assert exports == ["memmap", "shards"]
    assert out.read_text().startswith("# @package _global_")
    overrides = last.split()[1:]
    ran = run_command(tmp_path, [sys.executable, "-m", "pipeline", *overrides], timeout=300)
    assert ran.returncode == 0, ran.stderr[-3000:]
