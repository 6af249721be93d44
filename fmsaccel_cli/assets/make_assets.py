"""Regenerate the embedded default's data and tokenizer (deterministic).

    python -m fmsaccel_cli.assets.make_assets

The data are synthetic word tasks (reverse, sort, copy, count, first/last) whose
answers follow from the input, so the loss visibly falls within a minute of
training a tiny random model. The tokenizer is a small byte-level BPE trained
on that data; being byte-level it also encodes any user text.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).parent
WORDS = (
    "apple banana cherry grape lemon mango melon olive peach pear plum berry kiwi lime fig date "
    "red blue green black white gold silver pink brown grey "
    "cat dog fox owl bee ant cow pig hen yak elk emu "
    "sun moon star rain snow wind fire ice rock sand tree leaf "
    "one two three four five six seven eight nine ten"
).split()

TASKS = {
    "Reverse the order of the words.": lambda ws: " ".join(reversed(ws)),
    "Sort the words alphabetically.": lambda ws: " ".join(sorted(ws)),
    "Repeat the words exactly.": lambda ws: " ".join(ws),
    "Give the first word.": lambda ws: ws[0],
    "Give the last word.": lambda ws: ws[-1],
    "How many words are there?": lambda ws: str(len(ws)),
}


def make_examples(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    instructions = list(TASKS)
    rows = []
    for _ in range(n):
        instruction = rng.choice(instructions)
        words = rng.sample(WORDS, rng.randint(3, 7))
        rows.append({"instruction": instruction, "input": " ".join(words), "output": TASKS[instruction](words)})
    return rows


def make_tokenizer(rows: list[dict], out_dir: Path, vocab_size: int = 1024) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|pad|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    corpus = [f"### Instruction:\n{r['instruction']}\n\n### Input:\n{r['input']}\n\n### Response: {r['output']}"
              for r in rows]
    tok.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=specials[0], eos_token=specials[1], pad_token=specials[2],
        model_max_length=4096,
    )
    fast.chat_template = (
        "{% for m in messages %}<|begin_of_text|>{{ m['role'] }}: {{ m['content'] }}<|end_of_text|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|begin_of_text|>assistant: {% endif %}"
    )
    fast.save_pretrained(out_dir)


def main() -> None:
    rows = make_examples(2000)
    with open(HERE / "word_tasks.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    make_tokenizer(rows, HERE / "tokenizer")
    print(f"wrote {len(rows)} examples and a tokenizer to {HERE}")


if __name__ == "__main__":
    main()
