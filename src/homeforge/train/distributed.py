"""Distributed training under torchrun: process group, DDP / FSDP2 wrapping, the launcher.

The same entry point runs as one process or under ``torchrun --nproc_per_node N``
(``homeforge train --nproc N`` launches it; multi-node: run torchrun yourself with
``--nnodes``/``--rdzv-endpoint``). NCCL on GPUs, gloo on CPUs. ``fsdp`` applies FSDP2
``fully_shard`` to every transformer block (the classes in the model's
``_no_split_modules``), then to the root.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from homeforge.errors import HomeforgeError


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def all_sum(self, values: list[float]) -> list[float]:
        """Sum a few floats over all ranks (one collective)."""
        if not self.enabled:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()


def init_distributed(backend: str = "auto") -> DistInfo:
    """Join the torchrun process group if launched by torchrun (WORLD_SIZE > 1); idempotent."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        if backend == "auto":
            backend = "nccl" if cuda else "gloo"
        dist.init_process_group(backend=backend, device_id=device if cuda else None)
    return DistInfo(rank=rank, world=world, local_rank=local_rank, device=device)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def block_classes(model: torch.nn.Module) -> set[type]:
    """Transformer block classes named by HF models' ``_no_split_modules`` (peft-wrapped too)."""
    names: set[str] = set()
    for m in model.modules():
        names.update(getattr(m, "_no_split_modules", None) or [])
    return {type(m) for m in model.modules() if type(m).__name__ in names}


def wrap_model(model: torch.nn.Module, info: DistInfo, strategy: str) -> torch.nn.Module:
    """DDP or FSDP2 around ``model`` (already on ``info.device``); unchanged for one process."""
    if not info.enabled:
        return model
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(model, device_ids=[info.local_rank] if info.device.type == "cuda" else None)
    from torch.distributed.fsdp import fully_shard

    classes = block_classes(model)
    if not classes:
        raise HomeforgeError(f"FSDP needs transformer blocks to shard, and {type(model).__name__} names none "
                             "(_no_split_modules)", fix="use distributed.strategy=ddp for this model")
    for m in list(model.modules()):
        if type(m) in classes:
            fully_shard(m)
    fully_shard(model)
    return model


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") and isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def grad_sync(model: torch.nn.Module, enabled: bool):
    """Context: skip the gradient all-reduce on all but the last micro-batch of a step."""
    import contextlib

    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return contextlib.nullcontext() if enabled else model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(enabled)
    return contextlib.nullcontext()


def torchrun_command(nproc: int, argv: list[str]) -> list[str]:
    """The torchrun command that re-runs ``homeforge ARGV`` in ``nproc`` local processes."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "homeforge", *argv]


def launch(nproc: int, argv: list[str]) -> int:
    """Run ``homeforge ARGV`` under torchrun with ``nproc`` processes; returns its exit code."""
    if nproc > 1 and not torch.cuda.is_available() and nproc > (os.cpu_count() or 1):
        raise HomeforgeError(f"--nproc {nproc} is more than the {os.cpu_count()} CPU cores here",
                             fix="use at most one process per core (or per GPU)")
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    return subprocess.call(torchrun_command(nproc, argv), env=env)
