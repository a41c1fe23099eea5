"""The optimizer choices (training/optimizers.py) at toy scale: each at its package's default learning rate,
AdamW at the tuned one.

    python benchmarks/optimizers.py            # full run (about 35 CPU minutes on one thread)
    python benchmarks/optimizers.py --quick    # a shrunken run to check the script (about 1 minute)
    python benchmarks/optimizers.py --jobs 2   # the same runs on 2 processes (1 thread each)
    python benchmarks/optimizers.py --optimizers Prodigy,AdamW --seeds 1

The setting of ``benchmarks/paper_comparison.py``'s ``lora16`` runs, whose setup, training and evaluation
this script imports: the demo's pretrained v-prediction tiny UNet (digits 0-6) fine-tuned on the digits
7-9 under the ``diff2flow`` objective with LoRA rank 16 (alpha 16) on every Linear and Conv weight,
batch 16, caption dropout 0.1, constant learning rate, weight decay 0, 2000 steps, 3 seeds. Only the
optimizer changes: AdamW at the paper comparison's tuned learning rate (``--lr-lora``, 1e-3), every
other installed optimizer at its ``default_learning_rate`` (the one its package documents: Prodigy 1,
AdamWScheduleFree 0.0025, Adafactor 1e-2, Lion 1e-4, Adam and SGD 1e-3). A choice whose package is
missing (AdamW8bit without bitsandbytes) is listed as not measured, with the reason.

At 0 / 100 / 500 / 2000 steps: the Fréchet distance (FD) of the demo classifier's features, 500
samples of the 8-step FM Euler sampler (the same noise for every model) against the real 7-9 digits,
and the FM validation loss ``d2f_core.fm_validation_loss``; with the weights a saved LoRA holds
(a schedule-free optimizer's evaluation weights, ``Trainer.sampling_weights``). Step 0 is the
pretrained model itself, the same for every optimizer (the adapters start as the identity).

Time convention (docs/MATH.md section 1): FM sigma in [0, 1], sigma = 1 is noise.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere: the demo package lives at the root
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))  # paper_comparison's setup

import paper_comparison  # noqa: E402
import torch  # noqa: E402
from paper_comparison import (  # noqa: E402
    CHECKPOINT_SAMPLER_STEPS,
    Setup,
    _fmt,
    _stats,
    add_finetune_flags,
    check_finetune_flags,
    evaluate,
    run_one,
    write_report,
)

from demo.progress import Progress  # noqa: E402
from training.files import atomic_write  # noqa: E402
from training.optimizers import OPTIMIZERS  # noqa: E402

OBJECTIVE = "diff2flow"
ADAPTER = "lora16"
TUNED = "AdamW"  # the optimizer measured at the paper comparison's tuned learning rate (--lr-lora)
# why a choice is not measured even where its package is installed (added to the missing package's reason)
NOT_ON_CPU = {"AdamW8bit": "bitsandbytes' 8-bit optimizer states are built for CUDA; this benchmark trains on the CPU"}


def learning_rate(name: str, tuned: float) -> float:
    """The learning rate ``name`` is measured at: the tuned one for :data:`TUNED`, else its package's default."""
    return tuned if name == TUNED else OPTIMIZERS[name].default_learning_rate


def measured_and_skipped(names: list[str]) -> tuple[list[str], dict[str, str]]:
    """``names`` split into the ones this installation runs and ``name -> why not`` for the others."""
    skipped = {}
    for name in names:
        reason = OPTIMIZERS[name].missing()
        if reason is not None:
            skipped[name] = f"{reason}" + (f" ({NOT_ON_CPU[name]})" if name in NOT_ON_CPU else "")
    return [n for n in names if n not in skipped], skipped


def run(
    setup: Setup,
    optimizer: str,
    seed: int,
    checkpoints: list[int],
    batch: int,
    lr: float,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """paper_comparison's ``diff2flow`` ``lora16`` run with ``optimizer`` at ``lr``; the 8-step FD and the
    FM validation loss at every checkpoint."""
    steps = [CHECKPOINT_SAMPLER_STEPS]
    result = run_one(
        setup, OBJECTIVE, ADAPTER, seed, checkpoints, steps, batch, {"lora": lr}, progress, optimizer=optimizer
    )
    return {**result, "optimizer": optimizer, "lr": lr}


def _worker_run(job: tuple) -> dict[str, Any]:
    return run(paper_comparison._WORKER["setup"], *job)


# ------------------------------------------------------------------------------------ report
def summarise(report: dict[str, Any]) -> str:
    """The markdown table: FD (mean ± std over seeds) per optimizer at each checkpoint, the FM validation loss
    and the training loss at the last one, the seconds per run; then the choices not measured."""
    cfg, runs, zero = report["config"], report["runs"], report["zero_shot"]
    checkpoints, k, last = cfg["checkpoints"], str(CHECKPOINT_SAMPLER_STEPS), str(cfg["checkpoints"][-1])
    lines = [
        f"# Optimizers at toy scale ({cfg['prediction']}-prediction tiny UNet, digits 0-6 -> 7-9, {OBJECTIVE}, "
        f"LoRA r{ADAPTER[4:]})",
        "",
        f"Mean ± std over {len(cfg['seeds'])} seed(s); FD of the {CHECKPOINT_SAMPLER_STEPS}-step FM Euler sampler on "
        f"{cfg['samples']} samples vs the {report['real_count']} real digits 7-9 (classifier features, 32-d); "
        f"real-vs-real floor **{report['floor_fd']:.2f}**; step 0 (the pretrained model, every optimizer): FD "
        f"{zero['fd'][k]:.2f}, FM validation loss {zero['val_loss']:.3f}. Batch {cfg['batch']}, constant learning "
        f"rate, weight decay 0, caption dropout 0.1, LoRA rank 16 (alpha 16) on every Linear and Conv weight; "
        f"{TUNED} at the paper comparison's tuned learning rate, every other optimizer at its package's default. "
        f"Total {report['seconds'] / 60:.1f} min on {cfg['jobs']} process(es) x 1 thread.",
        "",
        "| optimizer | learning rate | "
        + " | ".join(f"FD step {c}" for c in checkpoints)
        + f" | FM val. loss step {last} | train loss (last 100 steps) | s / run (training + evaluation) |",
        "|---|---|" + "---|" * (len(checkpoints) + 3),
    ]
    for name in cfg["optimizers"]:
        rs = [r for r in runs if r["optimizer"] == name]
        label = "tuned" if name == TUNED else "default"
        cells = [_fmt(*_stats([r["checkpoints"][str(c)]["fd"][k] for r in rs])) for c in checkpoints]
        cells.append(_fmt(*_stats([r["checkpoints"][last]["val_loss"] for r in rs]), 4))
        cells.append(_fmt(*_stats([r["train_loss_last100"] for r in rs]), 4))
        cells.append(_fmt(*_stats([r["seconds"] for r in rs]), 0))
        lines.append(f"| {name} | {rs[0]['lr']:g} ({label}) | " + " | ".join(cells) + " |")
    for name, reason in report["not_measured"].items():
        lr = OPTIMIZERS[name].default_learning_rate
        lines.append(f"| {name} | {lr:g} (default) | not measured: {reason} |" + " |" * (len(checkpoints) + 2))
    lines.append("")
    return "\n".join(lines)


def save_plot(report: dict[str, Any], path: pathlib.Path) -> pathlib.Path:
    """FD over fine-tuning steps, one line per optimizer (mean ± std), the real-vs-real floor dotted."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    cfg, runs, zero = report["config"], report["runs"], report["zero_shot"]
    k, xs = str(CHECKPOINT_SAMPLER_STEPS), [0] + cfg["checkpoints"]
    fig = Figure(figsize=(6.0, 4.2), dpi=100)
    ax = fig.subplots()
    for name in cfg["optimizers"]:
        rs = [r for r in runs if r["optimizer"] == name]
        stats = [(zero["fd"][k], 0.0)] + [_stats([r["checkpoints"][str(c)]["fd"][k] for r in rs]) for c in xs[1:]]
        means, stds = zip(*stats)
        ax.errorbar(xs, means, yerr=stds, marker="o", capsize=3, label=f"{name} (lr {rs[0]['lr']:g})")
    ax.axhline(report["floor_fd"], color="k", linestyle=":", label="real-vs-real floor")
    ax.set_xscale("symlog", linthresh=100)
    ax.set_xticks(xs, [str(x) for x in xs])
    ax.set_yscale("log")
    ax.set_xlabel("fine-tuning steps")
    ax.set_ylabel(f"FD ({CHECKPOINT_SAMPLER_STEPS}-step sampler)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, format="png"))
    return path


# ------------------------------------------------------------------------------------ main
def _names(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in OPTIMIZERS]
    if not names or unknown:
        raise argparse.ArgumentTypeError(
            f"--optimizers must list names of {', '.join(OPTIMIZERS)}, got {text!r}"
            + (f" (unknown: {', '.join(unknown)})" if unknown else "")
        )
    return [n for n in OPTIMIZERS if n in names]  # registry order, each once


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="shrunken run: 1 seed, checkpoints 20 and 50, 100 samples")
    p.add_argument("--seeds", type=int, default=None, help="number of seeds (default 3; --quick 1)")
    p.add_argument(
        "--optimizers",
        type=_names,
        default=list(OPTIMIZERS),
        help=f"comma-separated optimizer choices (default all: {','.join(OPTIMIZERS)})",
    )
    p.add_argument("--samples", type=int, default=None, help="FD samples (default 500; --quick 100)")
    add_finetune_flags(p)  # --lr-lora is AdamW's (tuned) learning rate; --lr-full is not used here
    args = p.parse_args(argv)
    quick = args.quick
    seeds = list(range(args.seeds if args.seeds is not None else (1 if quick else 3)))
    checkpoints = [20, 50] if quick else [100, 500, 2000]
    samples = args.samples or (100 if quick else 500)
    check_finetune_flags(p, args, ("seeds", len(seeds), 1), ("samples", samples, 2))
    torch.set_num_threads(1)
    start = time.perf_counter()
    names, skipped = measured_and_skipped(args.optimizers)
    for name, reason in skipped.items():
        print(f"not measured: {name}: {reason}", flush=True)
    setup = Setup("v", samples, args.weights)
    zero = evaluate(setup, OBJECTIVE, setup.unet, [CHECKPOINT_SAMPLER_STEPS])
    print(f"floor FD {setup.floor:.3f}; step 0: FD {zero['fd']}, val {zero['val_loss']:.4f}", flush=True)
    jobs = [(n, s, checkpoints, args.batch, learning_rate(n, args.lr_lora)) for n in names for s in seeds]
    runs = []
    if args.jobs == 1:
        with Progress(len(jobs) * checkpoints[-1], "optimizers", unit="step") as bar:
            for job in jobs:
                runs.append(run(setup, *job, progress=bar))
                print(f"{job[0]} seed {job[1]}: FD {[r['fd'] for r in runs[-1]['checkpoints'].values()]}", flush=True)
    else:
        import multiprocessing as mp

        with (
            Progress(len(jobs), f"optimizers ({args.jobs} processes)", unit="run") as bar,
            mp.get_context("spawn").Pool(
                args.jobs, initializer=paper_comparison._worker_init, initargs=("v", samples, str(args.weights))
            ) as pool,
        ):
            for result in pool.imap_unordered(_worker_run, jobs):
                runs.append(result)
                bar.update(1, f"{result['optimizer']} seed {result['seed']}")
    runs.sort(key=lambda r: (names.index(r["optimizer"]), r["seed"]))
    report = {
        "config": {
            "prediction": "v",
            "objective": OBJECTIVE,
            "adapter": ADAPTER,
            "optimizers": names,
            "seeds": seeds,
            "checkpoints": checkpoints,
            "sampler_steps": CHECKPOINT_SAMPLER_STEPS,
            "samples": samples,
            "batch": args.batch,
            "tuned_lr": {TUNED: args.lr_lora},
            "jobs": args.jobs,
            "quick": quick,
            "torch": torch.__version__,
        },
        "floor_fd": setup.floor,
        "real_count": int(setup.images.shape[0]),
        "zero_shot": zero,
        "not_measured": skipped,
        "runs": runs,
        "seconds": time.perf_counter() - start,
    }
    report = json.loads(json.dumps(report))  # JSON keys are strings: the in-memory report reads as the saved one
    stem = "optimizers_quick" if quick else "optimizers"
    write_report(args.out, stem, report, summarise(report), [save_plot(report, args.out / f"{stem}_fd_vs_steps.png")])
    return 0


if __name__ == "__main__":
    sys.exit(main())
