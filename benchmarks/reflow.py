"""Reflow at toy scale: few-step sampling of the demo's tiny v-model after reflow on its own ODE pairs.

    python benchmarks/reflow.py --jobs 2     # full run (36 min on 2 busy CPU cores; about 12 estimated when idle)
    python benchmarks/reflow.py --quick      # a shrunken run that checks the script (seconds)
    # reflow's second generation, one ingredient at a time (benchmarks/results/reflow_second_generation.md):
    python benchmarks/reflow.py --seeds 1 --adapters lora16 --pair-sampler ab2 --pair-steps 12 \
        --timestep-sampling u_shaped --loss pseudo_huber --inverted-share 0.5 --out /tmp/reflow_f
    # the toolkit's defaults (10 ab2 steps on the sigma_min grid, pseudo-Huber), at LoRA rank 128:
    python benchmarks/reflow.py --adapters lora128 --pair-sampler ab2 --pair-steps 10 --pair-grid sigma_min \
        --loss pseudo_huber --out /tmp/reflow_r128

Teacher: the shipped v-prediction UNet (``demo/weights/unet_v.safetensors``, pretrained on the digits
0-6; no fine-tuning), converted by the Diff2Flow alignment and sampled conditionally at cfg 1 (its
best FD here: guidance only lowers this small model's diversity). Pairs: ``training.pairs``
integrates the teacher's ODE with FM Euler from per-index noise, the classes cycling through 0-6
(``--pair-sampler`` / ``--pair-steps`` / ``--pair-grid``: another ``d2f_core.SAMPLERS`` solver and
``d2f_core.FM_GRIDS`` grid). With ``--inverted-share``
the real digits 0-6 (the teacher's own classes, each with its class as the caption) are inverted through
the teacher's ODE with the same solver into the same pairs folder (``training.pairs.invert_pairs``, as
``pairs --invert-cache`` does) and make up that share of every training batch.
Students: the teacher + a LoRA of rank 16 (``--adapters lora<rank>``: any rank), or + a full dense delta on
every Linear and Conv weight
(``demo.pipeline.attach_adapters``), trained with the ``reflow`` objective (docs/MATH.md sections 6
and 12) by ``training.Trainer`` on the pairs (shift-6 timestep sampling, none on the sampling grid, and MSE unless
``--timestep-sampling`` / ``--shift`` / ``--grid-share`` / ``--loss`` / ``--huber-c`` say otherwise; ``--ema-decay`` evaluates
an EMA of their weights; ``--optimizer`` trains them with another ``training.optimizers.OPTIMIZERS`` entry than
AdamW; ``--adapters lora16`` skips the full students); sampled with FM Euler at cfg 1. The defaults of every flag reproduce
``benchmarks/results/reflow.md``.

Reported, over seeds (a seed is a training seed and its own evaluation noise; the teacher's spread
is over the evaluation noise alone):

- FD (the demo classifier's 32 features, samples vs all real digits 0-6) at 1 / 2 / 4 / 8 steps for
  the teacher and each student, and the teacher's 50-step FD; the real-vs-real floor;
- straightness of the 32-step sampling paths (docs/MATH.md section 12; 0 = straight);
- the targets, judged on the means over seeds: the first generation's (2-step FD <= the teacher's 8-step,
  4-step <= 1.2x its 50-step, 1-step <= half its 1-step) and the second's (1-step FD <= the teacher's 8-step,
  2-step <= its 50-step);
- the pair-generation cost against a bare sampling loop of the same model, sampler, batch and steps
  (rounds alternating in this process; the target is a ratio <= 1.05), the inversion's against a bare
  ``d2f_core.invert`` loop over the same images, and the training cost;
- how far the teacher's N-step end points are from its 128-step ones (how the default of 32 pair
  steps was chosen), full mode with Euler pairs only.

``--pairs-folder DIR`` keeps the pairs (and inverted pairs) in ``DIR`` instead of a temporary folder; a
later run with the same pair settings reuses them (only missing pairs are generated, and the report says
the pairs were reused instead of timing them).

Targets: the student's 2-step FD <= the teacher's 8-step FD; its 4-step FD <= 1.2x the
teacher's 50-step FD; its 1-step FD <= 0.5x the teacher's 1-step FD. The report states each as
met or not, with the numbers.

Time convention (docs/MATH.md section 1): FM sigma in [0, 1], sigma = 1 is noise.
"""

from __future__ import annotations

import argparse
import pathlib
import shutil
import statistics
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
from demo.store import load_classifier, load_unet  # noqa: E402
from training import TrainConfig, Trainer, TrainingData  # noqa: E402
from training.files import atomic_write  # noqa: E402
from training.optimizers import OPTIMIZERS  # noqa: E402
from training.pairs import PairSettings, generate_pairs, invert_pairs, load_pairs, pair_shards  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))  # the benchmarks' shared flags
from paper_comparison import add_finetune_flags, check_finetune_flags, write_report  # noqa: E402

CLASSES = ddata.PRETRAIN_CLASSES
STUDENT_STEPS = (1, 2, 4, 8)
TEACHER_STEPS = (1, 2, 4, 8, 50)
STRAIGHTNESS_STEPS = 32
# the students' timestep sampling shift: it beat shift 3 and uniform (benchmarks/results/reflow_ablations.md)
SHIFT = 6.0
ADAPTERS = ("lora16", "full")  # the default students; --adapters also takes lora<rank> for any rank


# ------------------------------------------------------------------------------------ setup
class Setup:
    """The teacher, its alignment, the classifier and the real digits 0-6."""

    def __init__(self, weights: pathlib.Path, samples: int) -> None:
        self.unet, self.encoder, _ = load_unet("v", weights)
        self.classifier = load_classifier(weights)
        self.d2f = d2f_core.Diff2Flow(d2f_core.scaled_linear(), "v")
        images, labels = ddata.select_classes(*ddata.load_digits_tensor(), CLASSES)
        self.real_images, self.real_labels = images, labels
        self.real_count = int(images.shape[0])
        self.real_features = predict(self.classifier, images)[1]
        self.floor = pipeline.data_floor(self.real_features)
        self.samples = samples
        self.labels = pipeline.balanced_labels(CLASSES, samples)
        self.ctx = pipeline.contexts(self.encoder, self.labels)
        self.uncond = pipeline.contexts(self.encoder, [pipeline.NULL_CLASS])
        self.class_conds = [{"context": pipeline.contexts(self.encoder, [c])} for c in CLASSES]

    def noise(self, seed: int) -> torch.Tensor:
        return pipeline.fixed_noise(self.samples, seed=10_000 + seed)

    def velocity(self, net: torch.nn.Module):
        """``fn(x, sigma, cond) -> v``: the network through the alignment (teacher and students alike)."""
        aligned = self.d2f.velocity_fn(net)
        return lambda x, sigma, cond: aligned(x, sigma, **cond)

    def sigmas(self, steps: int) -> torch.Tensor:
        return d2f_core.fm_sigmas(steps, sigma_max=self.d2f.sigma_max)


@torch.no_grad()
def fd_at(setup: Setup, net: torch.nn.Module, seed: int, steps_list: tuple[int, ...]) -> dict[str, float]:
    """FD per sampler step count, conditional sampling at cfg 1 from the seed's noise."""
    aligned = setup.d2f.velocity_fn(net)
    out = {}
    for steps in steps_list:
        samples = pipeline.sample(aligned, setup.ctx, setup.uncond, setup.noise(seed), setup.sigmas(steps))
        out[str(steps)] = pipeline.evaluate_samples(samples, setup.labels, setup.real_features, setup.classifier).fd
    return out


@torch.no_grad()
def straightness(setup: Setup, net: torch.nn.Module, seed: int, count: int = 200) -> float:
    """docs/MATH.md section 12: sum_i dsigma_i |v_i - vbar|^2 / (sigma_0 |vbar|^2), mean over paths,
    on the 32-step FM Euler paths (0 for straight paths at constant speed)."""
    velocities: list[torch.Tensor] = []
    sigmas = setup.sigmas(STRAIGHTNESS_STEPS)
    aligned = setup.d2f.velocity_fn(net)
    x = float(sigmas[0]) * setup.noise(seed)[:count]
    ctx = setup.ctx[:count]
    end = d2f_core.sample_euler(
        lambda x_, s: aligned(x_, s, ctx), x, sigmas, callback=lambda info: velocities.append(info["velocity"])
    )
    vbar = (x - end) / float(sigmas[0])
    weights = (sigmas[:-1] - sigmas[1:]).float() / float(sigmas[0])
    deviation = sum(w * (v - vbar).pow(2).flatten(1).sum(1) for w, v in zip(weights, velocities))
    return float((deviation / vbar.pow(2).flatten(1).sum(1)).mean())


# ------------------------------------------------------------------------------------ pairs and their cost
def pair_settings(setup: Setup, steps: int, batch: int, sampler: str = "euler", grid: str = "uniform") -> PairSettings:
    return PairSettings(
        (1, 16, 16),
        setup.d2f.sigma_max,
        sampler,
        steps,
        1.0,
        1.0,
        0,
        batch,
        {"demo": "unet_v.safetensors", "classes": list(CLASSES)},
        grid,
        d2f_core.grid_floor(grid, setup.d2f.sigma_min),
    )


@torch.no_grad()
def bare_loop(setup: Setup, count: int, steps: int, batch: int, sampler: str = "euler", grid: str = "uniform") -> float:
    """Seconds of the same sampling without the pair machinery: one noise draw per batch, the
    classes cycling as in the pairs, the pairs' sampler and grid at cfg 1, nothing stored."""
    teacher, solve = setup.velocity(setup.unet), d2f_core.get_sampler(sampler)
    sigmas = pair_settings(setup, steps, batch, sampler, grid).sigmas()
    gen = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    for first in range(0, count, batch):
        noise = torch.randn(batch, 1, 16, 16, generator=gen)
        cond = {
            "context": torch.cat([setup.class_conds[i % len(CLASSES)]["context"] for i in range(first, first + batch)])
        }
        solve(lambda x, s, cond=cond: teacher(x, s, cond), setup.d2f.sigma_max * noise, sigmas)
    return time.perf_counter() - start


def make_pairs(
    setup: Setup,
    folder: pathlib.Path,
    count: int,
    steps: int,
    batch: int,
    shard: int,
    rounds: int,
    sampler: str = "euler",
    grid: str = "uniform",
) -> dict[str, Any]:
    """Generate ``count`` pairs into ``folder``: first ``rounds`` rounds of ``shard`` pairs each (appended),
    each followed by the bare loop on as many pairs; then the rest. Returns the timings (``reused``: the
    folder held every pair already, nothing was timed)."""
    settings, teacher = pair_settings(setup, steps, batch, sampler, grid), setup.velocity(setup.unet)
    held = sum(stop - start for start, stop, _ in pair_shards(folder)) if folder.is_dir() else 0
    if held >= count:
        summary = generate_pairs(teacher, setup.class_conds, folder, count, settings, shard_size=shard)
        print(f"{summary.report()} (reused)", flush=True)
        nan = float("nan")
        return {
            "count": count,
            "sampler": sampler,
            "grid": grid,
            "steps": steps,
            "batch": batch,
            "reused": True,
            "seconds": nan,
            "seconds_per_pair": nan,
            "pairs_per_second": nan,
            "ratios": [],
            "ratio": nan,
        }
    ratios, pair_seconds = [], 0.0
    for r in range(rounds):
        start = time.perf_counter()
        generate_pairs(teacher, setup.class_conds, folder, (r + 1) * shard, settings, shard_size=shard)
        seconds = time.perf_counter() - start
        pair_seconds += seconds
        ratios.append(seconds / bare_loop(setup, shard, steps, batch, sampler, grid))
        print(f"pair round {r + 1}: pairs / bare loop time {ratios[-1]:.3f}", flush=True)
    start = time.perf_counter()
    summary = generate_pairs(teacher, setup.class_conds, folder, count, settings, shard_size=shard)
    pair_seconds += time.perf_counter() - start
    print(summary.report(), flush=True)
    return {
        "count": count,
        "sampler": sampler,
        "grid": grid,
        "steps": steps,
        "batch": batch,
        "reused": False,
        "seconds": pair_seconds,
        "seconds_per_pair": pair_seconds / count,
        "pairs_per_second": count / pair_seconds,
        "ratios": ratios,
        "ratio": statistics.median(ratios) if ratios else float("nan"),
    }


@torch.no_grad()
def bare_invert_loop(setup: Setup, settings: PairSettings, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Seconds of ``d2f_core.invert`` over ``images`` in batches of ``settings.batch_size`` (a short last batch
    padded, as ``invert_pairs`` pads it), each image with its class: the inversion without the pair machinery."""
    teacher, sigmas, size = setup.velocity(setup.unet), settings.sigmas(), settings.batch_size
    contexts = torch.cat([setup.class_conds[CLASSES.index(int(c))]["context"] for c in labels])
    start = time.perf_counter()
    for first in range(0, len(images), size):
        rows = list(range(first, min(first + size, len(images))))
        rows += [rows[0]] * (size - len(rows))
        cond = {"context": contexts[rows]}
        d2f_core.invert(settings.sampler, lambda x, s, cond=cond: teacher(x, s, cond), images[rows], sigmas)
    return time.perf_counter() - start


def invert_real(
    setup: Setup,
    folder: pathlib.Path,
    count: int,
    steps: int,
    batch: int,
    shard: int,
    sampler: str,
    grid: str = "uniform",
) -> dict[str, Any]:
    """Invert the first ``count`` real digits 0-6 (each captioned with its class) through the teacher with the
    pairs' settings into ``folder`` (``training.pairs.invert_pairs``), then time a bare inversion loop over the
    same images. Returns the timings (``reused``: the folder held them all already)."""
    settings, teacher = pair_settings(setup, steps, batch, sampler, grid), setup.velocity(setup.unet)
    images, labels = setup.real_images[:count], setup.real_labels[:count]
    conds = [setup.class_conds[CLASSES.index(int(c))] for c in labels]
    held = sum(stop - start for start, stop, _ in pair_shards(folder, inverted=True)) if folder.is_dir() else 0
    summary = invert_pairs(
        teacher,
        list(images),
        conds,
        folder,
        settings,
        shard_size=shard,
        labels=[f"digit {int(c)} #{j}" for j, c in enumerate(labels)],
        sources={"demo": "digits 0-6"},
    )
    print(summary.report(), flush=True)
    if held >= count:
        nan = float("nan")
        return {"count": count, "reused": True, "seconds": nan, "seconds_per_image": nan, "ratio": nan}
    bare = bare_invert_loop(setup, settings, images, labels)
    print(f"inversion / bare invert loop time {summary.seconds / bare:.3f}", flush=True)
    return {
        "count": count,
        "reused": False,
        "seconds": summary.seconds,
        "seconds_per_image": summary.seconds / count,
        "bare_seconds": bare,
        "ratio": summary.seconds / bare,
    }


def training_data(folder: pathlib.Path, inverted_share: float) -> TrainingData:
    """The pairs folder's training data; with ``inverted_share`` 0 its generated pairs alone (a folder that
    also holds inverted pairs then trains exactly as one without them, and without the trainer's warning)."""
    pairs = load_pairs(folder)
    data = pairs.training_data()
    if inverted_share > 0 or not pairs.inverted_count:
        return data
    kept = pairs.generated_count  # the generated pairs come first
    return TrainingData(
        latents=data.latents[:kept], conds=data.conds[:kept], uncond=data.uncond, extras=data.extras[:kept]
    )


@torch.no_grad()
def pair_step_choice(
    setup: Setup, candidates: tuple[int, ...] = (8, 16, 32, 64), reference: int = 128, count: int = 256
) -> dict[str, float]:
    """RMS distance of the teacher's N-step end points from its ``reference``-step ones, relative to
    the RMS of the images (the discretisation error a pair carries)."""
    teacher = setup.d2f.velocity_fn(setup.unet)
    noise, ctx = setup.noise(0)[:count], setup.ctx[:count]
    end = {n: pipeline.sample(teacher, ctx, setup.uncond, noise, setup.sigmas(n)) for n in (*candidates, reference)}
    scale = end[reference].pow(2).mean().sqrt()
    return {str(n): float((end[n] - end[reference]).pow(2).mean().sqrt() / scale) for n in candidates}


# ------------------------------------------------------------------------------------ students
def train_student(
    setup: Setup,
    data: Any,
    adapter: str,
    seed: int,
    steps: int,
    batch: int,
    lr: float,
    options: dict[str, Any] | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """``options``: TrainConfig fields of the student (``timestep_sampling``, ``shift``, ``grid_share``, ``loss``,
    ``huber_c``, ``inverted_share``, ``ema_decay``, ``optimizer``) over the benchmark's defaults (shift-6 timestep
    sampling, none on the sampling grid, MSE, generated pairs only, no EMA, AdamW). With EMA the student is evaluated with its EMA weights, as a saved LoRA holds them."""
    kind, rank = ("full", 1) if adapter == "full" else ("lora", int(adapter[4:]))
    net = pipeline.fresh_copy(setup.unet)
    adapters = pipeline.attach_adapters(net, kind, rank=rank, targets="all", seed=seed)
    # shift timestep sampling: more training at high noise, where 1-4-step sampling spends its steps (SHIFT)
    settings = {"timestep_sampling": "shift", "shift": SHIFT, "loss": "mse", "grid_share": 0.0, **(options or {})}
    config = TrainConfig(
        objective="reflow",
        steps=steps,
        batch_size=batch,
        learning_rate=lr,
        lr_schedule="cosine",
        rank=rank,
        alpha=float(rank),
        targets="all",
        weight_decay=0.0,
        seed=seed,
        **settings,
    )
    trainer = Trainer(net, adapters, setup.d2f, config, data)
    start = time.perf_counter()
    trainer.run(on_step=(lambda *_: progress.update(1, f"{adapter} seed {seed}")) if progress is not None else None)
    seconds = time.perf_counter() - start
    with trainer.sampling_weights():
        fd, straight = fd_at(setup, net, seed, STUDENT_STEPS), straightness(setup, net, seed)
    return {
        "adapter": adapter,
        "seed": seed,
        "fd": fd,
        "straightness": straight,
        "train_seconds": seconds,
        "seconds_per_step": seconds / steps,
        "final_loss": statistics.fmean(trainer.losses[-100:]),
    }


_WORKER: dict[str, Any] = {}


def _worker_init(weights: str, samples: int, pairs: str, inverted_share: float = 0.0) -> None:
    torch.set_num_threads(1)
    _WORKER["setup"] = Setup(pathlib.Path(weights), samples)
    _WORKER["data"] = training_data(pathlib.Path(pairs), inverted_share)


def _worker_run(job: tuple) -> dict[str, Any]:
    return train_student(_WORKER["setup"], _WORKER["data"], *job)


# ------------------------------------------------------------------------------------ report
def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _cell(values: list[float], digits: int = 2) -> str:
    mean, std = _mean_std(values)
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target per student: the two numbers compared, and whether it is met (on the means). The first three
    are the first generation's; the last two, the second generation's (issue 24)."""
    teacher = {k: _mean_std([t["fd"][k] for t in report["teacher"]])[0] for k in report["teacher"][0]["fd"]}
    out = []
    for adapter in report["config"]["adapters"]:
        student = {
            k: _mean_std([r["fd"][k] for r in report["students"] if r["adapter"] == adapter])[0]
            for k in ("1", "2", "4")
        }
        for name, mine, bound in (
            ("2-step FD <= teacher 8-step FD", student["2"], teacher["8"]),
            ("4-step FD <= 1.2x teacher 50-step FD", student["4"], 1.2 * teacher["50"]),
            ("1-step FD <= 0.5x teacher 1-step FD", student["1"], 0.5 * teacher["1"]),
            ("1-step FD <= teacher 8-step FD", student["1"], teacher["8"]),
            ("2-step FD <= teacher 50-step FD", student["2"], teacher["50"]),
        ):
            out.append({"adapter": adapter, "target": name, "student": mine, "bound": bound, "met": mine <= bound})
    return out


def _describe(report: dict[str, Any]) -> tuple[str, str, str]:
    """The pairs' solver, the students' timestep sampling and their loss / inverted-pair mix, as the report's
    first paragraph names them (the default settings read as they always did)."""
    cfg, pairs = report["config"], report["pairs"]
    sampler = pairs.get("sampler", "euler")
    solver = "Euler" if sampler == "euler" else f"`{sampler}`"
    if pairs.get("grid", "uniform") != "uniform":
        solver += f" (grid `{pairs['grid']}`)"
    opts = cfg.get("options", {})
    method = opts.get("timestep_sampling", "shift")
    sampling = {"shift": f"shift-{opts.get('shift', SHIFT):g}", "u_shaped": "U-shaped"}.get(method, method)
    extra = ""
    if opts.get("loss", "mse") != "mse":
        c = opts.get("huber_c", 0.0)
        extra += f", loss `{opts['loss']}` (c {c:g})" if c else f", loss `{opts['loss']}` (the default c)"
    if opts.get("inverted_share", 0.0) > 0:
        inv = report.get("inverted") or {}
        extra += (
            f", {opts['inverted_share']:g} of every batch from the {inv.get('count', '?')} real digits 0-6 inverted "
            f"through the teacher's {pairs['steps']}-step {solver} ODE"
        )
    if opts.get("grid_share", 0.0) > 0:
        extra += (
            f", {opts['grid_share']:g} of the training sigmas on the 2-step grid's nodes (sigma_max, sigma_max / 2)"
        )
    if opts.get("ema_decay", 0.0) > 0:
        extra += f", evaluated with an EMA of the weights (decay {opts['ema_decay']:g})"
    return solver, sampling, extra


def lr_text(cfg: dict[str, Any]) -> str:
    """The students' learning rates as the report names them: the LoRAs' (with their ranks, alpha = rank) and
    the full students'."""
    adapters = cfg.get("adapters", list(ADAPTERS))
    ranks = [a[4:] for a in adapters if a != "full"]
    parts = [f"{cfg['lrs']['lora']:g} (LoRA r{' / r'.join(ranks)}, alpha = rank)"] if ranks else []
    parts += [f"{cfg['lrs']['full']:g} (full)"] if "full" in adapters else []
    return " / ".join(parts)


def summarise(report: dict[str, Any]) -> str:
    cfg, pairs = report["config"], report["pairs"]
    teacher, students = report["teacher"], report["students"]
    steps_cols = [str(s) for s in TEACHER_STEPS]
    solver, sampling, extra = _describe(report)
    lines = [
        f"# Reflow at toy scale (the demo's v-model on digits 0-6{', quick run' if cfg['quick'] else ''})",
        "",
        f"Teacher: the shipped `unet_v` (digits 0-6, no fine-tuning), FM Euler at cfg 1. {pairs['count']} pairs of its "
        f"{pairs['steps']}-step {solver} ODE (classes 0-6 in turn); students trained with `reflow` for {cfg['train_steps']} "
        f"steps, batch {cfg['batch']}, {sampling} timestep sampling{extra}, cosine learning rate {lr_text(cfg)}, "
        f"{cfg.get('options', {}).get('optimizer', 'AdamW')} without weight decay. FD on {cfg['samples']} samples vs the "
        f"{report['real_count']} real digits 0-6 (classifier features, 32-d); real-vs-real floor **{report['floor_fd']:.2f}**. "
        f"Mean ± std over {len(cfg['seeds'])} seed(s). Total {report['seconds'] / 60:.1f} min, {cfg['jobs']} process(es) "
        "x 1 thread.",
        "",
        "## FD by sampler steps (FM Euler, cfg 1) and straightness of the 32-step paths",
        "",
        "| model | " + " | ".join(f"{s} step{'s' if s != '1' else ''}" for s in steps_cols) + " | straightness |",
        "|---|" + "---|" * (len(steps_cols) + 1),
        "| teacher | "
        + " | ".join(_cell([t["fd"][s] for t in teacher]) for s in steps_cols)
        + f" | {_cell([t['straightness'] for t in teacher], 4)} |",
    ]
    for adapter in cfg["adapters"]:
        rs = [r for r in students if r["adapter"] == adapter]
        cells = [_cell([r["fd"][s] for r in rs]) if s in rs[0]["fd"] else "" for s in steps_cols]
        lines.append(
            f"| reflow student ({adapter}) | " + " | ".join(cells) + f" | {_cell([r['straightness'] for r in rs], 4)} |"
        )
    lines += ["", "## Targets", "", "| student | target | student | bound | met |", "|---|---|---|---|---|"]
    for t in report["targets"]:
        lines.append(
            f"| {t['adapter']} | {t['target']} | {t['student']:.2f} | {t['bound']:.2f} | {'yes' if t['met'] else 'no'} |"
        )
    train_s = [r["seconds_per_step"] for r in students]
    if pairs.get("reused"):
        generation = f"- Pair generation: the {pairs['count']} pairs ({pairs['steps']} steps) were already in the pairs folder (reused, not timed)."
    else:
        generation = (
            f"- Pair generation: {pairs['count']} pairs x {pairs['steps']} steps in {pairs['seconds']:.1f} s "
            f"({pairs['pairs_per_second']:.1f} pairs/s, batch {pairs['batch']}). Against a bare sampling loop of the same "
            f"model, batch and steps, alternating rounds of {cfg['shard']} pairs: time ratio "
            f"{', '.join(f'{r:.3f}' for r in pairs['ratios'])}, median **{pairs['ratio']:.3f}** (target <= 1.05)."
        )
    lines += ["", "## Cost", "", generation]
    inv = report.get("inverted")
    if inv and inv.get("reused"):
        lines.append(f"- Inversion: the {inv['count']} inverted real digits were already in the pairs folder (reused).")
    elif inv:
        lines.append(
            f"- Inversion: {inv['count']} real digits x {pairs['steps']} steps in {inv['seconds']:.1f} s "
            f"({1000 * inv['seconds_per_image']:.2f} ms per image); against a bare `d2f_core.invert` loop over the same "
            f"images and batches ({inv['bare_seconds']:.1f} s): time ratio **{inv['ratio']:.3f}**."
        )
    lines += [
        f"- Training: {_cell(train_s, 4)} s per step (batch {cfg['batch']}), "
        f"{statistics.fmean(r['train_seconds'] for r in students):.0f} s per student.",
    ]
    if report.get("pair_steps"):
        lines += [
            "",
            "## Pair steps (how the default was chosen)",
            "",
            "RMS distance of the teacher's N-step Euler end points from its 128-step ones, relative to the images' RMS "
            "(256 samples):",
            "",
            "| N | " + " | ".join(report["pair_steps"]) + " |",
            "|---|" + "---|" * len(report["pair_steps"]),
            "| distance | " + " | ".join(f"{v:.4f}" for v in report["pair_steps"].values()) + " |",
        ]
    lines.append("")
    return "\n".join(lines)


def save_plot(report: dict[str, Any], path: pathlib.Path) -> pathlib.Path:
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5, 4), dpi=100)
    ax = fig.subplots()
    series = [("teacher", report["teacher"], "k")] + [
        (f"reflow {a}", [r for r in report["students"] if r["adapter"] == a], c)
        for a, c in zip(report["config"]["adapters"], ("tab:green", "tab:orange"))
    ]
    for label, rs, color in series:
        xs = [int(s) for s in rs[0]["fd"]]
        stats = [_mean_std([r["fd"][str(s)] for r in rs]) for s in xs]
        ax.errorbar(
            xs, [m for m, _ in stats], yerr=[s for _, s in stats], marker="o", capsize=3, color=color, label=label
        )
    ax.axhline(report["floor_fd"], color="grey", linestyle=":", label="real-vs-real floor")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("FM Euler steps (cfg 1)")
    ax.set_ylabel("FD")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return atomic_write(path, lambda p: fig.savefig(p, format="png"))


# ------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--quick", action="store_true", help="seconds: 1 seed, 256 pairs of 8 steps, 20 training steps, 100 samples"
    )
    p.add_argument("--seeds", type=int, default=None, help="seeds (default 3)")
    p.add_argument(
        "--first-seed", type=int, default=0, help="the first seed: seeds first .. first + seeds - 1 (default 0)"
    )
    p.add_argument("--pairs", type=int, default=None, help="pairs (default 16384)")
    p.add_argument("--pair-steps", type=int, default=None, help="teacher ODE steps per pair (default 32)")
    p.add_argument(
        "--pair-sampler", default="euler", choices=tuple(d2f_core.SAMPLERS), help="the pairs' solver (default euler)"
    )
    p.add_argument(
        "--pair-grid",
        default="uniform",
        choices=tuple(d2f_core.FM_GRIDS),
        help="the pairs' sigma grid (default uniform)",
    )
    p.add_argument(
        "--timestep-sampling",
        default="shift",
        choices=tuple(d2f_core.TIMESTEP_SAMPLERS),
        help="the students' training sigmas (default shift)",
    )
    p.add_argument("--shift", type=float, default=SHIFT, help=f"shift of --timestep-sampling shift (default {SHIFT:g})")
    p.add_argument(
        "--grid-share",
        type=float,
        default=0.0,
        help="share of the students' training sigmas on the nodes of their 2-step sampling grid (default 0; -1: "
        "reflow's recommended share, the toolkit's default, 0.5)",
    )
    p.add_argument("--loss", default="mse", choices=tuple(d2f_core.LOSSES), help="the students' loss (default mse)")
    p.add_argument("--huber-c", type=float, default=0.0, help="c of --loss pseudo_huber (default 0: the paper's c)")
    p.add_argument(
        "--inverted-share",
        type=float,
        default=0.0,
        help="share of every batch from the real digits 0-6 inverted through the teacher (default 0: none inverted)",
    )
    p.add_argument(
        "--real-images", type=int, default=None, help="real digits to invert with --inverted-share (default all 1264)"
    )
    p.add_argument(
        "--adapters",
        default=",".join(ADAPTERS),
        help=f"students, comma-separated: lora<rank> (a LoRA of that rank, alpha = rank) or full (default "
        f"{','.join(ADAPTERS)})",
    )
    p.add_argument(
        "--pairs-folder",
        type=pathlib.Path,
        default=None,
        help="keep the pairs here (a later run with the same pair settings reuses them; default a temporary folder)",
    )
    p.add_argument("--train-steps", type=int, default=None, help="reflow training steps per student (default 3000)")
    p.add_argument(
        "--ema-decay",
        type=float,
        default=0.0,
        help="the students' EMA decay (default 0: none); with EMA the students are evaluated with the EMA weights",
    )
    p.add_argument(
        "--optimizer",
        choices=tuple(OPTIMIZERS),
        default="AdamW",
        help="the students' optimizer (default AdamW); --lr-lora / --lr-full are its learning rates",
    )
    p.add_argument("--samples", type=int, default=None, help="FD samples (default 500)")
    # the defaults (16384 pairs, 3000 steps, full lr 1e-3) won the seed-0 runs of benchmarks/results/reflow_ablations.md
    add_finetune_flags(p, batch=32, lr_lora=2e-3, lr_full=1e-3)
    args = p.parse_args(argv)
    quick = args.quick
    count_seeds = args.seeds if args.seeds is not None else (1 if quick else 3)
    if args.first_seed < 0:
        p.error(f"--first-seed must be >= 0, got {args.first_seed}")
    seeds = list(range(args.first_seed, args.first_seed + count_seeds))
    count = args.pairs or (256 if quick else 16384)
    pair_steps = args.pair_steps or (8 if quick else 32)
    train_steps = args.train_steps or (20 if quick else 3000)
    samples = args.samples or (100 if quick else 500)
    gen_batch, shard = (64, 128) if quick else (256, 1024)
    adapters = [a.strip() for a in args.adapters.split(",") if a.strip()]
    known = [a == "full" or (a.startswith("lora") and a[4:].isdigit() and int(a[4:]) > 0) for a in adapters]
    if not adapters or not all(known) or len(set(adapters)) != len(adapters):
        p.error(f"--adapters must name lora<rank> (rank > 0) or full, each once, got {args.adapters!r}")
    if not 0 <= args.inverted_share <= 1:
        p.error(f"--inverted-share must lie in [0, 1], got {args.inverted_share}")
    if args.inverted_share > 0:
        try:
            d2f_core.check_invertible(args.pair_sampler)
        except ValueError as exc:
            p.error(str(exc))
    if args.inverted_share == 1:
        p.error(
            "--inverted-share 1 would train on the real digits alone: the benchmark mixes them with generated pairs"
        )
    options = {
        "timestep_sampling": args.timestep_sampling,
        "shift": args.shift,
        "loss": args.loss,
        "huber_c": args.huber_c,
        "inverted_share": args.inverted_share,
        "ema_decay": args.ema_decay,
        "grid_share": args.grid_share,
        "optimizer": args.optimizer,
    }
    missing = OPTIMIZERS[args.optimizer].missing()
    if missing is not None:
        p.error(missing)
    try:
        checked = TrainConfig(objective="reflow", **options)  # the training options' own checks, before minutes of work
    except ValueError as exc:
        p.error(str(exc))
    options["grid_share"] = checked.resolved_grid_share  # -1 (reflow's recommended share) reported as the share it is
    check_finetune_flags(
        p,
        args,
        ("seeds", len(seeds), 1),
        ("pairs", count, shard),
        ("pair-steps", pair_steps, 1),
        ("train-steps", train_steps, 1),
        ("samples", samples, 2),
        ("real-images", args.real_images if args.real_images is not None else 1, 1),
    )
    torch.set_num_threads(1)
    start = time.perf_counter()
    setup = Setup(args.weights, samples)
    print(f"floor FD (real vs real halves): {setup.floor:.3f}", flush=True)
    teacher = [
        {
            "seed": s,
            "fd": fd_at(setup, setup.unet, s, TEACHER_STEPS),
            "straightness": straightness(setup, setup.unet, s),
        }
        for s in seeds
    ]
    for t in teacher:
        print(
            f"teacher seed {t['seed']}: FD {', '.join(f'{k}: {v:.2f}' for k, v in t['fd'].items())}, "
            f"straightness {t['straightness']:.4f}",
            flush=True,
        )
    choice = {} if quick or args.pair_sampler != "euler" else pair_step_choice(setup)
    keep = args.pairs_folder is not None
    folder = pathlib.Path(tempfile.mkdtemp(prefix="d2f_reflow_pairs_")) if not keep else None
    pairs_dir = args.pairs_folder if keep else folder / "pairs"
    lrs = {"lora": args.lr_lora, "full": args.lr_full}
    inverted = None
    try:
        pairs = make_pairs(
            setup,
            pairs_dir,
            count,
            pair_steps,
            gen_batch,
            shard,
            rounds=1 if quick else 3,
            sampler=args.pair_sampler,
            grid=args.pair_grid,
        )
        if args.inverted_share > 0:
            real = min(args.real_images or setup.real_count, setup.real_count)
            real = real if args.real_images or not quick else min(real, 128)
            inverted = invert_real(
                setup, pairs_dir, real, pair_steps, gen_batch, shard, args.pair_sampler, args.pair_grid
            )
        jobs = [
            (a, s, train_steps, args.batch, lrs["full" if a == "full" else "lora"], options)
            for s in seeds
            for a in adapters
        ]
        students = []
        if args.jobs == 1:
            data = training_data(pairs_dir, args.inverted_share)
            with Progress(len(jobs) * train_steps, "reflow students", unit="step") as bar:
                students = [train_student(setup, data, *job, progress=bar) for job in jobs]
        else:
            import multiprocessing as mp

            with (
                Progress(len(jobs), f"reflow students ({args.jobs} processes)", unit="run") as bar,
                mp.get_context("spawn").Pool(
                    args.jobs,
                    initializer=_worker_init,
                    initargs=(str(args.weights), samples, str(pairs_dir), args.inverted_share),
                ) as pool,
            ):
                for result in pool.imap_unordered(_worker_run, jobs):
                    students.append(result)
                    bar.update(1, f"{result['adapter']} seed {result['seed']}")
    finally:
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
    students.sort(key=lambda r: (adapters.index(r["adapter"]), r["seed"]))
    report = {
        "config": {
            "seeds": seeds,
            "adapters": adapters,
            "samples": samples,
            "batch": args.batch,
            "lrs": lrs,
            "train_steps": train_steps,
            "jobs": args.jobs,
            "shard": shard,
            "quick": quick,
            "options": options,
            "torch": torch.__version__,
        },
        "floor_fd": setup.floor,
        "real_count": setup.real_count,
        "teacher": teacher,
        "students": students,
        "pairs": pairs,
        "inverted": inverted,
        "pair_steps": choice,
        "seconds": time.perf_counter() - start,
    }
    report["targets"] = targets(report)
    stem = "reflow_quick" if quick else "reflow"
    write_report(args.out, stem, report, summarise(report), [save_plot(report, args.out / f"{stem}_fd_vs_steps.png")])
    return 0


if __name__ == "__main__":
    sys.exit(main())
