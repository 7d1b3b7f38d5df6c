"""Where and how things run: device choice, threads, seeds."""

from __future__ import annotations

import ctypes
import os
import platform
import random

import numpy as np
import torch

from calm.errors import CalmError


def pick_device(name: str = "auto") -> torch.device:
    """'auto' → CUDA when available, else CPU; 'cpu', 'cuda', 'cuda:1', 'mps' as given."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise CalmError(f"unknown device {name!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CalmError("--device cuda was asked for, but CUDA is not available here")
    return dev


def set_threads(n: int | None) -> None:
    """Intra-op threads (None or 0 keeps PyTorch's default)."""
    if n is not None and n < 0:
        raise CalmError(f"--threads must be 0 (default) or positive, got {n}")
    if n:
        torch.set_num_threads(n)


def use_huge_pages() -> None:
    """Let PyTorch's CPU allocator back large tensors with transparent huge pages.

    A CPU tensor of several MB is mapped afresh by the OS at each allocation and
    faulted in 4 KB page by page on first touch; with huge pages (PyTorch's
    ``THP_MEM_ALLOC_ENABLE``) that costs 512× fewer faults. Measured on an Intel Xeon
    (speed.py's sizes, training steps of 8 × 512 tokens, separate processes in turn):
    the baseline 5–13 % faster in bf16 and 6 % in fp32, CALM 2–4 %. PyTorch reads the
    variable at its first large allocation, so this must run before any; a value the
    user set (``THP_MEM_ALLOC_ENABLE=0``) is kept. The kernel must allow it
    (``/sys/kernel/mm/transparent_hugepage/enabled`` at ``madvise`` or ``always``);
    elsewhere it changes nothing.
    """
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_KEPT_MEMORY: bool | None = None


def keep_freed_memory() -> bool:
    """Let the C allocator keep freed memory for the next tensor instead of returning it.

    glibc serves every allocation above 32 MB (and, by its default threshold, many
    smaller ones) with a fresh ``mmap`` and gives it back at ``free``, so each training
    step maps, faults in and zeroes its large tensors anew, which costs kernel time
    (0.2–1.2 s per baseline step at ``benchmarks/speed.py``'s sizes). Here allocations
    come from the heap instead (``M_MMAP_MAX`` 0) and freed memory stays with the
    process up to 2 GiB at its top (``M_TRIM_THRESHOLD``), so a steady loop reuses it
    (measured on an Intel Xeon with AMX, 8 × 512-token training steps, separate
    processes, two rounds: CALM 3 % faster in bf16 and 8–20 % in fp32, the baseline
    2–15 %; after warm-up CALM's steps take no page faults at all). The price: the
    process keeps its peak footprint. ``CALM_KEEP_FREED_MEMORY=0`` turns it off; only
    glibc on Linux is changed, elsewhere this does nothing. Returns whether it applied (once per
    process; later calls return the first answer).
    """
    global _KEPT_MEMORY
    if _KEPT_MEMORY is not None:
        return _KEPT_MEMORY
    _KEPT_MEMORY = False
    if os.environ.get("CALM_KEEP_FREED_MEMORY", "1").strip() in ("0", "false", "no", "off"):
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _KEPT_MEMORY = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    return _KEPT_MEMORY


def configure_cpu_memory() -> None:
    """What the command line does before a command's first large tensor:
    :func:`use_huge_pages` and :func:`keep_freed_memory`."""
    use_huge_pages()
    keep_freed_memory()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default
