"""fused-ops-and-kernels (foak): Triton kernels and fused LoRA ops, patched into models by a rule table.

``spec`` (import-light) declares the plugin; ``plugin.build`` is its factory; ``ops`` holds the kernels.
"""
