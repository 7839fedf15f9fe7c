"""``python -m pipeline.runs``: the recent runs of the MLflow store as a table (pipeline/runs/listing.py)."""

import sys

from pipeline.runs.listing import main

sys.exit(main())
