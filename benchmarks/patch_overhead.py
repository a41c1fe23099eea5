"""Per-step cost of the Diff2Flow model-sampling patch: stock ``euler`` on an SD1.5-shaped eps
UNet (random weights, width set by ``--channels``), unpatched vs. after ``patch_model``.

After a warm-up, runs interleave (unpatched, patched, patched, unpatched, ...) so that drift on a
noisy machine hits both alike. Step times are the intervals between consecutive step callbacks (wall clock on
CPU, CUDA events on the device timeline on GPU), so model loading and setup are excluded. The table
gives the median (and min) over all timed steps of all runs; the target is patched / unpatched <= 1.02.

    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/patch_overhead.py [--channels 64] [--cfg 1 7]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import pathlib
import statistics
import sys
import time
from types import ModuleType
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.append(
    str(ROOT)
)  # a fresh clone: d2f_core and d2f_host without installing (appended: ComfyUI's nodes.py wins)


def import_comfyui() -> ModuleType:
    """Put ComfyUI on sys.path the way the tests do (device choice, ``utils`` before ``nodes``)."""
    path = pathlib.Path(os.environ.get("COMFYUI_PATH", "/nonexistent"))
    if not (path / "comfy" / "model_management.py").is_file():
        sys.exit("ComfyUI not found: set COMFYUI_PATH to a ComfyUI 0.8.0 source tree")
    sys.path.insert(0, str(ROOT / "tests"))
    import comfy_harness  # inserts COMFYUI_PATH, picks CPU unless CUDA is present

    if comfy_harness.COMFYUI is None:
        sys.exit(comfy_harness.COMFYUI_IMPORT_ERROR or comfy_harness.SKIP_REASON)
    return comfy_harness


def load_model_sampling() -> ModuleType:
    """The pack's model-sampling module (``d2f_host.model_sampling``: it needs only ComfyUI and
    d2f_core; loading the whole pack would make the benchmark depend on every node module)."""
    return importlib.import_module("d2f_host.model_sampling")


def build_sd15_shaped(harness: ModuleType, channels: int, context_dim: int, dtype: Any) -> Any:
    """SD1.5's UNet layout (4 levels, 2 res blocks, attention on the first 3) at a given width."""
    import comfy.model_base
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models
    import torch

    unet = dict(
        harness.TINY_UNET,
        model_channels=channels,
        context_dim=context_dim,
        num_res_blocks=[2, 2, 2, 2],
        channel_mult=[1, 2, 4, 4],
        transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0],
        transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    )
    cfg = comfy.supported_models.SD15(unet)
    cfg.set_inference_dtype(dtype, None)
    model = comfy.model_base.BaseModel(cfg, model_type=comfy.model_base.ModelType.EPS, device=torch.device("cpu"))
    harness.randomize_(model)
    device = comfy.model_management.get_torch_device()
    return comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=torch.device("cpu"))


def step_times(model: Any, steps: int, cfg: float, latent: Any, cond: list, uncond: list) -> list[float]:
    """One ``euler`` / ``simple`` run; the seconds between consecutive step callbacks (steps - 1 values).

    On CUDA the marks are CUDA events, so the intervals are the device's timeline, idle gaps
    from host-side work or synchronisation included; nothing is synchronised inside the run.
    """
    import comfy.sample
    import torch

    cuda = model.load_device.type == "cuda"
    marks: list[Any] = []

    def callback(*_: Any) -> None:
        marks.append(torch.cuda.Event(enable_timing=True) if cuda else time.perf_counter())
        if cuda:
            marks[-1].record()

    noise = comfy.sample.prepare_noise(latent, 0)
    comfy.sample.sample(
        model, noise, steps, cfg, "euler", "simple", cond, uncond, latent, callback=callback, disable_pbar=True, seed=0
    )
    if cuda:
        torch.cuda.synchronize()
        return [a.elapsed_time(b) / 1000 for a, b in zip(marks, marks[1:])]
    return [b - a for a, b in zip(marks, marks[1:])]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--channels", type=int, default=64, help="UNet model_channels (SD1.5: 320; multiple of 32)")
    ap.add_argument("--context-dim", type=int, default=768, help="cross-attention context width (SD1.5: 768)")
    ap.add_argument("--size", type=int, default=32, help="latent height = width (4 channels)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--cfg", type=float, nargs="+", default=[1.0], help="one table row pair per value (1 skips uncond)")
    ap.add_argument("--steps", type=int, default=10, help="sampling steps per run (>= 2)")
    ap.add_argument("--repeats", type=int, default=7, help="timed runs per variant and cfg")
    ap.add_argument("--warmup", type=int, default=2, help="untimed runs per variant and cfg")
    ap.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], help="default: fp16 on CUDA, fp32 otherwise")
    ap.add_argument(
        "--quick", action="store_true", help="a seconds-long run that checks the script (figures meaningless)"
    )
    args = ap.parse_args()
    if args.quick:
        args.channels, args.size, args.steps, args.repeats, args.warmup = 32, 16, 2, 1, 0
    if args.steps < 2:
        ap.error("--steps must be at least 2")

    harness = import_comfyui()
    ms = load_model_sampling()
    import comfy.model_management
    import torch

    device = comfy.model_management.get_torch_device()
    dtype_name = args.dtype or ("fp16" if device.type == "cuda" else "fp32")
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype_name]
    base = build_sd15_shaped(harness, args.channels, args.context_dim, dtype)
    variants = {"unpatched": base, "patched": ms.patch_model(base)}
    n_params = sum(p.numel() for p in base.model.diffusion_model.parameters())

    gen = torch.Generator().manual_seed(0)
    latent = torch.zeros(args.batch, 4, args.size, args.size)
    cond = [[torch.randn(args.batch, 77, args.context_dim, generator=gen), {}]]
    uncond = [[torch.randn(args.batch, 77, args.context_dim, generator=gen), {}]]

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {device} ({name})  torch {torch.__version__}  dtype {dtype_name}")
    print(
        f"UNet: SD1.5 layout, model_channels {args.channels}, context_dim {args.context_dim}, "
        f"{n_params / 1e6:.2f} M parameters; latent {args.batch}x4x{args.size}x{args.size}"
    )
    print(f"euler / simple, {args.steps} steps per run, {args.repeats} timed runs per variant (interleaved ABBA)\n")
    print(f"{'cfg':>5} {'variant':<10} {'median s/step':>14} {'min s/step':>11} {'ratio':>7}")
    noisy = False
    for cfg in args.cfg:
        times: dict[str, list[float]] = {k: [] for k in variants}
        for i in range(args.warmup + args.repeats):
            order = list(variants) if i % 2 == 0 else list(variants)[::-1]  # ABBA pairs cancel drift
            for key in order:
                t = step_times(variants[key], args.steps, cfg, latent, cond, uncond)
                if i >= args.warmup:
                    times[key].extend(t)
        med = {k: statistics.median(v) for k, v in times.items()}
        for key in variants:
            ratio = f"{med[key] / med['unpatched']:.3f}" if key == "patched" else ""
            print(f"{cfg:>5g} {key:<10} {med[key]:>14.4f} {min(times[key]):>11.4f} {ratio:>7}")
            noisy = noisy or med[key] > 1.1 * min(times[key])
    print("\ntarget: patched / unpatched <= 1.02")
    if noisy:
        print("warning: medians exceed the minima by > 10%: the machine is busy; rerun or raise --repeats")


if __name__ == "__main__":
    main()
