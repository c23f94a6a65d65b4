"""The torchrun environment, rank-0 printing and all-reduce helpers.

``torchrun --nproc_per_node=N -m patchgpt train ...`` sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` in
every process; `init` reads them and joins the process group (gloo on CPU, NCCL on CUDA). Without them it
is a no-op and everything below behaves as a world of one, so the single-process path is the same code.
References: PyTorch's DDP tutorial and torchrun docs (torch.distributed.elastic); karpathy/nanoGPT
`train.py` (its ``ddp`` set-up).
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Env:
    """Where this process sits: its rank among `world` processes and the device it trains on."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


class DeviceError(ValueError):
    """``train.device`` names a device this machine does not have; the message is one line."""


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` -> the local rank's GPU if there is one, else the CPU; ``cpu``, ``cuda[:N]`` or ``mps`` as given.

    Raises:
        DeviceError: an unknown device string, or a device this machine (or this torch build) does not have.
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps"):
        raise DeviceError(f"train.device={name!r}: choose auto, cpu, cuda, cuda:N or mps")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise DeviceError(f"train.device={name}: {why}; use train.device=cpu (or auto)")
        count = torch.cuda.device_count()
        if device.index is None:
            if local_rank >= count:
                raise DeviceError(f"train.device={name}: local rank {local_rank} has no GPU (this machine has "
                                  f"{count}); start at most {count} processes per node")
            device = torch.device("cuda", local_rank)
        elif device.index >= count:
            raise DeviceError(f"train.device={name}: GPU {device.index} does not exist (this machine has {count})")
    if device.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise DeviceError(f"train.device={name}: MPS (Apple GPU) is not available here; use train.device=cpu")
    return device


def init(device: str = "auto") -> Env:
    """Join the torchrun process group if this process was started by torchrun; else a world of one."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local_rank)
    if world <= 1:
        return Env(0, 1, 0, dev)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo",
                                device_id=dev if dev.type == "cuda" else None)
    return Env(dist.get_rank(), dist.get_world_size(), local_rank, dev)


def is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def print0(*args, **kwargs) -> None:
    """`print` on rank 0 only (to stderr unless `file` is given)."""
    if is_main():
        kwargs.setdefault("file", sys.stderr)
        print(*args, **kwargs)


def all_reduce(values: list[float], device: torch.device, op: str = "mean") -> list[float]:
    """Element-wise mean (or sum, or max) of `values` over all ranks; `values` itself in a world of one."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    if op == "mean":
        t /= dist.get_world_size()
    return t.tolist()


def all_reduce_mean(metrics: dict[str, float], device: torch.device | None = None) -> dict[str, float]:
    """The mean of each scalar over all ranks (every rank must pass the same keys in the same order)."""
    keys = list(metrics)
    vals = all_reduce([float(metrics[k]) for k in keys], device or torch.device("cpu"))
    return dict(zip(keys, vals, strict=True))


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def cleanup() -> None:
    """Leave the process group (at the end of a torchrun run)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def wrap(module: torch.nn.Module, env: Env, blocks: Iterable[torch.nn.Module] = (), fsdp: bool = False
         ) -> torch.nn.Module:
    """The module a training loop calls: `module` itself in a world of one, else DDP (or FSDP2) over all of it.

    DDP skips parameters with ``requires_grad=False`` (frozen backbones of probes); FSDP2 shards each of
    `blocks` (a backbone's transformer blocks) and then the rest (``fully_shard`` works in place; it is public
    in ``torch.distributed.fsdp`` from torch 2.6)."""
    if not env.distributed:
        return module
    if fsdp:
        try:
            from torch.distributed.fsdp import fully_shard
        except ImportError:
            raise RuntimeError(f"train.fsdp needs torch 2.6 or newer (this is {torch.__version__})") from None

        for block in blocks:
            fully_shard(block)
        return fully_shard(module)
    from torch.nn.parallel import DistributedDataParallel

    ids = [env.device.index] if env.device.type == "cuda" else None
    # Tasks leave some backbone parameters out of their loss (the unused LM head of a classifier, say):
    # DDP must look for them each step rather than wait for their gradients for ever.
    return DistributedDataParallel(module, device_ids=ids, find_unused_parameters=True)


def no_sync(model: torch.nn.Module, skip: bool):
    """A context in which backward does not all-reduce gradients (DDP's ``no_sync``, FSDP2's switch)."""
    if not skip:
        return contextlib.nullcontext()
    if hasattr(model, "no_sync"):
        return model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):
        @contextlib.contextmanager
        def off():
            model.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                model.set_requires_gradient_sync(True)
        return off()
    return contextlib.nullcontext()
