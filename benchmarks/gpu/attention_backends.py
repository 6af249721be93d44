#!/usr/bin/env python
"""GPU check and benchmark of the padding-free attention backends (fmsaccel's aadp plugin).

For every backend that can run (flash_attn if installed, torch varlen, flex, the masked
SDPA path) this script

1. checks a packed row's output and its q/k/v gradients against an independent fp32
   reference: plain causal SDPA run on each example alone;
2. times forward+backward at llama3-8b attention shapes (32 query heads, 8 KV heads,
   head dim 128, bf16) on rows packed from 4 and from 16 examples with lognormal
   lengths (mu 5.4, sigma 0.6, clipped to 32..2048: mean ~ 270 tokens), next to the
   padded SDPA batch plain training would run on the same examples.

``prep_ms`` is the once-per-step cost (the backend's mask or metadata for a new row);
``fwd_bwd_ms`` is one layer's attention with it cached, as the other layers see it.
Flex is compiled: its warm-up rows pay the compile (automatic dynamic shapes: the
second row length recompiles once with a symbolic length), the timed rows do not.

Run from the repository root on a CUDA machine (about a minute on an H100):

    python benchmarks/gpu/attention_backends.py            # CSV -> $OUT/attention_backends.csv
    python benchmarks/gpu/attention_backends.py --out DIR  # CSV -> DIR/attention_backends.csv
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[2]
try:
    from fmsaccel_aadp import attention as A
except ImportError:  # not pip-installed: use the checkout
    sys.path.insert(0, str(REPO / "plugins" / "attention-and-distributed-packing"))
    from fmsaccel_aadp import attention as A

HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128  # llama3-8b
DTYPE = torch.bfloat16
TOLERANCE = 2e-2  # max |error| / max |reference|, bf16 against fp32


class _CausalModule(torch.nn.Module):
    """Stands in for the attention module transformers passes to the attention function."""

    is_causal = True


def lognormal_lengths(rng: np.random.Generator, n: int) -> list[int]:
    return np.clip(rng.lognormal(5.4, 0.6, n), 32, 2048).astype(int).tolist()


def make_row(lengths: list[int], seed: int, device: str = "cuda"):
    """q [1, H, T, D], k/v [1, Hkv, T, D] (leaf tensors) and the collator's kwargs for one packed row."""
    g = torch.Generator(device=device).manual_seed(seed)
    total = sum(lengths)
    q, k, v = (torch.randn(1, h, total, HEAD_DIM, generator=g, device=device, dtype=DTYPE).requires_grad_()
               for h in (HEADS, KV_HEADS, KV_HEADS))
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lengths).cumsum(0)
    cu = cu.to(device)
    kwargs = {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": max(lengths), "max_length_k": max(lengths)}
    return q, k, v, kwargs


def reference(q, k, v, lengths: list[int]):
    """fp32 causal SDPA on each example alone; returns [1, T, H, D]."""
    outs, start = [], 0
    for n in lengths:
        sl = slice(start, start + n)
        o = F.scaled_dot_product_attention(q[:, :, sl].float(), k[:, :, sl].float(), v[:, :, sl].float(),
                                           is_causal=True, scale=HEAD_DIM ** -0.5, enable_gqa=True)
        outs.append(o.transpose(1, 2))
        start += n
    return torch.cat(outs, dim=1)


def forward_backward(fn, q, k, v, kwargs, grad_out):
    q.grad = k.grad = v.grad = None
    out, _ = fn(_CausalModule(), q, k, v, None, scaling=HEAD_DIM ** -0.5, dropout=0.0, **kwargs)
    out.backward(grad_out)
    return out.detach(), q.grad, k.grad, v.grad


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    got, expected = got.detach().float(), expected.detach().float()
    return float((got - expected).abs().max() / expected.abs().max().clamp(min=1e-6))


def check_backend(fn, rng: np.random.Generator) -> dict:
    lengths = lognormal_lengths(rng, 4) + [1, 37]  # odd sizes and a one-token example
    q, k, v, kwargs = make_row(lengths, seed=1)
    grad_out = torch.randn(1, sum(lengths), HEADS, HEAD_DIM, device="cuda", dtype=DTYPE)
    got = forward_backward(fn, q, k, v, kwargs, grad_out)
    q.grad = k.grad = v.grad = None
    ref_out = reference(q, k, v, lengths)
    ref_out.backward(grad_out.float())
    errors = [relative_error(a, b) for a, b in zip(got, (ref_out, q.grad, k.grad, v.grad), strict=True)]
    return {"err_out": errors[0], "err_dq": errors[1], "err_dk": errors[2], "err_dv": errors[3],
            "correct": max(errors) <= TOLERANCE}


def cuda_time_ms(repeats: int, run, *args) -> float:
    """Mean milliseconds of ``run(*args)`` over ``repeats`` calls, by CUDA events."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(repeats):
        run(*args)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def bench_packed(fn, rows, repeats: int) -> dict:
    """Mean forward+backward time per row (cached mask), per-row prep time, peak extra memory."""
    for q, k, v, kwargs, grad_out, _ in rows:  # warm-up: compiles flex, fills caches
        forward_backward(fn, q, k, v, kwargs, grad_out)
    times, preps, peaks = [], [], []
    for q, k, v, kwargs, grad_out, _ in rows:
        fresh = {**kwargs, "cu_seq_lens_q": kwargs["cu_seq_lens_q"].clone()}
        fresh["cu_seq_lens_k"] = fresh["cu_seq_lens_q"]
        with_prep = cuda_time_ms(1, forward_backward, fn, q, k, v, fresh, grad_out)
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        cached = cuda_time_ms(repeats, forward_backward, fn, q, k, v, fresh, grad_out)
        peaks.append(torch.cuda.max_memory_allocated() - base)
        times.append(cached)
        preps.append(max(with_prep - cached, 0.0))
    return {"fwd_bwd_ms": float(np.mean(times)), "prep_ms": float(np.mean(preps)),
            "peak_extra_mib": max(peaks) / 2**20}


def padded_rows(rows):
    """The same examples as a padded [B, H, Lmax, D] batch with a 2D padding mask (plain training)."""
    out = []
    for _, _, _, _, _, lengths in rows:
        b, width = len(lengths), max(lengths)
        g = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = (torch.randn(b, h, width, HEAD_DIM, generator=g, device="cuda", dtype=DTYPE).requires_grad_()
                   for h in (HEADS, KV_HEADS, KV_HEADS))
        mask = torch.zeros(b, width, dtype=torch.bool, device="cuda")
        for i, n in enumerate(lengths):
            mask[i, :n] = True
        grad_out = torch.randn(b, width, HEADS, HEAD_DIM, device="cuda", dtype=DTYPE)
        out.append((q, k, v, mask, grad_out, lengths))
    return out


def padded_forward_backward(q, k, v, mask, grad_out) -> None:
    q.grad = k.grad = v.grad = None
    A.sdpa_padded_attention(q, k, v, mask, HEAD_DIM ** -0.5, 0.0).backward(grad_out)


def bench_padded(rows, repeats: int) -> dict:
    for q, k, v, mask, grad_out, _ in rows:
        padded_forward_backward(q, k, v, mask, grad_out)
    times, peaks = [], []
    for q, k, v, mask, grad_out, _ in rows:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        times.append(cuda_time_ms(repeats, padded_forward_backward, q, k, v, mask, grad_out))
        peaks.append(torch.cuda.max_memory_allocated() - base)
    return {"fwd_bwd_ms": float(np.mean(times)), "prep_ms": 0.0, "peak_extra_mib": max(peaks) / 2**20}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for attention_backends.csv")
    parser.add_argument("--rows", type=int, default=4, help="packed rows (distinct lengths) per setting")
    parser.add_argument("--repeats", type=int, default=5, help="timed forward+backward passes per row")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("attention_backends.py needs a CUDA GPU", file=sys.stderr)
        return 2

    began = time.perf_counter()
    print(f"# {torch.cuda.get_device_name()} | torch {torch.__version__} | cuda {torch.version.cuda} | "
          f"heads {HEADS}/{KV_HEADS} x {HEAD_DIM} | {DTYPE}")
    results: list[dict] = []
    rng = np.random.default_rng(args.seed)
    settings = {}
    for per_row in (4, 16):
        rows = []
        for r in range(args.rows):
            lengths = lognormal_lengths(rng, per_row)
            q, k, v, kwargs = make_row(lengths, seed=100 + r)
            grad_out = torch.randn(1, sum(lengths), HEADS, HEAD_DIM, device="cuda", dtype=DTYPE)
            rows.append((q, k, v, kwargs, grad_out, lengths))
        settings[per_row] = rows

    for backend in A.BACKENDS:
        reason = A.backend_unavailable_reason(backend, "cuda", DTYPE, True)
        if reason:
            print(f"# {backend}: skipped ({reason})")
            results.append({"backend": backend, "status": f"skipped: {reason}"})
            continue
        fn = A.make_attention_forward(backend, strict=True)
        try:
            check = check_backend(fn, np.random.default_rng(args.seed + 1))
            for per_row, rows in settings.items():
                tokens = float(np.mean([sum(r[5]) for r in rows]))
                timing = bench_packed(fn, rows, args.repeats)
                results.append({"backend": backend, "examples_per_row": per_row, "mean_tokens_per_row": tokens,
                                **timing, "tokens_per_s_M": tokens / timing["fwd_bwd_ms"] / 1e3, **check,
                                "status": "ok" if check["correct"] else "WRONG"})
        except Exception as e:  # report a backend that fails and go on with the others
            print(f"# {backend}: FAILED ({type(e).__name__}: {e})")
            results.append({"backend": backend, "status": f"error: {type(e).__name__}: {e}"})

    for per_row, rows in settings.items():
        tokens = float(np.mean([sum(r[5]) for r in rows]))
        padded = padded_rows(rows)
        width = float(np.mean([len(r[5]) * max(r[5]) for r in rows]))
        timing = bench_padded(padded, args.repeats)
        results.append({"backend": f"padded_sdpa (B={per_row}, {tokens / width:.0%} real tokens)",
                        "examples_per_row": per_row, "mean_tokens_per_row": tokens, **timing,
                        "tokens_per_s_M": tokens / timing["fwd_bwd_ms"] / 1e3, "status": "baseline"})

    columns = ["backend", "examples_per_row", "mean_tokens_per_row", "fwd_bwd_ms", "prep_ms", "tokens_per_s_M",
               "peak_extra_mib", "err_out", "err_dq", "err_dk", "err_dv", "status"]
    print(f"{'backend':<40} {'ex/row':>6} {'tokens':>7} {'fwd+bwd ms':>10} {'prep ms':>8} {'Mtok/s':>7} "
          f"{'peak MiB':>9} {'err out':>8} {'err dq':>8} {'err dk':>8} {'err dv':>8}  status")
    for r in results:
        if "fwd_bwd_ms" not in r:
            print(f"{r['backend']:<40} {'':>6} {'':>7} {'':>10} {'':>8} {'':>7} {'':>9} {'':>8} {'':>8} {'':>8} "
                  f"{'':>8}  {r['status']}")
            continue
        errs = " ".join(f"{r[c]:>8.1e}" if c in r else f"{'-':>8}" for c in ("err_out", "err_dq", "err_dk", "err_dv"))
        print(f"{r['backend']:<40} {r['examples_per_row']:>6} {r['mean_tokens_per_row']:>7.0f} "
              f"{r['fwd_bwd_ms']:>10.3f} {r['prep_ms']:>8.3f} {r['tokens_per_s_M']:>7.2f} "
              f"{r['peak_extra_mib']:>9.1f} {errs}  {r['status']}")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "attention_backends.csv"
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(results)
    print(f"# wrote {path} in {time.perf_counter() - began:.0f} s")
    wrong = [r["backend"] for r in results if r["status"] in ("WRONG",) or r["status"].startswith("error")]
    if wrong:
        print(f"# INCORRECT or failing backends: {', '.join(wrong)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
