"""Discover plugin specs through the ``fmsaccel.plugins`` entry-point group.

Each entry point names a ``PluginSpec`` object (never the heavy implementation), so
listing plugins and validating recipes stays import-light.
"""

from __future__ import annotations

from functools import lru_cache
from importlib.metadata import entry_points

from .spec import PluginSpec

ENTRY_POINT_GROUP = "fmsaccel.plugins"


@lru_cache(maxsize=1)
def discover() -> dict[str, PluginSpec]:
    specs: dict[str, PluginSpec] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        spec = ep.load()
        if not isinstance(spec, PluginSpec):
            raise TypeError(f"entry point {ep.name} ({ep.value}) is not a PluginSpec")
        specs[spec.name] = spec
    return dict(sorted(specs.items(), key=lambda kv: (kv[1].order, kv[0])))


def path_owners() -> dict[str, PluginSpec]:
    """Map each claimed config path (dotted, under ``plugins:``) to its plugin."""
    owners: dict[str, PluginSpec] = {}
    for spec in discover().values():
        for path in spec.paths:
            if path in owners:
                raise RuntimeError(f"config path plugins.{path} claimed twice: {owners[path].name}, {spec.name}")
            owners[path] = spec
    return owners
