"""The export a run trained on, as MLflow dataset inputs: the runs table's Dataset column and lineage.

    from pipeline.tracking.dataset_input import log_export_inputs
    log_export_inputs(tracked_run, exp, split)     # after the split (JobRecorder.split does it)

Two inputs, what ``mlflow.log_input`` would log, through ``MlflowClient.log_inputs`` with the run's
id: ``<export name>/train`` and ``<export name>/val`` with the contexts ``train`` and ``val`` (MLflow
keeps one input per name and digest, so the two need two names). Both carry the export's content
digest (the first 36 hex digits of ``data.content_sha256``: MLflow's longest digest), the export
folder as a local source, the samples' tensor schema (as ``mlflow.data.from_numpy`` writes it), and a
profile with the split's size and digest.
"""

from __future__ import annotations

import json

DIGEST_CHARS = 36  # mlflow.utils.validation.MAX_DATASET_DIGEST_SIZE
CONTEXT_TAG = "mlflow.data.context"  # the tag mlflow.log_input(context=...) writes


def _tensor(dtype: str, shape) -> str:
    return json.dumps([{"type": "tensor", "tensor-spec": {"dtype": dtype, "shape": [-1, *shape]}}])


def dataset_inputs(exp, split) -> list:
    from mlflow.entities import Dataset, DatasetInput, InputTag

    m = exp.manifest
    schema = json.dumps(
        {"mlflow_tensorspec": {"features": _tensor(m["dtype"], m["shape"]), "targets": _tensor("int64", [])}}
    )
    out = []
    for context, ids in (("train", split.train), ("val", split.val)):
        profile = {
            "num_samples": len(ids),
            "export_samples": m["num_samples"],
            "split": context,
            "split_digest": split.digest,
            "content_sha256": m["content_sha256"],
        }
        dataset = Dataset(
            name=f"{m['name']}/{context}",
            digest=m["content_sha256"][:DIGEST_CHARS],
            source_type="s3" if exp.url else "local",
            source=json.dumps({"uri": exp.url or exp.root.resolve().as_uri()}),
            schema=schema,
            profile=json.dumps(profile),
        )
        out.append(DatasetInput(dataset, [InputTag(CONTEXT_TAG, context)]))
    return out


def log_export_inputs(tr, exp, split) -> None:
    tr.client.log_inputs(tr.run_id, datasets=dataset_inputs(exp, split))
