import pytest
import torch
import torch.nn.functional as F

from calm.ops import linear_cross_entropy


def test_linear_cross_entropy_matches_unfused():
    torch.manual_seed(0)
    h = torch.randn(37, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 50, (37,))
    loss, acc = linear_cross_entropy(h, w, t, chunk_rows=8)  # several uneven chunks
    (2.5 * loss).backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    logits = h @ w.t()
    ref = F.cross_entropy(logits, t)
    (2.5 * ref).backward()
    torch.testing.assert_close(loss.double(), ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gh, h.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gw, w.grad, rtol=1e-5, atol=1e-6)
    assert acc.item() == pytest.approx((logits.argmax(-1) == t).double().mean().item())


def test_linear_cross_entropy_no_grad_path():
    h = torch.randn(5, 4)
    w = torch.randn(7, 4)
    t = torch.randint(0, 7, (5,))
    with torch.no_grad():
        loss, _ = linear_cross_entropy(h, w, t)
    torch.testing.assert_close(loss, F.cross_entropy(h @ w.t(), t))
