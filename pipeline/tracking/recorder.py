"""What a job records about each of its stages, so that pipeline/job.py reads as the list of stages.

    with JobRecorder(cfg, resume) as rec:         # the MLflow run (rank 0 only), its memory sampler
        rec.export(exp)                           # tags, artifacts and the export's figures (when built)
        rec.split(exp, split)                     # dataset inputs, split.npz, sample grid
        rec.threads(n)                            # param torch.num_threads
        rec.loading(device)                       # memory sampling starts (storage=ram loads now)
        rec.loaders_built(train_loader)           # what loader.num_workers=auto became
        rec.transform((mean, std))                # transform.normalize: the train split's figures
        rec.epoch(epoch, metrics)                 # per-epoch metrics (pipeline/metrics.py), memory series
        rec.finished(model, val_loader, device, spec)

Under torchrun only rank 0 has an MLflow run; the other ranks record into ``NoRun`` (nothing), but
still sample memory and enforce the budget. Leaving the block ends the run FINISHED, FAILED (an
exception; its ``error`` tag says why) or KILLED (Ctrl-C, SIGTERM), after the memory figures and the
job's log file are logged -- also for a run that failed. Before its run starts, the job ends the runs
that dead processes left RUNNING (reaper.py); while it runs, a thread keeps its heartbeat (heartbeat.py).
"""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig

from pipeline.system.memory import MemorySampler
from pipeline.training import distributed

log = logging.getLogger(__name__)


def _hydra_overrides() -> str:
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return ""
    return " ".join(HydraConfig.get().overrides.task)


def run_name(cfg: DictConfig) -> str:
    return cfg.tracking.run_name or f"{cfg.source.name}-{cfg.storage.name}-{cfg.model.name}"


class JobRecorder:
    def __init__(self, cfg: DictConfig, resume=None) -> None:
        self.cfg, self.resume = cfg, resume
        self.output_dir = distributed.rank_dir(Path(cfg.paths.output_dir))
        self.memory = MemorySampler(cfg.trainer.memory_interval_s, cfg.trainer.memory_budget_mb)
        self.tr = None
        self.run_id: str | None = None
        self.heartbeat = None

    # ---- the run ----

    def __enter__(self) -> "JobRecorder":
        if not distributed.is_rank0():  # one MLflow run per training: rank 0's
            self.tr = distributed.NoRun()
            return self
        from pipeline.tracking.heartbeat import Heartbeat, process_tags
        from pipeline.tracking.lineage import lineage_tags
        from pipeline.tracking.reaper import reap_quietly
        from pipeline.tracking.store import TrackedRun, flatten, prepare_store, ui_url
        from pipeline.tracking.sweep import child_run_name, sweep_parent_run_id

        cfg = self.cfg
        experiment_id = prepare_store(
            cfg.tracking.uri, cfg.tracking.experiment, cfg.tracking.artifact_location
        )
        if cfg.tracking.reap:  # runs that dead processes left RUNNING: ended KILLED, saying why
            reap_quietly(cfg.tracking.uri, experiment_id, cfg.tracking.stale_after_s)
        tags = {"pipeline.role": "job", "hydra.overrides": _hydra_overrides(), **lineage_tags(cfg)}
        tags.update(process_tags(cfg.tracking.heartbeat_s))  # host, pid, first heartbeat
        parent = sweep_parent_run_id()
        name = child_run_name(cfg, parent, tags["hydra.overrides"]) if parent else None
        self.tr = TrackedRun(cfg.tracking.uri, experiment_id, name or run_name(cfg), parent, tags)
        self.tr.start()
        self.run_id = self.tr.run_id
        try:
            log.info("MLflow: run %s in %s", self.tr.run_id, cfg.tracking.uri)
            if ui_url(cfg.tracking.uri, experiment_id):
                log.info("MLflow UI: %s", ui_url(cfg.tracking.uri, experiment_id, self.tr.run_id))
            if self.resume is not None:
                self.resume.link(self.tr)
            self.tr.log_params(flatten(cfg))
            self.tr.log_artifact(self.output_dir / ".hydra", "hydra")
        except BaseException as err:
            self.tr.__exit__(type(err), err, err.__traceback__)
            raise
        self.heartbeat = Heartbeat(cfg.tracking.uri, self.tr.run_id, cfg.tracking.heartbeat_s).start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.memory.stop()
        if not distributed.is_rank0():
            return
        from pipeline.tracking.memory_record import log_final

        try:
            last_epoch = self.cfg.trainer.epochs - 1
            log_final(self.tr, self.memory, self.output_dir, last_epoch, self.cfg.trainer.memory_budget_mb)
            for handler in logging.getLogger().handlers:  # the job's log file complete before upload
                handler.flush()
            for logfile in self.output_dir.glob("*.log"):
                self.tr.log_artifact(logfile)
        finally:
            if self.heartbeat is not None:
                self.heartbeat.stop()  # no beat after the run has ended
            self.tr.__exit__(exc_type, exc, tb)

    # ---- the stages ----

    def export(self, exp) -> None:
        """Tags naming the export, its manifest as an artifact, and -- when this job built it -- how fast
        (``export/samples_per_s``, ``export/mb_per_s``, ``export/workers``: the manifest's throughput). A
        reused export logs no figures: this run did not do that work."""
        from pipeline.data.integrity import MANIFEST

        self.tr.set_tags(
            {
                "data.fingerprint": exp.fingerprint,
                "data.dir": exp.url or str(exp.root),
                "data.reused": str(exp.reused).lower(),
                "data.content_sha256": exp.manifest["content_sha256"],
            }
        )
        self.tr.log_artifact(exp.root / MANIFEST, "data")
        speed = exp.throughput
        if not exp.reused and speed:
            self.tr.log_metrics(
                {
                    "export/samples_per_s": float(speed["samples_per_s"]),
                    "export/mb_per_s": float(speed["mb_per_s"]),
                    "export/workers": float(speed["workers"]),
                },
                step=0,
            )
            self.tr.set_tags({"export.engine": str(speed["engine"])})

    def split(self, exp, split) -> None:
        from pipeline.data.partition import save_split
        from pipeline.tracking import plots
        from pipeline.tracking.dataset_input import log_export_inputs

        log_export_inputs(self.tr, exp, split)  # the Dataset column: the export, train and val
        self.tr.log_artifact(save_split(split, self.output_dir / "split.npz"))
        self.tr.log_artifact(plots.sample_grid(exp, self.output_dir / "plots" / "samples.png"), "plots")
        self.tr.set_tags({"split.digest": split.digest, "split.stratified": str(split.stratified).lower()})
        self.tr.log_params(
            {
                "data.num_samples": len(exp.labels),
                "data.num_train": len(split.train),
                "data.num_val": len(split.val),
            }
        )

    def threads(self, n: int) -> None:
        self.tr.log_params({"torch.num_threads": n})

    def loading(self, device) -> None:
        """Before the datasets are built: storage=ram loads its data then, so sampling starts now."""
        self.memory.start(device)

    def transform(self, stats) -> None:
        """The train split's per-channel mean and std the model normalises with (transform.normalize)."""
        if stats is not None:
            mean, std = (",".join(repr(float(v)) for v in np_.reshape(-1)) for np_ in stats)
            self.tr.log_params({"transform.train_mean": mean, "transform.train_std": std})
            log.info("transform: train split mean %s, std %s", mean, std)

    def loaders_built(self, train_loader=None) -> None:
        resolved = getattr(train_loader, "resolved", None)
        if resolved:  # loader.*=auto: the values in effect and where they came from (pipeline/tune/auto.py)
            self.tr.log_params(resolved)
        self.memory.sample()
        self.memory.check("after building the datasets")

    def epoch(self, epoch: int, metrics: dict) -> None:
        from pipeline.tracking.memory_record import log_series

        self.tr.log_metrics(metrics, step=epoch)
        log_series(self.tr, self.memory)

    def finished(self, model, val_loader, device, spec) -> None:
        """Every rank's parameter digest, and (rank 0) the plots and the model."""
        distributed.record_params(model, self.cfg.paths.output_dir, self.tr)
        if not distributed.is_rank0():
            return
        from pipeline.tracking import plots

        plots.log_training_plots(
            self.tr, model, val_loader, device, spec.class_names, self.output_dir / "plots"
        )
        if self.cfg.tracking.log_model:
            from pipeline.tracking.logged_model import log_final_model

            log_final_model(self.tr, model, self.cfg.model, spec)
