"""Mixture-of-experts models under TRL and transformers 5.17–5.24: what the plain stack misses.

TRL's ``SFTTrainer`` turns the load-balancing loss on for MoE models, but reads a config name some
architectures lack, and Granite MoE in transformers 5.17 records no router logits to compute it from.
"""

from __future__ import annotations

import torch

from .run_metrics import log


def name_experts_for_trl(model) -> None:
    """TRL's SFTTrainer turns the load-balancing loss on for MoE models, and its loss forward reads
    ``config.num_experts``, which Mixtral and Granite MoE configs call ``num_local_experts``: alias it."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    if not hasattr(config, "num_experts") and hasattr(config, "num_local_experts"):
        config.num_experts = config.num_local_experts


def record_router_logits(model) -> None:
    """Make an MoE model that does not record its router logits record them (Granite MoE in transformers 5.17).

    Without them its load-balancing loss is the int 0: TRL's logging of it crashes, and the loss the run asked for
    is silently missing. The router (a ``*TopKRouter``) is probed once to find which output holds the logits.
    """
    try:
        from transformers.utils.output_capturing import _CAN_RECORD_REGISTRY, OutputRecorder
    except ImportError:  # another transformers: its models record what they declare
        return
    router = next((m for m in model.modules() if type(m).__name__.endswith("TopKRouter")), None)
    lacking = [m for m in model.modules()  # the model classes around the router that declare no router logits
               if isinstance(getattr(type(m), "_can_record_outputs", None), dict)
               and "router_logits" not in type(m)._can_record_outputs
               and any(sub is router for sub in m.modules())] if router is not None else []
    if not lacking:
        return
    weight = router.weight
    with torch.no_grad():
        outputs = router(torch.zeros(1, weight.shape[-1], dtype=weight.dtype, device=weight.device))
    index = next((i for i, t in enumerate(outputs) if torch.is_tensor(t) and t.is_floating_point()
                  and t.shape[-1] == weight.shape[0]), None)  # [tokens, num_experts]: the logits
    if index is None:
        log(f"warning: {type(router).__name__} returns no [tokens, experts] logits: the load-balancing loss "
            "cannot be computed for this model")
        return
    recorder = {"router_logits": OutputRecorder(type(router), index=index)}
    for module in lacking:
        declared = type(module)._can_record_outputs
        if type(_CAN_RECORD_REGISTRY) is dict:  # 5.17: keyed on the class name
            key = str(type(module))
            _CAN_RECORD_REGISTRY[key] = {**(_CAN_RECORD_REGISTRY.get(key) or declared), **recorder}
        else:  # later releases key it on the model
            _CAN_RECORD_REGISTRY[module] = {**(_CAN_RECORD_REGISTRY.get(module) or declared), **recorder}
    log(f"{' and '.join(type(m).__name__ for m in lacking)} did not record router logits: now recording output "
        f"{index} of {type(router).__name__} (for the load-balancing loss)")
