"""Plugin specs: what a plugin claims, declared as data.

A spec is imported by the CLI (``plugins list``, recipe validation, completion), so
this module and every plugin's ``spec`` module must never import torch or other
heavy libraries. The heavy implementation is named by ``factory`` and imported only
when a run actually needs it (Axolotl-style lazy plugins).
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass, field
from typing import Any

MISSING: Any = object()


@dataclass(frozen=True)
class ConfigKey:
    """One key a plugin accepts under one of its config paths."""

    type: type | tuple[type, ...]
    default: Any = MISSING
    choices: tuple[Any, ...] | None = None
    help: str = ""

    @property
    def required(self) -> bool:
        return self.default is MISSING


@dataclass(frozen=True)
class PluginSpec:
    """Everything the framework must know about a plugin without importing it.

    paths:        config path under ``plugins:`` (dotted) -> accepted keys.
    order:        application order (peft 10 < foak 20 < aadp 30 < moe 40).
    loads_model:  the plugin builds the model itself (at most one active loader).
    requires:     importable module names the plugin's extra provides.
    extra:        the ``fmsaccel[extra]`` that installs ``requires``.
    gpu_only:     the plugin cannot run without CUDA (CPU fallbacks make this rare).
    architectures: model_type values it supports (empty = any).
    factory:      ``"module:callable"``; called as ``factory(spec, config)`` where
                  config maps each active path to its validated keys.
    """

    name: str
    description: str
    paths: dict[str, dict[str, ConfigKey]]
    factory: str
    order: int = 50
    loads_model: bool = False
    requires: tuple[str, ...] = ()
    extra: str | None = None
    gpu_only: bool = False
    architectures: tuple[str, ...] = ()
    conflicts: tuple[str, ...] = field(default=())

    def missing_requirements(self) -> list[str]:
        """Modules this plugin needs that cannot be imported here (no import done)."""
        return [m for m in self.requires if importlib.util.find_spec(m) is None]

    def pip_command(self) -> list[str]:
        """The pip command that installs this plugin's extra."""
        import sys

        target = f"fmsaccel[{self.extra}]" if self.extra else "fmsaccel"
        return [sys.executable, "-m", "pip", "install", target]

    def build(self, config: dict[str, dict[str, Any]]):
        module_name, _, attr = self.factory.partition(":")
        factory = getattr(importlib.import_module(module_name), attr)
        return factory(self, config)
