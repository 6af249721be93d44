"""fmsaccel_cli.files.atomic_write: a per-process temporary name, and a failed write leaves the old file."""

from __future__ import annotations

import os

import pytest

from fmsaccel_cli import files
from fmsaccel_cli.bench import runner


def test_writes_the_text_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "results.csv"
    target.write_text("old\n")
    files.atomic_write(target, "new\n")
    assert target.read_text() == "new\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.csv"]


def test_the_temporary_name_is_per_process(tmp_path, monkeypatch):
    target = tmp_path / "results.jsonl"
    renamed = []
    real_replace = os.replace
    monkeypatch.setattr(files.os, "replace", lambda src, dst: renamed.append(src) or real_replace(src, dst))
    pid = os.getpid()
    files.atomic_write(target, "a")
    monkeypatch.setattr(files.os, "getpid", lambda: 4242)  # another process
    files.atomic_write(target, "b")
    assert [p.name for p in renamed] == [f".results.jsonl.{pid}.tmp", ".results.jsonl.4242.tmp"]
    assert all(p.parent == tmp_path for p in renamed)  # beside the target: the rename stays on one filesystem
    assert target.read_text() == "b"


@pytest.mark.parametrize("failing", ["fsync", "replace"])
def test_a_failed_write_leaves_the_old_file_intact(tmp_path, monkeypatch, failing):
    target = tmp_path / "results.csv"
    target.write_text("old\n")

    def fail(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files.os, failing, fail)
    with pytest.raises(OSError):
        files.atomic_write(target, "new\n")
    assert target.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.csv"]  # the temporary is removed


def test_the_bench_uses_the_shared_helper():
    assert runner.atomic_write is files.atomic_write
