"""Configuration: schemas with every default (schema.py), constraints on values (checks.py), resolvers
(resolvers.py), and the checks that composition cannot express (validate.py).

    import pipeline.config
    pipeline.config.register()   # the resolvers, and the schemas (base_*) in Hydra's ConfigStore

``register`` runs once per process, before Hydra composes (the CLI and the notebook API call it). It is not
done on import: registering imports every source and storage format module (their schemas live there), and
those modules import the schema bases from this package.
"""

_REGISTERED = False


def register() -> None:
    global _REGISTERED
    if _REGISTERED:
        return
    from pipeline.config import resolvers, schema

    resolvers.register()
    schema.register_configs()
    _REGISTERED = True
