"""fmsaccel's plugin framework: specs (light, data) and the runtime framework (heavy hooks)."""

from .spec import MISSING, ConfigKey, PluginSpec

__all__ = ["MISSING", "ConfigKey", "PluginSpec"]
