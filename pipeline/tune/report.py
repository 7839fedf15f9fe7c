"""The tune's answer: the overrides, one sentence per choice naming the bottleneck it addresses, the trials,
the facts -- printed, written as a config file, recorded for ``auto``, and logged as an MLflow parent run.

    from pipeline.tune import report
    text = report.markdown(answer)                 # the MLflow description: answer, choices, trials, facts
    report.write_config(answer, "conf/local/tuned.yaml")    # `pipeline local=tuned`
    run_id = report.publish(cfg, answer, out_dir)  # parent run + one child run per trial, artifacts

**Bottlenecks** (``bottleneck``), read off the default's trials the way the sweep report reads a sweep
(pipeline/tracking/sweep_report.py): a step that waited less than 15% of its time for data is bound by the
**model**; otherwise the data is, and it is the **disk** when the export does not fit the page cache or the
trial read from the disk at more than half its sequential speed, **decode** when each sample is decoded or
augmented, else the **hand-off** (assembling batches and handing them to the step).

MLflow: the parent run (``pipeline.role=tune``) holds the facts as ``fact.*`` params, the answer as tags
(``tune.overrides``, ``tune.command``, ``tune.gain``, ``tune.beat_default``), the description
(``mlflow.note.content``: what the MLflow UI shows on the run's page) and the files (``tune.md``,
``trials.csv``, the config file); each trial is a child run whose params are its settings and whose metrics
are the job's own (pipeline/metrics.py): ``perf/train_samples_per_s``, ``perf/data_wait_fraction``,
``io/read_mb``, ``io/read_amplification``. The runs are made once the trials are over, so a tune that dies
leaves no run looking alive.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from dataclasses import asdict
from pathlib import Path

from omegaconf import DictConfig

from pipeline import fsio
from pipeline import metrics as registry
from pipeline.tune.space import Candidate
from pipeline.tune.trials import Trial
from pipeline.tune.tuner import Answer

log = logging.getLogger(__name__)

WAIT_MODEL = 0.15  # below this share of the step spent waiting for data, the model bounds the epoch
NOTE_TAG, NOTE_MAX = "mlflow.note.content", 8000
SPS, WAIT, AMP, READ = (
    "perf/train_samples_per_s",
    "perf/data_wait_fraction",
    "io/read_amplification",
    "io/read_mb",
)


def _fmt(metric: str, value) -> str:
    return registry.get(metric).format(value)


def default_trials(answer: Answer) -> list[Trial]:
    return [t for t in answer.trials if t.candidate == answer.default and t.ok]


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def bottleneck(answer: Answer) -> tuple[str, str]:
    """(disk | decode | hand-off | model, a sentence saying why) for the default's trials."""
    base = default_trials(answer)
    f = answer.facts
    if not base:
        return "unknown", "the default setting could not be measured"
    wait = _mean([t.data_wait for t in base])
    if wait < WAIT_MODEL:
        return "model", (
            f"with the default the step waited {wait:.0%} of its time for data, so the model, not the data, "
            "bounds the epoch"
        )
    read_rate = _mean([t.read_mb / t.seconds for t in base if t.seconds > 0])
    seq = f.disk.sequential_mb_per_s if f.disk is not None else 0.0
    if not f.data.fits_cache or (seq and read_rate > 0.5 * seq):
        return "disk", (
            f"with the default the step waited {wait:.0%} of its time for data read from the disk "
            f"({read_rate:,.0f} MB/s; sequential {seq:,.0f} MB/s)"
        )
    per_sample = (1e3 * f.load_ms / max(f.batch_size, 1)) if f.load_ms is not None else None
    cost = f" ({per_sample:,.0f} µs a sample serially)" if per_sample is not None else ""
    if f.data.per_sample_work:
        work = " and ".join(
            w for w, on in (("decoding", f.data.decoded), ("augmenting", f.data.augmented)) if on
        )
        return (
            "decode",
            f"with the default the step waited {wait:.0%} of its time for data, {work} each sample{cost}",
        )
    return "hand-off", (
        f"with the default the step waited {wait:.0%} of its time for batches to be assembled and handed "
        f"over{cost}"
    )


def choices(answer: Answer) -> list[str]:
    """One sentence per choice: each setting the answer changes, or why the default stays."""
    kind, why = bottleneck(answer)
    d, c = answer.default, answer.chosen
    rounds = len(answer.ratios)
    if not answer.beat_default:
        b = answer.best
        if b is None:
            tail = (
                "no other setting ran well enough to compare"
                if len(answer.trials) > 1
                else "nothing else ran"
            )
        elif b in answer.disqualified:
            tail = f"the fastest other setting, {b.label()}, {answer.disqualified[b]}"
        elif answer.gain is None:
            tail = f"the screening's fastest other setting, {b.label()}, could not be confirmed in the budget"
        else:
            tail = (
                f"the fastest other setting, {b.label()}, was {answer.gain:+.0%} against it in a duel "
                f"(median of {rounds} pairs of turns side by side), less than the {answer.min_gain:.0%} "
                "required"
            )
        return [f"Kept the default ({d.label()}) [{kind}]: {why}; {tail}."]
    chosen_wait = _mean([t.data_wait for t in answer.trials if t.candidate == c and t.ok])
    after = (
        f"{answer.gain:+.0%} samples/s over {rounds} pairs of turns side by side with the default, "
        f"waiting {chosen_wait:.0%} for data"
    )
    out = []
    changed = {o.split("=", 1)[0]: o for o in c.overrides(d)}
    for key, override in changed.items():
        if key == "storage":
            out.append(
                f"`{override}` [disk]: {why}; the {c.storage} export reads and decodes it faster ({after})."
            )
        elif key == "storage.buffers":
            how = (
                "large sequential reads into memory, pages dropped behind the reader: the export does not "
                "fit the page cache"
                if c.buffers == "memory"
                else "reads through the page cache, which holds the export from epoch to epoch"
            )
            out.append(f"`{override}` [disk]: {how}.")
        elif key == "loader.num_workers":
            if c.num_workers > d.num_workers:
                out.append(
                    f"`{override}` [{kind}]: {why}; {c.num_workers} worker processes do that work on the "
                    f"other cores while the step trains ({after})."
                )
            else:
                out.append(
                    f"`{override}` [model]: fewer workers: the loading they took over was cheaper than the "
                    f"cores they took from the training step ({after})."
                )
        elif key == "loader.decode_threads":
            where = "each worker" if c.num_workers else "the main process"
            if c.decode_threads > d.decode_threads:
                out.append(
                    f"`{override}` [decode]: {why}; {c.decode_threads} threads in {where} decode and augment "
                    f"the parts of each batch side by side (the decoders release the GIL) ({after})."
                )
            else:
                out.append(f"`{override}` [model]: fewer threads competing with the training step ({after}).")
        elif key == "loader.thread_prefetch":
            if c.thread_prefetch:
                out.append(
                    f"`{override}` [hand-off]: {why}; a thread prepares {c.thread_prefetch} batches ahead "
                    f"while the step computes ({after})."
                )
            else:
                out.append(f"`{override}` [model]: no prefetch thread competing with the step ({after}).")
    return out


def headline(answer: Answer) -> str:
    if answer.beat_default:
        return (
            f"**Recommended**: `{' '.join(answer.overrides)}` -- {answer.gain:+.0%} train samples/s against "
            f"the default ({answer.default.label()}): the median of {len(answer.ratios)} pairs of turns "
            "side by side in this run."
        )
    return (
        f"**No setting beat the default** ({answer.default.label()}) by {answer.min_gain:.0%}: the default "
        "is recommended."
    )


def trials_table(answer: Answer) -> list[str]:
    base = {t.round: t.rate for t in answer.trials if t.candidate == answer.default and t.ok}
    head = [
        "setting",
        "round",
        registry.get(SPS).label,
        "typical",
        "x default (same round)",
        registry.get(WAIT).label,
    ]
    head += [registry.get(AMP).label, "first batch ms", "memory MiB", "s", "note"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for t in answer.trials:
        note = t.error or answer.disqualified.get(t.candidate, "")
        if t.candidate == answer.chosen and answer.beat_default:
            note = note or "recommended"
        if not t.ok:
            cells = [t.candidate.label(), str(t.round), *[""] * 8, f"failed: {t.error}"]
        else:
            amp = _fmt(AMP, t.read_amplification) if t.read_mb else ""
            cells = [
                t.candidate.label(),
                str(t.round),
                _fmt(SPS, t.samples_per_s),
                _fmt(SPS, t.rate),
                f"{t.rate / base[t.round]:.2f}" if base.get(t.round) else "",
                _fmt(WAIT, t.data_wait),
                amp,
                f"{t.first_batch_ms:.0f}",
                f"{t.memory_mb:.0f}",
                f"{t.seconds:.1f}",
                note,
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def pruned_lines(answer: Answer) -> list[str]:
    """Pruned settings grouped by rule: how many, which, and the rule's reason (the first one's words)."""
    groups: dict[str, list[tuple[Candidate, str]]] = {}
    for c, rule, why in answer.pruned:
        groups.setdefault(rule, []).append((c, why))
    out = []
    for rule, items in groups.items():
        shown = "; ".join(c.label() for c, _ in items[:4]) + (
            f"; +{len(items) - 4} more" if len(items) > 4 else ""
        )
        out.append(f"- `{rule}` ({len(items)}: {shown}): {items[0][1]}.")
    if answer.untried:
        out.append(
            f"- not tried, the budget spent ({len(answer.untried)}): "
            + "; ".join(c.label() for c in answer.untried[:6])
        )
    return out


def markdown(answer: Answer) -> str:
    f = answer.facts
    lines = [headline(answer), "", "```", answer.command, "```", "", "**Why**", ""]
    lines += [f"- {s}" for s in choices(answer)]
    lines += [
        "",
        f"**Trials** ({len(answer.trials)}, {answer.seconds:.0f} s of a {answer.budget_s:.0f} s budget)",
        "",
    ]
    lines += trials_table(answer)
    for i, (c, duel) in enumerate(answer.duels, 1):
        gain = f"{duel.gain:+.0%}" if duel.gain is not None else "failed"
        ratios = ", ".join(f"{r:.2f}" for r in duel.ratios)
        lines += [
            "",
            f"Duel {i} ({c.label()} against the default): {gain}; ratio per pair of turns: {ratios}",
        ]
    lines += ["", f"**Pruned before any trial** ({len(answer.pruned)})", ""]
    lines += pruned_lines(answer) or ["- nothing"]
    lines += ["", "**Facts**", "", "| fact | value | what |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in f.rows()]
    if answer.export_seconds > 1:
        lines += [
            "",
            f"The export took {answer.export_seconds:.0f} s before the budget started (the job reuses it).",
        ]
    return "\n".join(lines) + "\n"


def description(answer: Answer, limit: int = NOTE_MAX) -> str:
    text = markdown(answer)
    return text if len(text) <= limit else text[: limit - 40] + "\n\n... (full report: tune.md)\n"


def write_config(answer: Answer, path: str | Path) -> Path:
    """The answer as a config file merged last (`# @package _global_`): in conf/local/ it is
    ``pipeline local=tuned``; the tuned keys only, so it changes nothing else."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [
        "# @package _global_",
        f"# pipeline-tune: {answer.command}",
        "# " + headline(answer).replace("*", ""),
    ]
    settings = answer.chosen.settings()
    tuned = [o.split("=", 1)[0] for o in answer.overrides]
    if "storage" in tuned:
        lines += ["defaults:", f"  - override /storage: {settings['storage']}"]
    nodes: dict[str, dict] = {}
    for key in tuned:
        if key != "storage":
            group, name = key.split(".", 1)
            nodes.setdefault(group, {})[name] = settings[key]
    for group, values in nodes.items():
        lines.append(f"{group}:")
        lines += [f"  {k}: {v}" for k, v in values.items()]
    if not tuned:
        lines.append("{}  # the default settings are the answer")
    return fsio.atomic_write(path, "\n".join(lines) + "\n")


CSV_COLUMNS = (
    "setting", "stage", "round", *Candidate.__dataclass_fields__, SPS, "typical_samples_per_s", WAIT, READ,
    AMP, "first_batch_ms", "memory_mb", "seconds", "samples", "error",
)  # fmt: skip


def write_trials_csv(answer: Answer, path: Path) -> Path:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(CSV_COLUMNS)
        for t in answer.trials:
            c = t.candidate
            w.writerow(
                [c.label(), t.stage, t.round, *asdict(c).values(), t.samples_per_s, t.rate, t.data_wait]
                + [t.read_mb, t.read_amplification, t.first_batch_ms, t.memory_mb, t.seconds, t.samples]
                + [t.error or ""]
            )
    return path


def publish(cfg: DictConfig, answer: Answer, out_dir: str | Path, config_path: Path | None = None) -> str:
    """The MLflow parent run and a child run per trial (module docstring); returns the parent's id."""
    from pipeline.tracking.lineage import git_info
    from pipeline.tracking.store import TrackedRun, prepare_store

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tune.md").write_text(markdown(answer))
    (out / "facts.json").write_text(json.dumps(answer.facts.params(), indent=2) + "\n")
    write_trials_csv(answer, out / "trials.csv")
    uri = cfg.tracking.uri
    exp_id = prepare_store(uri, cfg.tracking.experiment, cfg.tracking.artifact_location)
    name = cfg.tracking.run_name or f"tune {cfg.source.name}-{cfg.storage.name}-{cfg.model.name}"
    tags = {
        "pipeline.role": "tune",
        "hydra.overrides": " ".join(answer.user_overrides),
        "pipeline.output_dir": str(out),
        **git_info(cfg.paths.root),
    }
    with TrackedRun(uri, exp_id, name, os.environ.get("PIPELINE_MLFLOW_PARENT_RUN_ID"), tags) as parent:
        parent.log_params(answer.facts.params())
        parent.log_params({"tune.budget_s": answer.budget_s, "tune.min_gain": answer.min_gain})
        for t in answer.trials:
            _child(uri, exp_id, parent.run_id, t, answer)
        parent.set_tags(
            {
                "tune.overrides": " ".join(answer.overrides) or "(defaults)",
                "tune.command": answer.command,
                "tune.beat_default": str(answer.beat_default).lower(),
                "tune.gain": f"{answer.gain:.4f}" if answer.gain is not None else "",
                "tune.seconds": f"{answer.seconds:.1f}",
                NOTE_TAG: description(answer),
            }
        )
        for name in ("tune.md", "trials.csv", "facts.json"):
            parent.log_artifact(out / name)
        if config_path is not None:
            parent.log_artifact(config_path)
        hydra_dir = out / ".hydra"
        if hydra_dir.is_dir():
            parent.log_artifact(hydra_dir, "hydra")
        return parent.run_id


def _child(uri: str, exp_id: str, parent_id: str, t: Trial, answer: Answer) -> None:
    from pipeline.tracking.store import TrackedRun

    c = t.candidate
    tags = {"pipeline.role": "tune-trial", "tune.stage": t.stage}
    if c == answer.chosen:
        tags["tune.chosen"] = "true"
    if c in answer.disqualified:
        tags["tune.disqualified"] = answer.disqualified[c]
    tags["tune.round"] = str(t.round)
    run = TrackedRun(uri, exp_id, f"{c.label()} (round {t.round})", parent_id, tags).start()
    try:
        run.log_params(
            {**c.settings(), "tune.overrides": " ".join(c.overrides(answer.default)) or "(default)"}
        )
        if t.ok:
            m = {SPS: t.samples_per_s, WAIT: t.data_wait, READ: t.read_mb}
            if t.read_amplification is not None:
                m[AMP] = t.read_amplification
            run.log_metrics(m)
            run.end("FINISHED")
        else:
            run.set_tags({"error": t.error or "no samples"})
            run.end("FAILED")
    except BaseException:
        run.end("FAILED")
        raise
