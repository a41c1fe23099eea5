"""Pair accuracy against teacher network evaluations: how close each FM sampler's end points come to the
teacher's exact noise-to-data map for a given number of network evaluations per pair (how the pairs'
default sampler and steps were chosen; docs/MATH.md section 14, docs/REFLOW.md).

    python benchmarks/pair_accuracy.py            # full run (23 min: one process on 2 busy CPU cores)
    python benchmarks/pair_accuracy.py --quick    # a shrunken run that checks the script (seconds)

Teachers (FM convention, docs/MATH.md section 1: sigma = 1 is noise):

- ``demo``: the shipped v-prediction digit UNet (``demo/weights/unet_v.safetensors``) through the
  Diff2Flow alignment on SD's schedule, conditional at cfg 1 with the classes 0-6 in turn, from
  ``sigma_max * z`` with sigma_max = 0.936: the teacher of ``benchmarks/reflow.py``.
- ``demo_cfg5``: the same at cfg 5 (the pairs' default guidance; the null class as the negative).
- ``gmm``: the exact FM velocity of a Gaussian mixture (docs/MATH.md section 7) in 256 dimensions (the
  mean images of the digit classes 0-6, each with standard deviation 0.5, equal weights), from pure
  noise at sigma = 1: a flow-model / zero-terminal-SNR teacher whose velocity has no model error.

For each teacher and one fixed set of noises: a reference solution (``ab2`` at 1024 steps), checked
against a second one (``heun`` at 512 steps); then every sampler of ``d2f_core.SAMPLERS`` at each
budget of network evaluations per pair, with the most steps whose evaluations fit the budget
(``Sampler.evaluations``; Heun's 2 per step, one on the last, gives odd counts), on each sigma grid of
``d2f_core.FM_GRIDS`` (the demo teachers' ``sigma_min`` grid ends its uniform part at the schedule's
sigma_min = 0.028; the mixture has no sigma_min, so only the uniform grid). The error of a run is
the RMS over all pairs and pixels of (end point - reference), relative to the RMS of the reference end
points; the report adds the median over pairs of each pair's own relative distance, which a few paths
near the boundaries between the mixture's components (where its map is steep) cannot dominate. Every
grid is ``d2f_core.fm_sigmas(steps, sigma_max, sigma_floor=...)`` (shift 1), as the pairs use.

With cfg != 1 every evaluation is one network call on the doubled batch (cond and uncond together,
``d2f_core.cfg_velocity``), so the evaluation counts and the table hold at any cfg.

Target (the pairs' cost): the accuracy of today's default, 32-step FM Euler, with at most one third of
its network evaluations (<= 10 per pair). The report states it per teacher, with the numbers.
"""

from __future__ import annotations

import argparse
import math
import pathlib
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere: the demo package lives at the root
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import d2f_core  # noqa: E402
from demo import data as ddata  # noqa: E402
from demo import pipeline  # noqa: E402
from demo.store import load_unet  # noqa: E402
from training.files import atomic_write, ensure_writable_folder  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))  # the benchmarks' shared report folder rule
from paper_comparison import add_report_flags, report_folder, write_report  # noqa: E402

BUDGETS = (8, 10, 12, 16, 24, 32, 64)
QUICK_BUDGETS = (8, 16)
REFERENCE = ("ab2", 1024)
CHECK = ("heun", 512)
QUICK_REFERENCE = (("ab2", 64), ("heun", 32))
TODAY = ("euler", 32)  # the pairs' default before this benchmark
TARGET_BUDGET = 10  # a third of today's 32 evaluations
CLASSES = ddata.PRETRAIN_CLASSES
GMM_STD = 0.5
DEMO_CFG = 5.0  # PairsConfig's default guidance


@dataclass
class Teacher:
    name: str
    description: str
    velocity: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # fn(x, sigma [B]) -> v, the whole batch
    noise: torch.Tensor
    sigma_max: float
    sigma_min: float  # the least trained noise level (grid sigma_min); 0: none, the uniform grid only


def demo_teacher(weights: pathlib.Path, count: int, cfg: float = 1.0) -> Teacher:
    unet, encoder, _ = load_unet("v", weights)
    d2f = d2f_core.Diff2Flow(d2f_core.scaled_linear(), "v")
    context = pipeline.contexts(encoder, pipeline.balanced_labels(CLASSES, count))
    uncond = pipeline.contexts(encoder, [pipeline.NULL_CLASS]).expand_as(context)
    aligned = d2f.velocity_fn(unet)
    return Teacher(
        "demo" if cfg == 1 else f"demo_cfg{cfg:g}",
        f"the demo's v-model (digits 0-6) through the Diff2Flow alignment, cfg {cfg:g}, from sigma_max = "
        f"{d2f.sigma_max:.3f}",
        d2f_core.cfg_velocity(lambda x, sigma, c: aligned(x, sigma, c), context, uncond, cfg),
        pipeline.fixed_noise(count, seed=10_000),
        d2f.sigma_max,
        d2f.sigma_min,
    )


def gmm_teacher(count: int) -> Teacher:
    images, labels = ddata.select_classes(*ddata.load_digits_tensor(), CLASSES)
    means = torch.stack([images[labels == c].mean(0) for c in CLASSES]).flatten(1)
    gmm = d2f_core.GaussianMixture(means.double(), stds=GMM_STD)
    noise = torch.randn(count, gmm.dim, generator=torch.Generator().manual_seed(10_000), dtype=torch.float64)
    return Teacher(
        "gmm",
        f"the exact FM velocity of a Gaussian mixture ({len(CLASSES)} digit-class mean images, std {GMM_STD:g}, "
        f"{gmm.dim}-d), from sigma = 1",
        gmm.fm_velocity,
        noise,
        1.0,
        0.0,
    )


def steps_within(sampler: d2f_core.Sampler, budget: int) -> int:
    """The most steps whose network evaluations fit ``budget`` (at least 1)."""
    steps = 1
    while sampler.evaluations(steps + 1) <= budget:
        steps += 1
    return steps


def run(teacher: Teacher, sampler: str, steps: int, grid: str = "uniform") -> torch.Tensor:
    floor = d2f_core.grid_floor(grid, teacher.sigma_min)
    sigmas = d2f_core.fm_sigmas(steps, sigma_max=teacher.sigma_max, sigma_floor=floor)
    return d2f_core.get_sampler(sampler)(teacher.velocity, teacher.sigma_max * teacher.noise, sigmas)


def grids(teacher: Teacher) -> list[str]:
    """The grids that differ for ``teacher``: every one of ``d2f_core.FM_GRIDS`` where it has a sigma_min."""
    return list(d2f_core.FM_GRIDS) if teacher.sigma_min > 0 else ["uniform"]


def row_name(sampler: str, grid: str) -> str:
    return f"{sampler}/{grid}"


def rms(x: torch.Tensor) -> float:
    return float(x.double().pow(2).mean().sqrt())


def median_distance(out: torch.Tensor, ref: torch.Tensor) -> float:
    """The median over pairs of each pair's RMS distance to its reference, relative to the reference's RMS."""
    per_pair = (out - ref).double().flatten(1).pow(2).mean(1).sqrt()
    return float(per_pair.median()) / rms(ref)


def errors(out: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    return {"error": rms(out - ref) / rms(ref), "median": median_distance(out, ref)}


@torch.no_grad()
def measure(teacher: Teacher, budgets: tuple[int, ...], reference: tuple, check: tuple) -> dict[str, Any]:
    start = time.perf_counter()
    ref = run(teacher, *reference)
    scale = rms(ref)
    check_error = rms(run(teacher, *check) - ref) / scale
    print(f"{teacher.name}: reference {reference[0]} x {reference[1]} vs {check[0]} x {check[1]}: {check_error:.2e}")
    rows: dict[str, dict[str, Any]] = {}
    for grid in grids(teacher):
        for name, sampler in d2f_core.SAMPLERS.items():
            cells = {}
            for budget in budgets:
                steps = steps_within(sampler, budget)
                if sampler.evaluations(steps) > budget:
                    continue  # one step costs more than the budget
                cells[str(budget)] = {
                    "steps": steps,
                    "evaluations": sampler.evaluations(steps),
                    **errors(run(teacher, name, steps, grid), ref),
                }
            rows[row_name(name, grid)] = cells
            print(
                f"{teacher.name} {name} {grid}: " + ", ".join(f"{b}: {c['error']:.4f}" for b, c in cells.items()),
                flush=True,
            )
    today = errors(run(teacher, *TODAY), ref)
    return {
        "description": teacher.description,
        "noises": int(teacher.noise.shape[0]),
        "sigma_max": teacher.sigma_max,
        "sigma_min": teacher.sigma_min,
        "reference": {"sampler": reference[0], "steps": reference[1], "check": list(check), "error": check_error},
        "today": {"sampler": TODAY[0], "steps": TODAY[1], **today},
        "rows": rows,
        "seconds": time.perf_counter() - start,
    }


def _measure_job(job: tuple) -> tuple[str, dict[str, Any]]:
    torch.set_num_threads(1)
    name, weights, noises, budgets, reference, check = job
    if name == "gmm":
        teacher = gmm_teacher(noises)
    else:
        teacher = demo_teacher(pathlib.Path(weights), noises, DEMO_CFG if name.startswith("demo_cfg") else 1.0)
    return name, measure(teacher, budgets, reference, check)


# ------------------------------------------------------------------------------------ report
def fewest_evaluations(result: dict[str, Any], sampler: str) -> int | None:
    """The smallest budget of the table at which ``sampler`` is at least as accurate as today's default."""
    for budget, cell in result["rows"][sampler].items():
        if cell["error"] <= result["today"]["error"]:
            return int(budget)
    return None


def targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Per teacher: the most accurate sampler within the target budget against today's default."""
    out = []
    for name, result in report["teachers"].items():
        within = [
            (cell["error"], sampler, cell)
            for sampler, cells in result["rows"].items()
            for budget, cell in cells.items()
            if int(budget) <= TARGET_BUDGET
        ]
        if not within:
            continue
        error, sampler, cell = min(within, key=lambda item: item[0])
        out.append(
            {
                "teacher": name,
                "sampler": sampler,
                "steps": cell["steps"],
                "evaluations": cell["evaluations"],
                "error": error,
                "bound": result["today"]["error"],
                "met": error <= result["today"]["error"],
            }
        )
    return out


def cell_name(row: str) -> str:
    """The sampler and grid columns of a row named ``sampler/grid``."""
    sampler, grid = row.split("/")
    return f"`{sampler}` | `{grid}`"


def summarise(report: dict[str, Any]) -> str:
    cfg = report["config"]
    budgets = [str(b) for b in cfg["budgets"]]
    lines = [
        f"# Pair accuracy against teacher network evaluations{' (quick run)' if cfg['quick'] else ''}",
        "",
        "Relative RMS distance (%) of each pair's end point to a reference solution from the same noise, by network "
        "evaluations per pair (the most steps of each sampler that fit), on each sigma grid (`uniform`: uniform in FM "
        "sigma to 0; `sigma_min`: the uniform grid with a node on the schedule's sigma_min, which up to 49 steps is "
        "uniform to sigma_min, then one step to 0; shift 1). With cfg != 1 "
        "each evaluation is one network call on the doubled batch, so the table holds at any cfg. "
        f"Total {report['seconds'] / 60:.1f} min.",
    ]
    for name, result in report["teachers"].items():
        ref = result["reference"]
        lines += [
            "",
            f"## Teacher `{name}`",
            "",
            f"{result['description'][0].upper()}{result['description'][1:]}; {result['noises']} noises. Reference: `{ref['sampler']}` at "
            f"{ref['steps']} steps; it lies {100 * ref['error']:.4f} % from `{ref['check'][0]}` at {ref['check'][1]} steps.",
            "",
            "| sampler | grid | "
            + " | ".join(f"{b} ev." for b in budgets)
            + " | fewest ev. at 32-step Euler's accuracy |",
            "|---|---|" + "---|" * (len(budgets) + 1),
        ]
        for sampler, cells in result["rows"].items():
            row = []
            for b in budgets:
                cell = cells.get(b)
                if cell is None:
                    row.append("")
                    continue
                note = f" ({cell['steps']} st., {cell['evaluations']} ev.)" if cell["evaluations"] != int(b) else ""
                row.append(f"{100 * cell['error']:.3f}{note}")
            fewest = fewest_evaluations(result, sampler)
            lines.append(
                f"| {cell_name(sampler)} | "
                + " | ".join(row)
                + f" | {fewest if fewest is not None else '> ' + budgets[-1]} |"
            )
        lines += [
            "",
            f"32-step Euler (the earlier default): **{100 * result['today']['error']:.3f} %**. The median over pairs "
            f"of each pair's own relative distance (32-step Euler: {100 * result['today']['median']:.3f} %):",
            "",
            "| sampler | grid | " + " | ".join(f"{b} ev." for b in budgets) + " |",
            "|---|---|" + "---|" * len(budgets),
        ]
        for sampler, cells in result["rows"].items():
            medians = [f"{100 * cells[b]['median']:.3f}" if b in cells else "" for b in budgets]
            lines.append(f"| {cell_name(sampler)} | " + " | ".join(medians) + " |")
    lines += [
        "",
        f"## Target: 32-step Euler's accuracy with <= {TARGET_BUDGET} evaluations per pair",
        "",
        "| teacher | best within the budget | evaluations | error (%) | 32-step Euler (%) | met |",
        "|---|---|---|---|---|---|",
    ]
    for t in report["targets"]:
        lines.append(
            f"| {t['teacher']} | `{t['sampler'].split('/')[0]}` {t['steps']} steps, grid `{t['sampler'].split('/')[1]}` | "
            f"{t['evaluations']} | {100 * t['error']:.3f} | "
            f"{100 * t['bound']:.3f} | {'yes' if t['met'] else 'no'} |"
        )
    lines.append("")
    return "\n".join(lines)


def save_plot(report: dict[str, Any], path: pathlib.Path) -> pathlib.Path:
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    teachers = report["teachers"]
    fig = Figure(figsize=(5 * len(teachers), 4), dpi=100)
    axes = fig.subplots(1, len(teachers), squeeze=False)[0]
    for ax, (name, result) in zip(axes, teachers.items()):
        for sampler, cells in result["rows"].items():
            points = sorted({(c["evaluations"], c["error"]) for c in cells.values()})
            ax.plot([p[0] for p in points], [100 * p[1] for p in points], marker="o", label=sampler)
        ax.axhline(100 * result["today"]["error"], color="grey", linestyle=":", label="32-step Euler")
        ax.axvline(TARGET_BUDGET, color="grey", linestyle="--", linewidth=0.8)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("network evaluations per pair")
        ax.set_ylabel("relative RMS error (%)")
        ax.set_title(f"teacher {name}")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return atomic_write(path, lambda p: fig.savefig(p, format="png"))


# ------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="seconds: 32 noises, budgets 8 and 16, short references")
    p.add_argument("--noises", type=int, default=None, help="noises of the demo teacher (default 256; the mixture 4x)")
    p.add_argument("--jobs", type=int, default=1, help="worker processes, one thread each, one per teacher (default 1)")
    add_report_flags(p)
    args = p.parse_args(argv)
    quick = args.quick
    noises = args.noises or (32 if quick else 256)
    if noises < 2 or args.jobs < 1:
        p.error(f"--noises must be >= 2 and --jobs >= 1, got {noises} and {args.jobs}")
    budgets = QUICK_BUDGETS if quick else BUDGETS
    reference, check = QUICK_REFERENCE if quick else (REFERENCE, CHECK)
    out = report_folder(args.out, quick, "pair_accuracy")
    try:
        ensure_writable_folder(out)
    except OSError as exc:
        p.error(f"--out {out} cannot be written: {exc}")
    torch.set_num_threads(1)
    start = time.perf_counter()
    jobs = [
        ("demo", str(args.weights), noises, budgets, reference, check),
        (f"demo_cfg{DEMO_CFG:g}", str(args.weights), noises, budgets, reference, check),
        ("gmm", str(args.weights), 4 * noises, budgets, reference, check),
    ]
    if args.jobs == 1:
        results = dict(_measure_job(job) for job in jobs)
    else:
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(min(args.jobs, len(jobs))) as pool:
            results = dict(pool.map(_measure_job, jobs))
    report = {
        "config": {
            "quick": quick,
            "budgets": list(budgets),
            "noises": noises,
            "reference": list(reference),
            "check": list(check),
            "samplers": {name: s.description for name, s in d2f_core.SAMPLERS.items()},
            "jobs": args.jobs,
            "torch": torch.__version__,
        },
        "teachers": {name: results[name] for name, *_ in jobs},
        "seconds": time.perf_counter() - start,
    }
    report["targets"] = targets(report)
    stem = "pair_accuracy_quick" if quick else "pair_accuracy"
    if not all(
        math.isfinite(c["error"]) for r in results.values() for cells in r["rows"].values() for c in cells.values()
    ):
        raise FloatingPointError("a sampler's end points are not finite")
    write_report(out, stem, report, summarise(report), [save_plot(report, out / f"{stem}_error_vs_evaluations.png")])
    return 0


if __name__ == "__main__":
    sys.exit(main())
