"""A small random-weight teacher for the pair-generation tests (pure torch), and a worker that
generates pairs (or, with ``invert``, inverts COUNT images of :func:`images`) as one of several
torchrun processes:

    python -m torch.distributed.run --standalone --nproc_per_node 2 pairs_teacher.py OUT COUNT SHARD_SIZE [invert]
"""

from __future__ import annotations

import pathlib
import sys

import torch

if __name__ == "__main__":  # run as a script by torchrun: the repository root on sys.path
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

import d2f_core
from training.pairs import PairSettings, generate_pairs, invert_pairs
from training.tests.helpers import CondNet

SHAPE = (4, 8, 8)


def teacher(prediction: str = "v"):
    """``(velocity(x, sigma, cond), d2f)``: a random-weight conditional net converted by the alignment."""
    net = CondNet(seed=11).eval().requires_grad_(False)
    d2f = d2f_core.Diff2Flow(d2f_core.scaled_linear(), prediction)
    return d2f.velocity_fn(lambda x, t, c: net(x, t, **c)), d2f


def prompts(n: int = 3, tokens: int = 3) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(5)
    return [{"context": torch.randn(1, tokens, 4, generator=gen)} for _ in range(n)]


def negative() -> dict[str, torch.Tensor]:
    return {"context": torch.zeros(1, 3, 4)}


def images(n: int) -> list[torch.Tensor]:
    """``n`` image latents of :data:`SHAPE` (image ``j`` the same whatever ``n``)."""
    return [torch.randn(SHAPE, generator=torch.Generator().manual_seed(100 + j)) for j in range(n)]


def captions(n: int) -> list[dict[str, torch.Tensor]]:
    """A caption per image: three distinct ones in turn (image ``j`` has caption ``j mod 3``)."""
    gen = torch.Generator().manual_seed(9)
    distinct = [{"context": torch.randn(1, 3, 4, generator=gen)} for _ in range(3)]
    return [distinct[j % 3] for j in range(n)]


def settings(d2f: d2f_core.Diff2Flow, **changes) -> PairSettings:
    values = dict(
        shape=SHAPE, sigma_max=d2f.sigma_max, steps=4, cfg=2.5, seed=7, batch_size=4, teacher={"name": "tiny"}
    )
    return PairSettings(**{**values, **changes})


def main() -> None:
    from d2f_app import distributed

    out, count, shard_size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    invert = sys.argv[4:] == ["invert"]
    torch.set_num_threads(1)
    world = distributed.world_from_env()
    distributed.init(world)
    velocity, d2f = teacher()
    place = dict(rank=world.rank, world_size=world.world_size, barrier=lambda: distributed.barrier(world))
    if invert:
        summary = invert_pairs(
            velocity, images(count), captions(count), out, settings(d2f), negative(), shard_size=shard_size, **place
        )
    else:
        summary = generate_pairs(
            velocity, prompts(), out, count, settings(d2f), negative(), shard_size=shard_size, **place
        )
    print(f"rank {world.rank}: generated {summary.generated}, folder holds {summary.count}", flush=True)
    distributed.finish(world, 0)


if __name__ == "__main__":
    main()
