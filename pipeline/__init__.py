"""Hydra-configured PyTorch pipeline for training on data that does not fit in RAM.

Stages: export (sources -> storage) -> partition -> loading -> train, tracked in MLflow.
Run it with ``pipeline`` or ``python -m pipeline``; see README.md.
"""
