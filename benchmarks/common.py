"""Shared helpers of the benchmarks: machine facts, timing statistics, result files."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import time
from pathlib import Path

from calm.runtime import configure_cpu_memory, keep_freed_memory

configure_cpu_memory()  # as the command line does, before any benchmark's first large tensor

RESULTS = Path(__file__).resolve().parent / "results"


FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")
"""CPU flags that decide the matrix kernels (recorded with every result)."""


def cpu_model() -> str:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return cpu


def cpu_flags() -> list[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                return [f for f in FLAGS if f in have]
    except OSError:
        pass
    return []


def cpu_model_number() -> int | None:
    """The CPU's model number (/proc/cpuinfo "model"): machines whose model name reads
    alike (a hypervisor's generic "Intel Xeon Processor") can still differ in it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model" and value.strip().isdigit():
                return int(value)
    except OSError:
        pass
    return None


def on_cuda(device) -> bool:
    """Whether ``device`` (None, a name or a torch.device) is a CUDA device."""
    import torch

    return device is not None and torch.device(device).type == "cuda"


def gpu_name(device=None) -> str | None:
    """The CUDA device's name ('NVIDIA H200'), or None off CUDA."""
    import torch

    return torch.cuda.get_device_name(torch.device(device)) if on_cuda(device) else None


def machine_tag(device=None) -> str:
    """A short name of this CPU kind for per-machine result files, e.g. 'intel-xeon-amx-m167'
    (the last part is the model number, where /proc/cpuinfo gives one); for figures
    measured on a CUDA device, the GPU's name, e.g. 'cuda-nvidia-h200'."""
    import re

    gpu = gpu_name(device)
    if gpu:
        return "-".join(["cuda", *re.findall(r"[a-z0-9]+", gpu.lower())])
    cpu = cpu_model().lower()
    cpu = re.sub(r"\(r\)|\(tm\)|processor|cpu|@.*$|\d+-core", " ", cpu)
    words = re.findall(r"[a-z0-9]+", cpu)[:3]
    flags = cpu_flags()
    extra = "amx" if "amx_bf16" in flags else "avx512" if "avx512f" in flags else \
        "avx2" if "avx2" in flags else ""
    number = cpu_model_number()
    parts = words + ([extra] if extra and extra not in words else [])
    return "-".join(parts + ([f"m{number}"] if parts and number is not None else [])) or "unknown"


def machine_limits(threads=(1, 2), size: int = 2048, gemv: int = 4096, device="cpu") -> dict:
    """This machine's own limits, measured now: fp32 and bf16 matmul GFLOP/s (size²)
    and fp32 matrix-vector read bandwidth (GB/s, a gemv² weight), at each thread count.

    Every speed figure of the benchmarks is reported as a share of the limit that
    applies to it, so no peak is assumed from another machine. On a CUDA ``device``
    the limits are the GPU's, measured once (key "gpu", see ``limits_key``), at sizes
    that fill it (8192² products, a 1 GiB matrix-vector read, larger than its caches).
    """
    import torch
    import torch.nn.functional as F

    device = torch.device(device)
    cuda = on_cuda(device)
    if cuda:
        threads, size, gemv = ("gpu",), max(size, 8192), max(gemv, 16384)
    before = torch.get_num_threads()
    out = {}
    try:
        for t in threads:
            if not cuda:
                torch.set_num_threads(t)
            row = {}
            for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
                a = torch.randn(size, size, device=device).to(dtype)
                b = torch.randn(size, size, device=device).to(dtype)
                s = timed(lambda a=a, b=b: a @ b, warmup=2, repeat=5, device=device)["min"]
                row[f"matmul_{name}_gflops"] = 2 * size**3 / s / 1e9
            w = torch.randn(gemv, gemv, device=device)
            wt, x = w.t().contiguous(), torch.randn(1, gemv, device=device)
            s = min(timed(lambda x=x, w=w: F.linear(x, w), warmup=5, repeat=20, device=device)["min"],
                    timed(lambda x=x, wt=wt: x @ wt, warmup=5, repeat=20, device=device)["min"])
            row["gemv_fp32_gbs"] = w.numel() * 4 / s / 1e9
            out[str(t)] = row
            del a, b, w, wt
    finally:
        torch.set_num_threads(before)
    return out


def weight_read_gbs(nbytes: int, threads: int, device="cpu") -> float:
    """Matrix-vector read bandwidth (GB/s) over one fp32 weight of about ``nbytes``, at
    ``threads`` intra-op threads: the memory limit of a decoding step that reads that
    many bytes of weights.

    On a CPU the bandwidth depends on the size read: a 64 MB weight (``machine_limits``'
    gemv) stays largely in the last-level cache between reads, while the 100–250 MB
    that a decoding step of ``benchmarks/speed.py``'s models reads comes mostly from
    DRAM (measured on an Intel Xeon with AMX, 2 threads: 53–61 GB/s up to 64 MB, 48 at
    128 MB, 34 at 256 MB, 32 at 1 GB). So a step is held to the bandwidth measured at
    its own size.
    """
    import torch
    import torch.nn.functional as F

    device = torch.device(device)
    before = torch.get_num_threads()
    try:
        if not on_cuda(device):
            torch.set_num_threads(threads)
        rows = max(1, nbytes // (4 * 4096))
        w = torch.randn(rows, 4096, device=device)  # (out, in), as nn.Linear holds it
        wt, x = w.t().contiguous(), torch.randn(1, 4096, device=device)  # and (in, out)
        s = min(timed(lambda: F.linear(x, w), warmup=3, repeat=10, device=device)["min"],
                timed(lambda: x @ wt, warmup=3, repeat=10, device=device)["min"])
        return w.numel() * 4 / s / 1e9
    finally:
        torch.set_num_threads(before)


def limits_key(threads: int, device="cpu") -> str:
    """The key of ``machine_limits``' row that applies: the thread count, or "gpu"."""
    return "gpu" if on_cuda(device) else str(threads)


def format_limits(limits: dict) -> str:
    return "; ".join(
        f"{'GPU' if t == 'gpu' else t + (' thread' if t == '1' else ' threads')}: "
        f"fp32 {r['matmul_fp32_gflops']:.0f}, "
        f"bf16 {r['matmul_bf16_gflops']:.0f} GFLOP/s, gemv {r['gemv_fp32_gbs']:.1f} GB/s"
        for t, r in limits.items()
    )


def machine(device=None) -> dict:
    import numpy
    import torch

    cpu = cpu_model()
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = None
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu,
        "cpu_flags": cpu_flags(),
        "cpu_model_number": cpu_model_number(),
        "machine_tag": machine_tag(device),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "load_average_1min": load,
        "thp_mem_alloc": os.environ.get("THP_MEM_ALLOC_ENABLE"),
        "keep_freed_memory": keep_freed_memory(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "cuda": torch.cuda.is_available(),
        **({"gpu": gpu_name(device), "cuda_version": torch.version.cuda} if gpu_name(device) else {}),
    }


def timed(fn, *, warmup: int = 1, repeat: int = 5, device=None) -> dict:
    """Median, min and max seconds of ``fn()`` over ``repeat`` runs after ``warmup`` runs.

    On a CUDA ``device`` each run waits for the GPU's queued work before the clock stops.
    """
    import torch

    sync = torch.cuda.synchronize if on_cuda(device) else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return {"median": statistics.median(times), "min": min(times), "max": max(times), "runs": repeat}


def write(name: str, payload: dict, per_machine: bool = False, device=None) -> Path:
    """results/NAME.json, or results/NAME-<machine tag>.json for figures that depend
    on the CPU, or on the GPU for a CUDA ``device`` (kept side by side, one file per
    kind of machine)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / (f"{name}-{machine_tag(device)}.json" if per_machine else f"{name}.json")
    path.write_text(json.dumps({"machine": machine(device), **payload}, indent=2) + "\n")
    return path


def table(rows: list[list], header: list[str]) -> str:
    """A Markdown table."""
    cells = [[str(c) for c in r] for r in [header, *rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    fmt = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join([fmt(cells[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|",
                      *map(fmt, cells[1:])])


def run_cli(argv: list[str], *, capture: bool = False) -> str:
    """Run a `calm` command in this process; its stdout when ``capture``; exit on failure."""
    import contextlib
    import io

    from calm.cli import main as calm_main

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf) if capture else contextlib.nullcontext():
        rc = calm_main(argv)
    if rc != 0:
        raise SystemExit(f"`calm {' '.join(argv)}` failed (exit {rc})")
    return buf.getvalue()



# CALM's training minutes in a default `calm quickstart` (13 minutes, of which 80 % train and
# CALM gets its share): the budget the quickstart-sized probes give each CALM.
def _quickstart_calm_minutes() -> float:
    from calm.cli.quickstart import SPLIT, TRAIN_SHARE

    return 13.0 * TRAIN_SHARE * SPLIT["calm"]


QUICKSTART_CALM_MINUTES = _quickstart_calm_minutes()


def number_list(text: str, flag: str, *, allow_zero: bool = False) -> list[float]:
    """Comma-separated numbers of a flag, all positive (or >= 0); exit with a one-line error."""
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"{flag}: expected numbers like 0.5,1,2, got {text!r}") from None
    if not values or any(v < 0 or (v == 0 and not allow_zero) for v in values):
        raise SystemExit(f"{flag}: expected {'numbers >= 0' if allow_zero else 'positive numbers'}, "
                         f"got {text!r}")
    return values


def last_logged(folder: Path) -> dict:
    """A run's last metrics row with a throughput (its final step)."""
    from calm.report import read_metrics

    return [r for r in read_metrics(folder) if "tokens_per_s" in r][-1]
