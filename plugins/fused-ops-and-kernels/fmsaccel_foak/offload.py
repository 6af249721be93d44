"""Offloaded MLP activations: the recompute of a checkpointed layer takes ``gate``/``up`` back from host memory.

Under checkpointing each layer's forward runs twice, and the MLP's gate/up matmuls are most
of the rerun (two of a Llama layer's seven matmuls, 27 % of its forward FLOPs at llama3-8b).
Keeping their outputs on the GPU would cost ~0.9 GiB a layer at 16k tokens; copying them to
pinned host memory in the forward (a side stream, overlapped with the next layers) and back
before the layer's recompute (prefetched while the layer above runs its backward) costs PCIe
time instead, which the GPU's compute hides.

Only for layers whose gate/up op saves nothing (no LoRA on gate/up, dequantised weights not
kept), so the recompute saves the same tensors whether or not it runs that op; the copies
are exact. Without CUDA (the tests) the "host" copies are plain clones.

Steps of fewer than ``min_tokens`` tokens are not offloaded: they are paced by the host, where
the gate/up rerun is GPU time the host's launches hide anyway and the copies are host work
added. Pinning takes seconds at this size (R's first 6,760-token step after 3,480 stalled
6-8 s in s20c2), so the first step pins for the longest step the batch size and sequence
length allow, and a longer one (beyond them) grows the buffer to a power of two of its tokens.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Collection

import torch
from torch import nn
from torch.utils._python_dispatch import _disable_current_modes

logger = logging.getLogger("fmsaccel_foak")


def _outside_dispatch_modes(method):
    """Run an offload step outside any dispatch mode: selective checkpointing's mode replays the recompute op by
    op against the forward, and the copies (whose ops differ between the two) are no op of the layer."""

    @functools.wraps(method)
    def wrapped(*args, **kwargs):
        with _disable_current_modes():
            return method(*args, **kwargs)

    return wrapped


class Offloaded:
    """One MLP's gate/up copies for the current step."""

    def __init__(self, index: int, min_tokens: int = 0, reserve_tokens: int = 0):
        self.index = index
        self.min_tokens = min_tokens
        self.reserve_tokens = reserve_tokens  # the first buffer's size: the longest step the run can have
        self.host: tuple[torch.Tensor, torch.Tensor] | None = None  # views of ``pinned`` for this step
        self.pinned: torch.Tensor | None = None
        self.on_device: tuple[torch.Tensor, torch.Tensor] | None = None
        self.copied = None  # CUDA event: the last copy (to host, then back) done
        self.saved = False

    @_outside_dispatch_modes
    def save(self, gate: torch.Tensor, up: torch.Tensor, copies_running: Collection[int] = ()) -> None:
        """Copy this forward's gate/up to the host (asynchronously on a GPU), not waiting for the copies of the
        layers in ``copies_running`` (:func:`copies_left_running`)."""
        if self.on_device is not None and self.copied is not None:  # brought back but never taken: let the copy
            _compute_stream_waits_for(self.copied)  # land before its buffers can be reused
        self.on_device = None
        tokens = gate.numel() // max(gate.shape[-1], 1)
        if tokens < self.min_tokens:  # a short step: its recompute runs gate/up as usual
            self.saved = False
            return
        if not gate.is_cuda:
            self.host, self.saved = (gate.detach().clone(), up.detach().clone()), True
            return
        if self.pinned is None or self.pinned.numel() < 2 * gate.numel() or self.pinned.dtype != gate.dtype:
            self.pinned = None  # grown past the largest step seen: steps of other lengths reuse it (no new pinning)
            try:  # for the longest step expected, else (host memory short) for this one
                self.pinned = pin_buffer([2 * pinned_tokens(t) * gate.shape[-1]  # gate and up, of one shape
                                          for t in (max(tokens, self.reserve_tokens), tokens)], gate.dtype)
            except RuntimeError as err:  # pinned host memory exhausted: this layer recomputes as usual
                self.saved = False
                logger.warning("fmsaccel_foak: offload_mlp_activations: no pinned host memory for layer %d's "
                               "gate/up (%s); it recomputes them", self.index, err)
                return
        n = gate.numel()
        self.host = (self.pinned[:n].view(gate.shape), self.pinned[n: 2 * n].view(up.shape))
        retire_in_flight(keep=copies_running)
        stream = _side_stream(gate.device)
        stream.wait_stream(torch.cuda.current_stream(gate.device))
        with torch.cuda.stream(stream):
            for host, t in zip(self.host, (gate, up), strict=True):
                host.copy_(t.detach(), non_blocking=True)
            self.copied = torch.cuda.Event()
            self.copied.record(stream)
        _in_flight.append((self.copied, self.index, gate, up))
        self.saved = True

    @_outside_dispatch_modes
    def prefetch(self) -> None:
        """Start bringing the copies back (no-op when already on their way or nothing was saved)."""
        if not self.saved or self.on_device is not None:
            return
        if not self.host[0].is_pinned():
            self.on_device = self.host
            return
        device = torch.device("cuda", torch.cuda.current_device())
        back = tuple(torch.empty(h.shape, dtype=h.dtype, device=device) for h in self.host)
        stream = _side_stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))  # the buffers' allocation
        with torch.cuda.stream(stream):
            for t, host in zip(back, self.host, strict=True):
                t.copy_(host, non_blocking=True)  # no record_stream: see _in_flight; take() waits for the copy
            self.copied = torch.cuda.Event()
            self.copied.record(stream)
        self.on_device = back

    @_outside_dispatch_modes
    def take(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """gate/up for the recompute (waiting for their copy); None if none were saved this step."""
        if not self.saved:
            return None
        self.prefetch()
        if self.copied is not None:
            _compute_stream_waits_for(self.copied)
        taken, self.on_device, self.saved = self.on_device, None, False
        return taken


def pin_buffer(numels: list[int], dtype: torch.dtype) -> torch.Tensor:
    """A pinned host buffer of the first of ``numels`` that can be pinned; the last error if none can."""
    error = None
    for numel in dict.fromkeys(numels):
        try:
            return torch.empty(numel, dtype=dtype, pin_memory=True)
        except RuntimeError as err:
            error = err
    raise error


def pinned_tokens(tokens: int) -> int:
    """Tokens a pinned buffer is sized for: the next power of two, so a run's growing steps re-pin a few times."""
    return 1 << max(tokens - 1, 0).bit_length()


_streams: dict[torch.device, torch.cuda.Stream] = {}
# (copy done, layer index, gate, up) of the copies to the host not yet waited for. The tensors are held here, not
# handed to the allocator with record_stream: the host runs far ahead of the GPU, and every layer it queued would
# keep its gate/up allocated until the side stream caught up (9.6 GiB of them in s16c2's warm-up). Before each
# copy the compute stream waits for the earlier ones but those of the layers right below
# (:func:`copies_left_running`), which bounds what is held to two or three layers' gate/up: one copy (~17 ms at
# llama3-8b and 16k tokens, PCIe at 55 GB/s) outlasts one layer's forward (~12 ms), and waiting for the layer below
# would stall the GPU where offloaded layers are adjacent (and did, ~8 ms a P step, before each run of three in
# s18c4's profile, when only the one right below was left running). The same goes for the copies back (6 layers'
# pairs alive at s16c4's warm-up peak, 15.96 GiB): their buffers are the compute stream's own, which waits for each
# copy before using it.
_in_flight: list = []


def copies_left_running(index: int, n_layers: int) -> tuple[int, ...]:
    """The layers right below layer ``index`` whose copies to the host its MLP forward leaves running: two in the
    lower half of the decoder (a third pair held there stays under the backward's peak), one above."""
    return (index - 1, index - 2) if index < n_layers // 2 else (index - 1,)


def retire_in_flight(keep: Collection[int] = ()) -> None:
    """The compute stream waits for the copies to the host (but those of the layers in ``keep``), whose gate/up are
    released."""
    kept = [entry for entry in _in_flight if entry[1] in keep]
    for done, index, *_ in _in_flight:
        if index not in keep:
            _compute_stream_waits_for(done)
    _in_flight[:] = kept


def _compute_stream_waits_for(event) -> None:
    """Work queued from now on the current (compute) stream starts after ``event``; the host does not wait."""
    torch.cuda.current_stream().wait_event(event)


def _side_stream(device: torch.device):
    if device not in _streams:
        _streams[device] = torch.cuda.Stream(device)
    return _streams[device]


def offload_layers(mlps: list[nn.Module | None], count: int, min_tokens: int = 0,
                   reserve_tokens: int = 0) -> list[int]:
    """Give ``count`` of ``mlps`` an :class:`Offloaded`, evenly spread from the first layer up (the lower a layer,
    the later its backward: more time for its copies), the top eligible layer last of all: its recompute is the
    backward's first, with no recompute above it to start bringing its copies back (s18c2: a 17 ms stall a step).

    ``mlps``: every decoder layer's MLP, bottom up, None where it cannot be offloaded (not checkpointed, or its
    gate/up op saves something). Every MLP learns the nearest offloaded MLP below it, whose copies its recompute
    starts bringing back. Steps of fewer than ``min_tokens`` tokens offload nothing; the first pins host buffers for
    ``reserve_tokens`` (the longest step expected). Returns the chosen layer indices.
    """
    eligible = [index for index, mlp in enumerate(mlps) if mlp is not None]
    count = min(count, len(eligible))
    chosen = [eligible[i * len(eligible) // count] for i in range(count)]
    below = None
    for index, mlp in enumerate(mlps):
        if mlp is None:
            continue
        mlp._foak_offload_below = below
        if index in chosen:
            mlp._foak_offload = below = Offloaded(index, min_tokens, reserve_tokens)
    return chosen
