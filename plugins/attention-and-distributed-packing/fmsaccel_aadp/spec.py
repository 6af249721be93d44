"""Spec of the attention-and-distributed-packing ("aadp") plugin (import-light)."""

from fmsaccel_framework import ConfigKey, PluginSpec

CUDNN_MODES = ("always", "unpadded", "never")  # training.attention.sdpa.cudnn

AADP = PluginSpec(
    name="attention-and-distributed-packing",
    description="padding-free attention (flash-attn, torch varlen, flex or masked), multipack batching, "
                "and the SDPA kernel for padded batches",
    paths={
        "training.attention.padding_free": {
            "method": ConfigKey(str, default="huggingface", choices=("huggingface",), help="padding-free method"),
            "backend": ConfigKey(str, default="auto", choices=("auto", "flash_attn", "varlen", "flex", "sdpa_masked"),
                                 help="attention kernel; auto picks the fastest that runs here"),
            "bucket_lengths": ConfigKey(bool, default=False,
                                        help="pad each row with filler examples (not trained on, not counted) to "
                                             "one of a few fixed lengths: the fixed shapes that CUDA graphs need"),
        },
        "training.attention.sdpa": {
            "cudnn": ConfigKey(str, default="unpadded", choices=CUDNN_MODES,
                               help="padded batches: where PyTorch may use cuDNN attention, which plans a kernel per "
                                    "new sequence length (always: PyTorch's choice; unpadded: not for batches with "
                                    "padding; never)"),
        },
        "training.dataloader.multipack": {
            "num_processes": ConfigKey(int, default=16, help="processes used to compute lengths"),
        },
    },
    factory="fmsaccel_aadp.plugin:build",
    order=30,
    requires=(),
    extra="padding-free",
)
