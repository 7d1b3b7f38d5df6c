"""Process-wide CPU memory settings (calm.runtime)."""

import platform
import subprocess
import sys

import pytest

PROBE = """
import resource
import torch
from calm.runtime import keep_freed_memory
applied = keep_freed_memory()
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(256, 4096), torch.nn.GELU(), torch.nn.Linear(4096, 256))
opt = torch.optim.AdamW(model.parameters())
x = torch.randn(4096, 256)  # 64 MB hidden activations: above glibc's largest mmap threshold
def step():
    model(x).square().mean().backward()
    opt.step()
    opt.zero_grad()
for _ in range(3):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    step()
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _probe(env_value: str) -> tuple[bool, int]:
    import os

    env = {**os.environ, "CALM_KEEP_FREED_MEMORY": env_value, "THP_MEM_ALLOC_ENABLE": "0"}
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True,
                         check=True).stdout.split()
    return out[0] == "True", int(out[1])


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                    reason="the setting is glibc's")
def test_freed_memory_is_reused_unless_told_not_to():
    kept, faults_kept = _probe("1")
    off, faults_off = _probe("0")
    assert kept and not off
    # Three steps of a small MLP, after three of warm-up: each step maps its 64 MB
    # activations anew (16,384 faults of 4 KB pages each) unless freed memory is kept,
    # when the warm steps reuse it (the heap may still grow by a block while it settles).
    assert faults_off > 100_000
    assert faults_kept * 5 < faults_off
