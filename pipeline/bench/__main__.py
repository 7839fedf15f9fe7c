"""python -m pipeline.bench [overrides]: the loader benchmark (pipeline/bench/cli.py, conf/bench.yaml)."""

from pipeline.bench.cli import cli

cli()
