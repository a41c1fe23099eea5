"""Worker for the multi-process and interrupt tests: the tiny pure-torch model trained through
``run_headless`` (the CLI's loop: files, metrics, signals), one process or several under torchrun.

    python training/tests/headless_worker.py OUT_DIR [--steps N] [--resume] [--sleep S] [--save-every K] [--concat]
        [--validation]
    python -m torch.distributed.run --nproc_per_node 2 training/tests/headless_worker.py OUT_DIR ...
"""

from __future__ import annotations

import argparse
import pathlib
import time

import torch

from d2f_app import distributed
from d2f_app.headless import run_headless
from d2f_core.lora_metadata import LoraMetadata
from training import TrainConfig
from training.files import RunFiles, load_training_state
from training.tests.helpers import make_run


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--sleep", type=float, default=0.0, help="seconds added to every forward (a slow model)")
    parser.add_argument("--save-every", type=int, default=0)
    parser.add_argument(
        "--concat", action="store_true", help="an image-conditioned model (each sample carries a concat latent)"
    )
    parser.add_argument(
        "--validation", action="store_true", help="hold out 3 of 9 samples and evaluate them every 5 steps"
    )
    args = parser.parse_args()
    world = distributed.world_from_env()
    distributed.init(world)
    torch.set_num_threads(1)
    config = TrainConfig(
        steps=args.steps,
        batch_size=4,
        grad_accumulation=2,
        learning_rate=3e-3,
        lr_schedule="cosine",
        caption_dropout=0.25,
        seed=21,
        save_every=args.save_every,
        validation_split=0.34 if args.validation else 0.0,
        validation_every=5 if args.validation else 0,
    )
    trainer, net, _ = make_run(config, "v", n=9 if args.validation else 6, concat=args.concat)
    trainer.rank, trainer.world_size = world.rank, world.world_size
    if args.sleep:
        forward = net.forward

        def slow(*a, **k):
            time.sleep(args.sleep)
            return forward(*a, **k)

        net.forward = slow
    files = RunFiles(pathlib.Path(args.out), "tiny")
    if args.resume:
        trainer.load_state_dict(load_training_state(files.state))
    code = run_headless(
        trainer,
        files,
        lambda step: LoraMetadata("diff2flow", "v", False, steps=step),
        world,
        resume_hint=f"headless_worker.py {args.out} --resume",
        progress=False,
    )
    distributed.barrier(world)
    distributed.finish(world, code)


if __name__ == "__main__":
    main()
