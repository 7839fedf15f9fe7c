"""Constraints declared on the schema's fields, checked by one walk over the composed config.

    @dataclass
    class LoaderConfig:
        batch_size: int = at_least(1, 64)                  # an integer >= 1, default 64
        pin_memory: str = one_of(TRISTATE, "auto")
    check_fields(cfg)     # ConfigError("Invalid config: loader.batch_size=0 -- must be an integer >= 1")

Hydra already rejects a wrong type, an unknown key or a value outside an Enum when it composes; what a type
cannot say (a range, a list's shape, "auto or an integer") is written once, on the field it belongs to, and
``check_fields`` finds it through each node's dataclass (``OmegaConf.get_type``) -- the config groups'
option schemas included, wherever their dataclass lives (a source's or a storage format's own module).
Checks that involve several keys live with their owner: a source's or a format's ``validate``, else
pipeline/config/validate.py.

Tri-state options (``auto``/``true``/``false``) are strings checked here rather than Enums: a YAML or
command-line ``true`` reaches OmegaConf as a boolean, which an Enum node rejects.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf

TRISTATE = ("auto", "true", "false")


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key, the value and what is valid."""

    def __init__(self, key: str, value: Any, valid: str):
        self.key, self.value, self.valid = key, value, valid
        super().__init__(f"Invalid config: {key}={value!r} -- {valid}")


def require(ok: bool, key: str, value: Any, valid: str) -> None:
    if not ok:
        raise ConfigError(key, value, valid)


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclasses.dataclass(frozen=True)
class Constraint:
    """``ok(value)`` and the words for what is valid."""

    ok: Callable[[Any], bool]
    valid: str
    optional: bool = False  # None (null) is valid too

    def check(self, key: str, value: Any) -> None:
        if self.optional and value is None:
            return
        require(self.ok(value), key, value, self.valid)


def _field(default: Any, constraint: Constraint):
    if isinstance(default, (list, dict)):
        return dataclasses.field(
            default_factory=lambda: type(default)(default), metadata={"check": constraint}
        )
    return dataclasses.field(default=default, metadata={"check": constraint})


def at_least(minimum: int, default: Any, *, optional: bool = False, valid: str | None = None):
    """An integer >= ``minimum``."""
    words = valid or f"must be an integer >= {minimum}"
    return _field(default, Constraint(lambda v: is_int(v) and v >= minimum, words, optional))


def number(
    default: Any,
    *,
    above: float | None = None,
    at_least: float | None = None,
    below: float | None = None,
    at_most: float | None = None,
    optional: bool = False,
    valid: str,
):
    """A finite number within the bounds given (``above``/``below`` exclusive, ``at_least``/``at_most``
    inclusive); ``valid`` says it in words, with an example."""

    def ok(v: Any) -> bool:
        return (
            is_number(v)
            and (above is None or v > above)
            and (at_least is None or v >= at_least)
            and (below is None or v < below)
            and (at_most is None or v <= at_most)
        )

    return _field(default, Constraint(ok, valid, optional))


def one_of(values: tuple, default: Any):
    """One of ``values``, compared as lower-case strings (a YAML ``true`` arrives as a boolean)."""
    allowed = tuple(str(v).lower() for v in values)
    return _field(default, Constraint(lambda v: str(v).lower() in allowed, f"one of {values}"))


def int_list(default: list | None, *, length: int | None = None, valid: str, optional: bool = False):
    """A non-empty list of integers >= 1 (of exactly ``length`` items when given)."""

    def ok(v: Any) -> bool:
        items = list(v) if OmegaConf.is_list(v) or isinstance(v, (list, tuple)) else None
        return (
            items is not None
            and len(items) >= 1
            and (length is None or len(items) == length)
            and all(is_int(d) and d >= 1 for d in items)
        )

    return _field(default, Constraint(ok, valid, optional))


def auto_or_at_least(minimum: int, default: Any):
    """``auto`` or an integer >= ``minimum``."""
    return _field(
        default,
        Constraint(lambda v: v == "auto" or (is_int(v) and v >= minimum), f"auto or an integer >= {minimum}"),
    )


def text(default: Any, *, optional: bool = False, valid: str):
    """A non-empty string."""
    return _field(default, Constraint(lambda v: isinstance(v, str) and v.strip() != "", valid, optional))


def constrained(default: Any, ok: Callable[[Any], bool], valid: str, optional: bool = False):
    """Any other single-value rule."""
    return _field(default, Constraint(ok, valid, optional))


def check_fields(node: DictConfig, prefix: str = "") -> None:
    """Check every constrained field of ``node`` and the nodes below it; raise ConfigError on the first bad
    value, naming its full key."""
    kind = OmegaConf.get_type(node)
    if dataclasses.is_dataclass(kind):
        for f in dataclasses.fields(kind):
            constraint = f.metadata.get("check")
            if constraint is not None and f.name in node and not OmegaConf.is_missing(node, f.name):
                constraint.check(f"{prefix}{f.name}", node[f.name])
    for key in node:
        if OmegaConf.is_missing(node, key) or OmegaConf.is_interpolation(node, key):
            continue
        child = node[key]
        if isinstance(child, DictConfig):
            check_fields(child, f"{prefix}{key}.")
