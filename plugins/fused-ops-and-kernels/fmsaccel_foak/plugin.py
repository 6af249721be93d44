"""The fused-ops-and-kernels plugin: patch the model with the requested kernels, following the rule table.

``augment`` (after the quantisation plugins added LoRA) applies the kernels in a fixed
order and reports every replacement; a requested kernel without a rule for the
architecture is an error naming the supported ones. ``prepare_trainer`` then makes
the fused loss answer TRL's ``fused_lm_head`` calls, compiles the decoder layers when
``compile_layers`` is set, and installs selective activation checkpointing when asked.
"""

from __future__ import annotations

import logging

import torch

from fmsaccel_framework.lora import apply_lora, unwrap_peft
from fmsaccel_framework.plugin import AccelerationPlugin, PluginError, TrainContext

from .patching import Options, RuleError, apply_rule, is_fused
from .rules import KERNELS, RULES, supported

logger = logging.getLogger(__name__)

PATHS = ("peft.quantization.fused_ops_and_kernels", "training.fused_ops_and_kernels")
# fused_lora before fast_swiglu: the fused MLP forward takes the SwiGLU kernel along
ORDER = ("fast_rms_layernorm", "fast_rope_embeddings", "fused_lora", "fast_swiglu", "fast_loss")
assert sorted(ORDER) == sorted(KERNELS)


def _lora_layers(model) -> list:
    return [m for m in model.modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")]


def _installed_forwards(base) -> list[tuple]:
    """(module, attribute, bound method) of every foak forward on a submodule (the causal LM itself excluded)."""
    return [(m, attr, m.__dict__[attr]) for m in base.modules() if m is not base
            for attr in ("forward", "_apply_gate")
            if getattr(m.__dict__.get(attr), "__module__", "").startswith("fmsaccel_foak")]


class FusedOpsPlugin(AccelerationPlugin):
    def __init__(self, spec, config):
        super().__init__(spec, config)
        active = [p for p in PATHS if p in config]
        if len(active) != 1:
            raise PluginError(f"configure fused_ops_and_kernels under exactly one of: {', '.join(PATHS)}")
        self.keys = config[active[0]]
        self.requested = [k for k in ORDER if self.keys[k]]
        for key, what in (("fp8_matmul", "runs the fused LoRA op's base matmuls in FP8"),
                          ("dropout_in_kernel", "draws the fused LoRA op's dropout in its kernels")):
            if self.keys[key] and not self.keys["fused_lora"]:
                raise PluginError(f"plugins.{active[0]}.{key} {what}: it needs fused_lora: true")
        if self.keys["cuda_graphs"] and not self.keys["compile_layers"]:
            raise PluginError(f"plugins.{active[0]}.cuda_graphs replays the compiled decoder: it needs "
                              "compile_layers: true or model")
        if self.keys["checkpoint_in_graph"] and self.keys["compile_layers"] is not True:
            raise PluginError(f"plugins.{active[0]}.checkpoint_in_graph moves each layer's checkpoint into its "
                              "compiled region: it needs compile_layers: true (with 'model' the checkpoints are "
                              "inside the one region already)")
        if self.keys["offload_mlp_activations"] and not (self.keys["fused_lora"] and self.keys["fast_swiglu"]):
            raise PluginError(f"plugins.{active[0]}.offload_mlp_activations brings the fused MLP's gate/up back for "
                              "the recompute: it needs fused_lora: true and fast_swiglu: true")
        if self.keys["offload_mlp_activations"] and self.keys["compile_layers"]:
            raise PluginError(f"plugins.{active[0]}.offload_mlp_activations works in eager layers: it cannot be "
                              "combined with compile_layers")
        for key in ("selective_checkpointing", "uncheckpointed_layers", "offload_mlp_activations"):
            if self.keys[key] is not True and self.keys[key] < 0:
                raise PluginError(f"plugins.{active[0]}.{key} counts decoder layers: 0 or more, not {self.keys[key]}")
        budget = self.keys["activation_budget_gib"]
        if budget is not None and budget <= 0:
            raise PluginError(f"plugins.{active[0]}.activation_budget_gib must be a positive number of GiB (or "
                              f"null for full checkpointing), not {budget}")
        self._installed: list[tuple] = []  # foak forwards on submodules, checked again in prepare_trainer

    def augment(self, model, ctx: TrainContext):
        if not self.requested:
            ctx.report.note(self.name, "no kernel requested (all keys false)")
            return model
        arch = unwrap_peft(model).config.model_type
        rules = RULES.get(arch, {})
        for kernel in self.requested:
            if kernel not in rules:
                raise PluginError(f"{kernel} has no rule for architecture '{arch}'; "
                                  f"supported: {', '.join(supported(kernel))}")
        self._note_runtime(ctx)
        if "fused_lora" in self.requested:
            model = self._with_lora(model, ctx)
            self._check_base_layer(model)
        base = unwrap_peft(model)
        # under checkpointing the recompute's dequantised weights serve the backward (one layer's worth, ~0.3 GiB at
        # 8B); FSDP runs are there for memory, so they dequantise again instead
        options = Options(keep_weights=bool(ctx.args.get("gradient_checkpointing")) and not ctx.fsdp,
                          fast_swiglu=bool(self.keys["fast_swiglu"]), fast_loss=self.keys["fast_loss"],
                          fp8=bool(self.keys["fp8_matmul"]), dropout_in_kernel=bool(self.keys["dropout_in_kernel"]))
        if options.fp8:
            self._note_fp8(ctx)
        if options.dropout_in_kernel:
            ctx.report.note(self.name, "dropout_in_kernel: LoRA dropout drawn inside the fused op's Triton kernels "
                                       "(a seed per projection, no mask kept; not PEFT's random stream)")
        for kernel in self.requested:
            try:
                lines = apply_rule(base, rules, kernel, options)
            except (RuleError, TypeError, ValueError) as err:
                raise PluginError(f"{kernel} on {arch}: {err}") from err
            for what, count in lines:
                ctx.report.add(self.name, what, count)
        if "fused_lora" in self.requested:
            self._note_unfused(base, ctx)
        self._installed = _installed_forwards(base)
        return model

    def prepare_trainer(self, trainer, ctx: TrainContext) -> None:
        from .ops.rms_norm import sm_count

        base = unwrap_peft(trainer.model)
        if torch.cuda.is_available():  # asked now, eagerly: compiled layers (foak's or another plugin's) cannot
            sm_count(torch.device("cuda"))  # trace device queries
        fused_loss = self.keys["fast_loss"] == "fused_ce_liger"
        if self.keys["fast_loss"] is True and _uses_trl_fused_head(trainer):
            # TRL's SFTTrainer computes the loss through its own chunked LM head and never calls the model's
            # loss_function, so the Triton cross-entropy on full logits cannot run; the fast loss there is
            # foak's chunked linear + cross-entropy (faster than TRL's head on the H100), so that serves it
            for key in [k for k in ctx.report.entries if k[0] == self.name and "triton cross-entropy" in k[1]]:
                del ctx.report.entries[key]
            logger.warning("fast_loss: true under TRL's SFTTrainer (no full logits to apply the Triton "
                           "cross-entropy to): foak's chunked linear + cross-entropy computes the loss instead")
            fused_loss = True
        self._note_replaced_experts(base, ctx)
        lost = [m for m, attr, fn in self._installed if m.__dict__.get(attr) is not fn]
        if lost:
            ctx.report.note(self.name, f"{len(lost)} modules patched by foak ({type(lost[0]).__name__}, ...) got "
                                       "another forward from a later plugin; foak's does not run there")
        if fused_loss:
            # TRL's SFTTrainer put its own fused-LM-head forward on the model after augment; ours answers both
            rules = RULES[base.config.model_type]
            lines = apply_rule(base, rules, "fast_loss", Options(fast_loss="fused_ce_liger"))
            ctx.report.add(self.name, f"{lines[0][0]} (the trainer's fused_lm_head calls)", 1)
            if ctx.fsdp:
                self._shard_vocabulary(base, ctx)
        if self.keys["loss_filter_on_device"]:
            from .loss_filter import filter_losses_on_device

            if filter_losses_on_device(trainer):
                ctx.report.add(self.name, "trainer NaN/Inf loss filter -> on the device (no host wait a step)", 1)
            else:
                ctx.report.note(self.name, "loss_filter_on_device: logging_nan_inf_filter is off; nothing to move")
        if self.keys["non_blocking_batches"]:
            from .batches import copy_batches_without_waiting

            if copy_batches_without_waiting(trainer):
                ctx.report.add(self.name, "batch copies to the device -> queued (no host wait a step)", 1)
            else:
                ctx.report.note(self.name, "non_blocking_batches unused: dataloader_pin_memory is off (a copy from "
                                           "pageable memory waits anyway)")
        if self.keys["compile_layers"]:
            self._compile_layers(base, ctx)
        if self.requested and ctx.args.get("gradient_checkpointing") and not self.keys["compile_layers"]:
            self._checkpoint_contexts(base, ctx)
        elif self.keys["offload_mlp_activations"]:
            ctx.report.note(self.name, "offload_mlp_activations unused: gradient checkpointing is off")
        if self.keys["activation_budget_gib"] is not None or self.keys["uncheckpointed_layers"]:
            self._budget_checkpointing(base, ctx)

    def _checkpoint_contexts(self, base, ctx: TrainContext) -> None:
        """Mark each layer's recompute (the fused MLP skips its unused SwiGLU output); selective where asked."""
        from fmsaccel_framework.compiling import decoder_layers

        from .checkpointing import install_checkpoint_contexts

        layers, selective = decoder_layers(base), self.keys["selective_checkpointing"]
        checkpointed = layers[: max(len(layers) - self.keys["uncheckpointed_layers"], 0)]
        chosen = checkpointed if selective is True else checkpointed[len(checkpointed) - int(selective):]
        install_checkpoint_contexts(base.base_model, chosen)
        if chosen:
            ctx.report.add(self.name, f"gradient checkpointing -> selective (attention outputs kept) in {len(chosen)} "
                                      f"of {len(layers)} layers", 1)
        if self.keys["offload_mlp_activations"]:
            self._offload_mlps(layers, len(checkpointed), ctx)

    def _offload_mlps(self, layers: list, checkpointed: int, ctx: TrainContext) -> None:
        from .offload import copies_left_running, offload_layers

        if ctx.fsdp:
            ctx.report.note(self.name, "offload_mlp_activations unused under FSDP")
            return

        def eligible(index: int, mlp) -> bool:  # checkpointed, fused, and its gate/up op saves nothing
            return (index < checkpointed and mlp is not None and "_foak_keep_weights" in mlp.__dict__
                    and not any(hasattr(p, "lora_A") for p in (mlp.gate_proj, mlp.up_proj)))

        mlps = [getattr(layer, "mlp", None) for layer in layers]
        for index, mlp in enumerate(mlps):  # each MLP's forward frees the copies of the offloaded layers below it
            if mlp is not None:
                mlp._foak_copies_running = copies_left_running(index, len(mlps))
        mlps = [mlp if eligible(i, mlp) else None for i, mlp in enumerate(mlps)]
        if not any(mlps):
            raise PluginError("offload_mlp_activations: no checkpointed layer has a fused MLP without LoRA on gate/up "
                              "(the recompute must save the same tensors with or without their matmuls)")
        longest = int(ctx.args.get("per_device_train_batch_size") or 0) * int(ctx.args.get("max_seq_length") or 0)
        chosen = offload_layers(mlps, self.keys["offload_mlp_activations"], self.keys["offload_min_tokens"], longest)
        ctx.report.add(self.name, f"gradient checkpointing -> MLP gate/up of {len(chosen)} layers offloaded to host "
                                  f"memory for the recompute (of {sum(m is not None for m in mlps)} eligible; "
                                  f"steps of {self.keys['offload_min_tokens']}+ tokens)", 1)

    def _budget_checkpointing(self, base, ctx: TrainContext) -> None:
        from fmsaccel_framework.compiling import decoder_layers

        from .checkpointing import enable_activation_budget, layers_to_keep, saved_bytes_per_token

        budget, always = self.keys["activation_budget_gib"], self.keys["uncheckpointed_layers"]
        keys = " and ".join(k for k, v in (("activation_budget_gib", budget), ("uncheckpointed_layers", always)) if v)
        if not ctx.args.get("gradient_checkpointing"):
            # the padding-free foak recipes set a budget for checkpointed runs; `fmsaccel run`'s default is off
            ctx.report.note(self.name, f"{keys} unused: gradient checkpointing is off, so every layer keeps its "
                                       "activations already")
            return
        if ctx.fsdp_checkpoints_layers:
            ctx.report.note(self.name, f"{keys} unused under FSDP: FSDP checkpoints every decoder layer itself")
            return
        layers = decoder_layers(base)
        if not layers:
            raise PluginError(f"{keys}: {type(base).__name__} has no checkpointable decoder layers")
        per_token = saved_bytes_per_token(base.config, dropout_masks=not self.keys["dropout_in_kernel"])
        budget_bytes = int((budget or 0) * 2**30)
        if always:
            ctx.report.add(self.name, f"gradient checkpointing -> the last {min(always, len(layers))} of "
                                      f"{len(layers)} layers never checkpointed", 1)
        if budget:
            floor = min(always, len(layers))
            example = ", ".join(f"{max(floor, layers_to_keep(len(layers), n, budget_bytes, per_token))} at {n:,}"
                                for n in (512, 2048, 8192))
            ctx.report.add(self.name, f"gradient checkpointing -> up to {budget:g} GiB of activations kept, the last "
                                      f"layers unchecked per step (~{per_token / 1024:.0f} KiB a token and layer: of "
                                      f"{len(layers)} layers, {example} tokens)", 1)
        enable_activation_budget(base.get_decoder(), layers, budget_bytes, per_token, always)

    def _shard_vocabulary(self, base, ctx: TrainContext) -> None:
        """Under FSDP, split a frozen lm_head and input embedding by vocabulary instead of letting FSDP gather them.

        The gathered lm_head would be needed at the loss, the gathered embedding (in the root shard
        unit) stays on every rank for the whole step: about 1 GiB each at llama3-8b. Only where every
        rank holds the full tables at this point: quantised models load on every rank (a full-precision
        model loads on rank 0 only, the others are empty).
        """
        import torch.distributed as dist
        from torch import nn

        from .modules import shard_embedding, shard_lm_head

        lm_head, embed = base.get_output_embeddings(), base.get_input_embeddings()
        common = ("the model is not quantised (only rank 0 holds its weights before FSDP)"
                  if self.keys["base_layer"] not in ("bitsandbytes", "auto_gptq")
                  else "no process group" if not (dist.is_available() and dist.is_initialized())
                  else "they are tied" if lm_head.weight is embed.weight
                  else None)
        world = dist.get_world_size() if common is None else 1
        embed_whole = ("the embeddings are trainable" if embed.weight.requires_grad
                       else f"{type(embed).__name__} is not a plain nn.Embedding" if type(embed) is not nn.Embedding
                       else None)
        tables = [  # (module, how to split it, why it stays whole, its name, what FSDP does, what the split costs)
            (lm_head, shard_lm_head, "the lm_head is trainable" if lm_head.weight.requires_grad else None,
             "lm_head", "is gathered at the loss", "vocab-parallel loss, never gathered"),
            (embed, shard_embedding, embed_whole, "input embeddings", "are gathered for each step",
             "ids all-gathered and rows all-reduced per lookup"),
        ]
        for module, split, stays_whole, name, gathered, cost in tables:
            why_not = common or stays_whole
            if why_not:
                ctx.report.note(self.name, f"FSDP: the {name} {gathered} ({why_not})")
                continue
            start, stop, vocab = split(module)
            ctx.report.add(self.name, f"FSDP: {name} split by vocabulary across {world} ranks (rows {start}-{stop} "
                                      f"of {vocab} here), {cost}", 1)

    def _compile_layers(self, base, ctx: TrainContext) -> None:
        from fmsaccel_framework.compiling import compile_decoder_layers, skip_reason

        if self.keys["selective_checkpointing"]:
            raise PluginError("compile_layers and selective_checkpointing cannot be combined (the selective "
                              "policy dispatches every op in Python); choose one")
        why_not = skip_reason(base, ctx.fsdp)
        if why_not:  # the padding-free foak recipes ask for it; an FSDP or CPU run of them still trains, eagerly
            what = "compile_layers and cuda_graphs" if self.keys["cuda_graphs"] else "compile_layers"
            logger.warning("%s: the decoder layers stay eager (%s)", what, why_not)
            ctx.report.note(self.name, f"{what} skipped: {why_not}")
            return
        scope, cuda_graphs = self.keys["compile_layers"], self.keys["cuda_graphs"]
        if cuda_graphs:
            if not ctx.extras.get("padding_free_buckets"):
                logger.warning("cuda_graphs: rows are not bucketed (training.attention.padding_free.bucket_lengths), "
                               "so every new batch shape records new CUDA graphs: slow and memory-hungry unless all "
                               "rows have one length")
                ctx.report.note(self.name, "cuda_graphs without padding-free length buckets: a recording per new "
                                           "shape")
            logger.warning("cuda_graphs is experimental: no run with it has finished on a GPU yet (s9: the first "
                           "crashed in CUDA graph trees under checkpointing, now checkpointed inside each layer; "
                           "the second was cut while compiling); compare with a run without it")
            ctx.report.note(self.name, "cuda_graphs is experimental (not yet seen through a whole GPU run)")
        if self.keys["checkpoint_in_graph"]:
            logger.warning("checkpoint_in_graph: on the GPU (s10c1: torch 2.11, llama3-8b) the compiled layers kept "
                           "their activations as if nothing were checkpointed (2.5x the baseline's peak memory); "
                           "activation_budget_gib skips recomputes within a memory budget instead")
            ctx.report.note(self.name, "checkpoint_in_graph measured without memory savings on the GPU (s10c1)")
        inside = scope is True and (cuda_graphs or self.keys["checkpoint_in_graph"])
        # bitsandbytes' dequantisation would be merged across forward and backward (see compile_decoder_layers)
        cse = self.keys["base_layer"] != "bitsandbytes"
        layers = compile_decoder_layers(base, scope, cuda_graphs, checkpoint_in_graph=inside, cse=cse)
        if not layers:
            raise PluginError(f"compile_layers: {type(base).__name__} has no decoder layers to compile")
        graphs = ", replayed as CUDA graphs (recorded once per shape)" if cuda_graphs else ""
        if not cse:
            graphs += ", CSE off (the backward dequantises again, not kept)"
        if inside and ctx.args.get("gradient_checkpointing"):
            graphs += ", checkpointed inside the graph (the recompute runs in the backward graph)"
        if scope == "model":
            ctx.report.add(self.name, f"{type(base.get_decoder()).__name__} ({len(layers)} "
                                      f"{type(layers[0]).__name__}) -> torch.compile as one region (dynamic shapes; "
                                      f"compiles on the first step){graphs}", 1)
        else:
            ctx.report.add(self.name, f"{type(layers[0]).__name__} -> torch.compile (dynamic shapes, one graph for "
                                      f"all layers; compiles on the first step){graphs}", len(layers))

    def _note_fp8(self, ctx: TrainContext) -> None:
        from .ops import fp8

        if torch.cuda.is_available() and not fp8.supported(torch.device("cuda")):
            raise PluginError(f"fp8_matmul needs a GPU of compute capability 8.9 or newer (Ada, Hopper); this "
                              f"{torch.cuda.get_device_name()} has {torch.cuda.get_device_capability()}")
        ctx.report.note(self.name, f"fp8_matmul: frozen base matmuls (forward and input gradient) in FP8 e4m3, "
                                   f"row-wise scaled, for micro-batches of {fp8.MIN_ROWS}+ tokens; LoRA in "
                                   f"{str(ctx.torch_dtype).removeprefix('torch.')}")

    def _note_replaced_experts(self, base, ctx: TrainContext) -> None:
        """A later plugin (accelerated-moe) may replace the experts' forward, with its own SwiGLU: say so."""
        replaced = [m for m in base.modules() if "_apply_gate" in m.__dict__ and "forward" in m.__dict__]
        if replaced:
            ctx.report.note(self.name, f"{len(replaced)} {type(replaced[0]).__name__} modules got another forward "
                                       "after foak (accelerated-moe); its SwiGLU runs instead of foak's _apply_gate")

    def _note_runtime(self, ctx: TrainContext) -> None:
        from .runtime import kernels_available

        if not torch.cuda.is_available() and not kernels_available("cpu"):
            ctx.report.note(self.name, "no GPU and TRITON_INTERPRET is not set: the Triton kernels fall back to "
                                       "their plain-torch references (correct, not fast)")

    def _with_lora(self, model, ctx: TrainContext):
        """The model with LoRA layers: the quantisation plugin's, or added here from ``ctx.peft_config``."""
        if _lora_layers(model):
            return model
        if ctx.peft_config is None:
            raise PluginError("fused_lora: true needs LoRA adapters (peft_method: lora)")
        model = apply_lora(model, ctx.peft_config)
        ctx.peft_config = None
        ctx.report.add(self.name, "LoRA applied by foak (so its layers can be fused)", len(_lora_layers(model)))
        return model

    def _check_base_layer(self, model) -> None:
        from .base_layers import base_layer_kind

        expected = self.keys["base_layer"]
        for layer in _lora_layers(model):
            try:
                kind = base_layer_kind(layer.base_layer)
            except TypeError as err:
                raise PluginError(f"fused_lora: {err}") from err
            if kind != expected:
                raise PluginError(f"base_layer: {expected} but the LoRA base layers are "
                                  f"{kind or 'plain nn.Linear'}; set base_layer: {kind or 'null'}")

    def _note_unfused(self, base, ctx: TrainContext) -> None:
        lora = {id(m) for m in _lora_layers(base)}
        left = [name for name, m in base.named_modules() if id(m) in lora and not is_fused(m)]
        if left:
            shown = ", ".join(left[:4]) + (f" and {len(left) - 4} more" if len(left) > 4 else "")
            ctx.report.note(self.name, f"{len(left)} LoRA layers outside the rule table keep PEFT's forward: {shown}")


def _uses_trl_fused_head(trainer) -> bool:
    try:
        from trl import SFTTrainer
    except ImportError:
        return False
    return isinstance(trainer, SFTTrainer)


def build(spec, config) -> FusedOpsPlugin:
    return FusedOpsPlugin(spec, config)
