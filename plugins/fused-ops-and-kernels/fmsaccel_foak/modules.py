"""Replacement forwards, installed per module instance (or per modeling module, for RoPE).

Every function here computes what the Hugging Face / PEFT forward it replaces
computes, through the fused ops. Instances keep their class, parameters and names,
so state dicts, PEFT adapter saving and ``print(model)`` are unchanged; the patch
report says what was replaced.
"""

from __future__ import annotations

import functools
import types
from collections.abc import Callable

import torch
from torch import nn

from . import offload as offload_module
from . import ops
from .checkpointing import checkpointed_forward, recomputing


# --- RMSNorm -------------------------------------------------------------------------------------------------------
def rms_norm_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    return ops.rms_norm(hidden_states, self.weight, self.variance_epsilon)


def gemma_rms_norm_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    return ops.rms_norm(hidden_states, self.weight, self.eps, gemma=True)


# --- RoPE ----------------------------------------------------------------------------------------------------------
def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
    """Drop-in for ``modeling_*.apply_rotary_pos_emb``: per-token cos/sin come from the model's ``position_ids``."""
    return ops.rope(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim)


# --- LoRA layers ---------------------------------------------------------------------------------------------------
def fusable(layer: nn.Module) -> bool:
    """A PEFT LoRA layer in the plain state the fused op computes (one active adapter, not merged or disabled).

    Bare base layers (no LoRA) always are.
    """
    if not hasattr(layer, "lora_A"):
        return True
    active = layer.active_adapters
    return (not layer.disable_adapters and not layer.merged and len(active) == 1 and active[0] in layer.lora_A)


def fused_linear_forward(keep_weights: bool, **op_options) -> Callable:
    """Forward of one LoRA layer through the fused op (PEFT's own forward when it is not in a fusable state).

    ``op_options``: :func:`fmsaccel_foak.ops.fused_lora`'s keyword options (``fp8``, ``dropout_in_kernel``), as
    for the attention and MLP forwards below.
    """

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if args or kwargs or not fusable(self):
            return type(self).forward(self, x, *args, **kwargs)
        return ops.fused_lora(x, [self], keep_weights and self._foak_keep_weights, **op_options)[0]

    return forward


def fused_attention_forward(modeling, keep_weights: bool, sliding_window: str | None = None, head_norms: bool = False,
                            **op_options) -> Callable:
    """Rotary self-attention forward (Llama family) with q, k and v from one fused op over the shared input.

    Written out per architecture family rather than wrapping the original forward, so
    that nothing is mutated during the call (``torch.compile`` traces it as one graph).
    ``modeling`` is the architecture's transformers module (its ``apply_rotary_pos_emb``
    and ``eager_attention_forward`` are looked up at call time, so the RoPE rule applies);
    ``sliding_window`` says where the architecture keeps its window (``"config"``,
    ``"module"`` or None); ``head_norms`` applies Qwen3's per-head ``q_norm``/``k_norm``.
    Projections not in a fusable state (merged, disabled, several adapters) take the
    original forward.
    """
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, *args, **kwargs):
        projections = (self.q_proj, self.k_proj, self.v_proj)
        if args or not all(fusable(p) for p in projections):
            return type(self).forward(self, hidden_states, position_embeddings, attention_mask, *args, **kwargs)
        cache = kwargs.pop("cache", None)  # transformers >= 5.2x; earlier: past_key_values
        legacy_cache = kwargs.pop("past_key_values", None)
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        keep = keep_weights and self._foak_keep_weights
        query, key, value = (t.view(hidden_shape) for t in ops.fused_lora(hidden_states, projections, keep,
                                                                          **op_options))
        if head_norms:
            query, key = self.q_norm(query), self.k_norm(key)
        query, key, value = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
        cos, sin = position_embeddings
        query, key = modeling.apply_rotary_pos_emb(query, key, cos, sin)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx, kwargs=kwargs)
        elif legacy_cache is not None:
            key, value = legacy_cache.update(key, value, self.layer_idx)
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation,
                                                          modeling.eager_attention_forward)
        if sliding_window == "config":
            kwargs["sliding_window"] = getattr(self.config, "sliding_window", None)
        elif sliding_window == "module":
            kwargs["sliding_window"] = self.sliding_window
        output, weights = attention(self, query, key, value, attention_mask,
                                    dropout=0.0 if not self.training else self.attention_dropout,
                                    scaling=self.scaling, **kwargs)
        return self.o_proj(output.reshape(*input_shape, -1).contiguous()), weights

    return forward


# --- MLP -----------------------------------------------------------------------------------------------------------
def swiglu_mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.down_proj(ops.swiglu(self.gate_proj(x), self.up_proj(x)))


def fused_mlp_forward(keep_weights: bool, fast_swiglu: bool, **op_options) -> Callable:
    """Gated MLP with gate/up in one fused op and down in another.

    The down projection never keeps its dequantised weight: under checkpointing that
    saved copy would force the recompute to run the layer's last matmul, which
    otherwise is skipped (nothing after it is needed for the backward). For the same
    reason the recompute does not compute the SwiGLU output unless a later op saves it
    (a LoRA on ``down_proj``), and the SwiGLU backward writes its gradients over the
    ``gate`` and ``up`` it saved, which only it reads.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layers = (self.gate_proj, self.up_proj, self.down_proj)
        if not all(fusable(p) for p in layers):
            return type(self).forward(self, x)
        eager = not torch.compiler.is_compiling()  # compiled graphs plan their own buffers and recompute
        rerun = eager and recomputing()
        offload = self.__dict__.get("_foak_offload") if eager else None  # see fmsaccel_foak.offload
        copies_running = self.__dict__.get("_foak_copies_running", ())  # the layers below whose copies it leaves
        taken = None
        if rerun:
            offload_module.retire_in_flight()  # the forward's last copy to the host is done with on the device
            taken = offload.take() if offload is not None else None
            below = self.__dict__.get("_foak_offload_below")
            if below is not None:  # the next offloaded layer down starts coming back during this one's backward
                below.prefetch()
        elif eager and offload is None:
            # a forward past offloaded layers: their copies to the host are done with on the device (but those of
            # the layers right below, which may still be running), so their gate/up are freed here, not held
            # through the rest of the forward and the loss
            offload_module.retire_in_flight(keep=copies_running)
        if taken is not None:  # the forward's gate/up, back from the host: their matmuls are not rerun
            # (requiring grad as the op's outputs did, so the SwiGLU records and saves them as in the forward)
            gate, up = (t.requires_grad_() for t in taken)
        else:
            keep = keep_weights and self._foak_keep_weights and offload is None
            gate, up = ops.fused_lora(x, layers[:2], keep, **op_options)
            if offload is not None and checkpointed_forward() and torch.is_grad_enabled():
                offload.save(gate, up, copies_running)
        if fast_swiglu:
            hidden = ops.swiglu(gate, up, grads_in_place=eager, output_if_recompute_goes_on=rerun)
        else:
            hidden = self.act_fn(gate) * up
        return ops.fused_lora(hidden, layers[2:], keep_weights=False, **op_options)[0]

    return forward


# --- MoE experts ---------------------------------------------------------------------------------------------------
def experts_apply_gate(self, gate_up_out: torch.Tensor) -> torch.Tensor:
    """``_apply_gate`` of transformers' experts (grouped_mm / batched_mm paths): packed ``[gate; up]`` -> SwiGLU."""
    return ops.swiglu_packed(gate_up_out)


# --- loss ----------------------------------------------------------------------------------------------------------
def causal_lm_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    vocab_size: int,
    num_items_in_batch: torch.Tensor | int | None = None,
    ignore_index: int = -100,
    shift_labels: torch.Tensor | None = None,
    **kwargs,
) -> torch.Tensor:
    """``loss_function`` of a causal LM (same arguments as transformers' ``ForCausalLMLoss``), Triton cross-entropy.

    The logits stay in their dtype; statistics are fp32 inside the kernel.
    """
    if shift_labels is None:
        labels = nn.functional.pad(labels, (0, 1), value=ignore_index)
        shift_labels = labels[..., 1:]
    logits = logits.reshape(-1, vocab_size)
    shift_labels = shift_labels.reshape(-1).to(logits.device)
    return ops.cross_entropy(logits, shift_labels, ignore_index, num_items_in_batch=num_items_in_batch)


def _aligned_targets(labels, shift_labels, ignore_index: int = -100) -> torch.Tensor:
    """Each position's next-token target (``ignore_index`` where there is none), the hidden states' shape."""
    if shift_labels is not None:
        return shift_labels
    return nn.functional.pad(labels[..., 1:], (0, 1), value=ignore_index)


def fused_loss_forward(original: Callable, logit_scale: float, aux_loss: Callable | None) -> Callable:
    """Causal-LM forward whose training loss is the chunked linear+CE: the full logits never exist.

    Used when training with labels, and for TRL's ``fused_lm_head=True`` protocol (its
    ``SFTTrainer`` asks the model for per-token log-probabilities, entropy and top-1 flags
    instead of logits). Anything else (eval, generation, no labels) goes to ``original``.
    ``aux_loss(self, backbone_outputs, attention_mask)`` adds the MoE load-balancing loss.
    """

    @functools.wraps(original)
    def forward(self, *args, labels=None, shift_labels=None, num_items_in_batch=None, fused_lm_head=False,
                **kwargs):
        if not fused_lm_head and (labels is None and shift_labels is None or not self.training):
            extra = {k: v for k, v in (("labels", labels), ("shift_labels", shift_labels),
                                       ("num_items_in_batch", num_items_in_batch)) if v is not None}
            return original(self, *args, **kwargs, **extra)
        kwargs.pop("logits_to_keep", None)
        if aux_loss is not None and getattr(self.config, "output_router_logits", False):
            kwargs.setdefault("output_router_logits", True)
        outputs = self.base_model(*args, **kwargs)
        hidden = outputs.last_hidden_state
        targets = _aligned_targets(labels, shift_labels).to(hidden.device)
        mask = targets != -100
        # Every position is scored and the ignored ones zeroed after: picking the scored rows out (``hidden[mask]``)
        # would make the host wait for the GPU in every step (a data-dependent shape), for a few rows' work saved
        hidden, safe_targets = hidden.reshape(-1, hidden.shape[-1]), torch.where(mask, targets, 0).reshape(-1)
        lm_head = self.get_output_embeddings()
        shard = getattr(lm_head, "vocab_shard", None)  # see shard_lm_head
        if shard is not None:
            logp, entropy, top1 = ops.token_logprobs_vocab_parallel(hidden, shard, lm_head.vocab_start, safe_targets,
                                                                    logit_scale)
        else:
            logp, entropy, top1 = ops.token_logprobs(hidden, lm_head.weight, safe_targets, logit_scale)
        flat_mask = mask.reshape(-1)
        logp = torch.where(flat_mask, logp, 0.0).view(mask.shape)
        entropy = torch.where(flat_mask, entropy, 0.0).view(mask.shape)
        top1 = (top1 & flat_mask).view(mask.shape)
        if shift_labels is None:  # TRL's shape: one position a row fewer (the last has no next token)
            logp, entropy, top1, mask = logp[:, :-1], entropy[:, :-1], top1[:, :-1], mask[:, :-1]
        denominator = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        loss = -logp.sum() / denominator
        moe_loss = None
        if aux_loss is not None and kwargs.get("output_router_logits"):
            moe_loss = aux_loss(self, outputs, kwargs.get("attention_mask"))
            loss = loss + self.config.router_aux_loss_coef * moe_loss.to(loss.device)
        if fused_lm_head:
            from trl.trainer.utils import FusedCausalLMOutput

            return FusedCausalLMOutput(loss=loss, log_probs=logp, entropy=entropy, is_top1=top1, label_mask=mask,
                                       aux_loss=moe_loss)
        return _causal_lm_output(loss, moe_loss, outputs)

    return forward


def _this_ranks_rows(weight: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """This rank's block of vocabulary rows (a copy), its first row, and rows per rank (the last may be short)."""
    import torch.distributed as dist

    world, rank = dist.get_world_size(), dist.get_rank()
    vocab = weight.shape[0]
    per_rank = -(-vocab // world)
    start, stop = min(rank * per_rank, vocab), min((rank + 1) * per_rank, vocab)
    return weight.detach()[start:stop].clone(), start, per_rank


def shard_lm_head(lm_head: nn.Linear) -> tuple[int, int, int]:
    """Keep only this rank's rows of a frozen, untied lm_head, for the vocab-parallel loss (FSDP).

    The rows become a buffer, which FSDP neither shards nor gathers; the fused loss
    forward finds it (``vocab_shard``) and computes the loss across ranks. Anything that
    still asks for logits (evaluation, generation) gets them through an all-gather.
    Returns (first row, last row + 1, vocabulary size).
    """
    vocab = lm_head.weight.shape[0]
    shard, start, per_rank = _this_ranks_rows(lm_head.weight)
    del lm_head.weight
    lm_head.register_buffer("vocab_shard", shard, persistent=False)
    lm_head.vocab_start, lm_head.vocab_size, lm_head.per_rank = start, vocab, per_rank
    lm_head.forward = types.MethodType(_gathered_logits_forward, lm_head)
    return start, start + shard.shape[0], vocab


def shard_embedding(embed: nn.Embedding) -> tuple[int, int, int]:
    """Keep only this rank's rows of a frozen input embedding (FSDP); each lookup sums the ranks' rows.

    Under FSDP the embedding sits in the root shard unit, which stays gathered from the
    first forward to the end of the backward: the full table on every rank for the whole
    step. Split by vocabulary instead, a lookup costs an all-gather of the ids (and of their counts,
    with a host sync) and an all-reduce of world x tokens rows.
    Returns (first row, last row + 1, vocabulary size).
    """
    vocab = embed.weight.shape[0]
    shard, start, _ = _this_ranks_rows(embed.weight)
    del embed.weight
    embed.register_buffer("vocab_shard", shard, persistent=False)
    embed.vocab_start = start
    embed.forward = types.MethodType(_vocab_parallel_embedding_forward, embed)
    return start, start + shard.shape[0], vocab


def _vocab_parallel_embedding_forward(self, input_ids: torch.Tensor) -> torch.Tensor:
    """Every rank's ids are looked up in every rank's rows (zeros for rows held elsewhere) and summed.

    Ranks train on different batches, so the ids are gathered first (padded to the longest);
    exactly one rank contributes each row, so the sum is exact in any dtype.
    """
    import torch.distributed as dist

    from .ops.vocab_parallel import gather_rows, most_rows

    flat = input_ids.reshape(-1)
    rows = most_rows(flat)
    local = gather_rows(flat, rows) - self.vocab_start
    inside = (local >= 0) & (local < self.vocab_shard.shape[0])
    embedded = nn.functional.embedding(torch.where(inside, local, 0), self.vocab_shard)
    embedded = embedded * inside.unsqueeze(-1).to(embedded.dtype)
    dist.all_reduce(embedded)
    mine = dist.get_rank() * rows
    return embedded[mine: mine + flat.numel()].reshape(*input_ids.shape, -1)


def _gathered_logits_forward(self, hidden: torch.Tensor) -> torch.Tensor:
    """Logits through the full lm_head, gathered from the ranks' rows for this call (evaluation, generation).

    Like FSDP's own gathering, every rank must call it together.
    """
    from .ops.vocab_parallel import gather_rows

    weight = gather_rows(self.vocab_shard, self.per_rank)[: self.vocab_size]
    return hidden @ weight.to(hidden.dtype).t()


def _causal_lm_output(loss, moe_loss, outputs):
    from transformers.modeling_outputs import CausalLMOutputWithPast, MoeCausalLMOutputWithPast

    common = dict(loss=loss, logits=None, hidden_states=outputs.hidden_states, attentions=outputs.attentions)
    if moe_loss is None and getattr(outputs, "router_logits", None) is None:
        return CausalLMOutputWithPast(**common)
    return MoeCausalLMOutputWithPast(**common, aux_loss=moe_loss, router_logits=outputs.router_logits)
