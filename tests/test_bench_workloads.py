"""The synthetic benchmark workloads P and R: shapes, statistics, determinism."""

from __future__ import annotations

import math
import statistics

import pytest

from fmsaccel_cli.workloads import FIRST_TOKEN_ID, build_workload, workload_lengths, workload_name


def test_p_is_every_example_exactly_max_length():
    rows = build_workload("P", vocab_size=1000, num_examples=5)
    assert [len(r["input_ids"]) for r in rows] == [4096] * 5
    assert [len(r["input_ids"]) for r in build_workload("workload:P", 1000, 3, max_length=256)] == [256] * 3
    for row in rows:
        assert row["labels"] == row["input_ids"] and row["labels"] is not row["input_ids"]
        assert FIRST_TOKEN_ID <= min(row["input_ids"]) and max(row["input_ids"]) < 1000


def test_r_lengths_are_lognormal_clipped():
    lengths = workload_lengths("R", num_examples=4000)
    assert min(lengths) >= 32 and max(lengths) <= 2048
    assert 255 < statistics.mean(lengths) < 285  # exp(5.4 + 0.6^2 / 2) ~ 265, a little more after clipping at 32
    assert abs(statistics.median(math.log(n) for n in lengths) - 5.4) < 0.05
    assert len(set(lengths)) > 300  # genuinely varied: padding matters
    assert max(workload_lengths("R", 2000, max_length=128)) == 128


def test_workloads_are_deterministic_for_a_seed():
    assert build_workload("R", 500, 20, seed=7) == build_workload("R", 500, 20, seed=7)
    assert build_workload("R", 500, 20, seed=7) != build_workload("R", 500, 20, seed=8)
    # lengths do not depend on the vocabulary, so one workload means the same shapes on every model
    assert workload_lengths("R", 50, seed=3) == [len(r["input_ids"]) for r in build_workload("R", 32000, 50, seed=3)]


def test_names_and_errors():
    assert workload_name("workload:R") == "R" and workload_name("data/train.jsonl") is None
    with pytest.raises(ValueError, match="unknown workload 'Q'"):
        build_workload("Q", 1000, 1)
    with pytest.raises(ValueError, match="vocab_size must exceed"):
        build_workload("P", 3, 1)
