"""The headless trainer's overhead: a CLI training step against a bare forward/backward loop.

Both train LoRA adapters (rank 8, ``--targets``) on the same random-weight SD1.5-layout UNet
(ComfyUI's classes, width ``--channels``; see train_speed.py), the same batch (4 latents 4x32x32
with one [1, 77, 768] conditioning), diff2flow objective, AdamW, fp32:

- ``cli``:  exactly what ``python -m training train`` runs after loading: ``d2f_host.unet.attach_adapters``
  (weight wrappers on a ModelPatcher clone), ``Trainer`` with its shared generator, and
  ``run_headless`` (metrics.jsonl, progress bar, the stop-signal check, loss.png at the end). Step
  times are the gaps between consecutive ``metrics.jsonl`` records, i.e. every step's full cost.
- ``bare``: the same network (the same clone, weight wrappers and adapters) in a plain loop:
  ``d2f_core.objective_loss`` + ``loss.backward()`` + ``AdamW.step()`` on the same batch. The ratio
  is what the trainer adds to a step (batch drawing, the shared generator, NaN guard, metrics,
  progress bar, stop check); the weight wrappers' cost against ``torch.nn.utils.parametrize`` is
  train_speed.py's "ours/bare" figure.

The two alternate in ``--rounds`` rounds of ``--steps`` timed steps (after ``--warmup`` untimed
ones each), in one process, so drift of the machine hits both; the figure is the ratio of the
median step times (target <= 1.05).

    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/cli_overhead.py [--channels 64] [--steps 8] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pathlib
import statistics
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.append(str(ROOT))  # a fresh clone: d2f_core, training, d2f_host without installing
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))  # comfy_harness: the tiny-model builders


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--channels", type=int, default=64, help="UNet model_channels (SD1.5: 320)")
    parser.add_argument("--targets", default="attention_ff", choices=["attention", "attention_ff", "all"])
    parser.add_argument("--steps", type=int, default=8, help="timed steps per round and trainer")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before each block")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    parser.add_argument("--quick", action="store_true", help="a short run that checks the script (figures meaningless)")
    args = parser.parse_args()
    if args.quick:
        args.channels, args.steps, args.warmup, args.rounds = 32, 1, 1, 1
    if min(args.steps, args.rounds) < 1 or args.warmup < 0:
        parser.error("--steps and --rounds must be >= 1, --warmup >= 0")

    from d2f_host.bootstrap import bootstrap_comfyui

    bootstrap_comfyui()
    from d2f_host.model_sampling import alignment_of
    from d2f_host.unet import attach_adapters, unet_network

    logging.disable(logging.WARNING)
    import comfy.model_management
    import torch
    from train_speed import BATCH, CONTEXT, LATENT, LR, RANK, build_model

    from d2f_app.headless import run_headless
    from d2f_core import objective_loss
    from d2f_core.lora_metadata import LoraMetadata
    from training import TrainConfig, Trainer, TrainingData
    from training.files import RunFiles

    if args.threads:
        torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(1)
    latents = torch.randn(BATCH, *LATENT, generator=gen)
    context = torch.randn(1, 77, CONTEXT, generator=gen)
    device = comfy.model_management.get_torch_device()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    # --- the CLI's trainer
    model = build_model(args.channels)
    d2f = alignment_of(model)
    x0 = model.model.process_latent_in(latents)
    data = TrainingData(list(x0), [{"context": context}])
    config = TrainConfig(
        steps=1, batch_size=BATCH, rank=RANK, alpha=float(RANK), learning_rate=LR, targets=args.targets, seed=0
    )
    with torch.inference_mode(False), torch.enable_grad():
        _, unet, adapters, _ = attach_adapters(model, config)
        trainer = Trainer(unet_network(unet), adapters, d2f, config, data, device)
    out = pathlib.Path(tempfile.mkdtemp(prefix="d2f_cli_overhead_"))
    files = RunFiles(out, "bench")
    metadata = lambda step: LoraMetadata("diff2flow", d2f.prediction, False, steps=step)  # noqa: E731

    def cli_block(n: int) -> list[float]:
        first = trainer.step
        trainer.config.steps = trainer.step + n
        with torch.inference_mode(False), torch.enable_grad():
            code = run_headless(trainer, files, metadata, progress=True)
        if code:
            sys.exit(f"the CLI trainer failed (exit {code})")
        seconds = [json.loads(line)["seconds"] for line in files.metrics.read_text().splitlines()]
        seconds = seconds[first:]
        return [b - a for a, b in zip(seconds, seconds[1:])]

    # --- the bare loop: the same network (clone, weight wrappers, adapters), batch and objective
    network = unet_network(unet)
    optimizer = torch.optim.AdamW([p for a in adapters.values() for p in a.parameters()], lr=LR, weight_decay=0.01)
    bare_x0, cond = x0.to(device), context.expand(BATCH, -1, -1).to(device)
    noise_gen = torch.Generator().manual_seed(0)

    def bare_block(n: int) -> list[float]:
        times = []
        for _ in range(n):
            start = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            with torch.inference_mode(False), torch.enable_grad():
                loss = objective_loss("diff2flow", network, d2f, bare_x0, generator=noise_gen, context=cond).loss
                loss.backward()
            optimizer.step()
            sync()
            times.append(time.perf_counter() - start)
        return times

    cli_times, bare_times = [], []
    for _ in range(args.rounds):
        bare_block(args.warmup)
        bare_times += bare_block(args.steps)
        cli_block(args.warmup)
        cli_times += cli_block(args.steps + 1)  # n + 1 records give n gaps
    cli, bare = statistics.median(cli_times), statistics.median(bare_times)
    load = os.getloadavg() if hasattr(os, "getloadavg") else (0.0, 0.0, 0.0)
    print(
        f"\nSD1.5-layout UNet, model_channels {args.channels}, targets {args.targets}, batch {BATCH}x{LATENT}, rank {RANK}, fp32, "
        f"{device}, torch threads {torch.get_num_threads()}, load avg {load[0]:.2f}"
    )
    print(f"bare loop  {bare:.4f} s/step (median of {len(bare_times)}, mean {statistics.mean(bare_times):.4f})")
    print(f"CLI        {cli:.4f} s/step (median of {len(cli_times)}, mean {statistics.mean(cli_times):.4f})")
    print(f"CLI / bare step time: {cli / bare:.3f}x (target <= 1.05)")


if __name__ == "__main__":
    main()
