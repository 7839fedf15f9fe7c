"""Turning an export into trained weights: DataLoaders, models, the epoch loop, torchrun.

from pipeline.training.loading import build_loader   # a DataLoader from the loader config
from pipeline.training.train import fit               # the epoch loop and its metrics
"""
