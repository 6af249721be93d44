"""foak tests: shared helpers and fixtures. Without a GPU the Triton kernels run under Triton's interpreter,
switched on by the repository's root ``conftest.py`` before any kernel is decorated.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

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
