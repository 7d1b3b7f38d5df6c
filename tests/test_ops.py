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


def test_kept_buffers_serve_later_calls_and_threads():
    """The CPU work buffers outlive a call: later calls with new inputs, in bf16 and in
    another thread, still give the unfused loss and gradients."""
    import threading

    from calm.ops import release_scratch

    torch.manual_seed(0)
    w = torch.randn(50, 16, requires_grad=True)

    def check(seed):
        g = torch.Generator().manual_seed(seed)
        h = torch.randn(37, 16, generator=g, requires_grad=True)
        t = torch.randint(0, 50, (37,), generator=g)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, _ = linear_cross_entropy(h, w, t, chunk_rows=8)
        gh, gw = torch.autograd.grad(loss, (h, w))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ref = F.cross_entropy((h @ w.t()).float(), t)
        rh, rw = torch.autograd.grad(ref, (h, w))
        assert abs(loss.item() - ref.item()) < 0.01 * ref.item()
        torch.testing.assert_close(gh, rh, atol=0.02 * rh.abs().max().item(), rtol=0)
        torch.testing.assert_close(gw, rw, atol=0.02 * rw.abs().max().item(), rtol=0)

    check(1)
    check(2)  # the same buffers, new contents
    finished = []

    def in_thread():
        check(3)
        finished.append(True)

    thread = threading.Thread(target=in_thread)
    thread.start()
    thread.join()
    assert finished == [True]  # the check ran to its end in the other thread
    release_scratch()
    check(4)
