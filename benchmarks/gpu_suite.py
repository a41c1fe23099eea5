"""The GPU suite: one command that checks and measures the toolkit on one GPU and prints one table.

- **CUDA tests**: the test variants that skip without CUDA (the ``device`` fixture's ``cuda`` variants of
  d2f_core/tests) and, on a GPU, tests/test_comfy_fp8.py (LoRA training on an fp8-stored base, the node and
  the CLI): pytest in a subprocess, pass / fail / skip counts.
- **Training speed** on a full-size SD1.5 UNet at 512 px (batch 4 of 4x64x64 latents, LoRA rank 8 on
  ``attention_ff``, bf16 autocast): Train Diff2Flow LoRA vs the bare PyTorch loop vs stock TrainLoraNode,
  it/s and peak memory (benchmarks/train_speed.py's children).
- **SDXL at 1024 px** peak memory and step time of one LoRA step (rank 16, ``attention_ff``, batch 1, bf16
  autocast): bf16 weights without and with gradient checkpointing, fp8 weights with checkpointing
  (benchmarks/memory.py's children).
- **Pair generation** throughput: reflow pairs of the full-size SD1.5 UNet (bf16 weights, 512 px, FM Euler,
  8 steps, batch 8) through ``training.pairs.generate_pairs``, the code behind ``python -m training pairs``.
- **Patch overhead**: benchmarks/patch_overhead.py on the full-size SD1.5 UNet at 512 px (fp16).

Every part runs in its own subprocess. On one H100 / H200 the whole suite is meant to take under 8
minutes. ``--device cpu --quick`` runs every part on small shapes (a few minutes on 2 CPU cores: the test
suite runs it, so the suite cannot rot); its figures mean nothing.

    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/gpu_suite.py [--device cuda|cpu] [--quick] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
sys.path.append(str(ROOT))  # a fresh clone: the layers without installing (appended: ComfyUI's nodes.py wins)
sys.path.insert(0, str(BENCHMARKS))

import memory  # noqa: E402
import train_speed  # noqa: E402

# the sizes of each part: full (on a GPU) and --quick (a few seconds each on a CPU)
FULL = {
    "train_channels": 320,  # SD1.5's UNet
    "train_size": 64,  # 512 px
    "train_steps": 5,
    "sdxl_model": "sdxl",
    "pairs_count": 64,
    "pairs_steps": 8,
    "pairs_batch": 8,
    "patch_args": ["--channels", "320", "--size", "64", "--steps", "10", "--repeats", "3", "--warmup", "1"],
}
QUICK = {
    "train_channels": 32,
    "train_size": 8,
    "train_steps": 1,
    "sdxl_model": "sdxl",  # memory.py's --quick shapes
    "pairs_count": 4,
    "pairs_steps": 2,
    "pairs_batch": 2,
    "patch_args": ["--quick"],
}
SDXL_CONFIGS = ("bf16 weights", "bf16 weights + ckpt", "fp8 weights + ckpt")
GIB = 2**30


def child_env(device: str) -> dict[str, str]:
    env = dict(os.environ)
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # ComfyUI picks CUDA whenever it is there
    return env


# ---------------------------------------------------------------------- the parts
def cuda_tests(args: argparse.Namespace) -> list[tuple[str, str, str]]:
    """pytest on the CUDA variants (and, on a GPU, the fp8 training tests): one row per run."""
    runs = [("CUDA variants of d2f_core/tests", ["d2f_core/tests", "-k", "cuda"])]
    if args.device == "cuda":
        runs.append(("fp8 base training (tests/test_comfy_fp8.py)", ["tests/test_comfy_fp8.py"]))
    rows = []
    for name, target in runs:
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", *target]
        proc = subprocess.run(cmd, cwd=ROOT, env=child_env(args.device), capture_output=True, text=True)
        summary = (proc.stdout.strip().splitlines() or ["(no output)"])[-1]
        counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|error|errors|deselected)", summary)}
        text = ", ".join(f"{counts[k]} {k}" for k in ("passed", "failed", "error", "errors", "skipped") if k in counts)
        rows.append(("tests", name, text or summary))
    return rows


def training_speed(args: argparse.Namespace, sizes: dict) -> list[tuple[str, str, str]]:
    """ours / bare / stock on full-size SD1.5 at 512 px, bf16 (train_speed.py's children)."""
    speed_args = argparse.Namespace(
        steps=sizes["train_steps"],
        warmup=1,
        channels=sizes["train_channels"],
        threads=args.threads,
        size=sizes["train_size"],
        dtype="bf16",
        gradient_checkpointing=False,
    )
    rows = []
    results = {}
    for method in ("ours", "bare", "stock"):
        try:
            r = train_speed.run_child(speed_args, method, "LoRA", "attention_ff" if method != "stock" else "all")
        except SystemExit as exc:  # run_child exits with the child's output: a row, and the suite goes on
            rows.append(("SD1.5 training", method, f"failed: {str(exc.code).strip().splitlines()[-1][:200]}"))
            continue
        results[method] = r
        peak = r["cuda"] if r["cuda"] is not None else r["rss"] - r["setup_rss"]
        what = "CUDA peak" if r["cuda"] is not None else "peak RSS over setup"
        rows.append(
            (
                "SD1.5 training",
                f"{method} (UNet batch {r['unet_batch']}, {r['trains']})",
                f"{1 / r['sec_per_step']:.2f} it/s, {what} {peak / GIB:.2f} GiB",
            )
        )
    if len(results) == 3:
        ratio = results["ours"]["sec_per_step"] / results["bare"]["sec_per_step"]
        speed = results["stock"]["sec_per_step"] / results["ours"]["sec_per_step"]
        rows.append(("SD1.5 training", "ours / bare step time; ours / stock speed", f"{ratio:.3f}x; {speed:.2f}x"))
    return rows


def sdxl_memory(args: argparse.Namespace, sizes: dict) -> list[tuple[str, str, str]]:
    """One SDXL step at 1024 px per configuration (memory.py's children)."""
    memory_args = argparse.Namespace(
        device=args.device, threads=args.threads, quick=args.quick, limit_gib=args.limit_gib, steps=1
    )
    rows = []
    for name in SDXL_CONFIGS:
        row = memory.measure(memory_args, sizes["sdxl_model"], name, (1,))
        r = row["runs"]["1"]
        if r.get("fits"):
            text = f"{r['peak'] / GIB:.2f} GiB peak, {r['step_seconds'][-1]:.2f} s/step"
        else:
            text = f"does not fit: {r.get('error', '')[:100]}"
        where = "SDXL (quick shapes)" if args.quick else "SDXL 1024 px"
        rows.append((f"{where}, batch 1", f"{name} ({row['describe']})", text))
    return rows


def pairs_child(args: argparse.Namespace) -> None:
    """Generate reflow pairs with the full-size (or --quick) SD1.5 UNet: prints ``RESULT {json}``."""
    import logging

    logging.disable(logging.WARNING)
    harness = memory.import_host()
    import torch

    import d2f_core
    from d2f_host.conditioning import cond_kwargs
    from d2f_host.model_sampling import alignment_of
    from d2f_host.unet import inference_network
    from training.pairs import PairSettings, generate_pairs

    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = QUICK if args.quick else FULL
    shape = (memory.QUICK_SHAPES if args.quick else memory.SHAPES)["sd15"]
    model = memory.build_unet(harness, shape, "bf16")
    d2f = alignment_of(model)
    network, device = inference_network(model)
    velocity = d2f_core.get_objective("diff2flow").velocity_fn(lambda x, t, c: network(x, t, **c), d2f)
    side = shape.pixels // 8
    latent = torch.zeros(4, side, side)
    gen = torch.Generator().manual_seed(0)
    conds = [cond_kwargs(model, (torch.randn(1, 77, shape.context_dim, generator=gen), {}), latent) for _ in range(2)]
    settings = PairSettings(
        (4, side, side), d2f.sigma_max, "euler", sizes["pairs_steps"], batch_size=sizes["pairs_batch"]
    )
    warm = PairSettings((4, side, side), d2f.sigma_max, "euler", 1, batch_size=sizes["pairs_batch"])
    with tempfile.TemporaryDirectory(prefix="d2f_gpu_suite_pairs_") as folder:
        generate_pairs(velocity, conds, pathlib.Path(folder) / "warm", sizes["pairs_batch"], warm, device=device)
        summary = generate_pairs(
            velocity, conds, pathlib.Path(folder) / "pairs", sizes["pairs_count"], settings, device=device
        )
    print("RESULT " + json.dumps({"generated": summary.generated, "seconds": summary.seconds}), flush=True)


def pair_throughput(args: argparse.Namespace, sizes: dict) -> list[tuple[str, str, str]]:
    cmd = [sys.executable, __file__, "--pairs-child", "--device", args.device, "--threads", str(args.threads)]
    proc = subprocess.run(
        cmd + (["--quick"] if args.quick else []), env=child_env(args.device), capture_output=True, text=True
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        return [("pairs", "generation", f"failed (exit {proc.returncode}): {proc.stderr.strip()[-300:]}")]
    r = json.loads(lines[-1][len("RESULT ") :])
    what = f"SD1.5 {'(quick shapes)' if args.quick else '512 px'}, {sizes['pairs_steps']} Euler steps, batch {sizes['pairs_batch']}"
    return [("pairs", what, f"{r['generated'] / r['seconds']:.2f} pairs/s ({r['generated']} in {r['seconds']:.1f} s)")]


def patch_overhead(args: argparse.Namespace, sizes: dict) -> list[tuple[str, str, str]]:
    cmd = [sys.executable, str(BENCHMARKS / "patch_overhead.py"), *sizes["patch_args"]]
    proc = subprocess.run(cmd, env=child_env(args.device), capture_output=True, text=True)
    found = re.search(r"^\s*\S+\s+patched\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)", proc.stdout, re.MULTILINE)
    if proc.returncode != 0 or not found:
        return [("patch overhead", "patched / unpatched", f"failed (exit {proc.returncode}): {proc.stderr[-300:]}")]
    unet = re.search(r"^UNet: .*$", proc.stdout, re.MULTILINE)
    what = unet.group(0).removeprefix("UNet: ") if unet else "SD1.5 layout"
    return [("patch overhead", what, f"patched / unpatched step time {found.group(3)}x (target <= 1.02)")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--quick", action="store_true", help="small shapes: checks the suite (figures meaningless)")
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads in each child (0: default)")
    parser.add_argument("--limit-gib", type=float, default=17.0, help="CPU only: each memory child's data limit")
    parser.add_argument("--pairs-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.pairs_child:
        return pairs_child(args)
    train_speed.check_comfyui()
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            parser.error("--device cuda: torch sees no CUDA device (run --device cpu --quick to check the suite)")
        card = torch.cuda.get_device_name(0)
    else:
        card = f"CPU ({os.cpu_count()} cores)"
    sizes = QUICK if args.quick else FULL
    start = time.perf_counter()
    rows: list[tuple[str, str, str]] = []
    timings = []
    for part in (cuda_tests, training_speed, sdxl_memory, pair_throughput, patch_overhead):
        began = time.perf_counter()
        print(f"[{time.perf_counter() - start:6.0f} s] {part.__name__} ...", flush=True)
        rows += part(args) if part is cuda_tests else part(args, sizes)
        timings.append(f"{part.__name__} {time.perf_counter() - began:.0f} s")
    total = time.perf_counter() - start
    print(f"\nGPU suite on {card}{' (quick: figures meaningless)' if args.quick else ''}: {total / 60:.1f} min")
    print("| part | what | result |\n|---|---|---|")
    for part, what, result in rows:
        print(f"| {part} | {what} | {result} |")
    print("\ntime per part: " + ", ".join(timings))


if __name__ == "__main__":
    main()
