"""Does EMA of the adapter weights change sample quality? Diff2Flow fine-tuning with and without it.

    python benchmarks/ema.py            # 3 seeds, LoRA r16 and full, checkpoints 500 and 2000
    python benchmarks/ema.py --quick    # a shrunken run to check the script (about a minute)
    python benchmarks/ema.py --jobs 2   # the same runs on 2 processes (1 thread each)

The setting of ``benchmarks/paper_comparison.py`` (the demo's pretrained v-model on digits 0-6,
fine-tuned on the digits 7-9 under the ``diff2flow`` objective, constant LR, caption dropout 0.1),
once with ``ema_decay`` 0 and once with ``--ema-decay`` (default 0.999, the reference Diff2Flow
configs' value, with LitEma's warm-up ``min(decay, (1 + t) / (10 + t))``). At each checkpoint the
model is evaluated with the weights a saved LoRA would hold: the EMA weights when EMA is on
(``Trainer.sampling_weights``). FD (the demo classifier's features, samples vs the real 7-9 digits)
with the ``diff2flow`` sampler at 8 and 50 FM Euler steps, from the same noise for every model.

Time convention (docs/MATH.md section 1): FM sigma in [0, 1], sigma = 1 is noise.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import time
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere: the demo package lives at the root
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))  # paper_comparison's setup

import torch  # noqa: E402
from paper_comparison import Setup, add_finetune_flags, check_finetune_flags  # noqa: E402
from paper_comparison import run_one as paper_run  # noqa: E402

from demo.progress import Progress  # noqa: E402
from training.files import atomic_write  # noqa: E402

OBJECTIVE = "diff2flow"


def run_one(
    setup: Setup,
    adapter: str,
    seed: int,
    ema_decay: float,
    checkpoints: list[int],
    sampler_steps: list[int],
    batch: int,
    lr: float,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """paper_comparison's run (``diff2flow``, ``adapter``: ``"full"`` or ``"lora<rank>"``) with
    ``ema_decay``, every checkpoint evaluated with every sampler step count; FD by checkpoint."""
    kind = "full" if adapter == "full" else "lora"
    run = paper_run(
        setup,
        OBJECTIVE,
        adapter,
        seed,
        checkpoints,
        sampler_steps,
        batch,
        {kind: lr},
        progress,
        ema_decay=ema_decay,
        checkpoint_sampler_steps=sampler_steps,
    )
    return {
        "adapter": adapter,
        "seed": seed,
        "ema_decay": ema_decay,
        "seconds": run["seconds"],
        "fd": {step: result["fd"] for step, result in run["checkpoints"].items()},
    }


_WORKER: dict[str, Any] = {}


def _worker_init(samples: int, weights: str) -> None:
    torch.set_num_threads(1)
    _WORKER["setup"] = Setup("v", samples, pathlib.Path(weights))


def _worker_run(job: tuple) -> dict[str, Any]:
    return run_one(_WORKER["setup"], *job)


def _cell(values: list[float]) -> str:
    mean = statistics.fmean(values)
    return f"{mean:.2f} ± {statistics.stdev(values):.2f}" if len(values) > 1 else f"{mean:.2f}"


def summarise(runs: list[dict[str, Any]], checkpoints: list[int], sampler_steps: list[int], ema_decay: float) -> str:
    """A markdown table: FD (mean ± std over seeds) per adapter, EMA off / on, checkpoint, sampler steps;
    and the per-seed difference on minus off."""
    adapters = sorted({r["adapter"] for r in runs}, key=lambda a: (a == "full", a))
    head = (
        "| adapter | EMA | " + " | ".join(f"step {c}, {s}-step FD" for c in checkpoints for s in sampler_steps) + " |"
    )
    lines = [head, "|" + "---|" * (2 + len(checkpoints) * len(sampler_steps))]
    for adapter in adapters:
        for decay in (0.0, ema_decay):
            sel = [r for r in runs if r["adapter"] == adapter and r["ema_decay"] == decay]
            cells = [_cell([r["fd"][c][s] for r in sel]) for c in checkpoints for s in sampler_steps]
            lines.append(f"| {adapter} | {'off' if decay == 0 else f'{decay:g}'} | " + " | ".join(cells) + " |")
        off = {r["seed"]: r for r in runs if r["adapter"] == adapter and r["ema_decay"] == 0.0}
        on = {r["seed"]: r for r in runs if r["adapter"] == adapter and r["ema_decay"] == ema_decay}
        diffs = [
            _cell([on[s]["fd"][c][k] - off[s]["fd"][c][k] for s in sorted(on)])
            for c in checkpoints
            for k in sampler_steps
        ]
        lines.append(f"| {adapter} | on - off (per seed) | " + " | ".join(diffs) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="1 seed, LoRA only, checkpoints 20 and 40, 100 samples")
    p.add_argument("--seeds", type=int, default=None, help="seeds (default 3)")
    p.add_argument("--ema-decay", type=float, default=0.999, help="the EMA decay compared with none (default 0.999)")
    p.add_argument("--samples", type=int, default=None, help="FD samples (default 500)")
    add_finetune_flags(p)
    args = p.parse_args(argv)
    seeds = list(range(args.seeds if args.seeds is not None else (1 if args.quick else 3)))
    checkpoints = [20, 40] if args.quick else [500, 2000]
    sampler_steps = [8] if args.quick else [8, 50]
    adapters = ["lora16"] if args.quick else ["lora16", "full"]
    samples = args.samples or (100 if args.quick else 500)
    if not 0 < args.ema_decay < 1:
        p.error(f"--ema-decay must lie in (0, 1), got {args.ema_decay}")
    check_finetune_flags(p, args, ("seeds", len(seeds), 1), ("samples", samples, 2))
    torch.set_num_threads(1)
    start = time.perf_counter()
    lrs = {"lora": args.lr_lora, "full": args.lr_full}
    jobs = [
        (a, s, d, checkpoints, sampler_steps, args.batch, lrs["full" if a == "full" else "lora"])
        for s in seeds
        for a in adapters
        for d in (0.0, args.ema_decay)
    ]
    runs = []
    if args.jobs == 1:
        setup = Setup("v", samples, args.weights)
        with Progress(len(jobs) * checkpoints[-1], "EMA comparison", unit="step") as bar:
            runs = [run_one(setup, *job, progress=bar) for job in jobs]
    else:
        import multiprocessing as mp

        with (
            Progress(len(jobs), f"EMA comparison ({args.jobs} processes)", unit="run") as bar,
            mp.get_context("spawn").Pool(
                args.jobs, initializer=_worker_init, initargs=(samples, str(args.weights))
            ) as pool,
        ):
            for result in pool.imap_unordered(_worker_run, jobs):
                runs.append(result)
                bar.update(1, f"{result['adapter']} seed {result['seed']} ema {result['ema_decay']:g}")
    table = summarise(runs, checkpoints, sampler_steps, args.ema_decay)
    minutes = (time.perf_counter() - start) / 60
    print(
        f"\nFD by sampler steps, diff2flow fine-tuning on digits 7-9, {len(seeds)} seed(s), EMA {args.ema_decay:g} vs off"
        f" ({minutes:.1f} min)\n\n{table}"
    )
    report = {
        "seeds": seeds,
        "checkpoints": checkpoints,
        "sampler_steps": sampler_steps,
        "ema_decay": args.ema_decay,
        "runs": runs,
        "minutes": minutes,
        "quick": args.quick,
    }
    text = (
        f"# EMA {args.ema_decay:g} vs none (benchmarks/ema.py{', quick run' if args.quick else ''}, {len(seeds)} seeds, "
        f"{minutes:.1f} min)\n\n{table}\n"
    )
    stem = "ema_quick" if args.quick else "ema"  # a quick run's folder is a temporary one unless --out is given
    atomic_write(args.out / f"{stem}.json", lambda path: pathlib.Path(path).write_text(json.dumps(report, indent=1)))
    atomic_write(args.out / f"{stem}.md", lambda path: pathlib.Path(path).write_text(text))
    print(f"wrote {args.out / (stem + '.md')} and {stem}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
