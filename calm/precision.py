"""Numeric precision of the matrix work: fp32, or bf16 autocast over fp32 weights.

``--precision auto`` (the command line's default) picks bf16 where it is faster
and fp32 elsewhere:

- CUDA: bf16 when the GPU supports it (every Ampere or newer card);
- CPU: bf16 only when the processor has bf16 matrix instructions (AMX or
  AVX-512-BF16) *and* a small bf16 matrix product, timed once per process,
  runs at least ``MIN_SPEEDUP`` times faster than in fp32. A CPU without them
  (AVX2 only, say) emulates bf16 slowly and stays in fp32;
- anything else (MPS): fp32.

bf16 here is always autocast: weights, gradients and optimizer state stay fp32
(the "master" copy), only the matrix products and attention run in bf16. The
energy loss, the Brier estimators, the cross-entropy's log-sum-exp and the
norms compute in fp32 whatever the precision (each says so where it does).

The environment variable ``CALM_PRECISION`` sets the command line's default
(the test suite pins it to fp32 so that its figures do not depend on the CPU).
"""

from __future__ import annotations

import functools
import os
import time
from contextlib import nullcontext

import torch

from calm.errors import CalmError

PRECISIONS = ("auto", "fp32", "bf16")
MIN_SPEEDUP = 1.5
"""How much faster a bf16 matrix product must be on a CPU for ``auto`` to pick bf16."""


def default_precision() -> str:
    """The command line's default: ``$CALM_PRECISION`` if set, else ``auto``."""
    value = os.environ.get("CALM_PRECISION", "auto").strip().lower() or "auto"
    if value not in PRECISIONS:
        raise CalmError(
            f"CALM_PRECISION={value!r} is not one of {', '.join(PRECISIONS)}"
        )
    return value


def cpu_bf16_instructions() -> bool:
    """Whether this CPU has bf16 matrix instructions (AMX-BF16 or AVX-512-BF16)."""
    try:
        caps = torch.cpu.get_capabilities()
        return bool(caps.get("amx_bf16") or caps.get("avx512_bf16"))
    except (AttributeError, RuntimeError):  # older PyTorch: read the kernel's flags
        try:
            with open("/proc/cpuinfo") as f:
                flags = f.read()
        except OSError:
            return False
        return " amx_bf16" in flags or " avx512_bf16" in flags


def _matmul_seconds(dtype: torch.dtype, size: int, repeat: int) -> float:
    a = torch.randn(size, size).to(dtype)
    b = torch.randn(size, size).to(dtype)
    a @ b  # warm-up (kernel selection, thread pool)
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return best


@functools.cache
def cpu_bf16_speedup(threads: int | None = None, size: int = 512, repeat: int = 5) -> float:
    """fp32 time / bf16 time of a ``size``² matrix product on this CPU (about 50 ms to measure).

    ``threads`` is only part of the cache key: the product runs on the current pool.
    """
    del threads
    return _matmul_seconds(torch.float32, size, repeat) / _matmul_seconds(torch.bfloat16, size, repeat)


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """'auto' | 'fp32' | 'bf16' → the precision to use on ``device`` ('fp32' or 'bf16')."""
    if precision not in PRECISIONS:
        raise CalmError(f"unknown precision {precision!r}; choose {', '.join(PRECISIONS)}")
    device = torch.device(device)
    if precision == "bf16":
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise CalmError("--precision bf16: this GPU has no bf16 support; use fp32")
        if device.type not in ("cuda", "cpu"):
            raise CalmError(f"--precision bf16 is supported on CPU and CUDA, not {device.type}")
        return "bf16"
    if precision == "fp32":
        return "fp32"
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if device.type == "cpu" and cpu_bf16_instructions():
        return "bf16" if cpu_bf16_speedup(torch.get_num_threads()) >= MIN_SPEEDUP else "fp32"
    return "fp32"


def autocast(device: torch.device | str, precision: str):
    """A context in which the matrix work runs at ``precision`` ('fp32' or 'bf16') on ``device``."""
    device = torch.device(device)
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if precision != "fp32":
        raise ValueError(f"autocast needs a resolved precision, got {precision!r}")
    if device.type == "cuda":
        # An explicit fp32 request is honoured even inside an outer autocast region.
        return torch.autocast("cuda", enabled=False)
    return nullcontext()


def matmul_dtype(device_type: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype that autocast would run a matrix product in (for hand-written kernels)."""
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return dtype
