"""Token log-probabilities with the frozen lm_head split by vocabulary across ranks (FSDP QLoRA / GPTQ-LoRA).

Under FSDP a gathered lm_head (128k x 4096 in bf16 for Llama 3: 1 GiB) is the largest
tensor alive at the loss, on every rank. A frozen lm_head needs no gathering: each rank
keeps rows ``[vocab_start, vocab_start + shard)`` and

1. gathers every rank's hidden states (a few MiB) and targets;
2. computes its shard's logits for all of them, chunk by chunk, reducing them to fp32
   statistics: log-sum-exp, the entropy term, the largest logit and the target's logit
   where the target lies in the shard;
3. combines the ranks' statistics (one all-gather) into the full-vocabulary ones;
4. recomputes each chunk's logits into ``softmax - onehot`` and multiplies by its shard,
   giving its share of every token's hidden-state gradient, which an all-reduce sums;
   each rank keeps its own tokens' rows.

So, as with the unsharded fused op, the backward is one scale per row. Plain torch
(fp32 statistics per chunk): the matmuls dominate, and it runs on gloo for the tests.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

CHUNK_ROWS = 256  # fp32 tiles of 256 x (vocab / ranks): 63 MiB each for Llama 3 on 2 ranks, two at a time


def _all_gather(x: torch.Tensor, group) -> torch.Tensor:
    """Every rank's ``x`` (same shape on all ranks), stacked in rank order."""
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.stack(parts)


def most_rows(x: torch.Tensor, group=None) -> int:
    """The largest row count of ``x`` over the ranks (at least 1): what :func:`gather_rows` pads to."""
    counts = _all_gather(torch.tensor([x.shape[0]], device=x.device), group)
    return max(1, int(counts.max()))


def gather_rows(x: torch.Tensor, rows: int, group=None, fill=0) -> torch.Tensor:
    """Every rank's ``x`` padded to ``rows`` rows, concatenated in rank order (rank r's rows start at r * rows)."""
    padded = x.new_full((rows, *x.shape[1:]), fill)
    padded[: x.shape[0]] = x
    return _all_gather(padded, group).flatten(0, 1)


def _shard_logits(h: torch.Tensor, shard: torch.Tensor, scale: float) -> torch.Tensor:
    return (h @ shard.t()).float().mul_(scale)


class _VocabParallelLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, shard, vocab_start, targets, logit_scale, group):
        rank = dist.get_rank(group)
        dtype = shard.dtype
        rows = most_rows(hidden, group)
        h_all = gather_rows(hidden.to(dtype), rows, group)
        t_all = gather_rows(targets, rows, group, fill=-1)
        local_t = t_all - vocab_start
        in_shard = (local_t >= 0) & (local_t < shard.shape[0])
        local_t = local_t.clamp(0, shard.shape[0] - 1)[:, None]

        stats = torch.empty(4, h_all.shape[0], dtype=torch.float32, device=hidden.device)  # lse, ent, max, target
        for start in range(0, h_all.shape[0], CHUNK_ROWS):
            end = min(start + CHUNK_ROWS, h_all.shape[0])
            z = _shard_logits(h_all[start:end], shard, logit_scale)
            z_max = z.max(dim=1).values
            stats[2, start:end] = z_max
            stats[3, start:end] = z.gather(1, local_t[start:end])[:, 0] * in_shard[start:end]
            e = (z - z_max[:, None]).exp_()  # two fp32 tiles at most: z and e
            total = e.sum(dim=1)
            stats[0, start:end] = z_max + total.log()
            stats[1, start:end] = stats[0, start:end] - e.mul_(z).sum(dim=1) / total  # this shard's entropy
            del z, e
        every = _all_gather(stats, group)
        shard_lse = every[:, 0]
        lse = torch.logsumexp(shard_lse, dim=0)
        weight = (shard_lse - lse).exp()  # each shard's share of the probability mass
        entropy = lse - (weight * (shard_lse - every[:, 1])).sum(dim=0)
        z_target = every[:, 3].sum(dim=0)

        dh_all = torch.empty_like(h_all)
        for start in range(0, h_all.shape[0], CHUNK_ROWS):
            end = min(start + CHUNK_ROWS, h_all.shape[0])
            g = _shard_logits(h_all[start:end], shard, logit_scale).sub_(lse[start:end, None]).exp_()
            rows_in = in_shard[start:end].nonzero()[:, 0]
            g[rows_in, local_t[start:end][rows_in, 0]] -= 1.0
            g.mul_(-logit_scale)  # d logp / d logits
            torch.matmul(g.to(dtype), shard, out=dh_all[start:end])
        dist.all_reduce(dh_all, group=group)  # (a reduce-scatter would do; gloo has none for these shapes)

        mine = slice(rank * rows, rank * rows + hidden.shape[0])
        dh = dh_all[mine].clone()  # not a view: the other ranks' rows are freed
        logp = (z_target - lse)[mine]
        top1 = (z_target >= every[:, 2].max(dim=0).values)[mine]
        ctx.save_for_backward(dh)
        ctx.hidden_dtype = hidden.dtype
        entropy = entropy[mine].contiguous()
        ctx.mark_non_differentiable(entropy, top1)
        return logp, entropy, top1

    @staticmethod
    def backward(ctx, grad_logp, _grad_entropy, _grad_top1):
        if grad_logp is None:
            return (None,) * 6
        (dh,) = ctx.saved_tensors
        return (dh * grad_logp[:, None].to(dh.dtype)).to(ctx.hidden_dtype), None, None, None, None, None


def token_logprobs_vocab_parallel(
    hidden: torch.Tensor, shard: torch.Tensor, vocab_start: int, targets: torch.Tensor, logit_scale: float = 1.0,
    group=None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`~.fused_linear_ce.token_logprobs` for a frozen lm_head whose rows are split across ``group``.

    This rank holds rows ``[vocab_start, vocab_start + len(shard))``; every rank of the group
    calls this together, each with its own tokens. Returns this rank's tokens' log-probabilities
    (differentiable in ``hidden``), entropies and top-1 flags.
    """
    return _VocabParallelLogProbs.apply(hidden, shard, int(vocab_start), targets.contiguous(), float(logit_scale),
                                        group)
