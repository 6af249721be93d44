"""The standard GPTQ layout: our pack/unpack against a reference built bit by bit from its description."""

from __future__ import annotations

import pytest
import torch

from fmsaccel_peft.gptq import packing


def _int32(word: int) -> int:
    return word - 2**32 if word >= 2**31 else word


def _hand_qweight(intweight: torch.Tensor) -> torch.Tensor:
    """qweight[i, o] holds input rows 8i..8i+7 of output column o, row 8i+j at bits 4j."""
    out_features, in_features = intweight.shape
    words = [[_int32(sum(int(intweight[o, 8 * i + j]) << (4 * j) for j in range(8))) for o in range(out_features)]
             for i in range(in_features // 8)]
    return torch.tensor(words, dtype=torch.int32)


def _hand_qzeros(stored: torch.Tensor) -> torch.Tensor:
    """qzeros[g, c] holds the stored zero points of output columns 8c..8c+7, column 8c+j at bits 4j."""
    groups, out_features = stored.shape
    words = [[_int32(sum(int(stored[g, 8 * c + j]) << (4 * j) for j in range(8))) for c in range(out_features // 8)]
             for g in range(groups)]
    return torch.tensor(words, dtype=torch.int32)


@pytest.mark.parametrize("checkpoint_format", ["gptq", "gptq_v2"])
@pytest.mark.parametrize("act_order", [False, True])
def test_pack_matches_hand_built_layout_and_round_trips(checkpoint_format, act_order):
    g = torch.Generator().manual_seed(1)
    in_features, out_features, group_size = 48, 24, 16
    groups = in_features // group_size
    intweight = torch.randint(0, 16, (out_features, in_features), generator=g)
    intweight[0, :8] = 15  # a word with the sign bit set must survive as a negative int32
    lowest = 0 if checkpoint_format == "gptq_v2" else 1  # v1 stores zero - 1: zero 0 cannot be stored
    zeros = torch.randint(lowest, 16, (groups, out_features), generator=g)
    scales = torch.rand(groups, out_features, generator=g) * 0.1
    g_idx = packing.sequential_g_idx(in_features, group_size)
    if act_order:
        g_idx = g_idx[torch.randperm(in_features, generator=g)]

    tensors = packing.pack(intweight, zeros, scales, g_idx, checkpoint_format)

    offset = 1 if checkpoint_format == "gptq" else 0
    assert torch.equal(tensors["qweight"], _hand_qweight(intweight))
    assert torch.equal(tensors["qzeros"], _hand_qzeros(zeros - offset))
    assert tensors["qweight"].dtype == tensors["qzeros"].dtype == torch.int32
    assert tensors["scales"].dtype == torch.float16 and torch.equal(tensors["g_idx"], g_idx.int())
    assert tensors["qweight"].min() < 0  # the sign-bit word

    back_weight, back_zeros = packing.unpack(tensors["qweight"], tensors["qzeros"], checkpoint_format)
    assert torch.equal(back_weight, intweight.int()) and torch.equal(back_zeros, zeros.int())

    expected = torch.empty(out_features, in_features)
    for o in range(out_features):
        for k in range(in_features):
            gi = int(g_idx[k])
            expected[o, k] = float(tensors["scales"][gi, o]) * (int(intweight[o, k]) - int(zeros[gi, o]))
    dequantized = packing.dequantize_torch(tensors["qweight"], tensors["scales"], tensors["qzeros"], tensors["g_idx"],
                                           zero_offset=offset)
    torch.testing.assert_close(dequantized, expected, rtol=0, atol=1e-6)


def test_v1_reads_the_all_ones_nibble_as_sixteen():
    """v1 readers add one to the stored nibble; 0xF (what old writers left for zero 0) means 16."""
    qzeros = torch.full((1, 1), -1, dtype=torch.int32)  # eight nibbles of 0xF
    assert torch.equal(packing.unpack_cols(qzeros) + packing.zero_offset("gptq"), torch.full((1, 8), 16))


def test_v1_refuses_zero_point_zero_and_unknown_formats():
    args = (torch.zeros(8, 8, dtype=torch.int64), torch.zeros(1, 8, dtype=torch.int64), torch.ones(1, 8),
            torch.zeros(8, dtype=torch.int32))
    with pytest.raises(ValueError, match="zero point 0"):
        packing.pack(*args, checkpoint_format="gptq")
    assert packing.pack(*args, checkpoint_format="gptq_v2")["qzeros"].abs().sum() == 0
    with pytest.raises(ValueError, match="unknown GPTQ checkpoint format 'marlin'"):
        packing.zero_offset("marlin")


def test_group_size_minus_one_is_one_group():
    assert packing.num_groups(100, -1) == 1 and packing.num_groups(136, 32) == 5
    assert packing.sequential_g_idx(24, -1).eq(0).all()
    assert packing.sequential_g_idx(24, 8).tolist() == [k // 8 for k in range(24)]
