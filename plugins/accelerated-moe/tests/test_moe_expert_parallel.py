"""Expert parallelism with 2 processes on gloo: sharded experts equal the unsharded block."""

from __future__ import annotations

import socket

import moe_ep_worker
import pytest
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("backend", ["triton", "grouped_mm"])
def test_ep2_equals_unsharded_experts_with_gradients_clipping_and_gather(backend):
    mp.spawn(moe_ep_worker.check_experts, args=(2, _free_port(), backend), nprocs=2)


def test_ep2_plugin_matches_the_unsharded_model_and_saves_full_experts(tmp_path):
    mp.spawn(moe_ep_worker.check_plugin, args=(2, _free_port(), str(tmp_path / "ckpt")), nprocs=2)
