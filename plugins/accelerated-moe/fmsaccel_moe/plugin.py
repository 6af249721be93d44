"""The accelerated-MoE plugin: ScatterMoE experts, LoRA on experts, expert parallelism.

``augment`` (after the PEFT loaders and the other kernels):
1. finds the MoE blocks through the rule table (a clear error for anything else);
2. when the LoRA config names ``experts``, applies PEFT itself with the experts as
   ``target_parameters`` (``ctx.peft_config`` becomes None);
3. with ``ep_degree > 1``, shards the experts over the EP group;
4. picks the GEMM backend and replaces each experts module's forward;
5. on a bitsandbytes 4-bit model with frozen experts (QLoRA), keeps the expert
   weights 4-bit too (``quantized``);
6. keeps the auxiliary load-balancing loss in the loss when the run asks for it.

``prepare_trainer`` (sharded experts only) tells DDP to leave the shards alone,
averages their gradients, makes gradient clipping use the whole model's norm and
gathers the shards whenever the trainer saves.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import torch

from fmsaccel_framework.plugin import AccelerationPlugin, PluginError, TrainContext

from . import expert_parallel
from .backend import ExpertShape, resolve_backend, typical_batch_tokens, warm_up_triton
from .lora import expert_lora_config, wants_expert_lora
from .patch import ExpertsSettings, is_patched, patch_site, runs_in_graph
from .quantized import four_bit_quant_type, quantize_experts
from .router_logits import supply_router_logits
from .rules import find_moe_sites

CONFIG_PATH = "training.moe.scattermoe"
logger = logging.getLogger(__name__)


class MoEPlugin(AccelerationPlugin):
    def __init__(self, spec, config):
        super().__init__(spec, config)
        keys = config[CONFIG_PATH]
        self.ep_degree: int = int(keys["ep_degree"])
        self.disable_distributed: bool = bool(keys["disable_distributed"])
        self.backend: str = keys.get("backend", "auto")
        self.compile_layers: bool = bool(keys.get("compile_layers", False))
        if self.ep_degree < 1:
            raise PluginError(f"accelerated-moe: ep_degree must be >= 1, got {self.ep_degree}")
        self.shard: expert_parallel.EPShard | None = None
        self.hooks: list = []

    def augment(self, model, ctx: TrainContext):
        sites = find_moe_sites(model)
        rule, experts_class = sites[0].rule, type(sites[0].experts).__name__
        sharded = self.ep_degree > 1 and not self.disable_distributed
        if self.ep_degree > 1 and self.disable_distributed:
            ctx.report.note(self.name, f"disable_distributed: ep_degree={self.ep_degree} ignored, experts replicated")

        if ctx.peft_config is not None and wants_expert_lora(ctx.peft_config, rule):
            if sharded:
                raise PluginError("accelerated-moe: LoRA on experts with ep_degree > 1 is not supported")
            from peft import get_peft_model

            model = get_peft_model(model, expert_lora_config(ctx.peft_config, rule))
            ctx.peft_config = None
            sites = find_moe_sites(model)
            ctx.report.add(self.name, f"{experts_class} gate_up_proj/down_proj -> per-expert LoRA (PEFT)", len(sites))
        if sharded and any(site.head is not site.experts for site in sites):
            raise PluginError("accelerated-moe: LoRA on experts with ep_degree > 1 is not supported")

        if sharded:
            self.shard = expert_parallel.init_expert_parallel(self.ep_degree)
            for site in sites:
                expert_parallel.shard_experts(site.experts, self.shard)
            ctx.report.note(
                self.name,
                f"expert parallel: {self.ep_degree} ranks share the experts, "
                f"{sites[0].experts.gate_up_proj.size(0)} per rank, all-to-all token exchange",
            )

        _keep_experts_4bit(model, sites, ctx, self.name)
        shapes = {_shape(site, model.config) for site in sites}
        batch = int(ctx.args.get("per_device_train_batch_size", 8))
        tokens, source = typical_batch_tokens(ctx.extras.get("example_lengths"), batch,
                                              batch * int(ctx.args.get("max_seq_length", 1024)),
                                              packed=bool(ctx.extras.get("padding_free")),
                                              multipack=bool(ctx.extras.get("multipack")))
        if torch.cuda.is_available():
            _check_routing_kernels(shapes, ctx, self.name)
        backend, why = resolve_backend(self.backend, shapes, tokens)
        ctx.report.note(self.name, f"experts GEMM backend: {why}"
                        + (f" ({tokens} tokens: {source})" if why.startswith("auto") else ""))
        ctx.extras["moe_backend"] = backend
        if torch.cuda.is_available():
            counts = warm_up_triton(shapes, backend=backend)
            warmed = (f"Triton kernels compiled and tuned before training at {len(counts)} token counts "
                      f"({', '.join(map(str, counts))}): both row-tile heights, both parities" if backend == "triton"
                      else "SwiGLU runs as the Triton row kernels; compiled before training")
            ctx.report.note(self.name, warmed)

        settings = ExpertsSettings(backend=backend, shard=self.shard)
        patched = sum(patch_site(site, settings) for site in sites)
        ctx.report.add(self.name, f"{experts_class}.forward -> scattermoe ({backend})", patched)
        ctx.report.note(self.name, f"router kept as {model.config.model_type} computes it: {rule.routing}")
        _keep_aux_loss(model, ctx, self.name)
        self.sites = sites
        return model

    def prepare_trainer(self, trainer, ctx: TrainContext) -> None:
        # PEFT may have wrapped expert parameters after augment; patch the new outermost module.
        self.sites = find_moe_sites(trainer.model)
        for site in self.sites:
            if not is_patched(site.head):
                patch_site(site, site.experts._fmsaccel_moe)
        if getattr(trainer, "aux_loss_enabled", False):  # TRL's SFTTrainer decides from router_aux_loss_coef
            ctx.report.note(self.name, f"load-balancing loss in the loss (coef {trainer.router_aux_loss_coef}, TRL)")
        self._compile_layers(trainer.model, ctx)
        if self.shard is None:
            return
        experts = [site.experts for site in self.sites]
        weights = [getattr(m, name) for m in experts for name in expert_parallel.EXPERT_PARAMETERS]
        params = [w for w in weights if isinstance(w, torch.nn.Parameter)]
        ids = {id(p) for p in params} | {id(b) for m in experts for b in m.buffers()}  # 4-bit shards are buffers
        named = [*trainer.model.named_parameters(), *trainer.model.named_buffers()]
        trainer.model._ddp_params_and_buffers_to_ignore = [name for name, t in named if id(t) in ids]
        self.hooks = expert_parallel.average_expert_grads(params, self.shard)
        trainer.accelerator.clip_grad_norm_ = _ep_clip(trainer.accelerator, ids, self.shard)
        if any(p.requires_grad for p in params):
            trainer.save_model = _gathering_save(trainer.save_model, experts, self.shard)
        ctx.report.note(self.name, "sharded experts: DDP ignores them, gradients averaged, clipping on the full norm")

    def _compile_layers(self, model, ctx: TrainContext) -> None:
        """Short MoE steps are paced by the CPU launching attention, norm, router and expert kernels one by one;
        compiled layers launch a few fused graphs, the experts among them as custom ops (``graph_ops``).
        Layers compiled by this plugin or by foak get their router logits supplied (``router_logits``)."""
        from fmsaccel_framework.compiling import compile_decoder_layers, compiled_layers, skip_reason
        from fmsaccel_framework.lora import unwrap_peft

        base = unwrap_peft(model)
        in_graph = all(runs_in_graph(site.head) for site in self.sites)
        where = "experts as custom ops in it" if in_graph else \
            "experts (LoRA on experts, 4-bit or sharded) run between its graphs"
        if compiled_layers(base):  # foak's compile_layers ran first (order 20): the same regions
            ctx.report.note(self.name, f"the decoder layers are compiled (foak's compile_layers), {where}")
        elif not self.compile_layers:
            return
        else:
            why_not = skip_reason(base, ctx.fsdp)
            if why_not:
                logger.warning("compile_layers: the decoder layers stay eager (%s)", why_not)
                ctx.report.note(self.name, f"compile_layers skipped: {why_not}")
                return
            layers = compile_decoder_layers(base)
            if not layers:
                raise PluginError(f"accelerated-moe compile_layers: {type(base).__name__} has no decoder layers")
            ctx.report.add(self.name, f"{type(layers[0]).__name__} -> torch.compile (dynamic shapes, one graph for "
                                      f"all layers, {where}; compiles on the first step)", len(layers))
        if not supply_router_logits(base.get_decoder(), self.sites, base.config):
            logger.warning("compile_layers: %s returns no [tokens, experts] logits; compiled layers record none, "
                           "so the load-balancing loss cannot be computed", type(self.sites[0].block).__name__)
            ctx.report.note(self.name, "compile_layers: no router logits recorded (no load-balancing loss)")


def _shape(site, config) -> ExpertShape:
    gate_up = site.experts.gate_up_proj
    return ExpertShape(
        num_experts=gate_up.size(0),
        hidden=gate_up.size(2),
        intermediate=gate_up.size(1) // 2,
        top_k=int(config.num_experts_per_tok),
        dtype=gate_up.dtype,
    )


def _check_routing_kernels(shapes, ctx: TrainContext, name: str, device: torch.device | None = None) -> None:
    """Turn the Triton routing kernels off, loudly, where they do not give the torch routing on this GPU."""
    from . import routing
    from .routing_kernels import agrees_with_torch

    shape = max(shapes, key=lambda s: s.num_experts)
    device = device or torch.device("cuda", torch.cuda.current_device())
    try:
        agree = agrees_with_torch(device, shape.num_experts, shape.top_k)
        problem = "they disagree with the torch routing here"
    except Exception as err:  # noqa: BLE001 (a Triton or driver these kernels do not suit: torch routing instead)
        agree, problem = False, f"{type(err).__name__}: {err}"
    routing.KERNELS = agree
    if not agree:
        message = f"routing kernels off ({problem}): routing runs as ~30 torch ops a layer"
        logger.warning("accelerated-moe: %s", message)
        ctx.report.note(name, message)


def _keep_experts_4bit(model, sites, ctx: TrainContext, plugin: str) -> None:
    """QLoRA on a bitsandbytes 4-bit model: frozen expert weights go 4-bit as well."""
    quant_type = four_bit_quant_type(model)
    if quant_type is None:
        return
    frozen = [s for s in sites if not any(getattr(s.experts, n).requires_grad for n in ("gate_up_proj", "down_proj"))]
    for site in frozen:
        quantize_experts(site.experts, quant_type)
    if frozen:
        what = f"{type(frozen[0].experts).__name__} weights -> 4-bit {quant_type} (dequantised per use)"
        ctx.report.add(plugin, what, len(frozen))
    if len(frozen) < len(sites):
        ctx.report.note(plugin, "4-bit model with trainable experts: their weights stay 16-bit")


def _keep_aux_loss(model, ctx: TrainContext, plugin: str) -> None:
    """The router logits stay recorded, so HF adds the load-balancing loss when the run asks."""
    config = model.config  # (config.num_experts, which TRL reads, is aliased for every run in fmsaccel_cli.train)
    if "output_router_logits" in ctx.args:
        config.output_router_logits = bool(ctx.args["output_router_logits"])
    if "router_aux_loss_coef" in ctx.args:
        config.router_aux_loss_coef = float(ctx.args["router_aux_loss_coef"])
    if getattr(config, "output_router_logits", False):
        ctx.report.note(plugin, f"load-balancing loss in the loss (coef {config.router_aux_loss_coef})")


def _ep_clip(accelerator, expert_ids: set[int], shard):
    def clip_grad_norm_(parameters, max_norm, norm_type=2):
        accelerator.unscale_gradients()
        return expert_parallel.clip_grad_norm_(parameters, max_norm, norm_type, expert_params=expert_ids, shard=shard)

    return clip_grad_norm_


def _gathering_save(save_model, experts: list[torch.nn.Module], shard):
    @functools.wraps(save_model)
    def save(*args: Any, **kwargs: Any):
        with expert_parallel.gathered_experts(experts, shard):
            return save_model(*args, **kwargs)

    return save


def build(spec, config) -> MoEPlugin:
    return MoEPlugin(spec, config)
