"""The loader bench: how fast each storage format feeds batches, beside baselines measured in the same run.

    python -m pipeline.bench [overrides]     # conf/bench.yaml; docs/out-of-core.md has its columns

cli.py (the Hydra app and its MLflow run), schema.py (its config: ``base_bench``, checks, the other
formats' options), loader.py (the grid, measured), conditions.py (warm/cold passes, the memory cgroup),
report.py (CSV, table, chart). Benchmarks that compare with earlier readers, other decoders or other
designs are not part of the package: benchmarks/ in the repository (``python -m benchmarks.readers`` ...).
"""
