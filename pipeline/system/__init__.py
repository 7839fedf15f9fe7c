"""The machine the job runs on, measured: memory the run holds.

from pipeline.system.memory import MemorySampler, snapshot
"""
