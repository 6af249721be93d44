"""The attention-and-distributed-packing plugin: padding-free attention and multipack batching.

- ``augment``: registers the padding-free attention for the chosen backend with
  transformers' ``AttentionInterface`` and switches the model to it (no model code is
  patched); records the backend in the report and ``ctx.extras["padding_free"]``. Without
  padding-free, ``training.attention.sdpa`` switches the model to SDPA attention that keeps
  cuDNN's per-length planning away from padded batches.
- ``data_collator``: the padding-free collator (one ``[1, T]`` row per batch, optionally padded to a
  length bucket).
- ``prepare_trainer``: with multipack, the trainer's train dataloader draws token-balanced
  batches from :class:`~fmsaccel_aadp.multipack.MultipackBatchSampler`.
"""

from __future__ import annotations

import os
from typing import Any

from fmsaccel_framework.lora import unwrap_peft
from fmsaccel_framework.plugin import AccelerationPlugin, PluginError, TrainContext

from .attention import register_attention, register_sdpa, resolve_backend
from .collator import PaddingFreeCollator
from .multipack import MultipackBatchSampler

PADDING_FREE = "training.attention.padding_free"
SDPA = "training.attention.sdpa"
MULTIPACK = "training.dataloader.multipack"


def _switch_attention(base, name: str) -> None:
    """Point ``base`` (the model under any PEFT wrapper) at a registered attention implementation."""
    base.set_attn_implementation(name)
    if base.config._attn_implementation != name:
        raise PluginError(f"{type(base).__name__} did not accept attention implementation '{name}' (it must use "
                          "transformers' AttentionInterface)")


def _count_attention_layers(model) -> int:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return int(getattr(config, "num_hidden_layers", 0) or 0)


def example_lengths(dataset, num_processes: int = 1) -> list[int]:
    """Token count of every example, from its ``input_ids`` (in parallel for big ``datasets``)."""
    try:
        import datasets
    except ImportError:  # pragma: no cover - datasets is a dependency
        datasets = None
    if datasets is not None and isinstance(dataset, datasets.Dataset):
        # worker processes only pay off on big datasets
        num_proc = min(num_processes, os.cpu_count() or 1, len(dataset) // 50_000) or None
        counted = dataset.map(lambda batch: {"_fmsaccel_len": [len(x) for x in batch["input_ids"]]},
                              batched=True, num_proc=num_proc, remove_columns=dataset.column_names,
                              desc="multipack: counting tokens" if num_proc else None)
        return [int(n) for n in counted["_fmsaccel_len"]]
    return [len(dataset[i]["input_ids"]) for i in range(len(dataset))]


def install_multipack(trainer, token_budget: int, num_processes: int = 1) -> None:
    """Make ``trainer.get_train_dataloader`` use token-balanced multipack batches.

    The loader is still prepared by accelerate (device placement, epoch seeding, gradient
    accumulation bookkeeping), but the sampler already gives each rank its own batches,
    so accelerate's batch-sampler sharding is made a pass-through, exactly as transformers
    does for its own rank-aware ``BatchRebalanceSampler``.
    """
    from torch.utils.data import DataLoader

    def get_train_dataloader():
        dataset = trainer.train_dataset
        if dataset is None:
            raise ValueError("Trainer: training requires a train_dataset.")
        if trainer.args.remove_unused_columns and hasattr(trainer, "_remove_unused_columns"):
            dataset = trainer._remove_unused_columns(dataset, description="Training")
        try:
            sampler = MultipackBatchSampler(
                example_lengths(dataset, num_processes), token_budget,
                num_replicas=trainer.args.world_size, rank=trainer.args.process_index, seed=trainer.args.seed,
            )
        except ValueError as e:
            raise PluginError(f"multipack: {e}") from None
        loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=trainer.data_collator,
                            num_workers=trainer.args.dataloader_num_workers,
                            pin_memory=trainer.args.dataloader_pin_memory)
        prepared = trainer.accelerator.prepare(loader)
        shard = getattr(prepared, "batch_sampler", None)
        if shard is not sampler:
            if getattr(shard, "batch_sampler", None) is not sampler:
                raise PluginError(f"multipack: accelerate wrapped the batch sampler unexpectedly ({type(shard)})")
            shard.num_processes, shard.process_index = 1, 0
            shard.set_epoch = sampler.set_epoch  # accelerate looks for set_epoch on its wrapper only
        trainer.multipack_sampler = sampler
        return prepared

    trainer.get_train_dataloader = get_train_dataloader


class AttentionAndPackingPlugin(AccelerationPlugin):
    """Padding-free attention (any of four backends) and optional multipack batching."""

    @property
    def padding_free(self) -> dict[str, Any] | None:
        return self.config.get(PADDING_FREE)

    @property
    def multipack(self) -> dict[str, Any] | None:
        return self.config.get(MULTIPACK)

    @property
    def bucket_lengths(self) -> bool:
        """Padding-free rows padded to fixed lengths (for CUDA graphs)."""
        return bool((self.padding_free or {}).get("bucket_lengths", False))

    @property
    def sdpa(self) -> dict[str, Any] | None:
        return self.config.get(SDPA)

    def augment(self, model, ctx: TrainContext):
        if self.padding_free is None:
            return self._choose_sdpa_kernels(model, ctx) if self.sdpa is not None else model
        requested = self.padding_free.get("backend", "auto")
        try:
            backend, why = resolve_backend(requested, dtype=ctx.torch_dtype)
        except RuntimeError as e:
            raise PluginError(str(e)) from e
        base = unwrap_peft(model)
        _switch_attention(base, register_attention(backend, strict=requested != "auto"))
        ctx.report.add(self.name, f"attention -> padding-free {backend}", _count_attention_layers(base))
        ctx.report.note(self.name, f"padding-free attention backend: {backend} [{why}]; rows whose examples all have "
                                   "one length run as a dense batch on causal SDPA")
        if self.bucket_lengths:
            ctx.report.note(self.name, "padding-free rows padded to a ladder of fixed lengths (filler examples, "
                                       "not trained on, not counted as tokens)")
        ctx.extras["padding_free"] = True
        ctx.extras["padding_free_buckets"] = self.bucket_lengths
        ctx.extras["padding_free_backend"] = backend
        ctx.extras["multipack"] = self.multipack is not None
        return model

    def _choose_sdpa_kernels(self, model, ctx: TrainContext):
        cudnn = self.sdpa.get("cudnn", "unpadded")
        base = unwrap_peft(model)
        current = base.config._attn_implementation
        if current != "sdpa":
            raise PluginError(f"{SDPA}.cudnn chooses among SDPA kernels, but the model uses '{current}' attention "
                              "(attn_implementation / use_flash_attn): drop one of them")
        _switch_attention(base, register_sdpa(cudnn))
        ctx.report.add(self.name, f"attention -> sdpa, cuDNN {cudnn}", _count_attention_layers(base))
        if cudnn == "unpadded":
            ctx.report.note(self.name, "padded batches use the flash/efficient SDPA kernels, not cuDNN's, which "
                                       "plans a kernel for every new sequence length")
        return model

    def data_collator(self, ctx: TrainContext):
        if self.padding_free is None:
            return None
        return PaddingFreeCollator(self.bucket_lengths)

    def prepare_trainer(self, trainer, ctx: TrainContext) -> None:
        if self.multipack is None:
            return
        max_len = ctx.args.get("max_seq_length") or getattr(trainer.args, "max_length", None)
        if not max_len:
            raise PluginError("multipack needs max_seq_length to size its token budget")
        budget = int(trainer.args.per_device_train_batch_size) * int(max_len)
        install_multipack(trainer, budget, int(self.multipack.get("num_processes", 1)))
        ctx.report.note(self.name, f"multipack batches: at most {budget} tokens per rank and step "
                                   f"(per_device_train_batch_size x max_seq_length)")


def build(spec, config: dict[str, dict[str, Any]]) -> AttentionAndPackingPlugin:
    if SDPA in config and PADDING_FREE in config:
        raise PluginError(f"{SDPA} picks the attention kernel of padded batches and padding_free leaves no "
                          "padding: drop one of them")
    if MULTIPACK in config and PADDING_FREE not in config:
        # a token budget bounds real tokens; padded to the longest example a batch could be far bigger
        raise PluginError("multipack needs padding-free attention: add plugins.training.attention.padding_free")
    return AttentionAndPackingPlugin(spec, config)
