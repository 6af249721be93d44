"""Shared fixtures: a private model cache and helpers to run the CLI in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session", autouse=True)
def _model_cache(tmp_path_factory):
    """Built-in shapes and compiled code go to per-session caches, never the user's.

    pytest keeps only its last few session folders, so repeated runs (each clone compiles anew) cannot fill the disk
    the way a shared /tmp/torchinductor_<user> does.
    """
    os.environ.setdefault("FMSACCEL_CACHE", str(tmp_path_factory.mktemp("fmsaccel-cache")))
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(tmp_path_factory.mktemp("torchinductor")))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def cli(*args: str, cwd: Path | None = None, timeout: int = 600, env: dict | None = None):
    """Run ``fmsaccel ARGS`` as a user would; returns the CompletedProcess (text)."""
    return subprocess.run(
        [sys.executable, "-m", "fmsaccel_cli.main", *args],
        cwd=cwd or REPO, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})},
    )
