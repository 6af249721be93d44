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


def test_token_count_leaves_out_a_collators_filler_and_hides_it_from_the_model():
    """Padding-free length buckets add filler tokens: tokens/s counts only the real ones."""
    import torch

    from fmsaccel_cli.run_metrics import RunMetrics

    metrics = RunMetrics(0)
    seen = []
    model = torch.nn.Module()
    model.forward = lambda **kwargs: seen.append(sorted(kwargs))
    model.register_forward_pre_hook(metrics.count_tokens, with_kwargs=True)
    model(input_ids=torch.zeros(1, 64, dtype=torch.long), num_padding_tokens=9)
    model(input_ids=torch.zeros(2, 5, dtype=torch.long), attention_mask=torch.tensor([[1] * 5, [1, 1, 0, 0, 0]]))
    assert int(metrics.tokens) == 55 + 7
    assert seen == [["input_ids"], ["attention_mask", "input_ids"]]
