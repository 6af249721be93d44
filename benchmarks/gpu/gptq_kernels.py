#!/usr/bin/env python
"""GPU check and benchmark of fmsaccel's GPTQ kernels (the accelerated-peft-gptq plugin).

1. Correctness: the fused dequantise+matmul kernels (forward and grad-input) and the
   dequantise-then-cuBLAS path against an fp32 reference (plain-torch dequantise), in bf16
   and fp16, for group sizes 32/64/128/-1, act-order, both zero-point formats, odd token
   counts. Tolerance: max |error| / max |reference| below 2e-2 (bf16) / 5e-3 (fp16).
2. Speed at the llama3-8b projection shapes (4096->4096 q/o, 4096->1024 k/v, 4096->14336
   gate/up, 14336->4096 down), 4-bit group size 128, bf16 activations: forward ``x @ W^T``
   and grad-input ``dy @ W`` of

   - ``gptq_fused``   the fused Triton kernels (measured up to 4096 tokens),
   - ``gptq_dequant`` the Triton dequantise into a bf16 temporary, then cuBLAS,
   - ``bf16``         ``torch.matmul`` with a bf16 weight (the unquantised ceiling),
   - ``bnb_nf4``      bitsandbytes nf4 (double quant) ``Linear4bit``, as QLoRA runs it,

   at 16-512 tokens (to place the fused/dequant threshold) and 1k-16k tokens (training).
   The L2 cache is flushed before every timed call (a layer's weights are never still
   cached when training comes back to it). ``peak_mib`` is the memory one call allocates
   beyond its inputs (output and temporaries). The dequantise kernel alone is timed too
   (GB/s of 4-bit read + bf16 written).

Prints tables, a suggested ``FMSACCEL_GPTQ_FUSED_MAX_TOKENS`` and writes everything to one CSV.
Run from the repository root on a CUDA machine (about 1-2 minutes on an H100, most of it
Triton autotuning on first use of each shape):

    python benchmarks/gpu/gptq_kernels.py            # CSV -> $OUT/gptq_kernels.csv
    python benchmarks/gpu/gptq_kernels.py --out DIR  # CSV -> DIR/gptq_kernels.csv
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
try:
    from fmsaccel_peft.gptq import kernels, packing
except ImportError:  # not pip-installed: use the checkout
    sys.path[:0] = [str(REPO / "plugins" / "framework"), str(REPO / "plugins" / "accelerated-peft")]
    from fmsaccel_peft.gptq import kernels, packing

SHAPES = {"q/o_proj": (4096, 4096), "k/v_proj": (4096, 1024), "gate/up_proj": (4096, 14336),
          "down_proj": (14336, 4096)}  # name -> (in_features, out_features)
SMALL_TOKENS = (16, 128, 512)
TRAIN_TOKENS = (1024, 2048, 4096, 8192, 16384)
FUSED_MAX_MEASURED = 4096
TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 5e-3}
FIELDS = ["kind", "shape", "in_features", "out_features", "tokens", "method", "dtype", "group_size", "act_order",
          "format", "fwd_ms", "bwd_ms", "fwd_tflops", "bwd_tflops", "peak_mib", "fwd_err", "bwd_err", "ok", "note"]


def random_gptq(in_features, out_features, group_size=128, act_order=False, checkpoint_format="gptq", seed=0):
    """Packed GPTQ tensors on the GPU and the fp32 weight [out, in] they encode."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    groups = packing.num_groups(in_features, group_size)
    intweight = torch.randint(0, 16, (out_features, in_features), generator=g, device="cuda")
    zeros = torch.randint(1, 16, (groups, out_features), generator=g, device="cuda")
    scales = (torch.rand(groups, out_features, generator=g, device="cuda") * 0.01 + 0.001).half()
    g_idx = packing.sequential_g_idx(in_features, group_size, device="cuda")
    if act_order:
        g_idx = g_idx[torch.randperm(in_features, generator=g, device="cuda")]
    t = packing.pack(intweight, zeros, scales, g_idx, checkpoint_format)
    reference = packing.dequantize_torch(t["qweight"], t["scales"], t["qzeros"], t["g_idx"],
                                         zero_offset=packing.zero_offset(checkpoint_format))
    args = (t["qweight"], t["scales"], t["qzeros"], t["g_idx"] if act_order else None)
    kwargs = dict(group_size=group_size, zero_offset=packing.zero_offset(checkpoint_format))
    return args, kwargs, reference


_FLUSH = None


def flush_l2():
    global _FLUSH
    if _FLUSH is None:
        _FLUSH = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")
    _FLUSH.zero_()


def time_ms(fn, budget_ms=40.0, max_iters=30) -> float:
    """Median of per-call CUDA-event times, L2 flushed before each call."""
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    iters = int(min(max_iters, max(5, budget_ms / max((time.perf_counter() - t0) * 1e3, 1e-3))))
    times = []
    for _ in range(iters):
        flush_l2()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def peak_mib(fn) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del out
    return peak / 2**20


def rel_err(actual, expected) -> float:
    return ((actual.float() - expected).abs().max() / expected.abs().max()).item()


def check_correctness(rows: list[dict]) -> bool:
    cases = [  # (in, out, tokens, group_size, act_order, format)
        (4096, 1024, 333, 128, False, "gptq"), (4096, 1024, 333, 128, True, "gptq"),
        (4096, 1024, 77, 32, False, "gptq_v2"), (4096, 1024, 1030, 64, True, "gptq_v2"),
        (4096, 1024, 1030, -1, False, "gptq"), (14336, 4096, 4096, 128, False, "gptq"),
        (1000, 264, 129, 40, True, "gptq"),  # nothing a multiple of the tiles
    ]
    all_ok = True
    # one fixed config while checking: autotuning every case (dtype x group size x act-order) costs minutes
    kernels.PINNED_MATMUL = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 4}
    kernels.PINNED_DEQUANT = {"BLOCK_K": 64, "BLOCK_N": 128, "num_warps": 4}
    for in_f, out_f, tokens, group_size, act_order, fmt in cases:
        args, kwargs, reference = random_gptq(in_f, out_f, group_size, act_order, fmt)
        for dtype in (torch.bfloat16, torch.float16):
            x = torch.randn(tokens, in_f, device="cuda").to(dtype)
            dy = torch.randn(tokens, out_f, device="cuda").to(dtype)
            y_ref, dx_ref = x.float() @ reference.t(), dy.float() @ reference
            for backend in ("fused", "dequant"):
                if backend == "fused":
                    y = kernels.fused_matmul(x, *args, **kwargs)
                    dx = kernels.fused_matmul_grad_input(dy, *args, **kwargs)
                else:
                    w = kernels.dequantize(*args, **kwargs, dtype=dtype)
                    y, dx = x @ w.t(), dy @ w
                fe, be = rel_err(y, y_ref), rel_err(dx, dx_ref)
                ok = fe < TOLERANCE[dtype] and be < TOLERANCE[dtype] and y.dtype == dx.dtype == dtype
                all_ok &= ok
                rows.append(dict(kind="check", shape=f"{in_f}->{out_f}", in_features=in_f, out_features=out_f,
                                 tokens=tokens, method=f"gptq_{backend}", dtype=str(dtype).removeprefix("torch."),
                                 group_size=group_size, act_order=act_order, format=fmt, fwd_err=f"{fe:.2e}",
                                 bwd_err=f"{be:.2e}", ok=ok))
        # the autograd op end to end (auto backend): forward and input gradient
        x = torch.randn(2, tokens // 2 + 1, in_f, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        y = kernels.gptq_matmul(x, *args, **kwargs)
        y.float().square().sum().backward()
        ref_x = x.detach().float().requires_grad_()
        (ref_x @ reference.t()).square().sum().backward()
        fe, be = rel_err(y, ref_x.detach() @ reference.t()), rel_err(x.grad, ref_x.grad)
        ok = fe < TOLERANCE[torch.bfloat16] and be < TOLERANCE[torch.bfloat16]
        all_ok &= ok
        rows.append(dict(kind="check", shape=f"{in_f}->{out_f}", in_features=in_f, out_features=out_f,
                         tokens=x.shape[0] * x.shape[1], method="gptq_matmul(auto)", dtype="bfloat16",
                         group_size=group_size, act_order=act_order, format=fmt, fwd_err=f"{fe:.2e}",
                         bwd_err=f"{be:.2e}", ok=ok))
    kernels.PINNED_MATMUL = kernels.PINNED_DEQUANT = None  # timings use the autotuned configs
    return all_ok


def bnb_linear(reference: torch.Tensor):
    import bitsandbytes as bnb

    out_f, in_f = reference.shape
    layer = bnb.nn.Linear4bit(in_f, out_f, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4",
                              compress_statistics=True)
    layer.weight = bnb.nn.Params4bit(reference.to(torch.bfloat16).cpu(), requires_grad=False, quant_type="nf4",
                                     compress_statistics=True)
    return layer.cuda()


def candidates(x, dy, args, kwargs, w_bf16, bnb_layer) -> dict:
    """method -> (forward, grad-input) callables on these activations."""
    methods = {"gptq_dequant": (lambda: x @ kernels.dequantize(*args, **kwargs).t(),
                                lambda: dy @ kernels.dequantize(*args, **kwargs))}
    if x.shape[0] <= FUSED_MAX_MEASURED:
        methods["gptq_fused"] = (lambda: kernels.fused_matmul(x, *args, **kwargs),
                                 lambda: kernels.fused_matmul_grad_input(dy, *args, **kwargs))
    if w_bf16 is not None:
        methods["bf16"] = (lambda: x @ w_bf16.t(), lambda: dy @ w_bf16)
    if bnb_layer is not None:
        xg = x.detach().requires_grad_()
        y = bnb_layer(xg)
        methods["bnb_nf4"] = (lambda: bnb_layer(x), lambda: torch.autograd.grad(y, xg, dy, retain_graph=True)[0])
    return methods


def bench_shape(name, in_f, out_f, rows: list[dict], have_bnb: bool, act_order=False):
    args, kwargs, reference = random_gptq(in_f, out_f, 128, act_order)
    w_bf16 = reference.to(torch.bfloat16)
    bnb_layer = bnb_linear(reference) if have_bnb and not act_order else None
    del reference
    tokens_list = (4096,) if act_order else SMALL_TOKENS + TRAIN_TOKENS
    for tokens in tokens_list:
        x = torch.randn(tokens, in_f, device="cuda", dtype=torch.bfloat16)
        dy = torch.randn(tokens, out_f, device="cuda", dtype=torch.bfloat16)
        methods = candidates(x, dy, args, kwargs, None if act_order else w_bf16, bnb_layer)
        flops = 2 * tokens * in_f * out_f
        for method, (fwd, bwd) in methods.items():
            fwd_ms, bwd_ms = time_ms(fwd), time_ms(bwd)
            rows.append(dict(kind="time", shape=name, in_features=in_f, out_features=out_f, tokens=tokens,
                             method=method, dtype="bfloat16", group_size=128, act_order=act_order, format="gptq",
                             fwd_ms=round(fwd_ms, 4), bwd_ms=round(bwd_ms, 4),
                             fwd_tflops=round(flops / fwd_ms / 1e9, 1), bwd_tflops=round(flops / bwd_ms / 1e9, 1),
                             peak_mib=round(max(peak_mib(fwd), peak_mib(bwd)), 1)))
    if not act_order:
        ms = time_ms(lambda: kernels.dequantize(*args, **kwargs))
        moved = in_f * out_f * (0.5 + 2)  # 4-bit read, bf16 written
        rows.append(dict(kind="dequantize", shape=name, in_features=in_f, out_features=out_f, method="dequantize",
                         dtype="bfloat16", group_size=128, act_order=False, format="gptq", fwd_ms=round(ms, 4),
                         note=f"{moved / ms / 1e6:.0f} GB/s"))


def print_table(rows: list[dict]):
    timed = [r for r in rows if r["kind"] == "time" and not r["act_order"]]
    methods = [m for m in ("gptq_fused", "gptq_dequant", "bf16", "bnb_nf4") if any(r["method"] == m for r in timed)]
    print("\nforward / grad-input ms (bf16 activations, 4-bit g128; lower is better)")
    header = f"{'shape':<13}{'tokens':>7}" + "".join(f"{m:>22}" for m in methods) + f"{'best gptq vs nf4':>18}"
    print(header)
    for (shape, tokens) in dict.fromkeys((r["shape"], r["tokens"]) for r in timed):
        cells = {r["method"]: r for r in timed if r["shape"] == shape and r["tokens"] == tokens}
        line = f"{shape:<13}{tokens:>7}"
        for m in methods:
            r = cells.get(m)
            line += f"{r['fwd_ms']:>11.3f}/{r['bwd_ms']:<10.3f}" if r else f"{'-':>22}"
        ours = [cells[m] for m in ("gptq_fused", "gptq_dequant") if m in cells]
        if "bnb_nf4" in cells and ours:
            best = min(r["fwd_ms"] + r["bwd_ms"] for r in ours)
            line += f"{(cells['bnb_nf4']['fwd_ms'] + cells['bnb_nf4']['bwd_ms']) / best:>17.2f}x"
        print(line)
    for r in rows:
        if r["kind"] == "time" and r["act_order"]:
            print(f"act-order {r['shape']:<13}{r['tokens']:>7} {r['method']:<14} "
                  f"{r['fwd_ms']:.3f}/{r['bwd_ms']:.3f} ms")
    for r in rows:
        if r["kind"] == "dequantize":
            print(f"dequantize {r['shape']:<13} {r['fwd_ms']:.3f} ms  {r['note']}")


def suggest_threshold(rows: list[dict]) -> int:
    """Largest measured token count up to which the fused kernels beat dequant+cuBLAS on all shapes (fwd+bwd)."""
    timed = [r for r in rows if r["kind"] == "time" and not r["act_order"]]
    best = 0
    for tokens in sorted({r["tokens"] for r in timed}):
        pairs = [(f, d) for f in timed for d in timed if f["method"] == "gptq_fused" and d["method"] == "gptq_dequant"
                 and f["shape"] == d["shape"] and f["tokens"] == d["tokens"] == tokens]
        if not pairs:
            break
        if all(f["fwd_ms"] + f["bwd_ms"] <= d["fwd_ms"] + d["bwd_ms"] for f, d in pairs):
            best = tokens
        else:
            break
    return best


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for gptq_kernels.csv")
    opts = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    started = time.time()
    print(f"{torch.cuda.get_device_name()} | torch {torch.__version__} | triton {kernels.triton.__version__}")
    try:
        import bitsandbytes

        have_bnb = True
        print(f"bitsandbytes {bitsandbytes.__version__}")
    except ImportError:
        have_bnb = False
        print("!! bitsandbytes is not installed: the bnb_nf4 rows are missing from this run")

    rows: list[dict] = []
    ok = check_correctness(rows)
    for r in rows:
        if not r["ok"]:
            print(f"FAIL {r['method']} {r['shape']} tokens={r['tokens']} {r['dtype']} g{r['group_size']} "
                  f"act={r['act_order']} {r['format']}: fwd {r['fwd_err']} bwd {r['bwd_err']}")
    print(f"correctness: {'all passed' if ok else 'FAILURES above'} ({len(rows)} checks, {time.time() - started:.0f}s)")

    for name, (in_f, out_f) in SHAPES.items():
        t0 = time.time()
        bench_shape(name, in_f, out_f, rows, have_bnb)
        bench_shape(name, in_f, out_f, rows, have_bnb, act_order=True)
        print(f"timed {name} in {time.time() - t0:.0f}s", flush=True)
    print_table(rows)
    threshold = suggest_threshold(rows)
    print(f"\nsuggested FMSACCEL_GPTQ_FUSED_MAX_TOKENS={threshold} (now {kernels.FUSED_MAX_TOKENS}); "
          "measured token counts only: " + ", ".join(map(str, SMALL_TOKENS + TRAIN_TOKENS)))

    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "gptq_kernels.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {out / 'gptq_kernels.csv'} ({time.time() - started:.0f}s in all)")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
