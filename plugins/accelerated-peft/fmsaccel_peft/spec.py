"""Specs of the accelerated-PEFT plugins (import-light: no torch here)."""

from fmsaccel_framework import ConfigKey, PluginSpec

BNB = PluginSpec(
    name="accelerated-peft-bnb",
    description="4-bit QLoRA through bitsandbytes (nf4/fp4); runs on the CPU too",
    paths={
        "peft.quantization.bitsandbytes": {
            "quant_type": ConfigKey(str, choices=("nf4", "fp4"), help="4-bit data type"),
            "no_peft_model": ConfigKey(bool, default=False,
                                       help="true: leave LoRA to the trainer (plain TRL QLoRA baseline)"),
            "double_quant": ConfigKey(bool, default=True, help="quantise the quantisation constants too"),
            "compute_dtype": ConfigKey((str, type(None)), default=None, help="matmul dtype; default torch_dtype"),
            "quant_storage": ConfigKey((str, type(None)), default=None, help="storage dtype of packed weights (FSDP)"),
        }
    },
    factory="fmsaccel_peft.bnb:build",
    order=10,
    loads_model=True,
    requires=("bitsandbytes", "peft"),
    extra="peft",
)

GPTQ = PluginSpec(
    name="accelerated-peft-gptq",
    description="GPTQ-LoRA on our own Triton dequantise+matmul kernels (plain torch on the CPU)",
    paths={
        "peft.quantization.auto_gptq": {
            "kernel": ConfigKey(str, default="triton_v2", choices=("triton_v2",), help="quantised matmul kernel"),
            "from_quantized": ConfigKey(bool, default=True, help="load an already quantised GPTQ checkpoint"),
            "use_external_lib": ConfigKey(bool, default=False, choices=(False,), help="AutoGPTQ is not used"),
        }
    },
    factory="fmsaccel_peft.gptq.plugin:build",
    order=10,
    loads_model=True,
    requires=("triton", "safetensors", "peft"),
    extra="gptq",
)
