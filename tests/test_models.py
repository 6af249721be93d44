"""Built-in shapes: each builds the real architecture at its published size, without allocating weights."""

from __future__ import annotations

import pytest
import torch

from fmsaccel_cli import models

# parameter counts of the published checkpoints (billions), embeddings included
PUBLISHED = {"llama3-8b": 8.03, "llama3-70b": 70.55, "llama3.2-1b": 1.24, "mistral-7b": 7.25, "qwen2.5-7b": 7.62,
             "granite-8b": 8.17, "mixtral-8x7b": 46.70, "granite-3.0-3b-a800m": 3.37}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_real_shapes_have_their_published_size(name):
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(models.build_config(name))
    billions = sum(p.numel() for p in model.parameters()) / 1e9
    assert billions == pytest.approx(PUBLISHED[name], rel=0.02), billions


def test_every_real_shape_is_covered():
    assert {n for n in models.SHAPES if not n.startswith("tiny-")} == set(PUBLISHED)
