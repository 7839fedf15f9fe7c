"""What is recorded about a run in MLflow: the store and runs, sweeps and their report, lineage, plots,
memory records and the final model.

    from pipeline.tracking.store import TrackedRun, prepare_store
"""
