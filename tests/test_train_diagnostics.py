"""The profile's guard summary: what Dynamo checks before each call of a compiled region (foak's compile_layers)."""

import torch
from torch import nn


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.eps = 1e-5  # a float attribute: Dynamo checks it in Python (a lambda guard)

    def forward(self, x):
        return self.lin(x) + self.eps


def test_guard_summary_counts_the_guards_of_each_compiled_region_and_lists_the_python_ones():
    # training-side modules are imported inside tests, not at collection: fmsaccel_cli.train imports the plugins'
    # Triton kernels, which must be decorated after the plugin conftests choose Triton's interpreter (tests/ is
    # collected first)
    from fmsaccel_cli.run_metrics import guard_summary

    torch._dynamo.reset()
    model = nn.Sequential(_Block(), _Block())
    assert guard_summary(model) == ""  # nothing compiled, nothing to say
    for block in model:
        block.compile(backend="eager", dynamic=True)
    model(torch.randn(3, 8))
    lines = guard_summary(model).splitlines()
    head = lines[0]
    assert head.startswith("guards of _Block.forward (cache entry 0): ") and "TENSOR_MATCH" in head
    assert int(head.split(": ")[1].split(";")[0]) > 5
    assert any(line.startswith("  python guard:") and "eps" in line for line in lines[1:])
    torch._dynamo.reset()
