"""``torchrun`` entry for CPU tests of FSDP: ``fmsaccel_cli.train`` with accelerate's FSDP turned on for gloo.

accelerate enables its FSDP plugin only on accelerators (CUDA, XPU, ...); CPU processes always run
data-parallel (``fmsaccel_cli.distributed.verify`` refuses that for ``strategy: fsdp``). torch's FSDP2
itself runs on a CPU mesh over gloo, so this shim sets the distributed type to FSDP whenever a plugin
was given, and the rest is the production path unchanged: transformers' Trainer, accelerate's
``fully_shard`` per decoder layer, mixed precision, activation checkpointing, full-state-dict saving.
"""

from __future__ import annotations

from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType

_init = AcceleratorState.__init__


def _init_with_fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
    _init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        if self._mixed_precision != "no":
            fsdp_plugin.set_mixed_precision(self._mixed_precision)
        self.fsdp_plugin = fsdp_plugin
    if getattr(self, "fsdp_plugin", None) is not None:  # every later AcceleratorState() re-reads the process state
        self.distributed_type = DistributedType.FSDP


AcceleratorState.__init__ = _init_with_fsdp_on_cpu

if __name__ == "__main__":
    from fmsaccel_cli import train

    train.exit_process(train.main())
