"""Multi-GPU runs: the ``distributed`` argument section, its checks, and what it changes in a run.

A recipe (or ``--set distributed.strategy=fsdp``) picks how ``--nproc-per-node N`` processes share the work::

    distributed:
      strategy: ddp                     # ddp (default) or fsdp
      gather_step_metrics: true         # gather TRL's per-micro-batch metrics over ranks in every micro-step
      fsdp:                             # read only with strategy fsdp
        sharding: full_shard            # full_shard | shard_grad_op
        cpu_ram_efficient_loading: true # rank 0's weights are broadcast into the sharded model
        activation_checkpointing: null  # null: follow gradient_checkpointing
        offload_params: false           # keep the parameter shards in CPU memory

- **ddp**: every rank holds the whole model; gradients are all-reduced. ``ddp_find_unused_parameters``
  is turned off (LoRA and dense models use every trainable parameter each step; the unused-parameter
  search costs a graph walk per step), except for mixture-of-experts models, where a step may route no
  token to an expert. ``ddp_broadcast_buffers`` is turned off: DDP would otherwise copy rank 0's buffers
  to every rank before each forward, and GPTQ's packed 4-bit weights are buffers (4.5 GB for an 8B
  model, each micro-step); a causal LM's other buffers (rotary frequencies) never change.
- **fsdp**: FSDP2 through transformers/accelerate. Every decoder layer is its own shard unit (the class
  comes from the model's ``_no_split_modules``, read from its config without loading weights); mixed
  precision follows ``torch_dtype``; an adapter is saved from a full state dict, i.e. a normal PEFT
  adapter. ``gradient_checkpointing: true`` becomes FSDP's own activation checkpointing (both at once
  would checkpoint twice) unless ``activation_checkpointing: false`` keeps transformers' (under FSDP2
  it costs no second all-gather: a layer recomputed in the backward finds its parameters gathered).

TRL gathers its per-micro-batch metrics (entropy, token accuracy, token count) over all ranks in every
micro-step, between forward and backward, and reads them on the host: a cross-rank wait per micro-step at which
every rank idles until the slowest arrives. ``gather_step_metrics: false`` keeps each rank's own metrics instead
(``rank_local_metrics``): the logged entropy and accuracy are then rank 0's, and ``num_tokens`` counts rank 0's
tokens; the loss, its logging and the gradients are untouched. TRL's behaviour stays the default: on two GPUs
(session 7) the difference was lost in the variation between runs.

Launch-time checks (``check``) turn every combination that cannot work into one line before any process
starts; ``verify`` refuses a run where accelerate left FSDP off (it does on CPUs). ``reduce_metrics``
makes ``metrics.json`` describe all ranks, not rank 0.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any

from fmsaccel_framework.plugin import PluginError

from .recipes import RecipeError, closest

STRATEGIES = ("ddp", "fsdp")
# FSDP2 reshards a layer's parameters after its forward (full_shard) or keeps them gathered until its
# backward (shard_grad_op: one all-gather less per layer and step, more memory). FSDP1-only strategies
# (hybrid_shard, no_shard) are not offered: transformers 5 drives FSDP2.
SHARDINGS = {"full_shard": True, "shard_grad_op": False}
FSDP_KEYS = {
    "sharding": "full_shard (parameters, gradients, optimizer state) or shard_grad_op (parameters stay "
                "gathered from forward to backward)",
    "cpu_ram_efficient_loading": "shard an empty model and broadcast rank 0's weights into it (full-precision "
                                 "models; 4-bit checkpoints load on every rank)",
    "activation_checkpointing": "FSDP's activation checkpointing per decoder layer; null follows "
                                "gradient_checkpointing",
    "offload_params": "keep parameter shards (and their gradients) in CPU memory",
}
TOP_KEYS = {"strategy": "ddp or fsdp", "fsdp": "FSDP options (strategy fsdp only)",
            "gather_step_metrics": "gather TRL's per-micro-batch metrics over ranks in every micro-step (true, "
                                   "TRL's behaviour; false: each rank logs its own, without a cross-rank wait "
                                   "mid-step)"}
MOE_PATH = "training.moe.scattermoe"
BNB_PATH = "peft.quantization.bitsandbytes"
GPTQ_PATH = "peft.quantization.auto_gptq"


@dataclass(frozen=True)
class Settings:
    strategy: str = "ddp"
    sharding: str = "full_shard"
    cpu_ram_efficient_loading: bool = True
    activation_checkpointing: bool | None = None
    offload_params: bool = False
    gather_step_metrics: bool = True

    @property
    def fsdp(self) -> bool:
        return self.strategy == "fsdp"


def settings(args: dict[str, Any], source: str = "arguments") -> Settings:
    """The validated ``distributed`` section (defaults filled in); a ``RecipeError`` names the bad key."""
    section = args.get("distributed")
    if section is None:
        return Settings()
    if not isinstance(section, dict):
        raise RecipeError(f"{source}: distributed must be a mapping such as {{strategy: fsdp}} (got {section!r})")
    _unknown_keys(section, TOP_KEYS, "distributed", source)
    strategy = section.get("strategy", "ddp")
    if strategy not in STRATEGIES:
        raise RecipeError(f"{source}: distributed.strategy = {strategy!r} is not one of: "
                          f"{', '.join(STRATEGIES)}{closest(strategy, STRATEGIES)}")
    gather = section.get("gather_step_metrics", True)
    if not isinstance(gather, bool):
        raise RecipeError(f"{source}: distributed.gather_step_metrics = {gather!r} must be true or false")
    fsdp = section.get("fsdp") or {}
    if not isinstance(fsdp, dict):
        raise RecipeError(f"{source}: distributed.fsdp must be a mapping of FSDP options (got {fsdp!r})")
    _unknown_keys(fsdp, FSDP_KEYS, "distributed.fsdp", source)
    sharding = fsdp.get("sharding", "full_shard")
    if sharding not in SHARDINGS:
        hint = closest(sharding, SHARDINGS) or (" (hybrid_shard/no_shard are FSDP1-only; transformers 5 runs FSDP2)"
                                                if sharding in ("hybrid_shard", "no_shard") else "")
        raise RecipeError(f"{source}: distributed.fsdp.sharding = {sharding!r} is not one of: "
                          f"{', '.join(SHARDINGS)}{hint}")
    for key, allowed in (("cpu_ram_efficient_loading", (bool,)), ("activation_checkpointing", (bool, type(None))),
                         ("offload_params", (bool,))):
        if key in fsdp and not isinstance(fsdp[key], allowed):
            raise RecipeError(f"{source}: distributed.fsdp.{key} = {fsdp[key]!r} must be "
                              f"{'true, false or null' if type(None) in allowed else 'true or false'}")
    return Settings(strategy=strategy, sharding=sharding,
                    cpu_ram_efficient_loading=fsdp.get("cpu_ram_efficient_loading", True),
                    activation_checkpointing=fsdp.get("activation_checkpointing"),
                    offload_params=fsdp.get("offload_params", False), gather_step_metrics=gather)


def _unknown_keys(section: dict, known: dict[str, str], prefix: str, source: str) -> None:
    for key in section:
        if key not in known:
            raise RecipeError(f"{source}: unknown key {prefix}.{key}{closest(key, known)} "
                              f"(accepted: {', '.join(known)})")


def _checkpointing(kwargs: dict[str, Any]) -> bool:
    """transformers 5.24 renamed gradient_checkpointing to activation_checkpointing (5.17 knows only the old name)."""
    return bool(kwargs.get("activation_checkpointing") or kwargs.get("gradient_checkpointing"))


# ---------------------------------------------------------------------------------------------- launch checks


def check(args: dict[str, Any], active, world_size: int, sources: dict[str, str] | None = None) -> list[str]:
    """Refuse what cannot work with ``world_size`` processes; return notes worth printing before the launch.

    ``active`` is ``recipes.validate``'s list of (plugin spec, {config path: keys}).
    """
    source = (sources or {}).get("args.distributed", "arguments")
    dist = settings(args, source)
    notes: list[str] = []
    cfg = {path: keys for _, c in active for path, keys in c.items()}

    for key in ("per_device_train_batch_size", "gradient_accumulation_steps"):
        value = args.get(key, 1)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise RecipeError(f"{(sources or {}).get(f'args.{key}', 'arguments')}: {key} = {value!r} must be a "
                              "whole number >= 1")
    if "training.dataloader.multipack" in cfg:
        # the token budget per rank and step is per_device_train_batch_size x max_seq_length, and every example
        # is truncated to max_seq_length, so the budget holds the longest example as long as both are positive
        max_len = args.get("max_seq_length") or args.get("max_length")
        if not isinstance(max_len, int) or isinstance(max_len, bool) or max_len < 1:
            raise RecipeError(f"multipack sizes its per-rank token budget from max_seq_length; set it to a whole "
                              f"number >= 1 (got {max_len!r})")
        examples = args.get("num_train_examples")
        if isinstance(examples, int) and examples < world_size:
            raise RecipeError(f"multipack: num_train_examples {examples} cannot give each of {world_size} ranks "
                              "a batch")

    moe = cfg.get(MOE_PATH)
    ep_degree = int(moe.get("ep_degree", 1)) if moe and not moe.get("disable_distributed") else 1
    if ep_degree > 1:
        if dist.fsdp:
            raise RecipeError(f"plugins.{MOE_PATH}.ep_degree = {ep_degree} (expert parallelism) cannot run under "
                              "distributed.strategy fsdp: expert parallelism shards the experts itself; use strategy "
                              "ddp, or ep_degree 1 to let FSDP shard them")
        if world_size % ep_degree:
            raise RecipeError(f"plugins.{MOE_PATH}.ep_degree = {ep_degree} does not divide the {world_size} "
                              f"process(es) (--nproc-per-node x --nnodes); launch a multiple of {ep_degree}")

    if not dist.fsdp:
        section = args.get("distributed")
        if isinstance(section, dict) and section.get("fsdp"):
            notes.append("distributed.fsdp options are ignored: distributed.strategy is ddp")
        return notes

    if world_size < 2:
        raise RecipeError(f"{source}: distributed.strategy fsdp shards the model over processes, and this run has "
                          "one; pass --nproc-per-node N (N >= 2), or drop the strategy for a single-process run")
    bnb = cfg.get(BNB_PATH)
    if bnb is not None:
        dtype = str(args.get("torch_dtype", "bfloat16"))
        storage = bnb.get("quant_storage")
        if storage is not None and storage != dtype:
            raise RecipeError(f"plugins.{BNB_PATH}.quant_storage = {storage} under FSDP must equal torch_dtype "
                              f"({dtype}): FSDP casts sharded parameters to the compute dtype, which would corrupt "
                              "the packed 4-bit weights; leave quant_storage unset")
        notes.append(f"FSDP: the 4-bit weights are stored as {dtype} (bitsandbytes quant_storage) and sharded "
                     "like any parameter")
    if GPTQ_PATH in cfg:
        notes.append("FSDP: GPTQ's packed 4-bit tensors are held as torch_dtype parameters (the same bytes) and "
                     "sharded; each layer gathers its packed bytes, never a full-precision copy")
    return notes


# ---------------------------------------------------------------------------------------------- SFTConfig


def model_config(args: dict[str, Any]):
    """The transformers config of the run's model, read without loading (or writing) weights; None if unknown."""
    from . import models

    name = str(args.get("model_name_or_path") or "")
    if models.is_shape(name):
        return models.build_config(name, args.get("shape_overrides"))
    path = os.path.expanduser(name)
    if not os.path.exists(os.path.join(path, "config.json")):
        return None
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path)


def decoder_layer_classes(config) -> list[str] | None:
    """The model's decoder-layer class names (its ``_no_split_modules``), from the causal-LM class of ``config``."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(getattr(config, "model_type", None))
    model_class = getattr(transformers, name, None) if name else None
    layers = getattr(model_class, "_no_split_modules", None)
    return list(layers) if layers else None


def _is_moe(config) -> bool:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return any(getattr(text, key, 0) for key in ("num_local_experts", "num_experts", "n_routed_experts"))


def apply_to_sft_config(kwargs: dict[str, Any], args: dict[str, Any]) -> None:
    """Add the strategy's settings to the SFTConfig keyword arguments (in place)."""
    dist = settings(args)
    config = model_config(args)
    if not dist.fsdp:
        if "ddp_find_unused_parameters" not in kwargs and config is not None and not _is_moe(config):
            kwargs["ddp_find_unused_parameters"] = False
        kwargs.setdefault("ddp_broadcast_buffers", False)  # frozen buffers (GPTQ weights): no copy per forward
        return
    checkpointing = dist.activation_checkpointing
    if checkpointing is None:
        checkpointing = _checkpointing(kwargs)
    fsdp_config: dict[str, Any] = {
        "version": 2,
        "reshard_after_forward": SHARDINGS[dist.sharding],
        "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "cpu_ram_efficient_loading": dist.cpu_ram_efficient_loading,
        "state_dict_type": "FULL_STATE_DICT",  # save_model gathers the adapter into a normal PEFT file
        "activation_checkpointing": checkpointing,
        "cpu_offload": dist.offload_params,
    }
    layers = decoder_layer_classes(config) if config is not None else None
    if layers:
        fsdp_config["transformer_layer_cls_to_wrap"] = layers
    if checkpointing:  # FSDP checkpoints each layer itself; transformers' checkpointing on top would do it twice
        kwargs["gradient_checkpointing"] = False
        if "activation_checkpointing" in kwargs:
            kwargs["activation_checkpointing"] = False
        kwargs.pop("gradient_checkpointing_kwargs", None)
    kwargs["fsdp"] = True
    kwargs["fsdp_config"] = fsdp_config


# ---------------------------------------------------------------------------------------------- training process


def before_model_load(sft_config, ctx, loader_name: str | None) -> None:
    """Before the model is loaded: same random state on every rank, settle what the loader implies for FSDP."""
    import torch

    # The model's random parts (LoRA's A matrices) must start equal on every rank: FSDP2 shards each rank's own
    # copy without a broadcast, and a rank that has just materialised a built-in shape has drawn from the RNG.
    torch.manual_seed(int(ctx.args.get("seed", 42)))
    dist = settings(ctx.args)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.gather_step_metrics:
        ctx.report.note("distributed", "TRL's per-micro-batch metrics (entropy, token accuracy, num_tokens) are each "
                                       "rank's own, not gathered in every micro-step (distributed.gather_step_metrics)")
    if not dist.fsdp:
        if world > 1:
            ctx.report.note("distributed", f"DDP over {world} processes"
                            + (", find_unused_parameters off" if sft_config.ddp_find_unused_parameters is False
                               else "")
                            + (", buffers not broadcast" if sft_config.ddp_broadcast_buffers is False else ""))
        return
    plugin_args = sft_config.fsdp_plugin_args or {}
    if loader_name is not None and plugin_args.get("cpu_ram_efficient_loading"):
        # accelerate broadcasts parameters only; 4-bit weights (bnb Params4bit, GPTQ buffers) load on every rank
        plugin_args["cpu_ram_efficient_loading"] = False
        os.environ["FSDP_CPU_RAM_EFFICIENT_LOADING"] = "false"
        ctx.report.note("distributed", f"FSDP: {loader_name} loads its 4-bit checkpoint on every rank "
                                       "(cpu_ram_efficient_loading applies to full-precision models)")
    # accelerate's default policy reduces gradients in the parameter dtype (bf16): averaged in fp32 instead, as in
    # torchtune (LoRA's gradients are small; full fine-tuning pays twice the reduce-scatter volume for it)
    plugin_args.setdefault("mixed_precision_policy", {"param_dtype": ctx.torch_dtype, "reduce_dtype": torch.float32,
                                                      "output_dtype": ctx.torch_dtype})
    layers = ", ".join(sft_config.fsdp_config.get("transformer_layer_cls_to_wrap") or ["the model's _no_split_modules"])
    ctx.report.note("distributed", f"FSDP2 over {world} processes: {dist.sharding}, one shard unit per {layers}, "
                                   f"{'params offloaded to CPU, ' if dist.offload_params else ''}"
                                   f"mixed precision {str(ctx.torch_dtype).removeprefix('torch.')} "
                                   "(gradients reduced in float32)")
    if plugin_args.get("activation_checkpointing"):
        ctx.report.note("distributed", "FSDP activation checkpointing per decoder layer (replaces transformers' "
                                       "gradient checkpointing; foak's selective checkpointing does not apply)")


@contextlib.contextmanager
def rank_local_metrics(trainer, gather: bool):
    """Unless ``gather`` (``settings(args).gather_step_metrics``), TRL's ``gather_for_metrics`` returns this rank's
    tensor instead of gathering, within a training micro-step.

    The gather is for logging only; the loss and gradients never pass through it. Evaluation still gathers.
    """
    accelerator = trainer.accelerator
    if accelerator.num_processes == 1 or not trainer.model.training or gather:
        yield
        return
    accelerator.gather_for_metrics = lambda tensor, *_, **__: tensor  # shadows the method on this instance
    try:
        yield
    finally:
        del accelerator.gather_for_metrics


def verify(trainer, ctx) -> None:
    """After the trainer exists: FSDP was asked for, so accelerate must have turned it on (never silently DDP)."""
    if settings(ctx.args).fsdp and not getattr(trainer, "is_fsdp_enabled", False):
        raise PluginError("distributed.strategy fsdp: accelerate did not enable FSDP (it runs FSDP on GPUs only, and "
                          "runs CPU processes data-parallel); use strategy ddp here")


def save_model(trainer, output_dir: str) -> None:
    """``trainer.save_model``, except under FSDP, where a LoRA run gathers and saves its adapter only.

    The generic FSDP path gathers the full model state dict (every 4-bit weight, the embeddings and the
    lm_head, gigabytes) to save a few megabytes of adapter; on 2 GPUs it also stalled after training. Here
    every rank gathers the trainable tensors in the same order, and rank 0 writes a normal PEFT adapter.
    accelerate's checkpoint wrappers put ``_checkpoint_wrapped_module`` into every decoder layer's module
    name, which PEFT's key matching does not expect, so the names are saved without it.
    """
    if not getattr(trainer, "is_fsdp_enabled", False):
        trainer.save_model(output_dir)
        return
    model = trainer.accelerator.unwrap_model(trainer.model)
    if hasattr(model, "peft_config"):
        state_dict = {}
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            full = param.full_tensor() if hasattr(param, "full_tensor") else param  # all-gather: every rank
            if trainer.args.should_save:
                state_dict[name.replace("_checkpoint_wrapped_module.", "")] = full.detach().to("cpu")
    else:
        state_dict = trainer.accelerator.get_state_dict(trainer.model)  # a collective: every rank
    if trainer.args.should_save:
        with _checkpoint_wrappers_lifted(model):
            model.save_pretrained(output_dir, state_dict=state_dict)


@contextlib.contextmanager
def _checkpoint_wrappers_lifted(model):
    lifted = []
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            inner = getattr(child, "_checkpoint_wrapped_module", None)
            if inner is not None:
                parent._modules[name] = inner
                lifted.append((parent, name, child))
    try:
        yield
    finally:
        for parent, name, child in lifted:
            parent._modules[name] = child


def reduce_metrics(step_losses: list, tokens: float, seconds: float) -> tuple[list[float], float, float]:
    """(per-step loss averaged over ranks, tokens summed over ranks, slowest rank's seconds).

    A rank's training-step loss is its token sum over the global token count times the world size
    (transformers scales it so that DDP's gradient average is a global token mean), so the mean over
    ranks is the loss a single process would report for the same global batch. One collective per
    quantity at the end of training; nothing runs per step.
    """
    import torch
    import torch.distributed as dist

    losses = [float(x) for x in step_losses]
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return losses, tokens, seconds
    nccl = "nccl" in str(dist.get_backend())  # also "cuda:nccl,cpu:gloo"
    device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
    world = dist.get_world_size()
    # [seconds, steps, -steps] by max: the slowest rank, and whether every rank logged the same number of steps
    extremes = torch.tensor([seconds, len(losses), -len(losses)], dtype=torch.float64, device=device)
    dist.all_reduce(extremes, op=dist.ReduceOp.MAX)
    slowest, most, fewest = extremes.tolist()
    same_steps = most == -fewest
    summed = torch.tensor([tokens, *(losses if same_steps else [])], dtype=torch.float64, device=device)
    dist.all_reduce(summed, op=dist.ReduceOp.SUM)
    values = summed.tolist()
    return ([v / world for v in values[1:]] if same_steps else losses), values[0], slowest
