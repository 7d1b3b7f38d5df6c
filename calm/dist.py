"""Training on several processes: the torchrun environment, one wrapper, reductions.

Distribution is applied once, from outside the model (model files stay
single-device): ``setup`` reads torchrun's environment (RANK, WORLD_SIZE,
LOCAL_RANK) and starts the process group (NCCL for CUDA devices, gloo for the
CPU); ``wrap(model, mode)`` applies one of

- ``none``: the plain model (one process);
- ``ddp``: DistributedDataParallel, every rank holds all weights and gradients
  are averaged (the default when the world size is above 1);
- ``fsdp``: FSDP2 ``fully_shard`` on every Transformer block, then on the root.
  Frozen parameters (CALM's autoencoder) are left out of the sharding: each
  rank keeps its own full copy, as they need no gradients and no optimizer state.

Metrics are reduced as sums (numerator and denominator), then divided, so that
ranks with unequal shares still give the exact global mean. Without torchrun
every helper degrades to its one-process meaning, so the same code runs as one
process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as tdist
from torch import nn

from calm.errors import CalmError

MODES = ("none", "ddp", "fsdp")


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str) -> int | None:
    v = os.environ.get(name)
    if v is None:
        return None
    try:
        return int(v)
    except ValueError:
        raise CalmError(f"environment variable {name}={v!r} is not an integer") from None


def launched_by_torchrun() -> bool:
    return _env_int("RANK") is not None and _env_int("WORLD_SIZE") is not None


def setup(device: torch.device | str = "cpu") -> DistEnv:
    """Start the process group when launched by torchrun; return this process's place.

    Under torchrun a CUDA device becomes ``cuda:LOCAL_RANK`` (one GPU per process).
    Calling it again returns the same answer without starting a second group.
    """
    device = torch.device(device)
    if not launched_by_torchrun():
        return DistEnv(0, 1, 0, device)
    rank, world = _env_int("RANK"), _env_int("WORLD_SIZE")
    local = _env_int("LOCAL_RANK") or 0
    if device.type == "cuda":
        if local >= torch.cuda.device_count():
            raise CalmError(
                f"LOCAL_RANK {local} but only {torch.cuda.device_count()} CUDA device(s) are visible"
            )
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not tdist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        tdist.init_process_group(backend=backend, rank=rank, world_size=world, **kwargs)
    return DistEnv(rank, world, local, device)


def is_dist() -> bool:
    return tdist.is_available() and tdist.is_initialized()


def rank() -> int:
    return tdist.get_rank() if is_dist() else 0


def world_size() -> int:
    return tdist.get_world_size() if is_dist() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_dist():
        tdist.barrier()


def cleanup() -> None:
    if is_dist():
        tdist.destroy_process_group()


def _reduce_device() -> torch.device:
    # NCCL reduces CUDA tensors only; gloo reduces CPU tensors.
    if is_dist() and tdist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(values: list[float]) -> list[float]:
    """Element-wise sum of a list of numbers over all ranks (float64)."""
    if not is_dist():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=_reduce_device())
    tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
    return t.tolist()


def reduce_means(sums: dict[str, float], count: float) -> dict[str, float]:
    """Global means from per-rank sums and a per-rank count: Σ sums / Σ counts."""
    keys = sorted(sums)
    out = all_reduce_sum([sums[k] for k in keys] + [float(count)])
    total = max(out[-1], 1e-30)
    return {k: v / total for k, v in zip(keys, out)}


def reduce_eval(figures: dict[str, float | tuple[float, float]]) -> dict[str, float]:
    """Reduce validation figures: a (sum, count) pair → Σ sums / Σ counts over ranks;
    a plain number → its mean over ranks (for figures every rank computes alike)."""
    keys = sorted(figures)
    flat: list[float] = []
    for k in keys:
        v = figures[k]
        flat += [float(v[0]), float(v[1])] if isinstance(v, tuple) else [float(v), 1.0]
    out = all_reduce_sum(flat)
    return {k: out[2 * i] / max(out[2 * i + 1], 1e-30) for i, k in enumerate(keys)}


def broadcast_object(obj):
    """Rank 0's value of ``obj`` on every rank."""
    if not is_dist():
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=0)
    return box[0]


# ----------------------------------------------------------------------------- wrapping


def default_mode(mode: str | None, world: int) -> str:
    """The ``--dist`` choice: DDP when several processes run, else a plain model."""
    if mode is None:
        return "ddp" if world > 1 else "none"
    if mode not in MODES:
        raise CalmError(f"unknown --dist {mode!r}; choose from {', '.join(MODES)}")
    if mode != "none" and not is_dist():
        raise CalmError(f"--dist {mode} needs a torchrun launch (torchrun --nproc_per_node P -m calm ...)")
    if mode == "none" and world > 1:
        raise CalmError(f"--dist none with {world} processes would train {world} separate models; "
                        "use --dist ddp or fsdp")
    return mode


def _blocks(model: nn.Module) -> list[nn.Module]:
    """The Transformer blocks: the units FSDP shards one by one."""
    from calm.transformer import Block

    return [m for m in model.modules() if isinstance(m, Block)]


def wrap(model: nn.Module, mode: str, device: torch.device | str) -> nn.Module:
    """Apply the distribution wrapper once; the model must already be on ``device``."""
    device = torch.device(device)
    if mode == "none":
        return model
    if not is_dist():
        raise CalmError(f"--dist {mode} needs a torchrun launch")
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids, output_device=device.index if ids else None)
    if mode == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

        # A mesh of the run's own device type: fully_shard's default mesh takes the
        # accelerator whenever one is visible, also for a --device cpu (gloo) run.
        mesh = init_device_mesh(device.type, (tdist.get_world_size(),))
        frozen = {p for p in model.parameters() if not p.requires_grad}
        for block in _blocks(model):
            fully_shard(block, mesh=mesh, ignored_params=frozen & set(block.parameters()) or None)
        fully_shard(model, mesh=mesh, ignored_params=frozen or None)
        # Methods other than forward that read the root's weights (the autoencoder's
        # health figures call encode / decode directly) must gather them too.
        for name in ("encode", "decode"):
            if callable(getattr(model, name, None)):
                register_fsdp_forward_method(model, name)
        return model
    raise CalmError(f"unknown --dist {mode!r}; choose from {', '.join(MODES)}")


def unwrap(model: nn.Module) -> nn.Module:
    """The module under a DDP wrapper (FSDP2 changes the module in place: itself)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def is_fsdp(model: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return False
    return isinstance(model, FSDPModule)


def no_sync(model: nn.Module, last_micro_batch: bool):
    """Skip the gradient all-reduce on all but the last micro-batch of a step."""
    from contextlib import nullcontext

    if isinstance(model, nn.parallel.DistributedDataParallel) and not last_micro_batch:
        return model.no_sync()
    if is_fsdp(model):
        model.set_requires_gradient_sync(last_micro_batch)
    return nullcontext()
