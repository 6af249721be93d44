#!/usr/bin/env python
"""GPU timing of foak's LoRA-dropout kernels (``dropout_in_kernel``) against the torch mask path, at workload P.

At P (4 x 4096 tokens, hidden 4096, r=16, p=0.1) each LoRA projection reads or writes a few
128 MiB tensors per pass; this prints, per pass, the time of the kernel, of the torch path
it replaces (a ``bernoulli_`` mask kept in bf16 and its multiplies) and of the memory floor
(the same bytes at the copy bandwidth measured here), so one run says whether a kernel is
bandwidth-bound or spends its time in the random draws. ``rng`` rows time the draws alone:
one Philox per element (the kernels until s15c1) and the kernels' own draw (``lora_dropout._keep``:
one per eight elements, 16 bits an element), at Triton's default 10 Philox rounds and at the shipped
``lora_dropout.PHILOX_ROUNDS``. ``three projections`` rows time the ``*_multi`` kernels, which
read ``x`` (or read and write ``dx``) once for q/k/v, each with its own seed, against three single launches.
``tiles`` rows sweep each kernel's ``(BLOCK_M, BLOCK_K, num_warps)`` (``lora_dropout.GPU_TILES``), the
shipped tiles first.
Every time is GPU time: the calls are replayed from a CUDA graph.

    python benchmarks/gpu/lora_dropout_kernels.py            # needs a CUDA device
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

REPO = Path(__file__).resolve().parents[2]
try:
    import fmsaccel_foak  # noqa: F401
except ImportError:  # not pip-installed: use the checkout
    sys.path[:0] = [str(REPO / "plugins" / p) for p in ("framework", "accelerated-peft", "fused-ops-and-kernels")]

from fmsaccel_foak.ops import lora_dropout  # noqa: E402

M, K, R, P = 16384, 4096, 16, 0.1


@triton.jit
def _count_keep_kernel(OUT, seed, n_cols, p, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    total = tl.zeros((BLOCK_M,), dtype=tl.int32)
    for k0 in range(0, n_cols, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        keep = tl.rand(seed, (rows[:, None] * n_cols + cols[None, :]).to(tl.int32)) >= p
        total += tl.sum(keep.to(tl.int32), axis=1)
    tl.store(OUT + rows, total)


@triton.jit
def _count_kernels_keep(OUT, seed, n_cols, threshold, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                        ROUNDS: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    total = tl.zeros((BLOCK_M,), dtype=tl.int32)
    for k0 in range(0, n_cols, BLOCK_K):
        keep = lora_dropout._keep(seed, rows, k0, n_cols, threshold, BLOCK_M, BLOCK_K, ROUNDS)
        total += tl.sum(keep.to(tl.int32), axis=1)
    tl.store(OUT + rows, total)


def timed(fn, iters=20) -> float:
    """GPU milliseconds a call, from ``iters`` calls replayed as one CUDA graph.

    Eager launches of a ~0.1 ms kernel through a custom op are paced by the host: s15c2 and s15c3 timed the same
    tiles 20-40 % apart that way. The graph leaves only the GPU's time (eager events if capture fails)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(iters):
                fn()
        graph.replay()
        torch.cuda.synchronize()
        run = graph.replay
    except RuntimeError:
        torch.cuda.synchronize()

        def run():
            for _ in range(iters):
                fn()
    start.record()
    run()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def main() -> int:
    if not torch.cuda.is_available():
        print("needs a CUDA device")
        return 2
    dev = torch.device("cuda")
    bf16 = torch.bfloat16
    x = torch.randn(M, K, device=dev, dtype=bf16)
    dx = torch.randn(M, K, device=dev, dtype=bf16)
    a = torch.randn(R, K, device=dev, dtype=bf16) * 0.02
    dxa = torch.randn(M, R, device=dev, dtype=bf16)
    seed = lora_dropout.draw_seed(dev)
    mask = torch.empty_like(x).bernoulli_(1 - P)
    size = x.numel() * x.element_size()
    copy_ms = timed(lambda: dx.copy_(x))
    bandwidth = 2 * size / copy_ms / 1e6  # GB/s
    print(f"{torch.cuda.get_device_name(dev)}, triton {triton.__version__}: [{M}, {K}] bf16, r={R}, p={P}; "
          f"copy bandwidth {bandwidth:.0f} GB/s ({copy_ms:.3f} ms a {size / 2**20:.0f} MiB copy)")
    floor = lambda tensors: tensors * size / bandwidth / 1e6  # noqa: E731  ms to move that many x-sized tensors
    rows = [
        ("down: (x*keep)@A^T", lambda: lora_dropout.dropped_down(x, a, seed, P),
         lambda: (x * mask) @ a.t(), 1, 4),
        ("dA: dxa^T@(x*keep)", lambda: lora_dropout.dropped_weight_grad(dxa, x, seed, P),
         lambda: dxa.t() @ (x * mask), 1, 4),
        ("dx += (dxa@A)*keep", lambda: lora_dropout.add_dropped_input_grad(dx, dxa, a, seed, P),
         lambda: dx.add_((dxa @ a).mul_(mask)), 2, 7),
        ("mask draw", lambda: lora_dropout.keep_mask(seed, (M, K), P, bf16, dev),
         lambda: torch.empty_like(x).bernoulli_(1 - P), 1, 1),
    ]
    print(f"{'pass':22s} {'kernel ms':>10s} {'torch ms':>10s} {'kernel floor':>13s} {'torch floor':>12s}")
    for name, kernel, torch_path, kernel_tensors, torch_tensors in rows:
        print(f"{name:22s} {timed(kernel):10.3f} {timed(torch_path):10.3f} {floor(kernel_tensors):13.3f} "
              f"{floor(torch_tensors):12.3f}")
    # q/k/v: three projections of the same x, each its own seed and A (and dxa in the backward)
    a3 = torch.randn(3, R, K, device=dev, dtype=bf16) * 0.02
    dxa3 = torch.randn(3, M, R, device=dev, dtype=bf16)
    seeds3 = torch.cat([lora_dropout.draw_seed(dev) for _ in range(3)])
    multi = [
        ("down", lambda: lora_dropout.dropped_down_multi(x, a3, seeds3, P),
         lambda: [lora_dropout.dropped_down(x, a3[j], seeds3[j:j + 1], P) for j in range(3)], 1),
        ("dA", lambda: lora_dropout.dropped_weight_grad_multi(dxa3, x, seeds3, P),
         lambda: [lora_dropout.dropped_weight_grad(dxa3[j], x, seeds3[j:j + 1], P) for j in range(3)], 1),
        ("dx", lambda: lora_dropout.add_dropped_input_grad_multi(dx, dxa3, a3, seeds3, P),
         lambda: [lora_dropout.add_dropped_input_grad(dx, dxa3[j], a3[j], seeds3[j:j + 1], P) for j in range(3)], 2),
    ]
    fused_dx, single_dx = dx.clone(), dx.clone()  # compiled kernels agree (bf16 rounding apart: a wrong mask is O(1))
    lora_dropout.add_dropped_input_grad_multi(fused_dx, dxa3, a3, seeds3, P)
    for j in range(3):
        lora_dropout.add_dropped_input_grad(single_dx, dxa3[j], a3[j], seeds3[j:j + 1], P)
    pairs = [(name, fused(), torch.stack(singles())) for name, fused, singles, _ in multi[:2]]
    print("fused against single launches, max |diff|: " + ", ".join(
        f"{name} {(u.float() - v.float()).abs().max().item():.2e} (of {v.float().abs().max().item():.1f})"
        for name, u, v in [*pairs, ("dx", fused_dx, single_dx)]))
    print(f"{'three projections':22s} {'fused ms':>10s} {'3 singles':>10s} {'fused floor':>12s}")
    for name, fused, singles, tensors in multi:
        print(f"{name:22s} {timed(fused):10.3f} {timed(singles):10.3f} {floor(tensors):12.3f}")
    # tile sweep: (BLOCK_M, BLOCK_K, num_warps) per kernel, the shipped GPU_TILES first
    shipped = dict(lora_dropout.GPU_TILES)
    sweeps = {
        "down": (rows[0][1], [(m, k, w) for m in (16, 32, 64, 128) for k in (64, 128, 256) for w in (4, 8)]),
        "weight_grad": (rows[1][1], [(m, k, w) for m in (32, 64, 128) for k in (32, 64, 128) for w in (4, 8)]),
        "input_grad": (rows[2][1], [(m, k, w) for m in (32, 64, 128) for k in (64, 128, 256) for w in (4, 8)]),
        "down_multi": (multi[0][1], [(m, k, w) for m in (16, 32, 64) for k in (32, 64, 128) for w in (4, 8)]),
        "weight_grad_multi": (multi[1][1], [(m, k, w) for m in (32, 64, 128) for k in (32, 64, 128) for w in (4, 8)]),
        "input_grad_multi": (multi[2][1], [(m, k, w) for m in (16, 32, 64) for k in (64, 128, 256) for w in (4, 8)]),
    }
    for kernel_name, (launch, tiles) in sweeps.items():
        results = []
        for tile in [shipped[kernel_name]] + [t for t in tiles if t != shipped[kernel_name]]:
            lora_dropout.GPU_TILES[kernel_name] = tile
            try:
                results.append((timed(launch, iters=10), tile))
            except Exception as err:  # a tile Triton cannot fit (shared memory, registers)
                print(f"  {kernel_name} {tile}: {type(err).__name__}")
        lora_dropout.GPU_TILES[kernel_name] = shipped[kernel_name]
        best = sorted(results)[:3]
        print(f"tiles {kernel_name}: shipped {shipped[kernel_name]} {results[0][0]:.3f} ms; best "
              + ", ".join(f"{t} {ms:.3f} ms" for ms, t in best))
    counts = torch.empty(M, device=dev, dtype=torch.int32)
    one = timed(lambda: _count_keep_kernel[(M // 64,)](counts, 1234, K, P, BLOCK_M=64, BLOCK_K=64))
    kept_one = counts.float().mean().item() / K
    print(f"rng alone: one Philox-10 an element {one:.3f} ms (kept {kept_one:.4f})")
    for rounds in sorted({10, lora_dropout.PHILOX_ROUNDS.value}, reverse=True):
        eight = timed(lambda rounds=rounds: _count_kernels_keep[(M // 64,)](
            counts, 1234, K, lora_dropout.keep_threshold(P), BLOCK_M=64, BLOCK_K=64, ROUNDS=rounds))
        kept_eight = counts.float().mean().item() / K
        shipped = " (shipped)" if rounds == lora_dropout.PHILOX_ROUNDS.value else ""
        print(f"rng alone: the kernels' one Philox-{rounds} per eight{shipped} {eight:.3f} ms (kept {kept_eight:.4f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
