"""FMSACCEL_MEMORY's report: the allocator trace replayed to its peak, blocks grouped by allocating code."""

from __future__ import annotations

from fmsaccel_cli.memory import GIB, peak_report


def _frame(name: str, line: int = 1) -> list[dict]:
    return [{"filename": "/x/torch/autograd/function.py", "line": 9, "name": "apply"},  # plumbing: skipped
            {"filename": f"/repo/pkg/{name}.py", "line": line, "name": name}]


def _alloc(addr, size, name):
    return {"action": "alloc", "addr": addr, "size": size, "frames": _frame(name)}


def _free(addr, size):
    return {"action": "free_completed", "addr": addr, "size": size, "frames": []}


def test_peak_lists_what_is_alive_then_not_what_came_before_or_after():
    events = [
        _alloc(1, GIB // 2, "tokenizer_cache"),
        _free(1, GIB // 2),  # freed before the peak
        _alloc(2, 2 * GIB, "activations"),
        _alloc(3, 1 * GIB, "lm_head_gather"),  # the peak: 3 GiB on top of the 1 GiB baseline
        _free(3, 1 * GIB),
        _alloc(4, GIB // 2, "later"),  # after the peak, and smaller
    ]
    lines = peak_report(events, baseline=GIB).splitlines()
    assert lines[0].startswith("peak 4.00 GiB at event 3 of 6; allocated before training (weights, ...) 1.00 GiB")
    assert "2.000 GiB in     1 blocks  activations.py:1 activations" in lines[1]
    assert "1.000 GiB in     1 blocks  lm_head_gather.py:1 lm_head_gather" in lines[2]
    assert len(lines) == 3  # neither the freed cache nor the later block
    assert "function.py" not in "\n".join(lines)  # torch plumbing frames are left out


def test_blocks_from_the_same_code_are_summed_largest_first():
    events = [_alloc(i, GIB // 4, "small") for i in range(6)] + [_alloc(10, GIB, "big")]
    lines = peak_report(events, baseline=0).splitlines()
    assert lines[0].startswith("peak 2.50 GiB at event 6 of 7")
    assert "1.500 GiB in     6 blocks  small.py:1 small" in lines[1]
    assert "1.000 GiB in     1 blocks  big.py:1 big" in lines[2]


def test_freeing_a_block_allocated_before_recording_lowers_the_total():
    """The baseline's blocks (allocated before the history began) count out when they are freed."""
    events = [_alloc(1, GIB, "first"), _free(99, 2 * GIB), _alloc(2, 2 * GIB, "second")]
    lines = peak_report(events, baseline=2 * GIB).splitlines()
    assert lines[0].startswith("peak 3.00 GiB at event 0 of 3")  # 2 + 1, then 1 + 2 after the 2 GiB free
