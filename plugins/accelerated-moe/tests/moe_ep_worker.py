"""Body of the expert-parallel tests, run in each of 2 gloo processes (``torch.multiprocessing.spawn``).

Every rank builds the same model from the same seed, routes its own tokens, and checks
the sharded result against the unsharded computation it repeats locally for every
rank's tokens. A failed assertion fails the spawn, hence the test.
"""

from __future__ import annotations

import copy
import os
import types

import torch
import torch.distributed as dist

TOKENS, HIDDEN, INTER, EXPERTS, TOP_K = 13, 16, 24, 4, 2


def _init(rank: int, world: int, rendezvous: str) -> None:
    """``rendezvous``: a file path unique to the test (no TCP port to race for)."""
    # gloo on CPU tensors, so Triton runs in its interpreter even on a GPU machine (set before CUDA or
    # fmsaccel_moe.triton_kernels is touched in this fresh process)
    os.environ.update(CUDA_VISIBLE_DEVICES="", TRITON_INTERPRET="1")
    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)


def _inputs(rank: int):
    gen = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(TOKENS, HIDDEN, generator=gen)
    logits = torch.randn(TOKENS, EXPERTS, generator=gen)
    grad = torch.randn(TOKENS, HIDDEN, generator=gen)
    return x, logits, grad


def _close(a: torch.Tensor, b: torch.Tensor, what: str, tol: float = 1e-5) -> None:
    diff = (a - b).abs().max().item()
    assert diff <= tol * max(1.0, b.abs().max().item()), f"{what}: max diff {diff}"


def check_experts(rank: int, world: int, rendezvous: str, backend: str) -> None:
    """ep_routed_experts == routed_experts: outputs, token / routing-weight / expert-weight gradients."""
    _init(rank, world, rendezvous)
    from fmsaccel_moe import expert_parallel as ep
    from fmsaccel_moe.ops import routed_experts

    torch.manual_seed(0)
    gate_up = torch.nn.Parameter(torch.randn(EXPERTS, 2 * INTER, HIDDEN) * 0.2)
    down = torch.nn.Parameter(torch.randn(EXPERTS, HIDDEN, INTER) * 0.2)
    sharded = types.SimpleNamespace(
        gate_up_proj=torch.nn.Parameter(gate_up.detach().clone()),
        down_proj=torch.nn.Parameter(down.detach().clone()),
    )
    shard = ep.init_expert_parallel(world)
    ep.shard_experts(sharded, shard)
    lo, hi = shard.expert_range(EXPERTS)
    assert sharded.gate_up_proj.shape[0] == EXPERTS // world

    def run(fn, x, logits, grad, params):
        x, logits = x.clone().requires_grad_(), logits.clone().requires_grad_()
        weights, index = logits.softmax(-1).topk(TOP_K, dim=-1)
        out = fn(x, index, weights)
        return out, torch.autograd.grad(out, [x, logits, *params], grad)

    x, logits, grad = _inputs(rank)
    out, (d_x, d_logits, d_gate_up, d_down) = run(
        lambda *a: ep.ep_routed_experts(
            *a, sharded.gate_up_proj, sharded.down_proj, shard, num_experts=EXPERTS, backend=backend
        ),
        x, logits, grad, [sharded.gate_up_proj, sharded.down_proj],
    )
    full = [gate_up, down]
    ref_expert_grads = [torch.zeros_like(p) for p in full]
    for q in range(world):  # the shard's gradient collects every rank's tokens
        ref_out, (ref_dx, ref_dlogits, *ref_dw) = run(
            lambda *a: routed_experts(*a, gate_up, down, backend="grouped_mm"), *_inputs(q), full
        )
        for acc, g in zip(ref_expert_grads, ref_dw, strict=True):
            acc += g
        if q == rank:
            _close(out, ref_out, "output")
            _close(d_x, ref_dx, "d hidden_states")
            _close(d_logits, ref_dlogits, "d router logits")
    _close(d_gate_up, ref_expert_grads[0][lo:hi], "d gate_up_proj shard")
    _close(d_down, ref_expert_grads[1][lo:hi], "d down_proj shard")

    # DDP-style averaging of the shard gradients
    hooks = ep.average_expert_grads([sharded.gate_up_proj], shard)
    _, (_, _, d_avg) = run(
        lambda *a: ep.ep_routed_experts(
            *a, sharded.gate_up_proj, sharded.down_proj, shard, num_experts=EXPERTS, backend=backend
        ),
        x, logits, grad, [sharded.gate_up_proj],
    )
    _close(d_avg, ref_expert_grads[0][lo:hi] / world, "averaged shard gradient")
    for h in hooks:
        h.remove()

    # clipping on the norm of the whole model; the dense parameter is replicated
    dense = torch.nn.Parameter(torch.ones(5))
    dense.grad = torch.full((5,), 3.0)
    sharded.gate_up_proj.grad, sharded.down_proj.grad = d_gate_up.clone(), d_down.clone()
    params = [dense, sharded.gate_up_proj, sharded.down_proj]
    total = ep.clip_grad_norm_(params, 0.5, expert_params={id(p) for p in params[1:]}, shard=shard)
    ref_params = [torch.nn.Parameter(torch.ones(5)), *[torch.nn.Parameter(torch.zeros_like(p)) for p in full]]
    for p, g in zip(ref_params, [torch.full((5,), 3.0), *ref_expert_grads], strict=True):
        p.grad = g.clone()
    ref_total = torch.nn.utils.clip_grad_norm_(ref_params, 0.5)
    _close(total, ref_total, "global grad norm")
    _close(dense.grad, ref_params[0].grad, "clipped dense gradient")
    _close(sharded.gate_up_proj.grad, ref_params[1].grad[lo:hi], "clipped shard gradient")

    # saving sees the full experts, training continues on the shard
    with ep.gathered_experts([sharded], shard):
        _close(sharded.gate_up_proj.data, gate_up.data, "gathered gate_up_proj")
    assert sharded.gate_up_proj.shape[0] == EXPERTS // world
    dist.destroy_process_group()


def check_plugin(rank: int, world: int, rendezvous: str, out_dir: str) -> None:
    """augment + prepare_trainer with ep_degree=2 on a tiny Mixtral, against the unsharded model."""
    _init(rank, world, rendezvous)
    from moe_testing import tiny_model
    from transformers import AutoModelForCausalLM

    from fmsaccel_framework.plugin import TrainContext
    from fmsaccel_moe.spec import MOE

    reference = tiny_model("mixtral", seed=4, num_local_experts=4)
    plugin = MOE.build({"training.moe.scattermoe": {"ep_degree": 2, "disable_distributed": False, "backend": "auto"}})
    ctx = TrainContext(args={"per_device_train_batch_size": 2, "max_seq_length": 8}, torch_dtype=torch.float32)
    model = plugin.augment(copy.deepcopy(reference), ctx)
    assert any("expert parallel: 2 ranks" in m for _, m in ctx.report.notes)
    assert model.model.layers[0].mlp.experts.gate_up_proj.shape[0] == 2

    saved = []
    trainer = types.SimpleNamespace(
        model=model,
        accelerator=types.SimpleNamespace(unscale_gradients=lambda: None),
        save_model=lambda path: saved.append(model.save_pretrained(path) if rank == 0 else None),
    )
    plugin.prepare_trainer(trainer, ctx)
    ignored = set(model._ddp_params_and_buffers_to_ignore)
    expert_names = ("experts.gate_up_proj", "experts.down_proj")
    assert ignored == {n for n, _ in model.named_parameters() if n.endswith(expert_names)}

    ids = torch.randint(1, 128, (2, 7), generator=torch.Generator().manual_seed(rank))
    loss = model(input_ids=ids, labels=ids).loss
    ref_loss = reference(input_ids=ids, labels=ids).loss
    _close(loss, ref_loss, "loss")
    loss.backward()
    norm = trainer.accelerator.clip_grad_norm_(model.parameters(), 1.0)
    assert torch.isfinite(norm)

    trainer.save_model(out_dir)
    dist.barrier()
    plain = AutoModelForCausalLM.from_pretrained(out_dir, experts_implementation="eager")
    for (name, p), (_, q) in zip(plain.named_parameters(), reference.named_parameters(), strict=True):
        _close(p, q, f"saved {name}")
    dist.destroy_process_group()
