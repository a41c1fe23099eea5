"""The Diff2Flow paper's comparison at toy scale, on the demo's tiny digit-diffusion UNet.

    python benchmarks/paper_comparison.py            # full run (about 35 CPU minutes on one thread)
    python benchmarks/paper_comparison.py --quick    # a shrunken run to check the script (about 1 minute)
    python benchmarks/paper_comparison.py --jobs 2   # the same runs on 2 processes (1 thread each)

The pretrained model (``demo/weights/unet_<prediction>.safetensors``, digits 0-6 only) is
fine-tuned on the digits 7-9 under three objectives (docs/MATH.md section 6): ``diffusion`` (eps/v
MSE at integer timesteps), ``naive_fm`` (the raw output regressed on the FM velocity with no
alignment) and ``diff2flow``; with LoRA of two ranks and with full fine-tuning (a zero-initialised
dense delta on every layer, trained by the same ``training.Trainer``); over several seeds.

Sampling, from the same noise for every model, conditional (no guidance):
- ``diff2flow``: FM Euler on the uniform sigma grid ``d2f_core.fm_sigmas(steps, sigma_max)``;
- ``naive_fm``: FM Euler on the same grid with ``naive_fm_velocity_fn`` (raw output = velocity);
- ``diffusion``: DDIM (eta = 0) with trailing timestep spacing, computed as FM Euler of the
  Diff2Flow-converted model along the DDIM grid (that IS DDIM, docs/MATH.md section 4).

Metrics on the digits 7-9: Fréchet distance (FD) of the demo classifier's 32 penultimate
features, samples vs all real 7-9 digits; the real-vs-real floor (two halves of the real digits);
and the comparable FM validation loss ``d2f_core.fm_validation_loss`` (every model's output
converted to a velocity first). FD is measured with the 8-step sampler at every fine-tuning
checkpoint and with every sampler step count at step 0 (zero-shot) and at the last checkpoint.

Time convention (docs/MATH.md section 1): FM sigma in [0, 1], sigma = 1 is noise,
``x_sigma = (1 - sigma) x0 + sigma noise``, velocity ``noise - x0``.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys
import tempfile
import time
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere: the demo package lives at the root
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import d2f_core  # noqa: E402
from demo import data as ddata  # noqa: E402
from demo import pipeline  # noqa: E402
from demo.classifier import predict  # noqa: E402
from demo.progress import Progress  # noqa: E402
from demo.store import WEIGHTS_DIR, load_classifier, load_unet  # noqa: E402
from training import TrainConfig, Trainer  # noqa: E402
from training.files import atomic_write, ensure_writable_folder  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"  # where full runs write their reports (kept in the repository)
OBJECTIVES = ("diffusion", "naive_fm", "diff2flow")  # the paper's comparison, in report order
CHECKPOINT_SAMPLER_STEPS = 8  # the sampler used for FD along the fine-tuning checkpoints


# ------------------------------------------------------------------------------------ setup
class Setup:
    """Everything every run shares: the base model, data, fixed noise, the real features."""

    def __init__(self, prediction: str, samples: int, weights: pathlib.Path) -> None:
        self.unet, self.encoder, _ = load_unet(prediction, weights)
        self.classifier = load_classifier(weights)
        self.d2f = d2f_core.Diff2Flow(d2f_core.scaled_linear(), prediction)
        self.images, self.labels = ddata.select_classes(*ddata.load_digits_tensor(), ddata.FINETUNE_CLASSES)
        self.real_features = predict(self.classifier, self.images)[1]
        self.floor = pipeline.data_floor(self.real_features)
        self.eval_labels = pipeline.balanced_labels(ddata.FINETUNE_CLASSES, samples)
        self.eval_ctx = pipeline.contexts(self.encoder, self.eval_labels)
        self.eval_noise = pipeline.fixed_noise(samples, seed=12345)
        self.uncond = pipeline.contexts(self.encoder, [pipeline.NULL_CLASS])
        self.val_ctx = pipeline.contexts(self.encoder, self.labels)
        self.train_data = pipeline.training_data(self.images, self.labels, self.encoder)


@torch.no_grad()
def evaluate(setup: Setup, objective: str, net: torch.nn.Module, sampler_steps: list[int]) -> dict[str, Any]:
    """FD and classifier accuracy per sampler step count, and the FM validation loss."""
    velocity = pipeline.velocity_model(objective, net, setup.d2f)
    fd, acc = {}, {}
    for steps in sampler_steps:
        samples = pipeline.sample(
            velocity,
            setup.eval_ctx,
            setup.uncond,
            setup.eval_noise,
            d2f_core.get_objective(objective).sampler_sigmas(setup.d2f, steps),
        )
        if not torch.isfinite(samples).all():
            fd[steps], acc[steps] = float("nan"), float("nan")
            continue
        ev = pipeline.evaluate_samples(samples, setup.eval_labels, setup.real_features, setup.classifier)
        fd[steps], acc[steps] = ev.fd, ev.accuracy
    val = d2f_core.fm_validation_loss(velocity, setup.images, setup.val_ctx)["mean"]
    return {"fd": fd, "accuracy": acc, "val_loss": val}


# ------------------------------------------------------------------------------------ one run
def run_one(
    setup: Setup,
    objective: str,
    adapter: str,
    seed: int,
    checkpoints: list[int],
    sampler_steps: list[int],
    batch: int,
    lrs: dict[str, float],
    progress: Progress | None = None,
    ema_decay: float = 0.0,
    checkpoint_sampler_steps: list[int] | None = None,
    optimizer: str = "AdamW",
) -> dict[str, Any]:
    """Fine-tune one copy of the base model; evaluate at each checkpoint with
    ``checkpoint_sampler_steps`` (default: the 8-step sampler) and at the last one with every
    sampler step count. ``adapter`` is ``"full"`` or ``"lora<rank>"``. With ``ema_decay`` the
    evaluation uses the weights a saved LoRA holds (the EMA's, ``Trainer.sampling_weights``); so does a
    schedule-free ``optimizer`` (its evaluation weights; benchmarks/optimizers.py compares optimizers)."""
    kind, rank = ("full", 1) if adapter == "full" else ("lora", int(adapter[4:]))
    net = pipeline.fresh_copy(setup.unet)
    adapters = pipeline.attach_adapters(net, kind, rank=rank, targets="all", seed=seed)
    config = TrainConfig(
        objective=objective,
        steps=checkpoints[-1],
        batch_size=batch,
        learning_rate=lrs[kind],
        rank=rank,
        alpha=float(rank),
        targets="all",
        seed=seed,
        caption_dropout=0.1,
        weight_decay=0.0,
        lr_schedule="constant",
        ema_decay=ema_decay,
        optimizer=optimizer,
    )
    trainer = Trainer(net, adapters, setup.d2f, config, setup.train_data)
    results: dict[int, Any] = {}
    start = time.perf_counter()

    def on_step(step: int, loss: float, lr: float) -> None:
        if progress is not None:
            progress.update(1, f"{objective} {adapter} seed {seed}")
        if step in checkpoints:
            steps = (
                sampler_steps if step == checkpoints[-1] else (checkpoint_sampler_steps or [CHECKPOINT_SAMPLER_STEPS])
            )
            with trainer.sampling_weights():
                results[step] = evaluate(setup, objective, net, steps)

    trainer.run(on_step=on_step)
    return {
        "objective": objective,
        "adapter": adapter,
        "seed": seed,
        "checkpoints": results,
        "train_loss_last100": sum(trainer.losses[-100:]) / len(trainer.losses[-100:]),
        "seconds": time.perf_counter() - start,
    }


_WORKER: dict[str, Any] = {}


def _worker_init(prediction: str, samples: int, weights: str) -> None:
    torch.set_num_threads(1)
    _WORKER["setup"] = Setup(prediction, samples, pathlib.Path(weights))


def _worker_run(job: tuple) -> dict[str, Any]:
    return run_one(_WORKER["setup"], *job)


# ------------------------------------------------------------------------------------ report
def _stats(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v == v]
    if not values:
        return float("nan"), float("nan")
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return mean, std


def _fmt(mean: float, std: float, digits: int = 2) -> str:
    if mean != mean:
        return "n/a"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def summarise(report: dict[str, Any]) -> str:
    """The markdown tables: convergence over fine-tuning steps, few-step sampling, FM validation loss."""
    runs, zero, cfg = report["runs"], report["zero_shot"], report["config"]
    checkpoints, sampler_steps, adapters = cfg["checkpoints"], cfg["sampler_steps"], cfg["adapters"]
    k = str(CHECKPOINT_SAMPLER_STEPS)
    floor = report["floor_fd"]

    def pick(objective: str, adapter: str) -> list[dict]:
        return [r for r in runs if r["objective"] == objective and r["adapter"] == adapter]

    def checkpoint_table(metric, digits: int) -> list[str]:
        """One row per objective and adapter: ``metric`` zero-shot, then mean ± std at each checkpoint."""
        rows = [
            "",
            "| objective | adapter | " + " | ".join(f"step {c}" for c in [0] + checkpoints) + " |",
            "|---|---|" + "---|" * (len(checkpoints) + 1),
        ]
        for objective in OBJECTIVES:
            for adapter in adapters:
                rs = pick(objective, adapter)
                cells = [_fmt(metric(zero[objective]), 0.0, digits)]
                cells += [_fmt(*_stats([metric(r["checkpoints"][str(c)]) for r in rs]), digits) for c in checkpoints]
                rows.append(f"| {objective} | {adapter} | " + " | ".join(cells) + " |")
        return rows

    lines = [
        f"# Paper comparison at toy scale ({cfg['prediction']}-prediction tiny UNet, digits 0-6 -> 7-9)",
        "",
        f"Mean ± std over {len(cfg['seeds'])} seed(s); FD on {cfg['samples']} samples vs the {report['real_count']} real "
        f"digits 7-9 (classifier features, 32-d); real-vs-real floor **{floor:.2f}**. Batch {cfg['batch']}, "
        f"learning rate {cfg['lrs']['lora']:g} (LoRA, alpha = rank) / {cfg['lrs']['full']:g} (full), constant, "
        f"AdamW without weight decay, caption dropout 0.1, adapters on every Linear and Conv weight. "
        f"Total {report['seconds'] / 60:.1f} min on {cfg['jobs']} process(es) x 1 thread.",
        "",
        f"## FD over fine-tuning steps ({CHECKPOINT_SAMPLER_STEPS}-step sampler of each objective)",
        *checkpoint_table(lambda m: m["fd"][k], 2),
        "",
        "## FM validation loss over fine-tuning steps (docs/MATH.md section 6, every model converted to a velocity)",
        *checkpoint_table(lambda m: m["val_loss"], 3),
    ]
    last = str(checkpoints[-1])
    lines += [
        "",
        f"## FD by sampler steps: zero-shot and after {last} fine-tuning steps",
        "",
        "| objective (sampler) | adapter | " + " | ".join(f"{s} steps" for s in sampler_steps) + " |",
        "|---|---|" + "---|" * len(sampler_steps),
    ]
    for objective in OBJECTIVES:
        name = f"{objective} ({d2f_core.get_objective(objective).sampling_label})"
        lines.append(
            f"| {name} | zero-shot | "
            + " | ".join(_fmt(zero[objective]["fd"][str(s)], 0.0) for s in sampler_steps)
            + " |"
        )
        for adapter in adapters:
            rs = pick(objective, adapter)
            cells = [_fmt(*_stats([r["checkpoints"][last]["fd"][str(s)] for r in rs])) for s in sampler_steps]
            lines.append(f"| {name} | {adapter} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Classifier accuracy (samples read as the requested digit) after {last} steps, {CHECKPOINT_SAMPLER_STEPS}-step sampler:",
        "",
        "| objective | " + " | ".join(adapters) + " |",
        "|---|" + "---|" * len(adapters),
    ]
    for objective in OBJECTIVES:
        cells = [_fmt(*_stats([r["checkpoints"][last]["accuracy"][k] for r in pick(objective, a)])) for a in adapters]
        lines.append(f"| {objective} | " + " | ".join(cells) + " |")
    lines.append("")
    return "\n".join(lines)


def save_plots(report: dict[str, Any], out: pathlib.Path) -> list[pathlib.Path]:
    """fd_vs_finetune_steps.png, val_loss_vs_finetune_steps.png, fd_vs_sampler_steps.png."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    runs, zero, cfg = report["runs"], report["zero_shot"], report["config"]
    adapters, checkpoints, sampler_steps = cfg["adapters"], cfg["checkpoints"], cfg["sampler_steps"]
    k, last = str(CHECKPOINT_SAMPLER_STEPS), str(checkpoints[-1])
    colors = {"diffusion": "tab:blue", "naive_fm": "tab:red", "diff2flow": "tab:green"}
    written = []

    def panel_figure(name: str, ylabel: str, series, xs, xlabel: str, logx: bool, floor: float | None) -> None:
        fig = Figure(figsize=(4.2 * len(adapters), 3.8), dpi=100)
        axes = fig.subplots(1, len(adapters), sharey=True, squeeze=False)[0]
        for ax, adapter in zip(axes, adapters):
            for objective in OBJECTIVES:
                means, stds = zip(*[series(objective, adapter, x) for x in xs])
                ax.errorbar(xs, means, yerr=stds, marker="o", capsize=3, color=colors[objective], label=objective)
            if floor is not None:
                ax.axhline(floor, color="k", linestyle=":", label="real-vs-real floor")
            ax.set_title(adapter)
            ax.set_xlabel(xlabel)
            ax.set_xscale("symlog", linthresh=100) if logx == "symlog" else ax.set_xscale(
                "log", base=2
            ) if logx else None
            ax.set_yscale("log")
            ax.grid(True, alpha=0.3)
        axes[0].set_ylabel(ylabel)
        axes[-1].legend(fontsize=8)
        fig.tight_layout()
        path = out / name
        atomic_write(path, lambda p: fig.savefig(p, format="png"))
        written.append(path)

    def at_checkpoint(metric: str, steps_key: str | None):
        def series(objective: str, adapter: str, step: int) -> tuple[float, float]:
            if step == 0:
                value = zero[objective][metric] if steps_key is None else zero[objective][metric][steps_key]
                return value, 0.0
            rs = [r for r in runs if r["objective"] == objective and r["adapter"] == adapter]
            values = [
                r["checkpoints"][str(step)][metric]
                if steps_key is None
                else r["checkpoints"][str(step)][metric][steps_key]
                for r in rs
            ]
            return _stats(values)

        return series

    xs = [0] + checkpoints
    panel_figure(
        "fd_vs_finetune_steps.png",
        f"FD ({CHECKPOINT_SAMPLER_STEPS}-step sampler)",
        at_checkpoint("fd", k),
        xs,
        "fine-tuning steps",
        "symlog",
        report["floor_fd"],
    )
    panel_figure(
        "val_loss_vs_finetune_steps.png",
        "FM validation loss",
        at_checkpoint("val_loss", None),
        xs,
        "fine-tuning steps",
        "symlog",
        None,
    )

    def by_sampler(objective: str, adapter: str, steps: int) -> tuple[float, float]:
        rs = [r for r in runs if r["objective"] == objective and r["adapter"] == adapter]
        return _stats([r["checkpoints"][last]["fd"][str(steps)] for r in rs])

    panel_figure(
        "fd_vs_sampler_steps.png",
        f"FD after {last} fine-tuning steps",
        by_sampler,
        sampler_steps,
        "sampler steps (NFE)",
        True,
        report["floor_fd"],
    )
    return written


# ------------------------------------------------------------------------------------ main
def _int_list(name: str):
    def parse(text: str) -> list[int]:
        try:
            values = [int(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be comma-separated integers, got {text!r}") from None
        if not values or any(v < 1 for v in values):
            raise argparse.ArgumentTypeError(f"{name} must list integers >= 1, got {text!r}")
        return sorted(set(values))

    return parse


def add_finetune_flags(
    p: argparse.ArgumentParser, batch: int = 16, lr_lora: float = 1e-3, lr_full: float = 3e-4
) -> None:
    """The flags every toy fine-tuning benchmark shares (this one, reflow.py, ema.py)."""
    p.add_argument("--batch", type=int, default=batch, help=f"training batch (default {batch})")
    p.add_argument("--lr-lora", type=float, default=lr_lora, help=f"LoRA learning rate (default {lr_lora:g})")
    p.add_argument(
        "--lr-full", type=float, default=lr_full, help=f"full fine-tuning learning rate (default {lr_full:g})"
    )
    p.add_argument("--jobs", type=int, default=1, help="worker processes, one thread each (default 1)")
    add_report_flags(p)


def add_report_flags(p: argparse.ArgumentParser) -> None:
    """The demo's weights and the report folder: the flags of every benchmark on the demo model."""
    p.add_argument("--weights", type=pathlib.Path, default=WEIGHTS_DIR)
    p.add_argument(
        "--out",
        type=pathlib.Path,
        default=None,
        help="folder for the report (default benchmarks/results/; with --quick a fresh temporary folder, printed)",
    )


def report_folder(out: pathlib.Path | None, quick: bool, name: str) -> pathlib.Path:
    """Where a toy benchmark writes: ``out`` when given (``--out``); else :data:`RESULTS` for a full run and,
    for a ``--quick`` one, a fresh temporary folder (``d2f_<name>_quick_*``, printed), so a check of the
    script never writes into the checkout."""
    if out is not None:
        return out
    if not quick:
        return RESULTS
    folder = pathlib.Path(tempfile.mkdtemp(prefix=f"d2f_{name}_quick_"))
    print(f"quick run: writing the report to {folder} (--out to choose the folder)", flush=True)
    return folder


def check_finetune_flags(p: argparse.ArgumentParser, args: argparse.Namespace, *minimums: tuple[str, int, int]) -> None:
    """Refuse, through ``p.error``, each ``(flag, value, lowest)`` of ``minimums`` below its lowest value,
    ``--batch`` / ``--jobs`` below 1, learning rates that are not positive and an ``--out`` that cannot be written;
    ``args.out`` becomes the folder the report goes to (:func:`report_folder`, named after the script)."""
    for name, value, low in (*minimums, ("batch", args.batch, 1), ("jobs", args.jobs, 1)):
        if value < low:
            p.error(f"--{name} must be >= {low}, got {value}")
    for name in ("lr_lora", "lr_full"):
        if not getattr(args, name) > 0:
            p.error(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    args.out = report_folder(args.out, args.quick, pathlib.Path(p.prog).stem)
    try:
        ensure_writable_folder(args.out)
    except OSError as exc:
        p.error(f"--out {args.out} cannot be written: {exc}")


def write_report(
    out: pathlib.Path, stem: str, report: dict[str, Any], markdown: str, plots: list[pathlib.Path]
) -> None:
    """Write ``<stem>.md`` and ``<stem>.json`` into ``out`` (the plots are already written), print the
    markdown and where everything went (every toy benchmark ends this way)."""
    atomic_write(out / f"{stem}.md", lambda path: pathlib.Path(path).write_text(markdown))
    atomic_write(out / f"{stem}.json", lambda path: pathlib.Path(path).write_text(json.dumps(report, indent=1)))
    print(markdown)
    print(
        f"wrote {out / (stem + '.md')}, {stem}.json and {', '.join(str(p) for p in plots)} in {report['seconds'] / 60:.1f} min"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--quick", action="store_true", help="shrunken run: 1 seed, 20/50 steps, 1/4 sampler steps, 100 samples"
    )
    p.add_argument("--prediction", choices=["eps", "v"], default="v")
    p.add_argument(
        "--seeds", type=_int_list("--seeds"), default=None, help="number of seeds as one integer (default 3)"
    )
    p.add_argument(
        "--checkpoints",
        type=_int_list("--checkpoints"),
        default=None,
        help="fine-tuning checkpoints (default 100,500,2000)",
    )
    p.add_argument("--sampler-steps", type=_int_list("--sampler-steps"), default=None, help="default 1,2,4,8,50")
    p.add_argument("--ranks", type=_int_list("--ranks"), default=None, help="LoRA ranks (default 4,16)")
    p.add_argument("--samples", type=_int_list("--samples"), default=None, help="FD samples (default 500)")
    add_finetune_flags(p)
    args = p.parse_args(argv)
    quick = args.quick
    seeds = list(range(args.seeds[0] if args.seeds else (1 if quick else 3)))
    checkpoints = args.checkpoints or ([20, 50] if quick else [100, 500, 2000])
    sampler_steps = args.sampler_steps or ([1, 4] if quick else [1, 2, 4, 8, 50])
    if CHECKPOINT_SAMPLER_STEPS not in sampler_steps:
        sampler_steps = sorted(set(sampler_steps) | {CHECKPOINT_SAMPLER_STEPS})
    ranks = args.ranks or ([4] if quick else [4, 16])
    samples = args.samples[0] if args.samples else (100 if quick else 500)
    check_finetune_flags(p, args, ("samples", samples, 2))
    torch.set_num_threads(1)
    start = time.perf_counter()
    adapters = [f"lora{r}" for r in ranks] + ["full"]
    lrs = {"lora": args.lr_lora, "full": args.lr_full}
    setup = Setup(args.prediction, samples, args.weights)
    print(f"floor FD (real vs real halves): {setup.floor:.3f}", flush=True)
    zero = {}
    for objective in OBJECTIVES:  # step 0: the pretrained model under each objective's sampler
        zero[objective] = evaluate(setup, objective, setup.unet, sampler_steps)
        print(f"zero-shot {objective}: FD {zero[objective]['fd']}, val {zero[objective]['val_loss']:.4f}", flush=True)
    jobs = [(o, a, s, checkpoints, sampler_steps, args.batch, lrs) for s in seeds for a in adapters for o in OBJECTIVES]
    total = len(jobs) * checkpoints[-1]
    runs = []
    if args.jobs == 1:
        with Progress(total, "paper comparison") as bar:
            for job in jobs:
                runs.append(run_one(setup, *job, progress=bar))
    else:
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        with (
            Progress(len(jobs), f"paper comparison ({args.jobs} processes, runs)") as bar,
            ctx.Pool(
                args.jobs, initializer=_worker_init, initargs=(args.prediction, samples, str(args.weights))
            ) as pool,
        ):
            for result in pool.imap_unordered(_worker_run, jobs):
                runs.append(result)
                bar.update(1, f"{result['objective']} {result['adapter']} seed {result['seed']}")
    for r in runs:  # JSON keys are strings: make the in-memory report look like the saved one
        r["checkpoints"] = {
            str(c): {
                **v,
                "fd": {str(k): x for k, x in v["fd"].items()},
                "accuracy": {str(k): x for k, x in v["accuracy"].items()},
            }
            for c, v in r["checkpoints"].items()
        }
    for v in zero.values():
        v["fd"] = {str(k): x for k, x in v["fd"].items()}
        v["accuracy"] = {str(k): x for k, x in v["accuracy"].items()}
    report = {
        "config": {
            "prediction": args.prediction,
            "seeds": seeds,
            "checkpoints": checkpoints,
            "sampler_steps": sampler_steps,
            "adapters": adapters,
            "samples": samples,
            "batch": args.batch,
            "lrs": lrs,
            "jobs": args.jobs,
            "quick": quick,
            "torch": torch.__version__,
        },
        "floor_fd": setup.floor,
        "real_count": int(setup.images.shape[0]),
        "zero_shot": zero,
        "runs": runs,
        "seconds": time.perf_counter() - start,
    }
    plot_dir = args.out / ("quick" if quick else "")
    plot_dir.mkdir(parents=True, exist_ok=True)
    write_report(
        args.out,
        "paper_comparison_quick" if quick else "paper_comparison",
        report,
        summarise(report),
        save_plots(report, plot_dir),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
