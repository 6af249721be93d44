"""The runtime side of a plugin, and the framework that runs the active ones.

Imported only inside the training process. A plugin is a plain object with
optional hooks; the framework calls them in ``spec.order``:

- ``load_model(model_name_or_path, ctx) -> model`` when ``spec.loads_model``;
- ``augment(model, ctx) -> model``: patch modules, add adapters (may set
  ``ctx.peft_config = None`` when it applied PEFT itself);
- ``data_collator(ctx) -> collator | None`` and ``prepare_trainer(trainer, ctx)``
  for plugins that change batching (padding-free, multipack);
- ``callbacks(model, ctx) -> list`` of ``transformers.TrainerCallback``.

Every module a plugin replaces or wraps goes into ``ctx.report`` so ``run`` can
print which plugin patched what.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from .spec import PluginSpec


class PluginError(RuntimeError):
    """A user-facing error: printed as one line, no traceback."""


@dataclass
class PatchReport:
    """Which plugin replaced or wrapped which modules, and how many."""

    entries: Counter = field(default_factory=Counter)
    notes: list[tuple[str, str]] = field(default_factory=list)

    def add(self, plugin: str, what: str, count: int = 1) -> None:
        self.entries[(plugin, what)] += count

    def note(self, plugin: str, message: str) -> None:
        """A one-off remark worth showing (a fallback taken, a backend chosen)."""
        if (plugin, message) not in self.notes:
            self.notes.append((plugin, message))

    def count(self, plugin: str | None = None) -> int:
        return sum(n for (p, _), n in self.entries.items() if plugin in (None, p))

    def lines(self) -> list[str]:
        out = [f"  [{p}] {what}: {n}" for (p, what), n in sorted(self.entries.items())]
        out += [f"  [{p}] note: {m}" for p, m in self.notes]
        return out or ["  (no modules patched)"]

    def as_dict(self) -> dict[str, Any]:
        return {
            "patches": [{"plugin": p, "what": w, "count": n} for (p, w), n in sorted(self.entries.items())],
            "notes": [{"plugin": p, "note": m} for p, m in self.notes],
        }


@dataclass
class TrainContext:
    """What plugins may read and change while the run is built."""

    args: dict[str, Any]  # resolved training arguments (fms-hf-tuning / SFTConfig names)
    torch_dtype: Any = None
    tokenizer: Any = None
    peft_config: Any = None  # peft.LoraConfig or None
    sft_config: Any = None  # trl.SFTConfig, set before augment
    report: PatchReport = field(default_factory=PatchReport)
    extras: dict[str, Any] = field(default_factory=dict)  # plugin-to-plugin hand-offs

    @property
    def fsdp(self) -> bool:
        """Whether the run shards the model with FSDP (the ``distributed`` section, checked before launch)."""
        return (self.args.get("distributed") or {}).get("strategy") == "fsdp"

    @property
    def fsdp_checkpoints_layers(self) -> bool:
        """Whether FSDP's own wrapper checkpoints the decoder layers, as the SFTConfig was built
        (``fmsaccel_cli.distributed``: then transformers' gradient checkpointing is off)."""
        fsdp_config = getattr(self.sft_config, "fsdp_config", None) or {}
        return self.fsdp and bool(fsdp_config.get("activation_checkpointing"))


class AccelerationPlugin:
    """Base class with no-op hooks; a plugin overrides only what it does."""

    def __init__(self, spec: PluginSpec, config: dict[str, dict[str, Any]]):
        self.spec = spec
        self.config = config

    @property
    def name(self) -> str:
        return self.spec.name

    def load_model(self, model_name_or_path: str, ctx: TrainContext):
        raise PluginError(f"plugin {self.name} does not load models")

    def augment(self, model, ctx: TrainContext):
        return model

    def data_collator(self, ctx: TrainContext):
        return None

    def prepare_trainer(self, trainer, ctx: TrainContext) -> None:
        return None

    def callbacks(self, model, ctx: TrainContext) -> list:
        return []


class AccelerationFramework:
    """Builds the active plugins from a validated ``plugins:`` config and runs their hooks."""

    def __init__(self, active: list[tuple[PluginSpec, dict[str, dict[str, Any]]]]):
        active = sorted(active, key=lambda item: item[0].order)
        loaders = [spec.name for spec, _ in active if spec.loads_model]
        if len(loaders) > 1:
            raise PluginError(f"at most one plugin may load the model; these all do: {', '.join(loaders)}")
        self.plugins: list[AccelerationPlugin] = [spec.build(cfg) for spec, cfg in active]

    @property
    def loader(self) -> AccelerationPlugin | None:
        return next((p for p in self.plugins if p.spec.loads_model), None)

    def describe(self) -> list[str]:
        return [f"Active plugin: {p.name} ({type(p).__module__})" for p in self.plugins]

    def load_model(self, model_name_or_path: str, ctx: TrainContext):
        return self.loader.load_model(model_name_or_path, ctx)

    def augment(self, model, ctx: TrainContext):
        for plugin in self.plugins:
            model = plugin.augment(model, ctx)
        return model

    def data_collator(self, ctx: TrainContext):
        collators = [(p.name, c) for p in self.plugins if (c := p.data_collator(ctx)) is not None]
        if len(collators) > 1:
            raise PluginError(f"two plugins want to own the data collator: {collators[0][0]}, {collators[1][0]}")
        return collators[0][1] if collators else None

    def prepare_trainer(self, trainer, ctx: TrainContext) -> None:
        for plugin in self.plugins:
            plugin.prepare_trainer(trainer, ctx)

    def callbacks(self, model, ctx: TrainContext) -> list:
        return [cb for p in self.plugins for cb in p.callbacks(model, ctx)]
