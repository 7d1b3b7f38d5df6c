"""Fused operations that the hot paths need.

``linear_cross_entropy``: the vocabulary projection and cross-entropy in one pass
over row chunks. Both the autoencoder's decoder and the token-level baseline
end in a projection to the full vocabulary; materialising the (N, V) logits,
their log-softmax and its gradient costs several passes over N·V floats (0.5 GB
each at 4096 tokens × 32000 words). Here each chunk's logits are turned into
their gradient in place while they are still in cache, and the gradients of
the hidden states and the weight are accumulated during the forward pass.
The matrix products are the same three as the unfused version.
"""

from __future__ import annotations

import torch


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, chunk_rows: int, need_grad: bool):
        # h (N, d), weight (V, d), targets (N,) → (sum of losses, number of correct argmaxes)
        N = h.shape[0]
        acc_dtype = torch.promote_types(h.dtype, torch.float32)  # fp32 at least
        loss = torch.zeros((), dtype=acc_dtype, device=h.device)
        correct = torch.zeros((), dtype=torch.long, device=h.device)
        grad_h = torch.empty_like(h) if need_grad else None
        grad_w = torch.zeros(weight.shape, dtype=acc_dtype, device=weight.device) if need_grad else None
        for s in range(0, N, chunk_rows):
            hc = h[s : s + chunk_rows]
            tc = targets[s : s + chunk_rows]
            logits = (hc @ weight.t()).to(acc_dtype)  # (c, V)
            correct += (logits.argmax(-1) == tc).sum()
            lse = torch.logsumexp(logits, dim=-1)  # (c,)
            loss += (lse - logits.gather(1, tc[:, None]).squeeze(1)).sum()
            if need_grad:
                # d loss / d logits = softmax − onehot, computed in place.
                logits.sub_(lse[:, None]).exp_()
                logits[torch.arange(tc.shape[0], device=tc.device), tc] -= 1.0
                g = logits.to(h.dtype)
                grad_h[s : s + chunk_rows] = g @ weight
                grad_w.addmm_(g.t().to(acc_dtype), hc.to(acc_dtype))
        if need_grad:
            ctx.save_for_backward(grad_h, grad_w.to(weight.dtype))
        ctx.need_grad = need_grad
        ctx.mark_non_differentiable(correct)
        return loss, correct

    @staticmethod
    def backward(ctx, g_loss, g_correct):
        if not ctx.need_grad:
            return None, None, None, None, None
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * g_loss.to(grad_h.dtype), grad_w * g_loss.to(grad_w.dtype), None, None, None


def linear_cross_entropy(
    h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *, chunk_rows: int = 1024
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of ``h @ weight.T`` against ``targets`` without keeping the logits.

    h (..., d), weight (V, d), targets (...) → (mean loss, fraction of correct argmaxes).
    """
    h2 = h.reshape(-1, h.shape[-1])
    t = targets.reshape(-1)
    need_grad = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
    loss_sum, correct = _LinearCrossEntropy.apply(h2, weight, t, chunk_rows, need_grad)
    n = t.numel()
    return loss_sum / n, correct.float() / n
