"""Benchmarks that compare this project with what it replaced or passed over: earlier readers, other
decoders, other designs. Repository tooling, not part of the installed package (pyproject.toml packages
``pipeline*`` only); run them from the repository root. Each prints its figures beside a baseline
measured in the same run; the figures, with their date and machine, are in docs/.

    python -m benchmarks.readers     # memmap/shards readers warm and out of core vs the readers before
    python -m benchmarks.memory      # peak memory of one epoch per format and data size
    python -m benchmarks.codecs      # PNG/WebP/JPEG bytes and decode speed per decoder, on photo crops
    python -m benchmarks.augment     # batched flip/crop in the main process vs in the workers
    python -m benchmarks.photos DIR  # photo crops as an image folder (or LFW's layout) to bench on

The loader bench itself (formats x workers x batch sizes, warm/cold, memory cap) is the package's
``python -m pipeline.bench``; these import the package, never the other way round.
"""
