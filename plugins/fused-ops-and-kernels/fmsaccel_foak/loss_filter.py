"""The trainer's NaN/Inf loss filter on the device, so the host does not wait for every step's loss.

transformers' Trainer (``logging_nan_inf_filter``, on by default) asks after each micro-batch
whether its loss is NaN or Inf. The answer is a host read of a GPU value: the host waits until
the GPU has run the whole backward, and the GPU then idles while the host runs the optimizer
step, the callbacks and the next batch's loading. The filter's rule (a non-finite loss counts
as the mean of the losses since the last log) is one ``torch.where`` on the device instead,
applied to what ``training_step`` returns, with the trainer's own filter turned off.
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger("fmsaccel_foak")


def filter_losses_on_device(trainer) -> bool:
    """Move ``trainer``'s NaN/Inf loss filter onto the device; False where the filter is off (nothing to move)."""
    args = trainer.args
    if not getattr(args, "logging_nan_inf_filter", False):
        return False
    host_step = trainer.training_step

    def training_step(*a, **kw):
        loss = host_step(*a, **kw)
        running = getattr(trainer, "_tr_loss", None)  # the trainer's loss sum since its last log
        if running is None:  # a trainer that keeps it elsewhere: its own filter again (before it reads this loss)
            args.logging_nan_inf_filter = True
            trainer.training_step = host_step
            logger.warning("fmsaccel_foak: loss_filter_on_device: this transformers Trainer has no _tr_loss; "
                           "its own NaN/Inf filter (a host wait per step) stays on")
            return loss
        steps = 1 + trainer.state.global_step - trainer._globalstep_last_logged
        return torch.where(torch.isfinite(loss), loss, running / steps)

    args.logging_nan_inf_filter = False
    trainer.training_step = training_step
    return True
