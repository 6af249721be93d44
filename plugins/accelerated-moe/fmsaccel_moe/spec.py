"""Spec of the accelerated-MoE plugin (import-light)."""

from fmsaccel_framework import ConfigKey, PluginSpec

MOE = PluginSpec(
    name="accelerated-moe",
    description="ScatterMoE-style Triton expert kernels, expert parallelism, LoRA and 4-bit on experts",
    paths={
        "training.moe.scattermoe": {
            "ep_degree": ConfigKey(int, default=1, help="expert-parallel degree (ranks sharing the experts)"),
            "disable_distributed": ConfigKey(bool, default=False, help="keep all experts on every rank"),
            "backend": ConfigKey(
                str,
                default="auto",
                choices=("auto", "triton", "grouped_mm"),
                help="expert GEMMs: Triton ScatterMoE kernels, torch grouped_mm, or the faster of the two (timed)",
            ),
            "compile_layers": ConfigKey(
                bool,
                default=False,
                help="torch.compile each decoder layer (dynamic shapes), the experts as custom ops in its graph: "
                "far fewer launches on short steps; CUDA only, not under FSDP",
            ),
        }
    },
    factory="fmsaccel_moe.plugin:build",
    order=40,
    requires=("triton",),
    extra="moe",
    architectures=("mixtral", "granitemoe", "granitemoeshared", "granitemoehybrid", "qwen2_moe", "qwen3_moe"),
)
