"""Each batch's copy to the GPU without a host wait (``non_blocking_batches``).

accelerate's prepared dataloader moves every batch to the device with a blocking copy. A
blocking copy from the host makes the host wait until the GPU has run everything queued
before it, so at every step boundary the GPU drains, then idles while the host loads the
batch, runs the callbacks and starts the next forward (s18c2: 4–5 ms a step at workload P,
besides the host's work behind it). With the batches in pinned memory (the trainer's
``dataloader_pin_memory``, on by default) the copy can be queued like any kernel instead.
"""

from __future__ import annotations


def copy_batches_without_waiting(trainer) -> bool:
    """Have ``trainer``'s dataloader queue its batch copies (before training starts); False where the batches are
    not pinned, so that a queued copy would still wait."""
    if not getattr(trainer.args, "dataloader_pin_memory", False):
        return False
    trainer.accelerator.dataloader_config.non_blocking = True
    return True
