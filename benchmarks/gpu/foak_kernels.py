#!/usr/bin/env python
"""GPU check and microbenchmark of the fused-ops-and-kernels (foak) kernels, forward + backward.

At the llama3-8b shapes (hidden 4096, intermediate 14336, 32 heads / 8 KV heads, head dim
128, vocab 128256, 4 x 4096 tokens, bf16), each op runs through every provider there is:

- ``eager``    what Hugging Face / PEFT / TRL run without the plugin (the reference);
- ``compile``  ``torch.compile`` of the eager function (default mode);
- ``liger``    Liger-Kernel's op, when ``liger_kernel`` is importable;
- ``trl``      TRL's chunked log-prob head (what ``SFTTrainer`` uses for the loss), linear+CE only;
- ``foak``     ours.

Ops: ``rms_norm``, ``rope`` (q/k as transposed [B, L, H, D] views, as HF passes them),
``swiglu``, ``cross_entropy`` (materialised logits, 10 % ignored), ``fused_linear_ce``
(frozen lm_head, the LoRA case), ``lora_attention`` (q/k/v/o LoRA r=16, dropout 0.1, on
bf16 / bnb nf4 / GPTQ bases: PEFT's layers vs the fused op) and ``mlp`` (gate/up/down on a
4-bit base without LoRA, as in the benchmark recipes: HF MLP vs fused op + SwiGLU kernel).

Per provider: forward ms, forward+backward ms (CUDA events, after warm-up), the peak
memory one forward+backward allocates beyond its inputs, the speed-up over eager, and the
largest error of outputs and input gradients relative to eager (``ok`` below 3e-2, bf16).
A failing provider is a row with its error in ``note``, not a crash.

Run from the repository root on a CUDA machine (about 2-3 minutes on an H100, most of it
``torch.compile``; ``--no-compile`` takes under a minute):

    python benchmarks/gpu/foak_kernels.py                 # CSV -> $OUT/foak_kernels.csv
    python benchmarks/gpu/foak_kernels.py --out DIR --ops rms_norm,rope
    python benchmarks/gpu/foak_kernels.py --smoke         # tiny shapes, any device (CPU: TRITON_INTERPRET=1)
"""

from __future__ import annotations

import argparse
import csv
import gc
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

REPO = Path(__file__).resolve().parents[2]
try:
    import fmsaccel_foak  # noqa: F401
except ImportError:  # not pip-installed: use the checkout
    sys.path[:0] = [str(REPO / "plugins" / p) for p in ("framework", "accelerated-peft", "fused-ops-and-kernels")]

from fmsaccel_foak import ops, reference  # noqa: E402
from fmsaccel_foak.modules import fused_mlp_forward  # noqa: E402

LLAMA3_8B = dict(hidden=4096, intermediate=14336, heads=32, kv_heads=8, head_dim=128, vocab=128256, batch=4, seq=4096)
SMOKE = dict(hidden=64, intermediate=96, heads=4, kv_heads=2, head_dim=16, vocab=256, batch=2, seq=16)
OPS = ("rms_norm", "rope", "swiglu", "cross_entropy", "fused_linear_ce", "lora_attention", "mlp")
FIELDS = ["device", "op", "shape", "dtype", "provider", "fwd_ms", "fwd_bwd_ms", "peak_mib", "speedup", "max_rel_err",
          "ok", "note"]
TOLERANCE = 3e-2
DTYPE = torch.bfloat16


@dataclass
class Case:
    """One op at one shape: fresh inputs, and one callable per provider."""

    op: str
    shape: str
    make_inputs: Callable[[], list[torch.Tensor]]  # leaves; those requiring grad get gradients
    providers: dict[str, Callable]  # name -> fn(*inputs) -> tensor or tuple of tensors
    own_stream: frozenset[str] = frozenset()  # providers drawing other dropout masks: timed, not compared


def _optional_liger():
    try:
        from liger_kernel.transformers import functional as liger
    except ImportError:
        return None
    return liger


def _optional_trl_chunked():
    try:
        from trl.kernels import ChunkedLogProbFunction
    except ImportError:
        return None
    return ChunkedLogProbFunction


# --- timing ----------------------------------------------------------------------------------------------------------
def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device, min_iters=5, min_seconds=0.3) -> float:
    """Mean milliseconds per call after two warm-up calls."""
    for _ in range(2):
        fn()
    _sync(device)
    iters, total = 0, 0.0
    while iters < min_iters or total < min_seconds:
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            total += start.elapsed_time(end) / 1000
        else:
            t0 = time.perf_counter()
            fn()
            total += time.perf_counter() - t0
        iters += 1
        if iters >= 50:
            break
    return total / iters * 1000


def _as_tuple(out) -> tuple[torch.Tensor, ...]:
    return out if isinstance(out, tuple) else (out,)


def _seeds(outputs, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    return [torch.ones_like(o) if o.dim() == 0 else torch.randn(o.shape, generator=g).to(o.device, o.dtype)
            for o in outputs]


def _closures(provider, inputs, leaves, seeds):
    def forward():
        provider(*inputs)

    def forward_backward():
        for t in leaves:
            t.grad = None
        outs = [o for o in _as_tuple(provider(*inputs)) if o.requires_grad]
        torch.autograd.backward(outs, seeds)

    return forward, forward_backward


def _run_case(case: Case, device, compile_ok: bool) -> list[dict]:
    rows, reference_values = [], None
    eager_ms = None
    for name, provider in case.providers.items():
        row = dict(op=case.op, shape=case.shape, dtype=str(DTYPE).replace("torch.", ""), provider=name)
        if name == "compile" and not compile_ok:
            continue
        try:
            torch.manual_seed(1234)  # every provider gets the same inputs
            inputs = case.make_inputs()
            leaves = [t for t in inputs if t.requires_grad]
            outputs = [o for o in _as_tuple(provider(*inputs)) if o.requires_grad]
            seeds = _seeds(outputs)
            torch.autograd.backward(outputs, seeds)
            values = [o.detach().float() for o in outputs] + [t.grad.float() for t in leaves]
            if reference_values is None:
                reference_values = values
                row["max_rel_err"] = 0.0
            elif name in case.own_stream:
                row["max_rel_err"] = None
                row["note"] = "other dropout masks: not compared here (tests/test_foak_lora.py checks it)"
            else:
                row["max_rel_err"] = max(float((v - r).abs().max() / r.abs().max().clamp(min=1e-6))
                                         for v, r in zip(values, reference_values, strict=True))
            row["ok"] = None if row["max_rel_err"] is None else row["max_rel_err"] < TOLERANCE
            del outputs, values
            forward, forward_backward = _closures(provider, inputs, leaves, seeds)
            row["fwd_ms"] = _timed(forward, device)
            row["fwd_bwd_ms"] = _timed(forward_backward, device)
            for t in leaves:
                t.grad = None
            gc.collect()
            if device.type == "cuda":
                _sync(device)
                base = torch.cuda.memory_allocated(device)
                torch.cuda.reset_peak_memory_stats(device)
                forward_backward()
                _sync(device)
                row["peak_mib"] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
            if name == "eager":
                eager_ms = row["fwd_bwd_ms"]
            row["speedup"] = eager_ms / row["fwd_bwd_ms"] if eager_ms else None
        except Exception as err:  # one provider failing (missing kernel, OOM, compile error) is a result too
            row["note"] = f"{type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''}"
            row["ok"] = False
        finally:
            inputs = leaves = None
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        rows.append(row)
    return rows


# --- cases -----------------------------------------------------------------------------------------------------------
def _randn(*shape, device, requires_grad=True, scale=1.0):
    return (torch.randn(*shape, device=device, dtype=torch.float32) * scale).to(DTYPE).requires_grad_(requires_grad)


def _compiled(fn):
    return torch.compile(fn, dynamic=False)


def rms_norm_case(s, device, liger) -> Case:
    tokens, hidden = s["batch"] * s["seq"], s["hidden"]

    def make():
        return [_randn(tokens, hidden, device=device), (1 + _randn(hidden, device=device, scale=0.1)).detach()
                .requires_grad_()]

    def eager(x, w):
        return reference.rms_norm(x, w, 1e-5)

    providers = {"eager": eager, "compile": _compiled(eager)}
    if liger:
        providers["liger"] = lambda x, w: liger.liger_rms_norm(x, w, 1e-5, in_place=False)
    providers["foak"] = lambda x, w: ops.rms_norm(x, w, 1e-5)
    return Case("rms_norm", f"{tokens}x{hidden}", make, providers)


def _angles(s, device):
    positions = torch.arange(s["seq"], device=device).expand(s["batch"], -1)
    inv_freq = 1.0 / (500000.0 ** (torch.arange(0, s["head_dim"], 2, device=device).float() / s["head_dim"]))
    emb = torch.cat([positions[..., None].float() * inv_freq] * 2, dim=-1)
    return emb.cos().to(DTYPE), emb.sin().to(DTYPE)


def rope_case(s, device, liger) -> Case:
    b, seq, d = s["batch"], s["seq"], s["head_dim"]
    cos, sin = _angles(s, device)

    def make():  # leaves [B, L, H, D]; the ops see [B, H, L, D] views, like HF's attention
        return [_randn(b, seq, s["heads"], d, device=device), _randn(b, seq, s["kv_heads"], d, device=device)]

    def view(fn):
        return lambda q, k: fn(q.transpose(1, 2), k.transpose(1, 2), cos, sin)

    providers = {"eager": view(reference.rope), "compile": view(_compiled(reference.rope))}
    if liger:
        providers["liger"] = view(liger.liger_rope)
    providers["foak"] = view(ops.rope)
    return Case("rope", f"q {b}x{s['heads']}x{seq}x{d}, k {s['kv_heads']} heads", make, providers)


def swiglu_case(s, device, liger) -> Case:
    tokens, inter = s["batch"] * s["seq"], s["intermediate"]

    def make():
        return [_randn(tokens, inter, device=device), _randn(tokens, inter, device=device)]

    def eager(g, u):
        return F.silu(g) * u

    providers = {"eager": eager, "compile": _compiled(eager)}
    if liger:
        providers["liger"] = liger.liger_swiglu
    providers["foak"] = ops.swiglu
    return Case("swiglu", f"{tokens}x{inter}", make, providers)


def _targets(tokens, vocab, device):
    g = torch.Generator(device="cpu").manual_seed(0)
    t = torch.randint(0, vocab, (tokens,), generator=g)
    t[torch.rand(tokens, generator=g) < 0.1] = -100
    return t.to(device)


def cross_entropy_case(s, device, liger) -> Case:
    tokens, vocab = s["batch"] * s["seq"], s["vocab"]
    targets = _targets(tokens, vocab, device)

    def make():
        return [_randn(tokens, vocab, device=device, scale=2.0)]

    def eager(z):  # transformers' ForCausalLMLoss: fp32 upcast, then F.cross_entropy
        return F.cross_entropy(z.float(), targets, ignore_index=-100)

    providers = {"eager": eager, "compile": _compiled(eager)}
    if liger:  # writes its gradient into the logits in the forward
        providers["liger"] = lambda z: liger.liger_cross_entropy(z, targets)
    providers["foak"] = lambda z: ops.cross_entropy(z, targets)
    return Case("cross_entropy", f"{tokens}x{vocab}", make, providers)


def fused_linear_ce_case(s, device, liger, trl_chunked) -> Case:
    tokens, hidden, vocab = s["batch"] * s["seq"], s["hidden"], s["vocab"]
    targets = _targets(tokens, vocab, device)
    weight = _randn(vocab, hidden, device=device, requires_grad=False, scale=0.02)

    def make():
        return [_randn(tokens, hidden, device=device)]

    def eager(h):  # HF causal LM: full logits, fp32 upcast in the loss
        return F.cross_entropy((h @ weight.t()).float(), targets, ignore_index=-100)

    providers = {"eager": eager, "compile": _compiled(eager)}
    if trl_chunked:
        mask = targets != -100

        def trl(h):  # SFTTrainer's fused LM head (only non-ignored tokens, 4096 x 32768 tiles)
            logp = trl_chunked.apply(h[mask], weight, None, targets[mask], 1.0, 32768, None, 1.0, ("log_probs",))[0]
            return -logp.sum() / mask.sum()

        providers["trl"] = trl
    if liger:
        providers["liger"] = lambda h: liger.liger_fused_linear_cross_entropy(h, weight, targets)
    providers["foak"] = lambda h: ops.fused_linear_cross_entropy(h, weight, targets)
    return Case("fused_linear_ce", f"{tokens}x{hidden} @ {vocab}x{hidden}^T (frozen)", make, providers)


# --- LoRA and MLP cases: real PEFT layers on bf16 / bnb nf4 / GPTQ bases ---------------------------------------------
def _linear(in_f, out_f, base, device):
    layer = nn.Linear(in_f, out_f, bias=False, device=device, dtype=DTYPE)
    nn.init.normal_(layer.weight, std=0.02)
    layer.requires_grad_(False)
    if base == "bf16":
        return layer
    if base == "nf4":
        import bitsandbytes as bnb

        quant = bnb.nn.Linear4bit(in_f, out_f, bias=False, compute_dtype=DTYPE, quant_type="nf4")
        quant.weight = bnb.nn.Params4bit(layer.weight.data.cpu(), requires_grad=False, quant_type="nf4")
        return quant.to(device)
    if base == "gptq":
        from fmsaccel_peft.gptq.linear import QuantLinear
        from fmsaccel_peft.gptq.packing import pack
        from fmsaccel_peft.gptq.quantize import rtn_quantize

        q = rtn_quantize(layer.weight.data.float(), group_size=128 if in_f % 128 == 0 else 32)
        t = pack(q.intweight, q.zeros, q.scales, q.g_idx)
        return QuantLinear(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], None,
                           group_size=128 if in_f % 128 == 0 else 32).to(device)
    raise ValueError(base)


class _Attention(nn.Module):
    def __init__(self, s, base, device):
        super().__init__()
        h, kv = s["hidden"], s["kv_heads"] * s["head_dim"]
        self.norm = nn.RMSNorm(h, device=device, dtype=DTYPE)  # PEFT finds the device through a parameter
        self.q_proj, self.k_proj = _linear(h, h, base, device), _linear(h, kv, base, device)
        self.v_proj, self.o_proj = _linear(h, kv, base, device), _linear(h, h, base, device)


def lora_attention_case(s, device, base) -> Case:
    from peft import LoraConfig, get_peft_model

    tokens, hidden = s["batch"] * s["seq"], s["hidden"]
    model = get_peft_model(_Attention(s, base, device),
                           LoraConfig(r=16, lora_alpha=16, lora_dropout=0.1,
                                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    for name, p in model.named_parameters():
        if p.requires_grad:  # adapters in bf16, as TRL leaves them for quantised models
            p.data = p.data.to(DTYPE)
            if "lora_B" in name:
                nn.init.normal_(p, std=0.02)
    attn = model.base_model.model.train()

    def make():  # x feeds q/k/v, o reads the attention output
        return [_randn(tokens, hidden, device=device), _randn(tokens, hidden, device=device)]

    def eager(x, o):
        torch.manual_seed(0)
        return attn.q_proj(x), attn.k_proj(x), attn.v_proj(x), attn.o_proj(o)

    def foak(x, o):
        torch.manual_seed(0)
        return (*ops.fused_lora(x, [attn.q_proj, attn.k_proj, attn.v_proj]), *ops.fused_lora(o, [attn.o_proj]))

    def foak_dik(x, o):  # dropout_in_kernel: masks drawn in Triton, none kept
        torch.manual_seed(0)
        return (*ops.fused_lora(x, [attn.q_proj, attn.k_proj, attn.v_proj], dropout_in_kernel=True),
                *ops.fused_lora(o, [attn.o_proj], dropout_in_kernel=True))

    return Case(f"lora_attention_{base}", f"{tokens} tokens, r=16, dropout 0.1", make,
                {"eager": eager, "foak": foak, "foak_dik": foak_dik}, own_stream=frozenset({"foak_dik"}))


class _MLP(nn.Module):
    def __init__(self, s, base, device):
        super().__init__()
        h, i = s["hidden"], s["intermediate"]
        self.gate_proj, self.up_proj = _linear(h, i, base, device), _linear(h, i, base, device)
        self.down_proj = _linear(i, h, base, device)
        self.act_fn = nn.SiLU()

    def forward(self, x):  # LlamaMLP
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def mlp_case(s, device, base) -> Case:
    tokens = s["batch"] * s["seq"]
    mlp = _MLP(s, base, device)
    fused = fused_mlp_forward(keep_weights=False, fast_swiglu=True)

    def make():
        return [_randn(tokens, s["hidden"], device=device)]

    return Case(f"mlp_{base}", f"{tokens} tokens, {s['hidden']}->{s['intermediate']}->{s['hidden']}, no LoRA",
                make, {"eager": mlp, "foak": lambda x: fused(mlp, x)})


# --- main ------------------------------------------------------------------------------------------------------------
def build_cases(names, s, device, smoke) -> list[Callable[[], Case]]:
    liger = _optional_liger() if device.type == "cuda" else None
    trl_chunked = _optional_trl_chunked()
    bases = ["bf16", "nf4", "gptq"]
    makers = {
        "rms_norm": [lambda: rms_norm_case(s, device, liger)],
        "rope": [lambda: rope_case(s, device, liger)],
        "swiglu": [lambda: swiglu_case(s, device, liger)],
        "cross_entropy": [lambda: cross_entropy_case(s, device, liger)],
        "fused_linear_ce": [lambda: fused_linear_ce_case(s, device, liger, trl_chunked)],
        "lora_attention": [lambda b=b: lora_attention_case(s, device, b) for b in bases],
        "mlp": [lambda b=b: mlp_case(s, device, b) for b in ("nf4", "gptq")],
    }
    return [m for name in names for m in makers[name]]


def _fmt(value, digits=2):
    if value is None or value == "":
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        return f"{value:.{digits}f}" if value >= 0.01 or value == 0 else f"{value:.1e}"
    return str(value)


def print_table(rows):
    cols = ["op", "provider", "fwd_ms", "fwd_bwd_ms", "peak_mib", "speedup", "max_rel_err", "ok", "note"]
    table = [[_fmt(r.get(c)) if c != "peak_mib" else _fmt(r.get(c), 0) for c in cols] for r in rows]
    widths = [max(len(c), *(len(t[i]) for t in table)) for i, c in enumerate(cols)]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)))
    for t in table:
        print("  ".join(v.ljust(w) for v, w in zip(t, widths, strict=True)))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "."), help="directory for foak_kernels.csv ($OUT)")
    parser.add_argument("--ops", default=",".join(OPS), help=f"comma-separated subset of {','.join(OPS)}")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile provider")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on any device (checks the script runs)")
    args = parser.parse_args(argv)
    names = [n for n in args.ops.split(",") if n]
    unknown = set(names) - set(OPS)
    if unknown:
        parser.error(f"unknown ops {sorted(unknown)}; known: {', '.join(OPS)}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.smoke:
        parser.error("needs a CUDA device (or --smoke)")
    shapes = SMOKE if args.smoke else LLAMA3_8B
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    import triton

    print(f"{device_name}: torch {torch.__version__}, triton {triton.__version__}, shapes {shapes}")
    compile_ok = not args.no_compile and device.type == "cuda"
    rows = []
    started = time.time()
    for make_case in build_cases(names, shapes, device, args.smoke):
        try:
            case = make_case()
        except Exception as err:
            rows.append(dict(op="?", provider="setup", ok=False, note=f"{type(err).__name__}: {err}"[:200]))
            continue
        case_rows = _run_case(case, device, compile_ok)
        for r in case_rows:
            r["device"] = device_name
        rows += case_rows
        print_table(case_rows)
        print(f"  [{time.time() - started:.0f}s]", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "foak_kernels.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    print("\nall ops:")
    print_table(rows)
    print(f"\nwrote {out / 'foak_kernels.csv'} ({time.time() - started:.0f}s)")
    failed = [f"{r['op']}/{r['provider']}" for r in rows if r.get("provider") == "foak" and not r.get("ok")]
    if failed:
        print(f"foak outside tolerance or failing: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
