"""Padding-free attention registered through transformers' ``AttentionInterface``.

A padding-free batch is one row ``[1, T]`` holding several examples; attention must
never cross an example boundary. The boundaries arrive as ``cu_seq_lens_q`` (from our
collator, or TRL's) or are derived from restarting ``position_ids``. Four backends:

- ``flash_attn``: ``flash_attn.flash_attn_varlen_func``, where flash-attn is installed;
- ``varlen``: PyTorch's own ``torch.nn.attention.varlen.varlen_attn`` (CUDA, fp16/bf16);
- ``flex``: FlexAttention with a document-causal ``BlockMask`` (compiled on CUDA; on the
  CPU torch runs it eagerly and has no backward, so it is not a CPU training backend);
- ``sdpa_masked``: SDPA with a block-diagonal causal boolean mask: runs anywhere, costs
  O(T^2) mask memory, and is the reference the others are tested against.

Batches that are not packed (evaluation with padding, generation) take an ordinary
causal SDPA path with the padding mask, so registering this function never changes
what a padded batch computes.

For padded training (no padding-free), :func:`register_sdpa` registers transformers' own
SDPA attention with a say in which SDPA kernel runs: cuDNN's plans each new sequence
length (see :func:`make_sdpa_forward`).
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fmsaccel_framework.plugin import PluginError

from .spec import CUDNN_MODES

BACKENDS = ("flash_attn", "varlen", "flex", "sdpa_masked")
ATTENTION_NAME_PREFIX = "fmsaccel_padding_free"
HALF_DTYPES = (torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------- availability


@functools.cache
def backend_unavailable_reason(backend: str, device_type: str, dtype: torch.dtype | None = None,
                               training: bool = True) -> str | None:
    """Why ``backend`` cannot run here, or None when it can (cached: it is asked in every layer)."""
    if backend == "sdpa_masked":
        return None
    if backend == "flex":
        if importlib.util.find_spec("torch.nn.attention.flex_attention") is None:
            return f"torch {torch.__version__} has no torch.nn.attention.flex_attention"
        if device_type != "cuda" and training:
            return "FlexAttention has no backward on the CPU (forward only)"
        return None
    if device_type != "cuda":
        return f"{backend} runs on CUDA only"
    if dtype is not None and dtype not in HALF_DTYPES:
        return f"{backend} needs float16/bfloat16 activations, got {dtype}"
    if backend == "flash_attn":
        return None if importlib.util.find_spec("flash_attn") is not None else "flash-attn is not installed"
    if backend == "varlen":
        if importlib.util.find_spec("torch.nn.attention.varlen") is None:
            return f"torch {torch.__version__} has no torch.nn.attention.varlen"
        if torch.cuda.is_available() and torch.cuda.get_device_capability()[0] < 8:
            return "torch varlen attention needs an sm80+ GPU (flash kernels)"
        return None
    raise ValueError(f"unknown padding-free backend {backend!r}; choose from {BACKENDS}")


def resolve_backend(requested: str, device_type: str | None = None,
                    dtype: torch.dtype | None = None) -> tuple[str, str]:
    """Pick the backend for ``requested`` (``auto`` or a name); returns (backend, why).

    ``auto`` prefers flash-attn, then torch varlen, then flex (on CUDA), then the masked
    path. A named backend that cannot run is an error, never a silent substitute.
    """
    device_type = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
    if requested != "auto":
        reason = backend_unavailable_reason(requested, device_type, dtype)
        if reason:
            raise RuntimeError(f"padding-free backend '{requested}' cannot run here: {reason}")
        return requested, "requested"
    skipped = []
    for backend in BACKENDS:
        reason = backend_unavailable_reason(backend, device_type, dtype)
        if reason is None:
            why = "auto" + (f" ({'; '.join(skipped)})" if skipped else "")
            return backend, why
        skipped.append(f"{backend}: {reason}")
    raise AssertionError("sdpa_masked is always available")


# --------------------------------------------------------------------------- packing metadata


@dataclass(frozen=True)
class Packing:
    """Where each example of a packed row starts: ``cu_seqlens`` [n+1] int32, and the longest one."""

    cu_seqlens: torch.Tensor
    max_length: int


class _LastValueCache:
    """Remembers one derived value per key tensor, by identity.

    Every layer of a forward gets the same ``cu_seq_lens_q`` / ``position_ids`` tensor
    object, so masks and metadata are built once per forward instead of once per layer.
    The key tensor is kept alive with the value, so its id cannot be reused meanwhile.
    Inside a compiled layer (foak's ``compile_layers``) the value is built in the graph
    instead: guards on this cache's contents would recompile the layer on every batch.
    """

    def __init__(self):
        self._entries: dict[str, tuple[torch.Tensor, object]] = {}

    def get(self, kind: str, key: torch.Tensor, build: Callable[[], object]):
        if torch.compiler.is_compiling():
            return build()
        entry = self._entries.get(kind)
        if entry is not None and entry[0] is key:
            return entry[1]
        value = build()
        self._entries[kind] = (key, value)
        return value

    def clear(self) -> None:
        self._entries.clear()


_cache = _LastValueCache()


def packing_from_position_ids(position_ids: torch.Tensor) -> Packing | None:
    """Boundaries of a ``[1, T]`` row whose positions restart at 0; None when it holds one example."""
    pos = position_ids[0]
    starts = torch.nonzero(pos == 0).flatten()
    if starts.numel() == 0 or int(starts[0]) != 0:
        starts = torch.cat([starts.new_zeros(1), starts])
    if starts.numel() <= 1:
        return None
    ends = torch.cat([starts[1:], starts.new_tensor([pos.numel()])])
    cu = torch.cat([starts, ends[-1:]]).to(torch.int32)
    return Packing(cu, int((ends - starts).max()))


def find_packing(query: torch.Tensor, attention_mask, kwargs: dict) -> Packing | None:
    """The packed-row metadata of this call, or None for an ordinary (padded or single) batch."""
    cu = kwargs.get("cu_seq_lens_q")
    if cu is not None:
        if query.shape[0] != 1:
            raise PluginError(f"cu_seq_lens_q given with batch size {query.shape[0]}; padding-free rows are [1, T]")
        cu_k = kwargs.get("cu_seq_lens_k")
        if cu_k is not None and cu_k is not cu and cu_k.shape != cu.shape:
            raise PluginError("padding-free attention supports self-attention only (cu_seq_lens_k != _q)")
        max_length = kwargs.get("max_length_q")

        def build():
            c = cu.to(device=query.device, dtype=torch.int32)
            m = int(max_length) if max_length is not None else int(c.diff().max())
            return Packing(c, m)

        return _cache.get("packing_cu", cu, build)
    position_ids = kwargs.get("position_ids")
    if attention_mask is None and position_ids is not None and query.shape[0] == 1 and position_ids.shape[0] == 1:
        return _cache.get("packing_pos", position_ids, lambda: packing_from_position_ids(position_ids))
    return None


def document_ids(packing: Packing, total: int) -> torch.Tensor:
    """The example index of every token of the row, [T] int32."""
    cu = packing.cu_seqlens
    counts = (cu[1:] - cu[:-1]).long()
    return torch.repeat_interleave(torch.arange(counts.numel(), device=cu.device, dtype=torch.int32), counts,
                                   output_size=total)


def block_causal_mask(packing: Packing, total: int) -> torch.Tensor:
    """[T, T] boolean mask: a token sees earlier tokens of its own example only (True = attend)."""
    doc = document_ids(packing, total)
    idx = torch.arange(total, device=doc.device)
    return (doc[:, None] == doc[None, :]) & (idx[:, None] >= idx[None, :])


# --------------------------------------------------------------------------- backends
# Each takes q [1, Hq, T, D], k/v [1, Hkv, T, D] and returns [1, T, Hq, D].


def _gqa(query: torch.Tensor, key: torch.Tensor) -> bool:
    return query.shape[1] != key.shape[1]


def sdpa_masked_attention(query, key, value, packing: Packing, scaling: float | None, dropout: float) -> torch.Tensor:
    total = query.shape[2]
    mask = _cache.get("sdpa_mask", packing.cu_seqlens, lambda: block_causal_mask(packing, total))
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask[None, None], dropout_p=dropout,
                                         scale=scaling, enable_gqa=_gqa(query, key))
    return out.transpose(1, 2)


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    # Automatic dynamic shapes: the first new row length recompiles with a symbolic length,
    # so steps of varying T do not keep recompiling (or fall back to the eager path).
    return torch.compile(flex_attention)


def _flex_block_mask(packing: Packing, total: int):
    from torch.nn.attention.flex_attention import create_block_mask

    doc = document_ids(packing, total)

    def document_causal(b, h, q_idx, kv_idx):
        return (doc[q_idx] == doc[kv_idx]) & (q_idx >= kv_idx)

    return create_block_mask(document_causal, None, None, total, total, device=doc.device)


def flex_attention_packed(query, key, value, packing: Packing, scaling: float | None, dropout: float) -> torch.Tensor:
    if dropout:
        raise PluginError("the flex padding-free backend has no attention dropout; set attention_dropout=0")
    total = query.shape[2]
    block_mask = _cache.get("flex_mask", packing.cu_seqlens, lambda: _flex_block_mask(packing, total))
    if query.is_cuda:
        flex = _compiled_flex()
    else:
        from torch.nn.attention.flex_attention import flex_attention as flex
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
        out = flex(query, key, value, block_mask=block_mask, scale=scaling, enable_gqa=_gqa(query, key))
    return out.transpose(1, 2)


@dataclass(frozen=True)
class _VarlenApi:
    """torch's varlen_attn and what this torch version's signature offers."""

    fn: Callable
    causal: dict  # the causal keyword changed across versions
    native_gqa: bool
    has_scale: bool


@functools.cache
def _varlen_api() -> _VarlenApi:
    from torch.nn.attention.varlen import varlen_attn

    params = inspect.signature(varlen_attn).parameters
    if "window_size" in params:
        causal = {"window_size": (-1, 0)}  # torch >= 2.11
    elif "is_causal" in params:
        causal = {"is_causal": True}  # torch 2.10
    else:
        raise RuntimeError(f"torch {torch.__version__}: varlen_attn has neither window_size nor is_causal")
    return _VarlenApi(varlen_attn, causal, "enable_gqa" in params, "scale" in params)


def _tokens_heads_dim(x: torch.Tensor) -> torch.Tensor:
    """[1, H, T, D] -> contiguous [T, H, D], the varlen layout."""
    return x[0].transpose(0, 1).contiguous()


def _repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """[T, Hkv, D] -> [T, Hkv * n_rep, D], query head h reading kv head h // n_rep (transformers' order)."""
    return x if n_rep == 1 else x.repeat_interleave(n_rep, dim=1)


def varlen_attention_packed(query, key, value, packing: Packing, scaling: float | None, dropout: float,
                            api: _VarlenApi | None = None):
    if dropout:
        raise PluginError("torch varlen attention has no dropout; set attention_dropout=0")
    api = api or _varlen_api()
    q, k, v = (_tokens_heads_dim(t) for t in (query, key, value))
    extra = dict(api.causal)
    if _gqa(query, key):
        if api.native_gqa:
            extra["enable_gqa"] = True
        else:
            n_rep = q.shape[1] // k.shape[1]
            k, v = _repeat_kv(k, n_rep), _repeat_kv(v, n_rep)
    if scaling is not None:
        if api.has_scale:
            extra["scale"] = scaling
        else:  # the kernel applies 1/sqrt(D): fold the difference into q
            q = q * (scaling * q.shape[-1] ** 0.5)
    cu, m = packing.cu_seqlens, packing.max_length
    return api.fn(q, k, v, cu, cu, m, m, **extra)[None]


def flash_attn_packed(query, key, value, packing: Packing, scaling: float | None, dropout: float):
    from flash_attn import flash_attn_varlen_func

    q, k, v = (_tokens_heads_dim(t) for t in (query, key, value))
    cu, m = packing.cu_seqlens, packing.max_length
    out = flash_attn_varlen_func(q, k, v, cu, cu, m, m, dropout_p=dropout, softmax_scale=scaling, causal=True)
    return out[None]


@dataclass(frozen=True)
class PackedBackend:
    """A packed-attention kernel, and whether it takes attention dropout (those that don't refuse it on every row)."""

    fn: Callable
    supports_dropout: bool


PACKED_BACKENDS: dict[str, PackedBackend] = {
    "flash_attn": PackedBackend(flash_attn_packed, supports_dropout=True),
    "varlen": PackedBackend(varlen_attention_packed, supports_dropout=False),
    "flex": PackedBackend(flex_attention_packed, supports_dropout=False),
    "sdpa_masked": PackedBackend(sdpa_masked_attention, supports_dropout=True),
}


def padding_mask_passthrough(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
                             mask_function: Callable | None = None, attention_mask: torch.Tensor | None = None,
                             **kwargs) -> torch.Tensor | None:
    """The ``AttentionMaskInterface`` entry for our attention: hand over the 2D padding mask.

    Without a registered mask function transformers drops the padding mask entirely for a
    custom attention name. This keeps the 2D [B, S] mask (None when nothing is padded, as
    for a padding-free row) and builds no [T, T] mask that the varlen kernels would ignore.
    """
    if attention_mask is None:
        return None
    attention_mask = attention_mask[:, -kv_length:]
    if attention_mask.shape[1] == kv_length and bool(attention_mask.all()):
        return None
    return attention_mask


def sdpa_padded_attention(query, key, value, attention_mask, scaling: float | None, dropout: float) -> torch.Tensor:
    """Ordinary causal attention for [B, H, L, D] with an optional padding mask; returns [B, L, H, D].

    The padding mask arrives as 2D [B, S] (see :func:`padding_mask_passthrough`). Keys
    may outnumber queries (a KV cache): the causal diagonal is then aligned to the end.
    Every query may attend to itself, so rows of padding never become all-masked (their
    output is ignored anyway).
    """
    q_len, kv_len = query.shape[2], key.shape[2]
    gqa = _gqa(query, key)
    if attention_mask is None and q_len == kv_len:
        out = F.scaled_dot_product_attention(query, key, value, is_causal=True, dropout_p=dropout, scale=scaling,
                                             enable_gqa=gqa)
        return out.transpose(1, 2)
    if attention_mask is not None and attention_mask.dim() == 4:
        mask = attention_mask
    else:
        offset = kv_len - q_len
        qi = torch.arange(q_len, device=query.device)[:, None] + offset
        ki = torch.arange(kv_len, device=query.device)[None, :]
        mask = (ki <= qi)[None, None]
        if attention_mask is not None:
            mask = (mask & attention_mask[:, None, None, -kv_len:].bool()) | (ki == qi)[None, None]
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=dropout, scale=scaling,
                                         enable_gqa=gqa)
    return out.transpose(1, 2)


def equal_length_rows(packing: Packing, total: int) -> int | None:
    """How many examples a packed row holds when they all have one length (else None).

    Decided from host-side integers (the longest example and the example count), with no device sync: n examples
    whose longest is ``total / n`` tokens long are all that long.
    """
    n = packing.cu_seqlens.shape[0] - 1
    return n if n > 1 and packing.max_length * n == total else None


def sdpa_equal_length_attention(query, key, value, rows: int, scaling: float | None, dropout: float) -> torch.Tensor:
    """A packed row of ``rows`` examples of one length is a dense [rows, L] batch: run it as one.

    Full-length batches (workload P, data packed to the context length) reach padding-free attention too; dense
    causal SDPA (cuDNN's kernels on Hopper) runs them faster than the varlen kernels, with the same result.
    """
    def as_batch(x: torch.Tensor) -> torch.Tensor:  # [1, H, rows*L, D] -> [rows, H, L, D]
        return x[0].unflatten(1, (rows, -1)).transpose(0, 1)

    out = sdpa_padded_attention(as_batch(query), as_batch(key), as_batch(value), None, scaling, dropout)
    return out.reshape(1, -1, *out.shape[2:])  # [rows, L, H, D] -> [1, rows*L, H, D]


# --------------------------------------------------------------------------- the registered function


def make_attention_forward(backend: str, strict: bool = True) -> Callable:
    """The ``AttentionInterface`` function for ``backend``.

    ``strict=False`` (backend chosen by ``auto``) lets a call the backend cannot serve
    (CPU tensors for a CUDA kernel, fp32 for a half-only kernel) take the masked path
    with a one-time warning; ``strict=True`` makes that an error.
    """
    packed = PACKED_BACKENDS[backend]
    packed_fn = packed.fn
    if backend == "varlen" and backend_unavailable_reason("varlen", "cuda") is None:
        # resolved here, eagerly: inside a compiled layer (foak's compile_layers) the signature inspection it
        # does would be traced on every compilation
        packed_fn = functools.partial(varlen_attention_packed, api=_varlen_api())
    warned: set[str] = set()

    def padding_free_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                                       **kwargs):
        if not getattr(module, "is_causal", True) or kwargs.get("is_causal") is False:
            raise PluginError("padding-free attention is causal-only")
        if kwargs.get("softcap") is not None:
            raise PluginError("padding-free attention does not support logit soft-capping")
        packing = find_packing(query, attention_mask, kwargs)
        if packing is None:
            return sdpa_padded_attention(query, key, value, attention_mask, scaling, dropout), None
        window = kwargs.get("sliding_window")
        if window is not None and packing.max_length > window:
            raise PluginError(f"an example of {packing.max_length} tokens exceeds the sliding window "
                                      f"({window}); padding-free attention has no sliding-window support")
        rows = equal_length_rows(packing, query.shape[2])
        if rows is not None and (packed.supports_dropout or not dropout):  # (the others refuse it on every row)
            return sdpa_equal_length_attention(query, key, value, rows, scaling, dropout), None
        fn = packed_fn
        # (not asked inside a compiled layer: importlib's checks cannot be traced, and the plugin chose the
        # backend for this device and dtype before compiling)
        reason = None if torch.compiler.is_compiling() else backend_unavailable_reason(
            backend, query.device.type, query.dtype, training=torch.is_grad_enabled())
        if reason is not None:
            if strict:
                raise PluginError(f"padding-free backend '{backend}' cannot serve this call: {reason}")
            if reason not in warned:
                warned.add(reason)
                warnings.warn(f"padding-free backend '{backend}' cannot serve this call ({reason}); "
                              "using the masked SDPA path", stacklevel=2)
            fn = sdpa_masked_attention
        return fn(query, key, value, packing, scaling, dropout), None

    padding_free_attention_forward.backend = backend
    return padding_free_attention_forward


def attention_name(backend: str) -> str:
    return f"{ATTENTION_NAME_PREFIX}_{backend}"


def register_attention(backend: str, strict: bool = True) -> str:
    """Register the backend's function with transformers and return its attention name."""
    from transformers import AttentionInterface, AttentionMaskInterface

    name = attention_name(backend) + ("" if strict else "_auto")
    AttentionInterface.register(name, make_attention_forward(backend, strict=strict))
    AttentionMaskInterface.register(name, padding_mask_passthrough)
    return name


# --------------------------------------------------------------------------- padded batches: SDPA without cuDNN plans

SDPA_NAME_PREFIX = "fmsaccel_sdpa_cudnn"


def make_sdpa_forward(cudnn: str) -> Callable:
    """transformers' SDPA attention, keeping cuDNN's attention kernel away from padded batches.

    On Hopper GPUs PyTorch prefers cuDNN's attention, which builds an execution plan the first
    time it meets a shape, in a cache per thread (s4c3, H100: 12 ms a forward call, 19 ms a
    backward call). Padded batches of variable-length data bring a new length nearly every step,
    so each step plans again in every layer: about a second per step for llama3-8b. ``unpadded``:
    calls with a padding mask take the flash, memory-efficient or math kernel, which plan
    nothing; calls without one (fixed-length rows, ``is_causal``) keep PyTorch's choice.
    ``never``: no cuDNN at all. ``always``: PyTorch's choice (plain transformers).
    """
    if cudnn not in CUDNN_MODES:
        raise ValueError(f"unknown cudnn mode '{cudnn}' (known: {', '.join(CUDNN_MODES)})")
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    without_cudnn = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]

    def sdpa_forward(module, query, key, value, attention_mask, **kwargs):
        if cudnn == "never" or (cudnn == "unpadded" and attention_mask is not None):
            with sdpa_kernel(without_cudnn):
                return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    return sdpa_forward


def register_sdpa(cudnn: str) -> str:
    """Register SDPA attention with the ``cudnn`` mode (and SDPA's masks); return its attention name."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    name = f"{SDPA_NAME_PREFIX}_{cudnn}"
    AttentionInterface.register(name, make_sdpa_forward(cudnn))
    AttentionMaskInterface.register(name, sdpa_mask)
    return name
