"""``python -m demo``: Diff2Flow end to end on a tiny pretrained digit-diffusion model.

1. load the tiny class-conditional diffusion UNet (eps or v, SD's scaled-linear 1000-step
   schedule, pretrained on the digits 0-6 only) and convert it with ``d2f_core.Diff2Flow``;
2. sample it zero-shot with FM Euler (+ classifier-free guidance);
3. fine-tune LoRA adapters under the ``diff2flow`` objective with ``training.Trainer`` on the
   digits 7-9, which the model has never seen (the shifted target);
4. sample again from the same noise and write to ``--out``: ``samples.png`` (before | after,
   one row per class), ``loss_curve.png``, ``metrics.md`` (+ ``metrics.json``).

Metrics on the fine-tuning classes 7-9: Fréchet distance of the digit classifier's features
(samples vs the real digits, next to the real-vs-real floor), the fraction of samples the
classifier reads as the requested digit, and the FM validation loss (``d2f_core.fm_validation_loss``).
Time convention (docs/MATH.md section 1): FM sigma in [0, 1], sigma = 1 is noise,
``x_sigma = (1 - sigma) x0 + sigma noise``, velocity ``noise - x0``.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import torch

import d2f_core
from training import TrainConfig, Trainer
from training.files import atomic_write, ensure_writable_folder
from training.plots import save_loss_curve

from . import data as ddata
from . import pipeline
from .classifier import predict
from .grid import save_grid
from .model import NULL_CLASS, NUM_CLASSES
from .progress import Progress
from .store import WEIGHTS_DIR, load_classifier, load_unet


def _positive_int(name: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got {text!r}") from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"{name} must be >= 1, got {value}")
        return value

    return parse


def _positive_float(name: str):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a number, got {text!r}") from None
        if not value > 0 or value != value or value == float("inf"):
            raise argparse.ArgumentTypeError(f"{name} must be a finite number > 0, got {text}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--out", type=pathlib.Path, default=pathlib.Path("demo_output"), help="output folder (default demo_output/)"
    )
    p.add_argument("--prediction", choices=["eps", "v"], default="v", help="which pretrained model (default v)")
    p.add_argument("--steps", type=_positive_int("--steps"), default=1500, help="LoRA fine-tuning steps (default 1500)")
    p.add_argument("--batch", type=_positive_int("--batch"), default=32, help="fine-tuning batch size (default 32)")
    p.add_argument("--rank", type=_positive_int("--rank"), default=8, help="LoRA rank (default 8)")
    p.add_argument("--lr", type=_positive_float("--lr"), default=1e-3, help="learning rate (default 1e-3)")
    p.add_argument(
        "--samples",
        type=_positive_int("--samples"),
        default=600,
        help="samples of the digits 7-9 for the Fréchet distance (default 600; >= 2)",
    )
    p.add_argument(
        "--grid", type=_positive_int("--grid"), default=8, help="samples per class in the PNG grid (default 8)"
    )
    p.add_argument(
        "--sample-steps", type=_positive_int("--sample-steps"), default=20, help="FM Euler steps (default 20)"
    )
    p.add_argument(
        "--cfg", type=_positive_float("--cfg"), default=2.0, help="classifier-free guidance scale (default 2)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the noise and of the fine-tuning draws")
    p.add_argument(
        "--threads", type=_positive_int("--threads"), default=None, help="torch CPU threads (default: torch's)"
    )
    p.add_argument("--weights", type=pathlib.Path, default=WEIGHTS_DIR, help="folder of the pretrained weights")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def check_output_folder(out: pathlib.Path) -> None:
    """Create ``out`` and prove it is writable now, before minutes of work are spent."""
    try:
        ensure_writable_folder(out)
    except OSError as exc:
        raise SystemExit(f"error: --out {out}: the output folder cannot be written ({exc.strerror or exc})") from None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.samples < 2:
        parser.error(f"--samples must be >= 2 (a covariance needs two samples), got {args.samples}")
    if args.seed < 0:
        parser.error(f"--seed must be >= 0, got {args.seed}")
    check_output_folder(args.out)
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    show = not args.no_progress

    # ---------------------------------------------------------------- models and data
    try:
        unet, encoder, meta = load_unet(args.prediction, args.weights)
        classifier = load_classifier(args.weights)
    except FileNotFoundError as exc:
        raise SystemExit(f"error: --weights {args.weights}: {exc}") from None
    d2f = d2f_core.Diff2Flow(d2f_core.scaled_linear(), args.prediction)
    images, labels = ddata.select_classes(*ddata.load_digits_tensor(), ddata.FINETUNE_CLASSES)
    real_features = predict(classifier, images)[1]
    floor = pipeline.data_floor(real_features)

    sigmas = d2f_core.fm_sigmas(args.sample_steps, sigma_max=d2f.sigma_max)
    grid_labels = torch.arange(NUM_CLASSES).repeat_interleave(args.grid)
    grid_noise = pipeline.fixed_noise(len(grid_labels), args.seed)
    fd_labels = pipeline.balanced_labels(ddata.FINETUNE_CLASSES, args.samples)
    fd_noise = pipeline.fixed_noise(args.samples, args.seed + 1)
    uncond = pipeline.contexts(encoder, [NULL_CLASS])
    grid_ctx, fd_ctx = pipeline.contexts(encoder, grid_labels), pipeline.contexts(encoder, fd_labels)
    val_ctx = pipeline.contexts(encoder, labels)

    def evaluate(velocity, stage: str) -> tuple[torch.Tensor, dict]:
        # one bar per phase, each in its own unit, so every ETA is a real one
        with Progress(len(grid_labels) + args.samples, f"{stage} sampling", unit="img", enabled=show) as bar:
            grid = pipeline.sample(velocity, grid_ctx, uncond, grid_noise, sigmas, args.cfg)
            bar.update(len(grid_labels))
            fd_samples = pipeline.sample(velocity, fd_ctx, uncond, fd_noise, sigmas, args.cfg)
            bar.update(args.samples)
        ev = pipeline.evaluate_samples(fd_samples, fd_labels, real_features, classifier)
        return grid, {
            "fd": ev.fd,
            "accuracy": ev.accuracy,
            "fm_val_loss": pipeline.validation_loss(velocity, images, val_ctx),
        }

    with torch.no_grad():
        grid_before, before = evaluate(d2f.velocity_fn(unet), "zero-shot")

    # ---------------------------------------------------------------- LoRA fine-tuning (diff2flow)
    config = TrainConfig(
        objective="diff2flow",
        steps=args.steps,
        batch_size=args.batch,
        learning_rate=args.lr,
        rank=args.rank,
        alpha=float(args.rank),
        targets="all",
        seed=args.seed,
        caption_dropout=0.1,
        weight_decay=0.0,
    )
    tuned = pipeline.fresh_copy(unet)
    adapters = pipeline.attach_adapters(tuned, "lora", rank=args.rank, targets=config.targets, seed=args.seed)
    trainer = Trainer(tuned, adapters, d2f, config, pipeline.training_data(images, labels, encoder))
    with Progress(args.steps, "fine-tune", unit="step", enabled=show) as bar:
        trainer.run(on_step=lambda step, loss, lr: bar.update(1, f"loss {loss:.4f}"))

    with torch.no_grad():
        grid_after, after = evaluate(d2f.velocity_fn(tuned), "fine-tuned")

    # ---------------------------------------------------------------- outputs
    seconds = time.perf_counter() - start
    save_grid(args.out / "samples.png", grid_before, grid_after, args.grid)
    save_loss_curve(
        args.out / "loss_curve.png",
        {f"diff2flow LoRA r{args.rank} ({args.prediction})": trainer.losses},
        title="Diff2Flow LoRA fine-tuning on the digits 7-9",
    )
    result = {
        "prediction": args.prediction,
        "steps": args.steps,
        "rank": args.rank,
        "samples": args.samples,
        "sample_steps": args.sample_steps,
        "cfg": args.cfg,
        "seconds": seconds,
        "threads": torch.get_num_threads(),
        "floor_fd": floor,
        "before": before,
        "after": after,
        "final_train_loss": trainer.losses[-1],
        "pretrained": {k: meta.get(k) for k in ("steps", "seed", "classes")},
    }
    markdown = metrics_markdown(result)
    atomic_write(args.out / "metrics.md", lambda p: pathlib.Path(p).write_text(markdown))
    atomic_write(args.out / "metrics.json", lambda p: pathlib.Path(p).write_text(json.dumps(result, indent=2)))
    print(markdown)
    print(f"wrote {args.out}/samples.png, loss_curve.png, metrics.md, metrics.json in {seconds:.1f} s")
    return 0


def metrics_markdown(r: dict) -> str:
    """The metrics table of one demo run (the numbers the run measured)."""
    b, a = r["before"], r["after"]
    lines = [
        f"# Diff2Flow demo: {r['prediction']}-prediction tiny UNet, LoRA rank {r['rank']}, {r['steps']} steps",
        "",
        f"Evaluated on the digits 7-9 (unseen in pretraining): {r['samples']} samples, FM Euler "
        f"{r['sample_steps']} steps, CFG {r['cfg']:g}; FD = Fréchet distance of the digit classifier's features.",
        "",
        "| metric | zero-shot (before) | after fine-tuning | real-vs-real floor |",
        "|---|---|---|---|",
        f"| Fréchet distance | {b['fd']:.3f} | {a['fd']:.3f} | {r['floor_fd']:.3f} |",
        f"| classified as the requested digit | {b['accuracy']:.3f} | {a['accuracy']:.3f} | |",
        f"| FM validation loss | {b['fm_val_loss']:.4f} | {a['fm_val_loss']:.4f} | |",
        "",
        f"Run time {r['seconds']:.1f} s on {r['threads']} CPU thread(s).",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
