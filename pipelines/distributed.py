"""torch.distributed set up from the environment torchrun provides (RANK, WORLD_SIZE, LOCAL_RANK, ...)."""

from __future__ import annotations

import contextlib
import gc
import os
from typing import Iterator

import torch
import torch.distributed as dist


@contextlib.contextmanager
def distributed(device: str) -> Iterator[str]:
    """Join the process group when launched by torchrun (gloo on CPU, nccl on CUDA); yields this rank's device.

    Outside torchrun (WORLD_SIZE unset or 1) nothing happens and `device` is returned as given.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or not dist.is_available() or dist.is_initialized():
        yield device
        return
    cuda = device.startswith("cuda")
    if cuda:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo")
    try:
        yield device
        # DDP wrappers left in reference cycles hold the group's gloo threads; freed at interpreter exit, after the
        # group is gone, they aborted a rank (SIGABRT, "terminate called without an active exception"): free them now
        gc.collect()
        dist.barrier()  # every rank done before any tears down: a rank leaving early aborted its peer (gloo, loaded CPU)
    finally:
        dist.destroy_process_group()
