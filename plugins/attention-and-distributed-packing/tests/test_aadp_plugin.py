"""The plugin's hooks, and short TRL training runs: padding-free vs padded, and multipack batches."""

import pytest
import torch
from datasets import Dataset

from fmsaccel_aadp.attention import ATTENTION_NAME_PREFIX
from fmsaccel_aadp.collator import PaddingFreeCollator
from fmsaccel_aadp.plugin import MULTIPACK, PADDING_FREE, example_lengths
from fmsaccel_aadp.spec import AADP
from fmsaccel_framework.plugin import PluginError, TrainContext

PF = {"method": "huggingface", "backend": "auto"}


def _build(config):
    return AADP.build(config)


def test_augment_switches_attention_and_reports_the_backend(tiny_llama):
    plugin = _build({PADDING_FREE: PF})
    ctx = TrainContext(args={}, torch_dtype=torch.float32)
    model = plugin.augment(tiny_llama(), ctx)
    assert model.config._attn_implementation.startswith(ATTENTION_NAME_PREFIX)
    assert ctx.extras["padding_free"] is True
    backend = ctx.extras["padding_free_backend"]
    assert any(f"padding-free attention backend: {backend}" in m for _, m in ctx.report.notes)
    assert ctx.report.count(AADP.name) == 2  # one per decoder layer
    assert isinstance(plugin.data_collator(ctx), PaddingFreeCollator)


@pytest.mark.parametrize("buckets", [False, True])
def test_length_buckets_reach_the_collator_and_the_other_plugins(buckets, tiny_llama):
    """bucket_lengths: the collator pads rows to the ladder, and foak's cuda_graphs can see that it does."""
    plugin = _build({PADDING_FREE: {**PF, "bucket_lengths": buckets}})
    ctx = TrainContext(args={}, torch_dtype=torch.float32)
    plugin.augment(tiny_llama(), ctx)
    assert ctx.extras["padding_free_buckets"] is buckets
    assert any("ladder of fixed lengths" in m for _, m in ctx.report.notes) is buckets
    batch = plugin.data_collator(ctx)([{"input_ids": [1, 2, 3]}, {"input_ids": [4, 5]}])
    assert ("num_padding_tokens" in batch) is buckets
    assert batch["input_ids"].shape[1] == (64 if buckets else 5)


def test_augment_reaches_through_a_peft_wrapper(tiny_llama):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    _build({PADDING_FREE: PF}).augment(model, TrainContext(args={}, torch_dtype=torch.float32))
    assert model.get_base_model().config._attn_implementation.startswith(ATTENTION_NAME_PREFIX)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal of a CUDA-only backend")
def test_a_named_backend_that_cannot_run_is_a_plugin_error(tiny_llama):
    plugin = _build({PADDING_FREE: {**PF, "backend": "varlen"}})
    with pytest.raises(PluginError, match="varlen.*cannot run here"):
        plugin.augment(tiny_llama(), TrainContext(args={}, torch_dtype=torch.bfloat16))


def test_multipack_without_padding_free_is_refused():
    with pytest.raises(PluginError, match="multipack needs padding-free"):
        _build({MULTIPACK: {"num_processes": 1}})


def test_example_lengths_for_datasets_and_lists(random_examples):
    rows = random_examples((3, 8, 5))
    assert example_lengths(Dataset.from_list(rows)) == [3, 8, 5]
    assert example_lengths(rows) == [3, 8, 5]


# --------------------------------------------------------------------------- short training runs


def _tokenizer():
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(256)}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="t0")),
                                   pad_token="t0", eos_token="t1", unk_token="t0")


def _train(model, rows, tmp_path, plugin=None, steps=3, batch_size=4, max_length=64):
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=batch_size,
                     learning_rate=1e-2, lr_scheduler_type="constant", logging_steps=1, save_strategy="no",
                     report_to="none", use_cpu=not torch.cuda.is_available(), bf16=False, seed=0,
                     max_length=max_length, dataset_kwargs={"skip_prepare_dataset": True},
                     remove_unused_columns=False, dataloader_num_workers=0)
    ctx = TrainContext(args={"max_seq_length": max_length}, torch_dtype=torch.float32)
    if plugin is not None:
        model = plugin.augment(model, ctx)
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=_tokenizer(),
                         data_collator=plugin.data_collator(ctx) if plugin is not None else None)
    if plugin is not None:
        plugin.prepare_trainer(trainer, ctx)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return trainer, losses


def test_padding_free_training_matches_padded_training(tiny_llama, random_examples, tmp_path):
    rows = random_examples([7, 30, 12, 55, 3, 41, 19, 26, 9, 60, 33, 14], seed=8)
    _, padded = _train(tiny_llama(seed=1), rows, tmp_path / "padded")
    _, free = _train(tiny_llama(seed=1), rows, tmp_path / "free", plugin=_build({PADDING_FREE: PF}))
    assert len(padded) == len(free) == 3
    assert padded == pytest.approx(free, rel=1e-4)


def test_multipack_training_draws_token_balanced_batches(tiny_llama, random_examples, tmp_path):
    lengths = [int(x) for x in torch.randint(4, 64, (80,), generator=torch.Generator().manual_seed(0))]
    rows = random_examples(lengths, seed=9)
    plugin = _build({PADDING_FREE: PF, MULTIPACK: {"num_processes": 4}})
    trainer, losses = _train(tiny_llama(), rows, tmp_path, plugin=plugin, steps=4, batch_size=2, max_length=64)
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    budget = 2 * 64
    loader = trainer.get_train_dataloader()
    batches = list(loader)
    assert len(batches) == len(trainer.multipack_sampler)
    assert all(b["input_ids"].shape[0] == 1 and b["input_ids"].shape[1] <= budget for b in batches)
    assert sum(len(b["cu_seq_lens_q"]) - 1 for b in batches) == len(rows)  # every example, once
    assert sum(b["input_ids"].shape[1] for b in batches) == sum(lengths)
