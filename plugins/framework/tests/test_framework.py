"""The plugin framework: discovery through entry points, hook order, conflicts, the patch report."""

from __future__ import annotations

import sys
import types

import pytest

from fmsaccel_framework import ConfigKey, PluginSpec
from fmsaccel_framework.plugin import AccelerationFramework, AccelerationPlugin, PatchReport, PluginError, TrainContext
from fmsaccel_framework.registry import discover, path_owners

SHIPPED = {"accelerated-peft-bnb", "accelerated-peft-gptq", "fused-ops-and-kernels",
           "attention-and-distributed-packing", "accelerated-moe"}


def test_every_shipped_plugin_is_discovered_in_order_without_importing_torch():
    import subprocess

    code = ("import sys; from fmsaccel_framework.registry import discover; names = list(discover()); "
            "print(names); assert 'torch' not in sys.modules, 'a spec imported torch'")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    specs = discover()
    assert SHIPPED <= set(specs)
    orders = [s.order for s in specs.values()]
    assert orders == sorted(orders)
    assert path_owners()["peft.quantization.auto_gptq"].name == "accelerated-peft-gptq"


class _Recorder(AccelerationPlugin):
    def augment(self, model, ctx):
        ctx.extras.setdefault("order", []).append(self.name)
        ctx.report.add(self.name, "thing -> faster thing", 2)
        return model

    def load_model(self, model_name_or_path, ctx):
        return f"model from {self.name}"


def _spec(name: str, order: int, loads: bool = False) -> PluginSpec:
    module = types.ModuleType(f"_fake_{name}")
    module.build = lambda spec, config: _Recorder(spec, config)
    sys.modules[module.__name__] = module
    return PluginSpec(name=name, description="", paths={f"x.{name}": {"k": ConfigKey(int, default=1)}},
                      factory=f"{module.__name__}:build", order=order, loads_model=loads)


def test_hooks_run_in_spec_order_and_the_loader_loads():
    framework = AccelerationFramework([(_spec("late", 40), {}), (_spec("loader", 10, loads=True), {}),
                                       (_spec("mid", 20), {})])
    ctx = TrainContext(args={})
    assert framework.load_model("path", ctx) == "model from loader"
    framework.augment(None, ctx)
    assert ctx.extras["order"] == ["loader", "mid", "late"]
    assert ctx.report.count() == 6 and ctx.report.count("mid") == 2
    assert "  [mid] thing -> faster thing: 2" in ctx.report.lines()


def test_two_loaders_and_two_collators_are_refused():
    with pytest.raises(PluginError, match="at most one plugin may load the model"):
        AccelerationFramework([(_spec("a", 10, loads=True), {}), (_spec("b", 10, loads=True), {})])

    class Collating(AccelerationPlugin):
        def data_collator(self, ctx):
            return object()

    framework = AccelerationFramework([])
    framework.plugins = [Collating(_spec("c1", 30), {}), Collating(_spec("c2", 30), {})]
    with pytest.raises(PluginError, match="two plugins want to own the data collator"):
        framework.data_collator(TrainContext(args={}))


def test_patch_report_notes_are_kept_once_and_serialise():
    report = PatchReport()
    report.add("p", "A -> B", 3)
    report.note("p", "fell back to torch")
    report.note("p", "fell back to torch")
    assert report.as_dict() == {"patches": [{"plugin": "p", "what": "A -> B", "count": 3}],
                                "notes": [{"plugin": "p", "note": "fell back to torch"}]}
    assert PatchReport().lines() == ["  (no modules patched)"]


def test_train_context_says_whether_the_run_uses_fsdp():
    assert TrainContext(args={"distributed": {"strategy": "fsdp"}}).fsdp
    assert not TrainContext(args={"distributed": {"strategy": "ddp"}}).fsdp
    assert not TrainContext(args={}).fsdp
