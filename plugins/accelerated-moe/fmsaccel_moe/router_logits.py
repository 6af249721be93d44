"""Router logits from compiled MoE layers, for the load-balancing loss.

transformers records each router's logits with forward hooks feeding a collector that
compiled regions cannot use (``fmsaccel_framework.compiling._CollectorOutsideGraphs``
switches it off there). Here each router's own hook keeps its latest logits on the
router module, an attribute write Dynamo replays after the graph without guarding on
it, and a hook on the decoder stack (eager) hands them to the model's output in layer
order, where the model's own forward computes the loss from them as before.
"""

from __future__ import annotations

import torch

from fmsaccel_framework.compiling import supply_output

from .rules import MoESite

ATTRIBUTE = "_fmsaccel_router_logits"


def logits_index(router: torch.nn.Module, hidden: int, num_experts: int) -> int | None:
    """Which output of ``router`` holds the ``[tokens, experts]`` logits (probed once, eagerly; None if none does
    or the probe fails)."""
    tensor = next(router.parameters())
    dtype = tensor.dtype if tensor.is_floating_point() and tensor.element_size() > 1 else torch.bfloat16
    try:
        with torch.no_grad():
            outputs = router(torch.zeros(2, hidden, dtype=dtype, device=tensor.device))
    except (RuntimeError, TypeError, ValueError):
        return None
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    return next((i for i, t in enumerate(outputs) if torch.is_tensor(t) and t.is_floating_point()
                 and tuple(t.shape) == (2, num_experts)), None)


def supply_router_logits(decoder: torch.nn.Module, sites: list[MoESite], config) -> bool:
    """Keep each router's logits and put them into ``decoder``'s output (False: the router shows no logits)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    num_experts = getattr(text, "num_local_experts", None) or getattr(text, "num_experts", None)
    routers = [getattr(site.block, site.rule.router) for site in sites]
    index = logits_index(routers[0], text.hidden_size, int(num_experts)) if num_experts else None
    if index is None:
        return False

    def keep(module, args, output):
        setattr(module, ATTRIBUTE, output[index] if isinstance(output, tuple) else output)

    def hand_over(module, args, kwargs, output):
        if getattr(output, "router_logits", None) is not None:
            output.router_logits = tuple(getattr(router, ATTRIBUTE) for router in routers)
        return output

    for router in routers:
        router.register_forward_hook(keep)
    decoder.register_forward_hook(hand_over, with_kwargs=True)
    supply_output("router_logits")
    return True

