"""The profile's GPU-idle summary: gaps between kernels, put down to the host sync that returned as each opened."""

from types import SimpleNamespace

import torch

from fmsaccel_cli import gpu_idle


def _event(name, start, end, device="CUDA", stack=(), parent=None):
    return SimpleNamespace(name=name, time_range=SimpleNamespace(start=start, end=end),
                           device_type=f"DeviceType.{device}", stack=list(stack), cpu_parent=parent)


def test_gaps_are_the_stretches_without_a_running_kernel():
    kernels = [(0, 100, "a"), (50, 300, "b"), (305, 400, "c"), (1000, 1100, "d")]  # b overlaps a; c is back to back
    assert gpu_idle.idle_gaps(kernels) == [(400, 1000, "c", "d")]


def test_each_gap_is_put_down_to_the_sync_that_returned_as_it_opened():
    item = _event("aten::item", 390, 402, device="CPU", stack=["torch/_tensor.py(1): item",
                                                                "transformers/trainer.py(2748): _track", "x.py(3): f"])
    copy = _event("aten::copy_", 1290, 1300, device="CPU", parent=_event("aten::to", 1280, 1301, device="CPU"))
    sync = _event("cudaStreamSynchronize", 395, 401, device="CPU", parent=item)
    events = [_event("gemm", 0, 400), _event("Memcpy DtoH", 400, 900), _event("gemm", 1000, 1100),
              _event("gemm", 1400, 1500), sync, item,
              _event("cudaMemcpyAsync", 1295, 1299, device="CPU", parent=copy)]
    summary = gpu_idle.gpu_idle_summary(events, steps=1)
    assert summary.startswith("GPU idle between kernels: 0.9 ms a step (60.0 % of 2 ms), 2 gaps")  # memcpy is no kernel
    assert "0.60      1  cudaStreamSynchronize from transformers/trainer.py(2748): _track < x.py(3): f" in summary
    assert "0.30      1  cudaMemcpyAsync from aten::copy_ < aten::to" in summary  # no Python frames: the ops
    assert "0.60 at      0.4  gemm -> gemm" in summary


def test_a_profile_without_kernels_says_so():
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], with_stack=True) as prof:
        torch.ones(3).sum().item()
    assert gpu_idle.gpu_idle_summary(prof.events()) == "GPU idle: no kernels in the profile"


def test_the_call_site_comes_from_python_function_events_too():
    frames = [_event("<stdin>(3): <module>", 0, 10, device="CPU")]
    for name in ("transformers/trainer.py(2748): _track", "torch/_tensor.py(1): item", "aten::item"):
        frames.append(_event(name, 0, 10, device="CPU", parent=frames[-1]))
    sync = _event("cudaStreamSynchronize", 1, 2, device="CPU", parent=frames[-1])
    assert gpu_idle._call_site(sync) == "transformers/trainer.py(2748): _track < <stdin>(3): <module>"
