"""Expert parallelism with 2 processes on gloo: sharded experts equal the unsharded block."""

from __future__ import annotations

import moe_ep_worker
import pytest
import torch.multiprocessing as mp


@pytest.mark.parametrize("backend", ["triton", "grouped_mm"])
def test_ep2_equals_unsharded_experts_with_gradients_clipping_and_gather(backend, tmp_path):
    mp.spawn(moe_ep_worker.check_experts, args=(2, str(tmp_path / "rendezvous"), backend), nprocs=2)


def test_ep2_plugin_matches_the_unsharded_model_and_saves_full_experts(tmp_path):
    mp.spawn(moe_ep_worker.check_plugin, args=(2, str(tmp_path / "rendezvous"), str(tmp_path / "ckpt")), nprocs=2)
