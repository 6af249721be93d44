"""Worker for test_foak_vocab_parallel: one process of a 2-rank gloo group (spawned by the test)."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn

VOCAB, HIDDEN = 53, 16  # a vocabulary that does not split evenly


def check(rank: int, world: int, rendezvous: str) -> None:
    """``rendezvous``: a file path unique to the test (no TCP port to race for)."""
    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank))
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    try:
        _check(rank)
        _check_plugin(rank)
    finally:
        dist.destroy_process_group()


def _check(rank: int) -> None:
    from fmsaccel_foak import reference
    from fmsaccel_foak.modules import shard_embedding, shard_lm_head
    from fmsaccel_foak.ops import token_logprobs_vocab_parallel, vocab_parallel

    vocab_parallel.CHUNK_ROWS = 4  # several chunks, the last one short

    torch.manual_seed(0)  # the same lm_head on every rank
    lm_head = nn.Linear(HIDDEN, VOCAB, bias=False)
    weight = lm_head.weight.detach().clone()
    torch.manual_seed(1 + rank)  # each rank's own tokens, a different number of them
    rows = 9 if rank == 0 else 4
    hidden = torch.randn(rows, HIDDEN, dtype=torch.float64) * 3
    targets = torch.randint(0, VOCAB, (rows,))
    targets[0] = weight.shape[0] - 1 if rank == 0 else 0  # targets at both ends of the vocabulary
    upstream = torch.randn(rows, dtype=torch.float64)
    scale = 0.7

    h_ref = hidden.clone().requires_grad_()
    want = reference.token_logprobs(h_ref, weight.double(), targets, scale)
    (want[0] * upstream).sum().backward()

    start, stop, vocab = shard_lm_head(lm_head)
    assert vocab == VOCAB and stop - start == lm_head.vocab_shard.shape[0] and not hasattr(lm_head, "weight")
    h = hidden.clone().requires_grad_()
    got = token_logprobs_vocab_parallel(h, lm_head.vocab_shard.double(), start, targets, scale)
    (got[0] * upstream).sum().backward()
    torch.testing.assert_close(got[0], want[0], msg="log-probabilities")
    torch.testing.assert_close(got[1], want[1], msg="entropy")
    assert torch.equal(got[2], want[2]), "top-1"
    torch.testing.assert_close(h.grad, h_ref.grad, msg="hidden-state gradient")

    logits = lm_head(hidden.float())  # evaluation path: gathered full logits
    torch.testing.assert_close(logits, hidden.float() @ weight.t(), rtol=1e-5, atol=1e-5)

    torch.manual_seed(2)  # the same embedding on every rank; each rank its own ids (ends, the split, counts)
    embed = nn.Embedding(VOCAB, HIDDEN)
    table = embed.weight.detach().clone()
    ids = torch.tensor([[0, VOCAB - 1, 26, 27, 5], [52, 1, 30, 0, 0]]) if rank == 0 else torch.tensor([[26, 52, 3]])
    start, stop, vocab = shard_embedding(embed)
    assert vocab == VOCAB and stop - start == embed.vocab_shard.shape[0] and not hasattr(embed, "weight")
    assert torch.equal(embed(ids), table[ids]), "vocab-parallel lookup"


def _check_plugin(rank: int) -> None:
    """foak under FSDP splits a frozen untied lm_head and embedding, and leaves tied ones whole with a note."""
    from foak_testing import build_plugin, tiny_model

    from fmsaccel_framework.plugin import TrainContext

    for tied in (False, True):
        model = tiny_model("llama", tie_word_embeddings=tied).requires_grad_(False)
        ids = torch.tensor([[1, 5, rank, model.config.vocab_size - 1]])
        want = model.get_input_embeddings()(ids)
        ctx = TrainContext(args={"distributed": {"strategy": "fsdp"}})
        build_plugin("peft.quantization.fused_ops_and_kernels", base_layer="bitsandbytes")._shard_vocabulary(model, ctx)
        split = [what for (_, what) in ctx.report.entries if "split by vocabulary" in what]
        notes = [note for (_, note) in ctx.report.notes if "they are tied" in note]
        assert (len(split), len(notes)) == ((0, 2) if tied else (2, 0)), (split, ctx.report.notes)
        assert hasattr(model.get_input_embeddings(), "vocab_shard") != tied
        assert torch.equal(model.get_input_embeddings()(ids), want)
