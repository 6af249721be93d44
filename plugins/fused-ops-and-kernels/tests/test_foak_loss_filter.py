"""The trainer's per-step host waits foak removes: the NaN/Inf loss filter as a torch.where, with the same logged
losses (loss_filter_on_device), and the batch copies queued (non_blocking_batches)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fmsaccel_foak.loss_filter import filter_losses_on_device

LOSSES = [1.0, math.nan, 3.0, math.inf, 2.0, 4.0, -math.inf, 5.0, 6.0]


class _ScriptedLoss(nn.Module):
    """Each forward returns the next of LOSSES (a trainable weight times zero keeps every gradient finite)."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(1))
        self.calls = 0

    def forward(self, x, labels=None):
        value = LOSSES[self.calls]
        self.calls += 1
        return {"loss": (self.weight * 0.0).sum() + value}


def _logged_losses(tmp_path, on_device: bool, accumulation: int) -> tuple[list[float], object]:
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, max_steps=len(LOSSES) // accumulation,
                             per_device_train_batch_size=1, gradient_accumulation_steps=accumulation,
                             logging_steps=2 if accumulation == 1 else 1,
                             save_strategy="no", report_to="none", learning_rate=0.1, disable_tqdm=True)
    data = [{"x": torch.zeros(1), "labels": torch.zeros(1)} for _ in LOSSES]
    trainer = Trainer(model=_ScriptedLoss(), args=args, train_dataset=data)
    if on_device:
        assert filter_losses_on_device(trainer) and trainer.args.logging_nan_inf_filter is False
    trainer.train()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h], trainer


@pytest.mark.parametrize("accumulation", [1, 3])
def test_the_logged_losses_are_the_trainers_own_filters(tmp_path, accumulation):
    want, _ = _logged_losses(tmp_path / "host", on_device=False, accumulation=accumulation)
    got, trainer = _logged_losses(tmp_path / "device", on_device=True, accumulation=accumulation)
    assert all(math.isfinite(v) for v in want) and len(want) >= 2
    assert got == pytest.approx(want, rel=1e-6)
    assert trainer.args.logging_nan_inf_filter is False  # the trainer itself never read a loss on the host


def test_nothing_to_move_when_the_filter_is_off():
    from types import SimpleNamespace

    trainer = SimpleNamespace(args=SimpleNamespace(logging_nan_inf_filter=False), training_step=lambda: None)
    step = trainer.training_step
    assert filter_losses_on_device(trainer) is False and trainer.training_step is step


def test_a_trainer_without_its_running_loss_gets_its_own_filter_back(caplog):
    from types import SimpleNamespace

    trainer = SimpleNamespace(args=SimpleNamespace(logging_nan_inf_filter=True),
                              training_step=lambda: torch.tensor(math.nan))
    assert filter_losses_on_device(trainer)
    loss = trainer.training_step()
    assert math.isnan(loss) and trainer.args.logging_nan_inf_filter is True
    assert "no _tr_loss" in caplog.text


def test_the_plugin_moves_the_filter_and_reports_it():
    from types import SimpleNamespace

    from foak_testing import build_plugin, tiny_model

    from fmsaccel_framework.plugin import TrainContext

    plugin, ctx = build_plugin(fast_rms_layernorm=True, loss_filter_on_device=True), TrainContext(args={})
    model = plugin.augment(tiny_model("llama"), ctx)
    trainer = SimpleNamespace(model=model, args=SimpleNamespace(logging_nan_inf_filter=True),
                              training_step=lambda: torch.tensor(1.0))
    plugin.prepare_trainer(trainer, ctx)
    assert trainer.args.logging_nan_inf_filter is False
    assert any("NaN/Inf loss filter" in line for line in ctx.report.lines())


@pytest.mark.parametrize("pinned", [True, False])
def test_batches_are_copied_without_a_host_wait_where_they_are_pinned(pinned):
    from types import SimpleNamespace

    from accelerate import Accelerator
    from foak_testing import build_plugin, tiny_model
    from torch.utils.data import DataLoader

    from fmsaccel_framework.plugin import TrainContext

    plugin, ctx = build_plugin(fast_rms_layernorm=True, non_blocking_batches=True), TrainContext(args={})
    model = plugin.augment(tiny_model("llama"), ctx)
    accelerator = Accelerator(cpu=True)
    trainer = SimpleNamespace(model=model, accelerator=accelerator,
                              args=SimpleNamespace(logging_nan_inf_filter=True, dataloader_pin_memory=pinned))
    plugin.prepare_trainer(trainer, ctx)
    assert accelerator.prepare(DataLoader(list(range(4)), batch_size=2))._non_blocking is pinned
    if pinned:
        assert any("batch copies to the device -> queued" in line for line in ctx.report.lines())
    else:
        assert any("dataloader_pin_memory is off" in note for _, note in ctx.report.notes)
