"""python -m pipeline.tune [overrides]: the same as ``pipeline-tune`` (pipeline/tune/cli.py)."""

from pipeline.tune.cli import main

main()
