"""Runs after the fact: checkpoints, resuming an interrupted run, rerunning a logged one.

pipeline trainer.resume=<run id>          # pipeline/runs/resume.py
python -m pipeline.runs.reproduce <run id>
python -m pipeline.runs [--sweep latest] [--failed]   # recent runs as a table: pipeline/runs/listing.py
"""
