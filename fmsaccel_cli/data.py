"""Training data: local files or the shipped default, tokenised with response-only labels.

Rows are tokenised here, once, into ``input_ids`` + ``labels`` (-100 where no loss
is counted), so every plugin and collator sees the same thing and TRL's own
preparation is skipped. Formats: alpaca (``instruction``/``input``/``output``),
chat (``messages``), plain text (``dataset_text_field`` or ``text``), or already
tokenised rows (``input_ids``, optional ``labels``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .models import ASSETS

BUILTIN = {"builtin:word-tasks": ASSETS / "word_tasks.jsonl"}
ALPACA_PROMPT = "### Instruction:\n{instruction}\n\n### Input:\n{input}"
ALPACA_PROMPT_NO_INPUT = "### Instruction:\n{instruction}"


class DataError(ValueError):
    """Bad or unreadable training data; the message names the file and the problem."""


def check_path(path: Any) -> Path | str:
    """The file or folder of a data path, or the workload name; a DataError when there is no such data."""
    from .workloads import WORKLOADS, workload_name

    where = f"a local .json/.jsonl file, a datasets folder, {', '.join(BUILTIN)}, or workload:{'|'.join(WORKLOADS)}"
    if not isinstance(path, str) or not path:
        raise DataError(f"no training data given (training_data_path is {path!r}): {where}")
    name = workload_name(path)
    if name is not None:
        if name.upper() not in WORKLOADS:
            raise DataError(f"unknown workload '{name}': {where}")
        return name
    file = BUILTIN.get(path, Path(path).expanduser())
    if not file.exists():
        raise DataError(f"training data '{path}' not found: {where}")
    return file


def load_rows(path: str, args: dict[str, Any], vocab_size: int) -> list[dict]:
    file = check_path(path)
    limit = args.get("num_train_examples")
    if isinstance(file, str):  # a benchmark workload
        from .workloads import build_workload

        return build_workload(file, vocab_size=vocab_size, num_examples=int(limit or _workload_examples(args)),
                              seed=int(args.get("seed", 42)), max_length=int(args.get("max_seq_length") or 4096))
    rows = _read_rows(file)
    return rows[: int(limit)] if limit else rows


def _read_rows(file: Path) -> list[dict]:
    if file.is_dir():
        import datasets

        try:
            ds = datasets.load_from_disk(str(file))
        except Exception as e:  # noqa: BLE001 - datasets raises many kinds; the user needs one line
            raise DataError(f"{file}: not a saved datasets folder ({e})") from None
        if isinstance(ds, datasets.DatasetDict):
            ds = ds["train"] if "train" in ds else next(iter(ds.values()))
        return list(ds)
    text = file.read_text()
    try:
        if file.suffix == ".jsonl":
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            rows = json.loads(text)
            rows = rows.get("train", rows.get("data", rows)) if isinstance(rows, dict) else rows
    except json.JSONDecodeError as e:
        raise DataError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(rows, list) or not rows or not isinstance(rows[0], dict):
        raise DataError(f"{file}: expected a list of JSON objects")
    return rows


def _workload_examples(args: dict[str, Any]) -> int:
    """Independent of batch size and world size, so 1- and N-GPU runs draw from the same data."""
    return max(int(args.get("max_steps") or 20), 1) * 64


def tokenize_rows(rows: list[dict], tokenizer, args: dict[str, Any]) -> list[dict]:
    max_len = int(args.get("max_seq_length") or args.get("max_length") or 1024)
    template = args.get("response_template")
    field = args.get("dataset_text_field")
    out = []
    for i, row in enumerate(rows):
        if "input_ids" in row:
            ids = list(row["input_ids"])
            labels = list(row.get("labels", ids))
        elif "instruction" in row:
            fmt = ALPACA_PROMPT if row.get("input") else ALPACA_PROMPT_NO_INPUT
            prompt = fmt.format(**row) + (template if template is not None else "\n\n### Response:")
            ids, labels = _prompt_completion(tokenizer, prompt, " " + str(row.get("output", "")))
        elif "messages" in row:
            ids, labels = _chat(tokenizer, row["messages"])
        else:
            key = field if field in row else "text"
            if key not in row:
                raise DataError(f"row {i} has none of: instruction, messages, input_ids, text, {field} "
                                f"(its keys: {', '.join(row)})")
            text = str(row[key])
            if template and template in text:
                cut = text.index(template) + len(template)
                ids, labels = _prompt_completion(tokenizer, text[:cut], text[cut:])
            else:
                ids = _encode(tokenizer, text, eos=True)
                labels = list(ids)
        out.append({"input_ids": ids[:max_len], "labels": labels[:max_len]})
    return out


def _encode(tokenizer, text: str, eos: bool = False, bos: bool = False) -> list[int]:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if bos and tokenizer.bos_token_id is not None:
        ids = [tokenizer.bos_token_id] + ids
    if eos and tokenizer.eos_token_id is not None:
        ids = ids + [tokenizer.eos_token_id]
    return ids


def _prompt_completion(tokenizer, prompt: str, completion: str, bos: bool = True) -> tuple[list[int], list[int]]:
    p = _encode(tokenizer, prompt, bos=bos)
    c = _encode(tokenizer, completion, eos=True)
    return p + c, [-100] * len(p) + c


def _chat(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """Loss on the last assistant turn (the prompt is every message before it)."""
    if not messages or messages[-1].get("role") != "assistant":
        raise DataError("a 'messages' row must end with an assistant message")
    prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    if not full.startswith(prompt):
        return _prompt_completion(tokenizer, prompt, messages[-1]["content"], bos=False)
    return _prompt_completion(tokenizer, prompt, full[len(prompt):], bos=False)
