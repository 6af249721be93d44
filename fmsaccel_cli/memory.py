"""What is alive at a run's peak GPU memory: ``FMSACCEL_MEMORY=1`` (CUDA only).

torch's allocator history (``torch.cuda.memory._record_memory_history``) records every
allocation (with its Python stack) and free from the start of training. At the end of the
warm-up steps the history is replayed to the moment the allocated total was highest, and
the blocks alive then are listed, largest first, each with the innermost frames of the
code that allocated it. What was allocated before training (the model's weights) is
one line, the baseline. The report is ``memory_peak.txt`` in the output directory.
"""

from __future__ import annotations

from collections.abc import Iterable

GIB = 1024**3
_SKIP_FILES = ("torch/utils/_", "torch/autograd/", "torch/_", "contextlib.py", "functools.py")


def _frames(frames: list[dict], depth: int) -> str:
    """The innermost ``depth`` Python frames that are not torch plumbing, innermost first."""
    shown = [f"{f['filename'].rsplit('/', 2)[-1]}:{f['line']} {f['name']}" for f in frames
             if f.get("filename", "").endswith(".py") and not any(s in f["filename"] for s in _SKIP_FILES)]
    return " < ".join(shown[:depth]) or "(no Python frame)"


def peak_report(events: Iterable[dict], baseline: int, top: int = 15, depth: int = 3) -> str:
    """Replay allocator trace ``events`` (``alloc`` / ``free_completed``) on top of ``baseline`` bytes.

    Returns a text report: the peak, when it happened, and the largest blocks alive then,
    grouped by allocating stack.
    """
    events = list(events)
    total = peak = baseline
    peak_at = -1
    for i, ev in enumerate(events):
        if ev["action"] == "alloc":
            total += ev["size"]
            if total > peak:
                peak, peak_at = total, i
        elif ev["action"] == "free_completed":  # blocks of the baseline too: they leave the total when freed
            total -= ev["size"]
    alive: dict[int, int] = {}  # addr -> index of its alloc event, at the peak
    for ev_index, ev in enumerate(events[: peak_at + 1]):
        if ev["action"] == "alloc":
            alive[ev["addr"]] = ev_index
        elif ev["action"] == "free_completed":
            alive.pop(ev["addr"], None)
    groups: dict[str, list[int]] = {}
    for index in alive.values():
        where = _frames(events[index].get("frames", []), depth)
        groups.setdefault(where, []).append(events[index]["size"])
    rows = sorted(groups.items(), key=lambda kv: -sum(kv[1]))
    lines = [f"peak {peak / GIB:.2f} GiB at event {peak_at} of {len(events)}; allocated before training "
             f"(weights, ...) {baseline / GIB:.2f} GiB; alive at the peak, by allocating code:"]
    for where, sizes in rows[:top]:
        lines.append(f"  {sum(sizes) / GIB:7.3f} GiB in {len(sizes):5d} blocks  {where}")
    rest = sum(sum(s) for _, s in rows[top:])
    if rest:
        lines.append(f"  {rest / GIB:7.3f} GiB in {sum(len(s) for _, s in rows[top:]):5d} blocks  (the rest)")
    return "\n".join(lines)


def start_recording() -> int:
    """Start the allocator history; returns the bytes already allocated (the baseline)."""
    import torch

    # stacks of allocations only: capturing one at a free, which can happen while an exception unwinds, made
    # autograd functions fail on the H100 ("returned NULL without setting an exception"); the report needs none
    torch.cuda.memory._record_memory_history(max_entries=1_000_000, context="alloc", stacks="python")
    return torch.cuda.memory_allocated()


def stop_and_report(baseline: int) -> str:
    """Stop the history and report the peak of what it recorded (this process's current device)."""
    import torch

    snapshot = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    device = torch.cuda.current_device()
    return peak_report(snapshot["device_traces"][device], baseline)
