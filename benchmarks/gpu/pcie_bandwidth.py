"""Host <-> GPU copy bandwidth with pinned memory (what foak's offload_mlp_activations rides on).

    python3 benchmarks/gpu/pcie_bandwidth.py   # one line per direction, GB/s over a 1 GiB copy
"""

import time

import torch


def main() -> None:
    device_buf = torch.empty(2**29, dtype=torch.bfloat16, device="cuda")
    host_buf = torch.empty(device_buf.shape, dtype=device_buf.dtype, pin_memory=True)
    for name, dst, src in (("device->host", host_buf, device_buf), ("host->device", device_buf, host_buf)):
        for _ in range(2):  # the first copy warms up
            torch.cuda.synchronize()
            start = time.perf_counter()
            dst.copy_(src, non_blocking=True)
            torch.cuda.synchronize()
        print(f"{name}: {2**30 / (time.perf_counter() - start) / 1e9:.1f} GB/s", flush=True)


if __name__ == "__main__":
    main()
