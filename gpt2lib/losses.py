"""Cross-entropy of hidden states through the lm_head without holding the (B, T, vocab) logits.

GPT.forward's `loss_impl` names how its loss is computed (LOSS_IMPLS, also the --loss-impl flag):
    full      the (B, T, vocab) logits, then F.cross_entropy: simplest, most memory
    chunked   8,192 rows of logits at a time, gradients computed in the same pass (chunk_loss_scatter):
              the fastest eagerly
    fused     the same chunking, written out of place so torch.compile fuses each chunk into a few
              passes over bf16 logits (chunk_loss_fused): the fastest compiled
"""

import torch
from torch.nn import functional as F


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of x @ weight.T against targets, computed chunk by chunk; the gradients
    are computed in the same pass, so neither the logits nor the softmax are kept for backward.
    Matmuls follow the ambient autocast, the softmax is always fp32. loss_impl names the function
    in CHUNK_LOSSES that turns a chunk into its loss and logits gradient."""

    @staticmethod
    def forward(ctx, x, weight, targets, vocab_size, chunk_size, loss_impl):
        n = x.size(0)
        chunk_loss = CHUNK_LOSSES[loss_impl]
        grad_x = torch.empty_like(x)
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        loss_sum = torch.zeros((), dtype=torch.float32, device=x.device)
        for start in range(0, n, chunk_size):
            x_chunk = x[start : start + chunk_size]
            chunk_loss_sum, grad_logits = chunk_loss(
                x_chunk, weight, targets[start : start + chunk_size], vocab_size, n
            )
            loss_sum += chunk_loss_sum
            grad_x[start : start + chunk_size] = grad_logits @ weight
            grad_weight += grad_logits.t() @ x_chunk
        ctx.save_for_backward(grad_x, grad_weight.to(weight.dtype))
        return loss_sum / n

    @staticmethod
    def backward(ctx, grad_loss):
        grad_x, grad_weight = ctx.saved_tensors
        return grad_x * grad_loss, grad_weight * grad_loss, None, None, None, None


def masked_logits(x, weight, vocab_size):
    """(n, C) hidden states -> (n, Vp) fp32 logits, with padded vocabulary ids at -inf."""
    logits = (x @ weight.t()).float()
    if logits.size(1) > vocab_size:
        logits[:, vocab_size:] = float("-inf")
    return logits


def chunk_loss_scatter(x, weight, targets, vocab_size, n):
    """(summed loss, d(loss_sum / n)/d(logits) in fp32) of one chunk: fp32 logits, the one-hot
    subtracted in place. Eager-friendly, but in-place writes and scatter_add_ keep torch.compile from
    fusing it, and the chunk's logits exist in the matmul's dtype and in fp32."""
    logits = masked_logits(x, weight, vocab_size)  # (n_chunk, Vp) fp32
    lse = torch.logsumexp(logits, dim=1)
    loss_sum = (lse - logits.gather(1, targets[:, None]).squeeze(1)).sum()
    # (softmax - one_hot(targets)) / n; padded columns get exactly 0
    grad_logits = torch.exp(logits - lse[:, None])
    grad_logits.scatter_add_(1, targets[:, None], torch.full_like(lse[:, None], -1.0))
    grad_logits /= n
    return loss_sum, grad_logits


def chunk_loss_fused(x, weight, targets, vocab_size, n):
    """The same loss and gradient from out-of-place elementwise ops and row reductions only, so that
    under torch.compile they fuse into a few passes that read the logits in the matmul's dtype
    (bf16 under autocast) and write the gradient in it, with no fp32 copy of the logits in memory.
    Run eagerly, it is slower than chunk_loss_scatter."""
    logits = x @ weight.t()  # (n_chunk, Vp)
    cols = torch.arange(logits.size(1), device=logits.device)
    z = torch.where(cols < vocab_size, logits.float(), float("-inf"))  # padded ids never win
    lse = torch.logsumexp(z, dim=1)
    loss_sum = (lse - logits.gather(1, targets[:, None]).squeeze(1).float()).sum()
    p = torch.exp(z - lse[:, None])
    grad_logits = torch.where(cols == targets[:, None], p - 1.0, p) / n
    return loss_sum, grad_logits.to(logits.dtype)


CHUNK_LOSSES = {"chunked": chunk_loss_scatter, "fused": chunk_loss_fused}
# GPT.forward's loss_impl: the plain loss on the (B, T, vocab) logits, or one of the chunked ones
LOSS_IMPLS = ("full", *CHUNK_LOSSES)


def chunked_cross_entropy(x, weight, targets, vocab_size, chunk_size=8192, loss_impl="chunked"):
    """Mean cross-entropy of the (B, T, C) hidden states x through the (Vp, C) lm_head weight,
    never holding more than chunk_size rows of logits. loss_impl: a CHUNK_LOSSES name."""
    if loss_impl not in CHUNK_LOSSES:
        raise ValueError(f"unknown chunked loss {loss_impl!r}: use one of {', '.join(CHUNK_LOSSES)}")
    x = x.reshape(-1, x.size(-1))  # (B*T, C)
    targets = targets.reshape(-1)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return _ChunkedLinearCrossEntropy.apply(x, weight, targets, vocab_size, chunk_size, loss_impl)
    loss_sum = sum(
        F.cross_entropy(
            masked_logits(x[s : s + chunk_size], weight, vocab_size),
            targets[s : s + chunk_size],
            reduction="sum",
        )
        for s in range(0, x.size(0), chunk_size)
    )
    return loss_sum / x.size(0)
