"""Fused operations that the hot paths need.

``linear_cross_entropy``: the vocabulary projection and cross-entropy in one pass
over row chunks. Both the autoencoder's decoder and the token-level baseline
end in a projection to the full vocabulary; materialising the (N, V) logits,
their log-softmax and its gradient costs several passes over N·V floats (0.5 GB
each at 4096 tokens × 32000 words). Here each chunk's logits are turned into
their gradient in place while they are still in cache, and the gradients of
the hidden states and the weight are accumulated during the forward pass.
The matrix products are the same three as the unfused version.

Under bf16 autocast the three products run in bf16 (autocast does not reach
into the in-place accumulation on its own); the log-sum-exp, the softmax
gradient and the accumulated weight gradient stay in fp32.
"""

from __future__ import annotations

import threading

import torch

from calm.precision import matmul_dtype

_SCRATCH = threading.local()  # per thread: a server's concurrent requests never share one


def _scratch(name: str, shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised work buffer, kept on the CPU for the next call that asks for it.

    A CPU tensor of more than 32 MB is mapped afresh by the OS at each allocation and
    zeroed page by page on first touch; at the baseline's size (32000 words, 1024-row
    chunks) the fused loss's buffers are 65–131 MB each, so keeping them between
    steps saves those page faults (measured: bf16 baseline training 8–11 % faster on
    an Intel Xeon). On CUDA the caching allocator already reuses memory.
    """
    if device.type != "cpu":
        return torch.empty(shape, dtype=dtype, device=device)
    kept = _SCRATCH.__dict__.setdefault("buffers", {})
    key = (name, tuple(shape), dtype)
    buf = kept.get(key)
    if buf is None:
        buf = kept[key] = torch.empty(shape, dtype=dtype, device=device)
    return buf


def release_scratch() -> None:
    """Free this thread's kept CPU buffers of the fused loss (a few hundred MB at V = 32000)."""
    _SCRATCH.__dict__.pop("buffers", None)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, chunk_rows: int, need_grad: bool):
        # h (N, d), weight (V, d), targets (N,) → (sum of losses, number of correct argmaxes)
        N, V = h.shape[0], weight.shape[0]
        acc_dtype = torch.promote_types(h.dtype, torch.float32)  # fp32 at least
        mm = matmul_dtype(h.device.type, h.dtype)  # the dtype of the matrix products
        dev = h.device
        w_mm = weight if weight.dtype == mm else \
            _scratch("w", weight.shape, mm, dev).copy_(weight.detach())
        rows = min(chunk_rows, N)
        buf_mm = _scratch("logits", (rows, V), mm, dev)  # logits, then gradient
        buf = buf_mm if mm == acc_dtype else _scratch("logits_acc", (rows, V), acc_dtype, dev)
        logp = _scratch("logp", (rows, V), acc_dtype, dev)
        gw_part = None if mm == acc_dtype else _scratch("gw", weight.shape, mm, dev)
        gw_acc = None if mm == acc_dtype else _scratch("gw_acc", weight.shape, acc_dtype, dev)
        loss = torch.zeros((), dtype=acc_dtype, device=h.device)
        correct = torch.zeros((), dtype=torch.long, device=h.device)
        grad_h = torch.empty_like(h) if need_grad else None
        grad_w = torch.zeros(weight.shape, dtype=acc_dtype, device=weight.device) if need_grad else None
        for s in range(0, N, rows):
            hc_mm = h[s : s + rows].to(mm)
            tc = targets[s : s + rows]
            c = tc.shape[0]
            torch.mm(hc_mm, w_mm.t(), out=buf_mm[:c])  # (c, V) logits
            if buf is not buf_mm:
                buf[:c].copy_(buf_mm[:c])
            torch.ops.aten._log_softmax.out(buf[:c], -1, False, out=logp[:c])
            lp_true = logp[:c].gather(1, tc[:, None]).squeeze(1)  # (c,)
            loss -= lp_true.sum()
            # Right when the target scores the maximum (a tie counts as right): a max-reduction
            # is about 8× faster than argmax on a CPU at V = 32000.
            correct += (lp_true >= logp[:c].amax(-1)).sum()
            if need_grad:
                # d loss / d logits = softmax − onehot, computed in place.
                g = logp[:c].exp_()
                g[torch.arange(c, device=tc.device), tc] -= 1.0
                buf_mm[:c].copy_(g)
                g = buf_mm[:c]
                grad_h[s : s + rows] = g @ w_mm
                if gw_part is None:
                    grad_w.addmm_(g.t(), hc_mm)
                else:
                    # Convert into a kept fp32 buffer, then add: a mixed bf16 + fp32 add is
                    # about 3× slower on a CPU.
                    torch.mm(g.t(), hc_mm, out=gw_part)
                    grad_w += gw_acc.copy_(gw_part)
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
