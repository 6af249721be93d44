"""Kernel helpers shared by the plugins: how a kernel object tells whether Triton interprets it."""

from __future__ import annotations

import pytest

pytest.importorskip("triton")

from fmsaccel_framework.triton_utils import is_interpreted  # noqa: E402


class InterpretedFunction:  # the name is what Triton's interpreter gives its kernel objects
    fn = staticmethod(lambda: None)


class Autotuner:
    def __init__(self, fn):
        self.fn = fn


def test_is_interpreted_sees_the_kernel_and_an_autotuner_around_it():
    assert is_interpreted(InterpretedFunction())
    assert is_interpreted(Autotuner(InterpretedFunction()))
    assert not is_interpreted(Autotuner(lambda: None))
    assert not is_interpreted(lambda: None)
