"""MoE tests: shared helpers on the path. Without a GPU the Triton kernels run under Triton's interpreter,
switched on by the repository's root ``conftest.py`` before any kernel is decorated.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))  # moe_testing (shared helpers) under --import-mode=importlib
