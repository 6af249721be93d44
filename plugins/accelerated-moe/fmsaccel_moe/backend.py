"""Pick the GEMM engine for the experts: our Triton kernels or torch's ``grouped_mm``.

Both run the same memory plan (``ops``); they differ in who does the grouped GEMMs.
With ``backend: auto`` on a GPU, one forward+backward of each distinct expert shape
is timed with both at the run's typical token count per micro-batch (``typical_batch_tokens``:
short rows are paced by launches, where the two engines rank otherwise than at full rows),
and the faster one is used and reported.
Without a GPU, Triton only runs under ``TRITON_INTERPRET=1`` (tests), so ``auto``
means torch there.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from fmsaccel_framework.plugin import PluginError

from .ops import routed_experts
from .torch_kernels import grouped_mm_name


@dataclass(frozen=True)
class ExpertShape:
    num_experts: int
    hidden: int
    intermediate: int
    top_k: int
    dtype: torch.dtype

    def __str__(self) -> str:
        dtype = str(self.dtype).removeprefix("torch.")
        return f"E={self.num_experts} H={self.hidden} I={self.intermediate} top-{self.top_k} {dtype}"


def triton_usable() -> bool:
    from .triton_kernels import interpreting

    return torch.cuda.is_available() or interpreting()


def typical_batch_tokens(lengths: list[int] | None, batch: int, budget: int, *, packed: bool, multipack: bool,
                         samples: int = 64, seed: int = 0) -> tuple[int, str]:
    """Tokens the experts see in a typical micro-batch of this dataset, and how that was found.

    The median over ``samples`` random batches of ``batch`` examples: their sum when rows are packed
    (padding-free), ``batch x`` their longest when padded (pad tokens pass through the experts too).
    Multipack fills each batch to the ``budget`` (``batch x max_seq_length``), as does a run whose
    example lengths are unknown.
    """
    import random

    if multipack or not lengths:
        return budget, "multipack's token budget" if multipack else "batch x max_seq_length"
    rng = random.Random(seed)
    sizes = sorted(
        sum(pick) if packed else len(pick) * max(pick)
        for pick in (rng.sample(lengths, min(batch, len(lengths))) for _ in range(samples))
    )
    return min(sizes[len(sizes) // 2], budget), f"the median {'packed' if packed else 'padded'} micro-batch"


def resolve_backend(requested: str, shapes: set[ExpertShape], tokens: int) -> tuple[str, str]:
    """``(backend, why)`` for a run whose MoE layers have ``shapes``."""
    torch_name = grouped_mm_name() or "a per-expert torch.mm loop"
    if requested == "triton":
        if not triton_usable():
            raise PluginError("accelerated-moe: backend 'triton' needs a GPU (or TRITON_INTERPRET=1 for tests)")
        return "triton", "Triton ScatterMoE kernels (requested)"
    if requested == "grouped_mm":
        return "grouped_mm", f"{torch_name} (requested)"
    if requested != "auto":
        raise PluginError(f"accelerated-moe: unknown backend {requested!r} (auto, triton, grouped_mm)")
    if not torch.cuda.is_available():
        return "grouped_mm", f"no GPU: {torch_name} on the CPU"
    timings = {name: sum(_time_backend(name, shape, tokens) for shape in shapes) for name in ("triton", "grouped_mm")}
    best = min(timings, key=timings.get)
    if dist.is_initialized():  # every rank runs what rank 0 measured
        choice = [best]
        dist.broadcast_object_list(choice, src=0)
        best = choice[0]
    detail = ", ".join(f"{name} {ms:.2f} ms" for name, ms in timings.items())
    shapes_text = "; ".join(str(s) for s in sorted(shapes, key=str))
    return best, f"auto: fwd+bwd per layer at {tokens} tokens ({shapes_text}): {detail} -> {best}"


def warm_up_triton(shapes: set[ExpertShape], device: torch.device | None = None, backend: str = "triton") -> list[int]:
    """Compile (and autotune) the Triton kernels ``backend`` launches before training, at token counts that reach
    every variant (``triton_kernels.warm_up_token_counts``); returns the counts run. ``grouped_mm`` launches only
    the SwiGLU row kernels on CUDA, whose variants do not depend on the token count: one count reaches them."""
    from .triton_kernels import warm_up_token_counts

    counts = []
    for shape in shapes:
        wanted = warm_up_token_counts(shape.num_experts, shape.top_k)
        for tokens in wanted if backend == "triton" else wanted[:1]:
            _layer_step(backend, shape, tokens, device)()  # the first call compiles and autotunes
            _layer_step(backend, shape, tokens, device, frozen=True)()  # LoRA elsewhere: fewer gradients
            counts.append(tokens)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return counts


def _time_backend(backend: str, shape: ExpertShape, tokens: int, repeats: int = 5) -> float:
    """Milliseconds for one forward+backward of one MoE layer on random routing."""
    step = _layer_step(backend, shape, tokens)
    for _ in range(2):  # the first call autotunes the Triton kernels
        step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1000 / repeats


def _layer_step(backend: str, shape: ExpertShape, tokens: int, device: torch.device | None = None,
                frozen: bool = False):
    """One forward+backward of one MoE layer of ``shape`` on random routing, as a callable (``frozen``: no expert
    weight gradients)."""
    if device is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", torch.cuda.current_device())))
    gen = torch.Generator(device=device).manual_seed(0)
    e, h, i, k = shape.num_experts, shape.hidden, shape.intermediate, shape.top_k
    gate_up = (torch.randn(e, 2 * i, h, device=device, generator=gen) * h**-0.5).to(shape.dtype)
    down = (torch.randn(e, h, i, device=device, generator=gen) * i**-0.5).to(shape.dtype)
    gate_up.requires_grad_(not frozen)
    down.requires_grad_(not frozen)
    x = torch.randn(tokens, h, device=device, generator=gen).to(shape.dtype).requires_grad_()
    logits = torch.randn(tokens, e, device=device, generator=gen)
    weights, index = logits.softmax(-1).topk(k, dim=-1)
    grad = torch.randn(tokens, h, device=device, generator=gen).to(shape.dtype)

    def step():
        out = routed_experts(x, index, weights, gate_up, down, backend=backend)
        out.backward(grad)

    return step
