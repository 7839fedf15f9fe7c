"""Benchmarks that print their figures beside a baseline measured in the same run.

python -m pipeline.bench              # loader throughput per storage format (loader.py, conf/bench.yaml)
python -m pipeline.bench.memory       # peak memory of one epoch per format and data size (memory.py)
python -m pipeline.bench.readers      # memmap/shards readers warm and out of core vs before (readers.py)
"""
