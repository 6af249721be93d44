"""Training data formats: alpaca, chat, text with a response template, pre-tokenised rows, datasets folders."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from fmsaccel_cli import data
from fmsaccel_cli.models import TOKENIZER_DIR

ARGS = {"max_seq_length": 128, "response_template": "\n### Response:", "dataset_text_field": "output"}


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(TOKENIZER_DIR)


def _loss_text(tokenizer, row) -> str:
    return tokenizer.decode([t for t, lab in zip(row["input_ids"], row["labels"], strict=True) if lab != -100])


def test_alpaca_rows_count_loss_on_the_response_only(tokenizer):
    rows = data.tokenize_rows([{"instruction": "Reverse the order of the words.", "input": "cat dog",
                                "output": "dog cat"}], tokenizer, ARGS)
    assert _loss_text(tokenizer, rows[0]) == " dog cat<|end_of_text|>"
    assert tokenizer.decode(rows[0]["input_ids"]).startswith("<|begin_of_text|>### Instruction:")


def test_text_rows_split_at_the_response_template(tokenizer):
    text = "### Instruction:\nSay hi\n### Response: hi there"
    rows = data.tokenize_rows([{"output": text}, {"text": "no template here"}], tokenizer, ARGS)
    assert _loss_text(tokenizer, rows[0]) == " hi there<|end_of_text|>"
    assert _loss_text(tokenizer, rows[1]) == "no template here<|end_of_text|>"  # no template: every token counts


def test_chat_rows_count_loss_on_the_last_assistant_turn(tokenizer):
    messages = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    rows = data.tokenize_rows([{"messages": messages}], tokenizer, ARGS)
    assert _loss_text(tokenizer, rows[0]).startswith("4")
    with pytest.raises(data.DataError, match="must end with an assistant message"):
        data.tokenize_rows([{"messages": messages[:1]}], tokenizer, ARGS)


def test_pretokenised_rows_are_truncated_and_unknown_rows_rejected(tokenizer):
    rows = data.tokenize_rows([{"input_ids": list(range(300))}], tokenizer, ARGS)
    assert len(rows[0]["input_ids"]) == 128 and rows[0]["labels"] == rows[0]["input_ids"]
    with pytest.raises(data.DataError, match="row 0 has none of"):
        data.tokenize_rows([{"question": "?"}], tokenizer, ARGS)


def test_local_files_and_datasets_folders_load(tmp_path):
    rows = [{"instruction": "a", "input": "", "output": "b"}] * 3
    (tmp_path / "d.json").write_text(json.dumps(rows))
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    import datasets

    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "folder"))
    for path in ("d.json", "d.jsonl", "folder"):
        assert data.load_rows(str(tmp_path / path), {}, vocab_size=1024) == rows
    assert len(data.load_rows("builtin:word-tasks", {"num_train_examples": 5}, vocab_size=1024)) == 5
    with pytest.raises(data.DataError, match="not found"):
        data.load_rows(str(tmp_path / "missing.json"), {}, vocab_size=1024)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(data.DataError, match="not valid JSON"):
        data.load_rows(str(tmp_path / "bad.json"), {}, vocab_size=1024)


def test_workloads_are_pretokenised_and_independent_of_batch_size():
    args = {"max_steps": 3, "per_device_train_batch_size": 2, "seed": 1}
    a = data.load_rows("workload:R", args, vocab_size=1000)
    b = data.load_rows("workload:R", {**args, "per_device_train_batch_size": 8}, vocab_size=1000)
    assert a == b and len(a) == 3 * 64 and all(32 <= len(r["input_ids"]) <= 2048 for r in a)
