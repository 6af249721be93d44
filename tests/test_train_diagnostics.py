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


def test_progress_lines_come_a_step_late_every_progress_steps_with_each_steps_own_loss(capsys):
    """The line for a step is printed at the next step's end (its values copied behind the step's work, so
    printing never waits for the GPU) and the last one when training ends; the cadence is progress_steps."""
    import json
    from types import SimpleNamespace

    import torch

    from fmsaccel_cli import PROGRESS_TAG
    from fmsaccel_cli.run_metrics import RunMetrics

    metrics = RunMetrics(warmup_steps=1, progress_steps=2)
    args = SimpleNamespace(logging_steps=10, output_dir="unused")
    state = SimpleNamespace(global_step=0, max_steps=5)
    control = SimpleNamespace()
    metrics.on_train_begin(args, state, control)
    printed = []
    for step in range(1, 6):
        metrics.on_step_begin(args, state, control)
        metrics.count_tokens(None, (torch.zeros(2, 8, dtype=torch.long),), {})
        metrics.record_loss(torch.tensor(float(step)))
        state.global_step = step
        metrics.on_step_end(args, state, control)
        printed.append([json.loads(line.split(PROGRESS_TAG)[1]) for line in capsys.readouterr().out.splitlines()
                        if PROGRESS_TAG in line])
    metrics.on_train_end(args, state, control)
    last = [json.loads(line.split(PROGRESS_TAG)[1]) for line in capsys.readouterr().out.splitlines()
            if PROGRESS_TAG in line]
    # steps 2 and 4 (every 2nd) and 5 (the last) are queued; each is printed at the step after it or at the end
    assert [[p["step"] for p in ps] for ps in printed] == [[], [], [2], [], [4]]
    assert [p["step"] for p in last] == [5]
    lines = [p for ps in printed for p in ps] + last
    assert [p["loss"] for p in lines] == [2.0, 4.0, 5.0]
    assert lines[0]["tokens_per_second"] > 0 and all(p["max_steps"] == 5 for p in lines)
