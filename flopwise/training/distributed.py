"""DDP through torchrun: gloo on CPU, NCCL on CUDA. Without torchrun these are no-ops.

Launch on one machine with 8 GPUs:      torchrun --nproc-per-node 8 -m flopwise train ...
On 2 machines (run on each, same host): torchrun --nnodes 2 --node-rank R --nproc-per-node 8 \
                                          --rdzv-backend c10d --rdzv-endpoint HOST:29500 -m flopwise train ...
"""

from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as torch_dist


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def launched_rank() -> int:
    """This process' rank as torchrun set it ($RANK), before the process group exists; 0 when run alone."""
    return int(os.environ.get("RANK", "0") or 0)


def setup() -> tuple[int, int]:
    """(rank, world size); initialises the process group once when launched by torchrun."""
    world = world_size()
    if world == 1:
        return 0, 1
    if not torch_dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch_dist.init_process_group(backend)
    return torch_dist.get_rank(), world


def device_for(rank: int, name: str) -> torch.device:
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    local = int(os.environ.get("LOCAL_RANK", rank))
    torch.cuda.set_device(local)
    return torch.device("cuda", local)


def wrap(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def no_sync(model: torch.nn.Module, skip: bool):
    """Skip the gradient all-reduce on all but the last micro-batch of a step."""
    return model.no_sync() if skip and hasattr(model, "no_sync") else contextlib.nullcontext()


def mean(value: float, device: torch.device) -> float:
    if not torch_dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    torch_dist.all_reduce(t)
    return float(t) / torch_dist.get_world_size()


def barrier() -> None:
    if torch_dist.is_initialized():
        torch_dist.barrier()


def teardown() -> None:
    if torch_dist.is_initialized():
        torch_dist.destroy_process_group()
