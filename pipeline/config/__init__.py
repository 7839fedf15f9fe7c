"""Configuration: schemas with every default (schema.py), resolvers (resolvers.py), and the checks that
composition cannot express (validate.py).

    import pipeline.config   # registers the schemas (base_*) and the resolvers with Hydra
"""

from pipeline.config import resolvers, schema

resolvers.register()
schema.register_configs()
