"""Padding-free training computes the same per-token loss as padded training on the same data."""

import torch
import torch.nn.functional as F

from fmsaccel_aadp.attention import register_attention
from fmsaccel_aadp.collator import collate_padding_free


def _pad(rows, device):
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    labels = torch.full_like(ids, -100)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(r["input_ids"]), torch.tensor(r["labels"]), 1
    return ids.to(device), labels.to(device), mask.to(device)


def _token_losses(logits, labels):
    """Loss of every (position, next-token) pair that has a label, in row order."""
    logits, targets = logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten()
    keep = targets != -100
    return F.cross_entropy(logits[keep].float(), targets[keep], reduction="none")


def test_per_token_loss_matches_padded_training(tiny_llama, random_examples, device):
    rows = random_examples((23, 4, 57, 31, 9), seed=5)
    model = tiny_llama(seed=3)
    ids, labels, mask = _pad(rows, device)
    padded_out = model(input_ids=ids, attention_mask=mask, labels=labels)

    model.set_attn_implementation(register_attention("sdpa_masked"))
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in collate_padding_free(rows).items()}
    free_out = model(**batch)

    padded_tokens = _token_losses(padded_out.logits, labels)
    free_tokens = _token_losses(free_out.logits, batch["labels"])
    assert free_tokens.numel() == padded_tokens.numel() == sum(sum(t != -100 for t in r["labels"][1:]) for r in rows)
    torch.testing.assert_close(free_tokens, padded_tokens, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(free_out.loss, padded_out.loss, atol=1e-5, rtol=1e-4)

    # and the gradients of the mean loss agree too
    padded_grads = torch.autograd.grad(padded_out.loss, list(model.parameters()))
    free_grads = torch.autograd.grad(free_out.loss, list(model.parameters()))
    for a, b in zip(free_grads, padded_grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_length_buckets_change_no_loss_or_gradient(tiny_llama, random_examples, device):
    """Filler examples padding a row to its bucket are invisible to the real tokens' loss and gradients."""
    rows = random_examples((23, 4, 57, 31, 9), seed=7)
    model = tiny_llama(seed=4)
    model.set_attn_implementation(register_attention("sdpa_masked"))
    outs = []
    for bucket_lengths in (False, True):
        batch = collate_padding_free(rows, bucket_lengths=bucket_lengths)
        batch.pop("num_padding_tokens", None)  # the trainer's token counter takes it out
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        out = model(**batch)
        outs.append((out, batch["input_ids"].shape[1], torch.autograd.grad(out.loss, list(model.parameters()))))
    (plain, real, plain_grads), (bucketed, total, bucketed_grads) = outs
    assert total > real
    torch.testing.assert_close(bucketed.logits[:, :real], plain.logits, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(bucketed.loss, plain.loss, atol=1e-6, rtol=1e-5)
    for a, b in zip(bucketed_grads, plain_grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)
