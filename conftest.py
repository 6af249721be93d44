"""Loaded by pytest before any test module or plugin conftest, whatever subset of the suite runs.

Without a GPU the Triton kernels run under Triton's interpreter, which must be on before a kernel
is decorated: a module imported by one plugin's tests (aadp's import foak's kernels, say) would
otherwise decorate them for a GPU, and another plugin's tests would then fail on them.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
