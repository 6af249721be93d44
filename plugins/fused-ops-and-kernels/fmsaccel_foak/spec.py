"""Spec of the fused-ops-and-kernels ("foak") plugin (import-light)."""

from fmsaccel_framework import ConfigKey, PluginSpec

from .rules import RULES  # plain data (typing only): the spec stays import-light

_KEYS = {
    "base_layer": ConfigKey((str, type(None)), default=None, choices=("auto_gptq", "bitsandbytes", None),
                            help="quantised base layer the fused LoRA dequantises; null for bf16 LoRA / full FT"),
    "fused_lora": ConfigKey(bool, default=False, help="fused base+LoRA autograd for attention and MLP"),
    "fast_loss": ConfigKey((bool, str), default=False, choices=(True, False, "fused_ce_liger"),
                           help="true: Triton cross-entropy; fused_ce_liger: chunked linear+CE, no full logits"),
    "fast_rms_layernorm": ConfigKey(bool, default=False, help="Triton RMSNorm"),
    "fast_rope_embeddings": ConfigKey(bool, default=False, help="Triton RoPE with position_ids"),
    "fast_swiglu": ConfigKey(bool, default=False, help="Triton SwiGLU in the MLP"),
    "fp8_matmul": ConfigKey(bool, default=False,
                            help="fused LoRA: frozen base matmuls in FP8 e4m3 (row-wise scales) at 4096+ tokens"),
    "dropout_in_kernel": ConfigKey(bool, default=False,
                                   help="fused LoRA: dropout drawn inside Triton kernels from a per-projection seed "
                                        "(no mask stored, fewer memory passes); not PEFT's random stream"),
    "compile_layers": ConfigKey((bool, str), default=False, choices=(True, False, "model"),
                                help="torch.compile each decoder layer (one graph, dynamic lengths): far fewer "
                                     "kernel launches and less Python per step; compiles on the first step; "
                                     "'model': the whole decoder stack as one region (longer compile)"),
    "cuda_graphs": ConfigKey(bool, default=False,
                             help="with compile_layers, replay the compiled forwards and backwards as CUDA graphs "
                                  "(one recording per row shape: pair with padding_free.bucket_lengths)"),
    "checkpoint_in_graph": ConfigKey(bool, default=False,
                                     help="with compile_layers true, each layer checkpoints inside its compiled "
                                          "region: one compiled forward call per layer and step, the recompute in "
                                          "the backward graph (always so with cuda_graphs)"),
    "selective_checkpointing": ConfigKey((bool, int), default=False,
                                         help="under gradient checkpointing, keep attention outputs (memory and "
                                              "per-op CPU time for less recompute: long sequences only); true for "
                                              "every layer, N for the last N checkpointed ones"),
    "offload_mlp_activations": ConfigKey(int, default=0,
                                         help="under gradient checkpointing, N layers' MLP gate/up outputs are copied "
                                              "to host memory in the forward and back for the recompute, which then "
                                              "skips their matmuls (PCIe time instead of GPU time)"),
    "offload_min_tokens": ConfigKey(int, default=8192,
                                    help="steps of fewer tokens offload nothing: they are paced by the host, "
                                         "where the copies cost more than the rerun they save"),
    "uncheckpointed_layers": ConfigKey(int, default=0,
                                       help="under gradient checkpointing, the last N decoder layers are never "
                                            "checkpointed; the last one costs about no peak memory (its activations "
                                            "stand in for its recompute's)"),
    "loss_filter_on_device": ConfigKey(bool, default=False,
                                       help="the trainer's NaN/Inf loss filter (logging_nan_inf_filter) as one "
                                            "torch.where on the device, instead of a host wait for every step's "
                                            "loss; the logged losses are the same"),
    "non_blocking_batches": ConfigKey(bool, default=False,
                                      help="each batch's copy to the GPU is queued (pinned memory, accelerate's "
                                           "non_blocking) instead of making the host wait for the GPU to drain at "
                                           "every step"),
    "activation_budget_gib": ConfigKey((int, float, type(None)), default=None,
                                       help="under gradient checkpointing, each step runs its last decoder layers "
                                            "unchecked while their activations fit in this many GiB: short "
                                            "padding-free steps skip most of the recompute"),
}

FOAK = PluginSpec(
    name="fused-ops-and-kernels",
    description="fused LoRA, fused linear cross-entropy, RMSNorm, RoPE, SwiGLU Triton kernels",
    paths={
        "peft.quantization.fused_ops_and_kernels": _KEYS,
        "training.fused_ops_and_kernels": _KEYS,
    },
    factory="fmsaccel_foak.plugin:build",
    order=20,
    requires=("triton",),
    extra="kernels",
    architectures=tuple(RULES),
)
