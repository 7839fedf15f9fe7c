"""python -m pipeline.bench [overrides]: the loader benchmark (pipeline/bench/loader.py, conf/bench.yaml)."""

from pipeline.bench.loader import cli

cli()
