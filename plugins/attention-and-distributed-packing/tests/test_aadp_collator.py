"""The padding-free collator: one row, positions restarting per example, boundaries masked."""

import pytest
import torch

from fmsaccel_aadp.collator import IGNORE_INDEX, PaddingFreeCollator, collate_padding_free, example_labels


def test_one_row_with_restarting_positions_and_cu_seqlens():
    rows = [{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}, {"input_ids": [4, 5], "labels": [4, 5]},
            {"input_ids": [6], "labels": [6]}]
    batch = collate_padding_free(rows)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5, 6]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0]]
    # the first label of every example is ignored: no prediction across a boundary
    assert batch["labels"].tolist() == [[-100, 2, 3, -100, 5, -100]]
    assert batch["cu_seq_lens_q"].tolist() == [0, 3, 5, 6]
    assert batch["cu_seq_lens_q"].dtype == torch.int32
    assert batch["cu_seq_lens_k"] is batch["cu_seq_lens_q"]
    assert batch["max_length_q"] == batch["max_length_k"] == 3
    assert "attention_mask" not in batch  # every token is real


def test_label_forms_trl_produces():
    ids = [10, 11, 12, 13]
    assert example_labels({"input_ids": ids}) == ids
    assert example_labels({"input_ids": ids, "completion_mask": [0, 0, 1, 1]}) == [-100, -100, 12, 13]
    assert example_labels({"input_ids": ids, "assistant_masks": [0, 1, 1, 0]}) == [-100, 11, 12, -100]
    assert example_labels({"input_ids": ids, "labels": [-100, 11, -100, 13], "completion_mask": [0, 0, 0, 0]}) == [
        -100, 11, -100, 13]
    with pytest.raises(ValueError, match="differ in length"):
        example_labels({"input_ids": ids, "labels": [1]})


def test_rows_trl_already_packed_keep_their_boundaries():
    rows = [{"input_ids": [1, 2, 3, 4, 5], "labels": [1, 2, 3, 4, 5], "seq_lengths": [2, 3]},
            {"input_ids": [6, 7], "labels": [6, 7]}]
    batch = collate_padding_free(rows)
    assert batch["position_ids"].tolist() == [[0, 1, 0, 1, 2, 0, 1]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 2, IGNORE_INDEX, 4, 5, IGNORE_INDEX, 7]]
    assert batch["cu_seq_lens_q"].tolist() == [0, 2, 5, 7]
    with pytest.raises(ValueError, match="do not add up"):
        collate_padding_free([{"input_ids": [1, 2, 3], "seq_lengths": [1, 1]}])


def test_empty_examples_are_skipped_and_nothing_is_an_error():
    batch = collate_padding_free([{"input_ids": [], "labels": []}, {"input_ids": [3, 4], "labels": [3, 4]}])
    assert batch["cu_seq_lens_q"].tolist() == [0, 2]
    with pytest.raises(ValueError):
        collate_padding_free([])
    with pytest.raises(ValueError):
        collate_padding_free([{"input_ids": []}])


def test_collator_object_ignores_extra_columns():
    batch = PaddingFreeCollator()([{"input_ids": [1, 2], "labels": [1, 2], "text": "hi"}])
    assert batch["input_ids"].shape == (1, 2)


def test_bucket_ladder_is_short_and_tight():
    from fmsaccel_aadp.collator import BUCKET_ALIGN, bucket_length

    ladder = sorted({bucket_length(n) for n in range(1, 8193)})
    assert len(ladder) <= 24  # a handful of shapes (CUDA graph recordings) for a whole run
    assert all(b % BUCKET_ALIGN == 0 for b in ladder)
    for n in (1, 63, 64, 65, 300, 1000, 1025, 4096, 4097, 8000):
        assert n <= bucket_length(n) <= max(1.22 * n, n + BUCKET_ALIGN)


@pytest.mark.parametrize("lengths", [(5, 3, 9), (1,), (40, 40, 40, 40, 40, 40, 40, 40), (100, 7)])
def test_bucketed_rows_add_only_filler_examples(lengths):
    from fmsaccel_aadp.collator import DOC_MULTIPLE, bucket_length

    rows = [{"input_ids": list(range(1, n + 1))} for n in lengths]
    plain, bucketed = collate_padding_free(rows), collate_padding_free(rows, bucket_lengths=True)
    real = sum(lengths)
    total = bucketed["input_ids"].shape[1]
    cu = bucketed["cu_seq_lens_q"]
    assert total == bucket_length(total) and total > real
    assert bucketed["num_padding_tokens"] == total - real and "num_padding_tokens" not in plain
    assert bucketed["max_length_q"] == bucketed["max_length_k"] == total  # fixed per bucket, an upper bound
    # the real examples come first, unchanged; the filler examples are never empty and carry no labels
    for key in ("input_ids", "labels", "position_ids"):
        assert bucketed[key][0, :real].tolist() == plain[key][0].tolist()
    assert cu[: len(lengths) + 1].tolist() == plain["cu_seq_lens_q"].tolist()
    assert (cu.numel() - 1) % DOC_MULTIPLE == 0 and cu.numel() - 1 > len(lengths)
    assert (cu.diff() > 0).all() and int(cu[-1]) == total
    assert (bucketed["labels"][0, real:] == IGNORE_INDEX).all()
    starts = torch.repeat_interleave(cu[:-1].long(), cu.diff().long())
    assert bucketed["position_ids"][0].tolist() == (torch.arange(total) - starts).tolist()
    assert PaddingFreeCollator(bucket_lengths=True)(rows)["input_ids"].shape == bucketed["input_ids"].shape
