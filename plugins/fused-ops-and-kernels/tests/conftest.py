"""foak tests run the Triton kernels on the CPU through Triton's interpreter when there is no GPU.

The interpreter must be chosen before any kernel is decorated, so this sets it before
anything imports triton (pytest loads this file before the test modules).
"""

from __future__ import annotations

import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))  # foak_testing (shared helpers) under --import-mode=importlib


@pytest.fixture(autouse=True)
def _restore_function_patches():
    """RoPE patches a transformers module function process-wide; put it back after each test."""
    yield
    from fmsaccel_foak.patching import undo_function_patches

    undo_function_patches()


@pytest.fixture(autouse=True)
def _one_cpu_thread():
    """Tiny shapes: torch's spinning OpenMP workers only fight bitsandbytes' CPU kernels (3x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
