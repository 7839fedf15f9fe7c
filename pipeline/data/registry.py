"""Extension points found by looking: the modules of a package that define an instance of a contract.

    FORMATS = Registry("pipeline.data.storage", "FORMAT", StorageFormat, "storage format")
    FORMATS.all()          # {name: instance}: the package's, then the registered ones
    FORMATS.get("shards")  # ValueError naming the valid names when unknown
    FORMATS.add(fmt)       # one defined elsewhere (a notebook, a test)

Every module of the package is imported once, on first use; those whose ``attr`` is an instance of ``kind``
are the entries (keyed by its ``name``). pipeline/data/storage/ and pipeline/data/sources/ use it: adding a
format or a source is adding a module, nothing lists them.
"""

from __future__ import annotations

import importlib
import pkgutil


class Registry:
    def __init__(self, package: str, attr: str, kind: type, what: str) -> None:
        self.package, self.attr, self.kind, self.what = package, attr, kind, what
        self._entries: dict = {}
        self._discovered = False

    def _discover(self) -> None:
        if self._discovered:
            return
        pkg = importlib.import_module(self.package)
        for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda m: m.name):
            entry = vars(importlib.import_module(f"{self.package}.{info.name}")).get(self.attr)
            if isinstance(entry, self.kind):
                self._entries.setdefault(entry.name, entry)
        self._discovered = True

    def all(self) -> dict:
        self._discover()
        return dict(self._entries)

    def get(self, name: str):
        known = self.all()
        if name not in known:
            raise ValueError(f"Unknown {self.what} {name!r}; valid: {sorted(known)}")
        return known[name]

    def add(self, entry) -> None:
        if not isinstance(entry, self.kind):
            raise TypeError(
                f"registering a {self.what} takes a {self.kind.__name__}, got {type(entry).__name__}"
            )
        self._discover()
        self._entries[entry.name] = entry
