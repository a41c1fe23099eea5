"""Pretrain the demo's tiny diffusion UNets (eps and v) and its digit classifier.

    python -m demo.pretrain                 # writes demo/weights/{unet_eps,unet_v,classifier}.safetensors
    python -m demo.pretrain --only v --out /tmp/w

The UNets learn the ordinary diffusion objective (``d2f_core.evaluate_objective("diffusion")``:
integer tau uniform in 0..999 on SD's scaled-linear schedule, target eps or v) on the digits
0-6 only; 10 % of the labels are replaced by the null class (caption dropout) so that
classifier-free guidance works. The classifier learns all 10 digits (80 % split; the held-out
accuracy is printed). Everything is seeded and runs on one thread, so a run reproduces the
committed files bit for bit on the same torch build.
"""

from __future__ import annotations

import argparse
import hashlib
import pathlib
import sys
import time

import torch

import d2f_core
from d2f_core.objectives import evaluate_objective

from . import data as ddata
from .classifier import predict, train_classifier
from .model import NULL_CLASS, ClassEncoder, TinyUNet, UNetConfig
from .progress import Progress
from .store import WEIGHTS_DIR, classifier_path, save_classifier, save_unet, unet_path


def pretrain_unet(
    prediction: str,
    steps: int,
    batch: int,
    lr: float,
    seed: int,
    caption_dropout: float = 0.1,
    progress: Progress | None = None,
) -> tuple[TinyUNet, ClassEncoder]:
    """Diffusion pretraining on :data:`demo.data.PRETRAIN_CLASSES` (deterministic from ``seed``)."""
    images, labels = ddata.select_classes(*ddata.load_digits_tensor(), ddata.PRETRAIN_CLASSES)
    torch.manual_seed(seed)
    config = UNetConfig()
    unet, encoder = TinyUNet(config), ClassEncoder(config)
    d2f = d2f_core.Diff2Flow(d2f_core.scaled_linear(), prediction)
    params = list(unet.parameters()) + list(encoder.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * s / steps)).item())
    )
    gen = torch.Generator().manual_seed(seed + 1)
    for _ in range(steps):
        idx = torch.randint(images.shape[0], (batch,), generator=gen)
        y = labels[idx].clone()
        y[torch.rand(batch, generator=gen) < caption_dropout] = NULL_CLASS
        noise = torch.randn(batch, *images.shape[1:], generator=gen)
        tau = torch.randint(0, d2f.num_timesteps, (batch,), generator=gen)
        loss = evaluate_objective("diffusion", unet, d2f, images[idx], noise, tau, context=encoder(y)).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)  # the high-tau v / low-tau eps targets spike early
        opt.step()
        sched.step()
        if progress is not None:
            progress.update(1, f"{prediction} loss {loss.item():.4f}")
    return unet.eval().requires_grad_(False), encoder.eval().requires_grad_(False)


def sha256(path: pathlib.Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m demo.pretrain", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", choices=["eps", "v", "classifier", "all"], default="all", help="what to train")
    parser.add_argument("--steps", type=int, default=3000, help="UNet optimizer steps (default 3000)")
    parser.add_argument("--batch", type=int, default=64, help="UNet batch size")
    parser.add_argument("--lr", type=float, default=2e-3, help="UNet peak learning rate (cosine decay)")
    parser.add_argument("--classifier-steps", type=int, default=1500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=pathlib.Path, default=WEIGHTS_DIR, help="output folder (default demo/weights)")
    args = parser.parse_args(argv)
    for name in ("steps", "batch", "classifier_steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not args.lr > 0:
        parser.error(f"--lr must be > 0, got {args.lr}")
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        parser.error(f"--out {args.out} cannot be created: {exc}")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: the float reductions, hence the weights, are reproducible
    try:
        return _train(args)
    finally:
        torch.set_num_threads(threads)


def _train(args: argparse.Namespace) -> int:

    start = time.perf_counter()
    predictions = ["eps", "v"] if args.only == "all" else [args.only] if args.only in ("eps", "v") else []
    for prediction in predictions:
        with Progress(args.steps, f"pretrain {prediction}") as bar:
            unet, encoder = pretrain_unet(prediction, args.steps, args.batch, args.lr, args.seed, progress=bar)
        path = unet_path(prediction, args.out)
        save_unet(
            path,
            unet,
            encoder,
            {
                "prediction": prediction,
                "schedule": "scaled_linear(1000)",
                "objective": "diffusion",
                "classes": ",".join(map(str, ddata.PRETRAIN_CLASSES)),
                "steps": args.steps,
                "batch": args.batch,
                "lr": args.lr,
                "seed": args.seed,
            },
        )
        print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB, sha256 {sha256(path)})")
    if args.only in ("classifier", "all"):
        images, labels = ddata.load_digits_tensor()
        perm = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(args.seed))
        n_train = int(0.8 * images.shape[0])
        train, held = perm[:n_train], perm[n_train:]
        with Progress(args.classifier_steps, "classifier") as bar:
            clf = train_classifier(
                images[train],
                labels[train],
                steps=args.classifier_steps,
                seed=args.seed,
                progress=lambda s, loss: bar.update(1, f"loss {loss:.3f}"),
            )
        accuracy = float((predict(clf, images[held])[0] == labels[held]).float().mean())
        path = classifier_path(args.out)
        save_classifier(
            path,
            clf,
            {
                "classes": "0-9",
                "steps": args.classifier_steps,
                "seed": args.seed,
                "heldout_accuracy": f"{accuracy:.4f}",
            },
        )
        print(
            f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB, sha256 {sha256(path)}); held-out accuracy {accuracy:.3f}"
        )
    print(f"done in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
