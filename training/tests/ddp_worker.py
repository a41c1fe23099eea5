"""Worker for the multi-process test: trains the tiny model and writes the LoRA (rank 0).

    python -m torch.distributed.run --nproc_per_node 2 training/tests/ddp_worker.py OUT.safetensors
    python training/tests/ddp_worker.py OUT.safetensors          (one process)
"""
from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from d2f_core.lora import adapters_state_dict
from training import TrainConfig
from training.tests.helpers import make_run


def main(out: str) -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1:
        dist.init_process_group("gloo")
    torch.set_num_threads(1)
    config = TrainConfig(steps=10, batch_size=4, grad_accumulation=2, learning_rate=3e-3, lr_schedule="cosine",
                         caption_dropout=0.25, seed=21)
    trainer, _, adapters = make_run(config, "v", n=6)
    trainer.rank, trainer.world_size = rank, world
    trainer.run()
    if rank == 0:
        save_file({k: v.contiguous() for k, v in adapters_state_dict(adapters).items()}, out)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
