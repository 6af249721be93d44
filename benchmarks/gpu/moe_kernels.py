#!/usr/bin/env python
"""GPU check and benchmark of fmsaccel's MoE expert kernels (the accelerated-moe plugin).

1. Kernel check: each Triton primitive (gathered/scattered grouped GEMM, fused SwiGLU
   input, per-expert weight gradient, SwiGLU backward) against the torch backend on
   small odd shapes, fp32 (tolerance 1e-4) and bf16 (2e-2), max |error| / max |reference|.
2. The sparse-MoE block (Hugging Face's router + experts), forward and backward, bf16,
   8192 tokens, at two shapes:

   - granite-3.0-3b-a800m: hidden 1536, 40 experts, top-8, expert intermediate 512;
   - mixtral-8x7b:         hidden 4096,  8 experts, top-2, expert intermediate 14336;

   with the experts computed by

   - ``hf_<default>``          transformers' default experts implementation on this GPU
                               (``grouped_mm`` in transformers 5: sort, gather, torch grouped GEMM);
   - ``hf_eager``              transformers' per-expert loop (the old default);
   - ``scattermoe_triton``     our Triton kernels (gather/scatter in the GEMMs, fused SwiGLU);
   - ``scattermoe_triton_fused`` the same with SwiGLU built inside the down projection's input
                               loads instead of a separate pass (the plugin fuses when hidden <= 1024);
   - ``scattermoe_grouped_mm`` our memory plan with torch's grouped GEMM doing the GEMMs.

   Per implementation: forward ms, forward+backward ms (median of 10 after 3 warm-ups,
   the first of which autotunes Triton), tokens/s of forward+backward, ``peak_mib`` (what
   one forward+backward allocates beyond the weights and inputs, gradients included) and
   ``saved_mib`` (what autograd holds between forward and backward), and the error of the
   output and of every gradient (tokens, router weight, both expert weights) against an
   fp32 run of transformers' loop. The plugin's ``backend: auto`` makes the same
   triton-vs-grouped_mm comparison at start-up and uses the faster one.

Run from the repository root on a CUDA machine (about 2-3 minutes on an H100 on first use,
most of it Triton compiling and autotuning, cached afterwards; needs nothing beyond the
project's requirements: torch, triton, transformers):

    python benchmarks/gpu/moe_kernels.py                 # CSV -> $OUT/moe_kernels.csv
    python benchmarks/gpu/moe_kernels.py --out DIR       # CSV -> DIR/moe_kernels.csv
    python benchmarks/gpu/moe_kernels.py --tokens 4096 --shapes mixtral-8x7b
    python benchmarks/gpu/moe_kernels.py --tokens 1024 2048 8192   # where the backends cross over
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import types
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
try:
    import fmsaccel_moe  # noqa: F401
except ImportError:  # not pip-installed: use the checkout
    sys.path[:0] = [str(REPO / "plugins" / "framework"), str(REPO / "plugins" / "accelerated-moe")]

from fmsaccel_moe import torch_kernels, triton_kernels  # noqa: E402
from fmsaccel_moe.patch import ExpertsSettings, scattermoe_forward  # noqa: E402
from fmsaccel_moe.routing import route  # noqa: E402

SHAPES = {
    "granite-3.0-3b-a800m": dict(model_type="granitemoe", hidden=1536, experts=40, top_k=8, inter=512),
    "mixtral-8x7b": dict(model_type="mixtral", hidden=4096, experts=8, top_k=2, inter=14336),
}
DTYPE = torch.bfloat16
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2}
FIELDS = ["kind", "shape", "impl", "tokens", "dtype", "fwd_ms", "fwd_bwd_ms", "tokens_per_s", "speedup_vs_hf_default",
          "peak_mib", "saved_mib", "out_err", "grad_err", "ok", "note"]


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).abs().max() / want.float().abs().max().clamp_min(1e-12)).item()


# ----------------------------------------------------------------------------- 1. kernel check


def _kernel_cases(dtype: torch.dtype, gen: torch.Generator) -> dict:
    """Each primitive on small odd shapes (an empty expert group included), as ``backend -> tensor``."""
    tokens, experts, top_k, k, n = 333, 7, 3, 200, 264

    def randn(*shape):
        return torch.randn(*shape, device="cuda", generator=gen).to(dtype)

    index = torch.rand(tokens, experts, device="cuda", generator=gen).topk(top_k, -1).indices
    index[index == 5] = 4  # expert 5 gets no rows
    routing = route(index, experts)
    scale = torch.rand(tokens * top_k, device="cuda", generator=gen)
    x, rows_in = randn(tokens, k), randn(tokens * top_k, 2 * k)
    w, w_t = randn(experts, n, k) / k**0.5, randn(experts, k, n) / k**0.5
    grad_h = randn(tokens * top_k, k)

    def swiglu_bwd(m):
        d_gate_up, d_scale, h = m.swiglu_backward(rows_in, grad_h, scale, want_h=True)
        return torch.cat([d_gate_up.float().flatten(), d_scale.float(), h.float().flatten()])

    return {
        "mm gather": lambda m: m.expert_mm(x, w, routing, gather=True),
        "mm swiglu+scale+scatter": lambda m: m.expert_mm(rows_in, w, routing, swiglu=True, scatter=True,
                                                         row_scale=scale),
        "mm transposed gather": lambda m: m.expert_mm(x, w_t, routing, gather=True, transpose_weight=True),
        "xty gather_a swiglu_b": lambda m: m.expert_xty(x, rows_in, routing, gather_a=True, swiglu_b=True,
                                                        a_row_scale=scale),
        "xty gather_b": lambda m: m.expert_xty(rows_in, x, routing, gather_b=True),
        "swiglu": lambda m: m.swiglu(rows_in),
        "swiglu backward": swiglu_bwd,
    }


def kernel_checks() -> list[dict]:
    rows = []
    gen = torch.Generator(device="cuda").manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        for name, fn in _kernel_cases(dtype, gen).items():
            err = rel_err(fn(triton_kernels), fn(torch_kernels))
            dtype_name = str(dtype).removeprefix("torch.")
            rows.append(dict(kind="check", shape=name, impl="scattermoe_triton", dtype=dtype_name,
                             out_err=f"{err:.2e}", ok=err <= TOLERANCE[dtype]))
    return rows


# ----------------------------------------------------------------------------- 2. MoE block benchmark


def make_block(shape: dict, impl: str):
    """A transformers sparse-MoE block of the architecture, with the experts computed by ``impl``."""
    from transformers import AutoConfig

    cfg = AutoConfig.for_model(
        shape["model_type"], hidden_size=shape["hidden"], intermediate_size=shape["inter"],
        num_local_experts=shape["experts"], num_experts_per_tok=shape["top_k"],
    )
    if shape["model_type"] == "mixtral":
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock as Block
    else:
        from transformers.models.granitemoe.modeling_granitemoe import GraniteMoeMoE as Block
    cfg._experts_implementation = impl.removeprefix("hf_") if impl.startswith("hf_") else "eager"
    block = Block(cfg)
    if impl.startswith("scattermoe_"):
        backend = impl.removeprefix("scattermoe_").removesuffix("_fused")
        block.experts._fmsaccel_moe = ExpertsSettings(backend=backend, fuse_swiglu=True if "fused" in impl else None)
        block.experts.forward = types.MethodType(scattermoe_forward, block.experts)
    return block


def hf_default_experts() -> str:
    """What transformers picks for a model loaded without ``experts_implementation`` on this machine."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("mixtral", hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                               num_attention_heads=4, num_key_value_heads=4, vocab_size=64, num_local_experts=4)
    return AutoModelForCausalLM.from_config(cfg).config._experts_implementation


def init_weights(block, seed: int) -> None:
    gen = torch.Generator(device="cuda").manual_seed(seed)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, device="cuda", generator=gen) * p.shape[-1] ** -0.5)


def run_block(block, x, grad):
    """One forward+backward; returns output, gradients, forward ms, total ms, saved and peak MiB."""
    for p in block.parameters():
        p.grad = None
    x = x.detach().requires_grad_()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    start, mid, end = (torch.cuda.Event(enable_timing=True) for _ in range(3))
    start.record()
    out = block(x)
    mid.record()
    torch.cuda.synchronize()
    saved = torch.cuda.memory_allocated() - base - out.numel() * out.element_size()
    out.backward(grad)
    end.record()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    params = dict(block.named_parameters())
    grads = [x.grad, params[next(n for n in params if n.endswith(("gate.weight", "router.weight")))].grad,
             params["experts.gate_up_proj"].grad, params["experts.down_proj"].grad]
    return out, grads, start.elapsed_time(mid), start.elapsed_time(end), saved / 2**20, peak / 2**20


def bench_shape(name: str, shape: dict, tokens: int, default: str) -> list[dict]:
    impls = [f"hf_{default}", *(["hf_eager"] if default != "eager" else []), "scattermoe_triton",
             "scattermoe_triton_fused", "scattermoe_grouped_mm"]
    gen = torch.Generator(device="cuda").manual_seed(1)
    x32 = torch.randn(1, tokens, shape["hidden"], device="cuda", generator=gen)
    grad32 = torch.randn(1, tokens, shape["hidden"], device="cuda", generator=gen)

    reference = make_block(shape, "hf_eager").cuda()  # fp32 reference
    init_weights(reference, seed=2)
    ref_out, ref_grads, *_ = run_block(reference, x32, grad32)
    ref_out, ref_grads = ref_out.detach(), [g.detach() for g in ref_grads]
    del reference
    torch.cuda.empty_cache()

    rows = []
    x, grad = x32.to(DTYPE), grad32.to(DTYPE)
    for impl in impls:
        block = make_block(shape, impl).cuda()
        init_weights(block, seed=2)
        block = block.to(DTYPE)
        fwd, total, saved, peak = [], [], [], []
        for i in range(13):
            out, grads, f_ms, t_ms, s_mib, p_mib = run_block(block, x, grad)
            if i >= 3:
                fwd.append(f_ms), total.append(t_ms), saved.append(s_mib), peak.append(p_mib)
        out_err = rel_err(out, ref_out)
        grad_err = max(rel_err(g, r) for g, r in zip(grads, ref_grads, strict=True))
        total_ms = statistics.median(total)
        rows.append(dict(
            kind="bench", shape=name, impl=impl, tokens=tokens, dtype="bf16",
            fwd_ms=round(statistics.median(fwd), 3), fwd_bwd_ms=round(total_ms, 3),
            tokens_per_s=round(tokens / total_ms * 1000), peak_mib=round(max(peak)), saved_mib=round(max(saved)),
            out_err=f"{out_err:.2e}", grad_err=f"{grad_err:.2e}", ok=max(out_err, grad_err) <= TOLERANCE[DTYPE],
        ))
        del block, out, grads
        torch.cuda.empty_cache()
    base = next(r for r in rows if r["impl"] == f"hf_{default}")
    for r in rows:
        r["speedup_vs_hf_default"] = round(base["fwd_bwd_ms"] / r["fwd_bwd_ms"], 2)
    auto = [r for r in rows if r["impl"] in ("scattermoe_triton", "scattermoe_grouped_mm")]
    min(auto, key=lambda r: r["fwd_bwd_ms"])["note"] = "backend: auto picks this"
    return rows


def print_table(rows: list[dict], columns: list[str]) -> None:
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    for r in rows:
        print("  ".join(str(r.get(c, "")).ljust(widths[c]) for c in columns))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "."), help="directory for moe_kernels.csv")
    parser.add_argument("--tokens", type=int, nargs="+", default=[8192],
                        help="token counts to time (an R step of workload R holds about 1,000-2,000)")
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("moe_kernels.py needs a CUDA GPU", file=sys.stderr)
        return 2
    import transformers
    import triton

    default = hf_default_experts()
    print(f"{torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__} | "
          f"transformers {transformers.__version__} | default experts_implementation: {default} | "
          f"torch grouped GEMM: {torch_kernels.grouped_mm_name()}\n")

    checks = kernel_checks()
    print("Kernel check (Triton vs torch backend, max |err| / max |ref|):")
    print_table(checks, ["shape", "dtype", "out_err", "ok"])
    rows = list(checks)
    for name in args.shapes:
        for tokens in args.tokens:
            print(f"\nMoE block {name} ({SHAPES[name]}), {tokens} tokens, bf16, forward+backward:")
            bench = bench_shape(name, SHAPES[name], tokens, default)
            print_table(bench, ["impl", "fwd_ms", "fwd_bwd_ms", "tokens_per_s", "speedup_vs_hf_default", "peak_mib",
                                "saved_mib", "out_err", "grad_err", "ok", "note"])
            rows += bench

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "moe_kernels.csv"
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    print(f"\nwrote {path}")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
