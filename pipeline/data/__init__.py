"""Everything up to a published, split export: sources -> storage formats -> export -> partition.

from pipeline.data.export import export          # source + storage configs -> a complete export on disk
from pipeline.data.partition import partition    # labels -> seeded train / val ids
"""
