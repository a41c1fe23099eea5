"""Data-parallel processes started by ``torchrun``: setup, agreement on stopping, clean exit.

``torchrun --nproc_per_node N`` sets RANK, WORLD_SIZE and LOCAL_RANK; each process trains its
shard of every global batch (see ``Trainer``). NCCL on CUDA, gloo on CPU.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class World:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


ONE_PROCESS = World()  # a run without torchrun


def world_from_env() -> World:
    """The process's place as torchrun describes it (one process when not under torchrun)."""
    try:
        return World(
            int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))
        )
    except ValueError as exc:
        raise RuntimeError(
            f"RANK / WORLD_SIZE / LOCAL_RANK are not integers ({exc}): start several processes with torchrun"
        ) from exc


def init(world: World) -> None:
    """Join the process group (no-op for one process)."""
    if not world.distributed:
        return
    import torch.distributed as dist

    if torch.cuda.is_available():
        torch.cuda.set_device(world.local_rank)
        dist.init_process_group("nccl", device_id=torch.device("cuda", world.local_rank))
    else:
        dist.init_process_group("gloo")


def any_process(flag: bool, world: World) -> bool:
    """True on every process when ``flag`` is true on any (so all stop at the same step)."""
    if not world.distributed:
        return flag
    import torch.distributed as dist

    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def barrier(world: World) -> None:
    if world.distributed:
        import torch.distributed as dist

        dist.barrier()


def finish(world: World, code: int) -> None:
    """Leave the process group and exit with ``code``.

    A multi-process run ends with ``os._exit`` after flushing: with gloo, the process group's
    background threads can abort the interpreter during its normal teardown ("terminate called
    without an active exception", SIGABRT) after all work is done and saved, which would turn a
    finished run into a failed one. Every file is written and closed before this is called.
    """
    if world.distributed:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    if code:
        sys.exit(code)
