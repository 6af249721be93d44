"""Where a profiled step leaves the GPU idle, and which host waits come right before (``FMSACCEL_PROFILE=1``).

The kernel table says what the GPU spends its time on; a GPU-paced step gains as much from
closing the gaps between kernels. A gap opens when the host has queued nothing more: it
was behind (Python between launches), or it had been waiting for the GPU to drain (a host
sync: ``.item()``, a copy to pageable memory) and only starts queueing again now. Each gap
is put down to the host sync that returned as it opened, named by the first Python frames
outside torch that asked for it (``FMSACCEL_PROFILE=stack``), else by the ops it ran under.
"""

from __future__ import annotations

import collections

SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy")
MIN_GAP_US = 20.0  # shorter gaps are launch latency between back-to-back kernels
SYNC_SLACK_US = 200.0  # a sync returning this long after a gap opened still caused it


def _is_kernel(event) -> bool:
    return str(getattr(event, "device_type", "")).endswith("CUDA") and not event.name.startswith(("Memcpy", "Memset"))


def _call_site(event, frames: int = 2) -> str:
    """The innermost Python frames outside torch that led to ``event``, else the ops it ran under.

    The profiler records Python frames only with ``with_stack`` (``FMSACCEL_PROFILE=stack``):
    as a stack on an op, or (recent torch) as the op's ancestor events, one per Python call,
    named ``file(line): function``.
    """
    stack, ops, parent = [], [], getattr(event, "cpu_parent", None)
    while parent is not None:
        python = getattr(parent, "stack", None) or ([parent.name] if "): " in parent.name else [])
        stack += python
        if not python and not parent.name.startswith("<built-in"):
            ops.append(parent.name)
        parent = getattr(parent, "cpu_parent", None)
    own = [f for f in stack if "torch/" not in f and not f.startswith("<built-in")]
    return " < ".join(own[:frames] or stack[:1] or ops[:frames]) or "no caller recorded"


def idle_gaps(kernels: list[tuple[float, float, str]]) -> list[tuple[float, float, str, str]]:
    """``(start, end, kernel before, kernel after)`` of every stretch without a running kernel (µs, sorted input)."""
    gaps, busy_until, last = [], None, ""
    for start, end, name in kernels:
        if busy_until is not None and start - busy_until >= MIN_GAP_US:
            gaps.append((busy_until, start, last, name))
        if busy_until is None or end > busy_until:
            busy_until, last = end, name
    return gaps


def gpu_idle_summary(events, steps: int = 2, top: int = 10) -> str:
    """Idle time between kernels over ``steps`` profiled steps, by the host sync behind each gap."""
    kernels = sorted((e.time_range.start, e.time_range.end, e.name) for e in events if _is_kernel(e))
    if not kernels:
        return "GPU idle: no kernels in the profile"
    syncs = sorted((e.time_range.end, e) for e in events
                   if not _is_kernel(e) and e.name.startswith(SYNC_CALLS))
    gaps = idle_gaps(kernels)
    wall = kernels[-1][1] - kernels[0][0]
    idle = sum(end - start for start, end, *_ in gaps)
    by_site: dict[str, list[float]] = collections.defaultdict(list)
    rows = []
    for start, end, before, after in gaps:
        cause = next((e for returned, e in syncs if start - 50.0 <= returned <= start + SYNC_SLACK_US), None)
        site = f"{cause.name} from {_call_site(cause)}" if cause is not None else "host behind (no sync)"
        by_site[site].append(end - start)
        rows.append((end - start, start - kernels[0][0], before, after, site))
    lines = [f"GPU idle between kernels: {idle / 1e3 / steps:.1f} ms a step ({100 * idle / wall:.1f} % of "
             f"{wall / 1e3 / steps:.0f} ms), {len(gaps) / steps:.0f} gaps of {MIN_GAP_US:.0f}+ us a step"]
    lines.append("  by cause (ms a step, gaps):")
    for site, lengths in sorted(by_site.items(), key=lambda kv: -sum(kv[1]))[:top]:
        lines.append(f"    {sum(lengths) / 1e3 / steps:7.2f}  {len(lengths):5d}  {site[:160]}")
    lines.append("  longest gaps (ms, at ms, kernel before -> after, cause):")
    for length, at, before, after, site in sorted(rows, reverse=True)[:top]:
        lines.append(f"    {length / 1e3:6.2f} at {at / 1e3:8.1f}  {before[:40]} -> {after[:40]}  ({site[:100]})")
    return "\n".join(lines)
