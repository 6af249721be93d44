"""MoE tests run the Triton kernels on the CPU through Triton's interpreter when there is no GPU.

The interpreter must be chosen before any kernel is decorated, so this sets it before
anything imports triton (pytest loads this file before the test modules).
"""

from __future__ import annotations

import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(__file__))  # moe_testing (shared helpers) under --import-mode=importlib
