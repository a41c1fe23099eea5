"""Training speed and peak memory: Train Diff2Flow LoRA vs. stock TrainLoraNode vs. a bare PyTorch loop,
for every adapter algorithm (``--algorithms``: LoRA, LoHa, LoKr, OFT, DoRA).

All three train the same random-weight SD1.5-shaped UNet (ComfyUI's classes; 4 levels, 2 res blocks,
attention on the first 3 levels, context 768, width ``--channels``) on the same batch (4 latents
4x32x32 (``--size``), one fixed [1, 77, 768] conditioning), batch size 4, rank 8, fp32 (``--dtype bf16``: bf16
autocast in all three), AdamW lr 1e-4, with the same
algorithm (stock TrainLoraNode offers LoRA, LoHa, LoKr and OFT; DoRA is ours and bare only):

- ``ours``:  ``train_lora`` of this pack (diff2flow objective), d2f_core adapters as ComfyUI weight
  wrappers on the layers of ``--targets`` ("all" = every Linear and Conv weight of the UNet; no biases,
  no norms; "attention_ff" = attn1/attn2 q, k, v, out + ff.net.0.proj, ff.net.2).
- ``stock``: ComfyUI's TrainLoraNode (x0 MSE). Its targets are fixed: an adapter on EVERY Linear and Conv
  weight, plus a full-size trainable diff on every norm weight and on every bias (it has no option).
  It hands the sampler one conditioning per latent, and ComfyUI runs each conditioning over the whole
  batch, so its UNet sees 4 x 4 = 16 samples per step (the "UNet batch" column).
- ``bare``:  plain PyTorch on ``model.model.diffusion_model``: the same d2f_core adapters on the same
  ``--targets`` layers through ``torch.nn.utils.parametrize``, ``d2f_core.objective_loss("diff2flow")``,
  ``torch.optim.AdamW``; no ModelPatcher, no weight wrappers.

Each run is a separate subprocess (``--only``), so peak RSS (``ru_maxrss`` at the end of the child, the
whole process: ComfyUI + pack import, model, training) is per trainer; on CUDA also
``torch.cuda.max_memory_allocated``. Step times come from an optimizer step post-hook (the same for all
three); the first ``--warmup`` steps are excluded; s/step is the median (and mean) of the timed steps.
``--gradient-checkpointing`` applies to all three (each recomputes the layers inside the UNet's blocks).
Ratios per algorithm and target: ours/stock speed (goal >= 2), ours/stock peak RSS (<= 0.6), ours/bare step
time (<= 1.15).
The machine should be otherwise idle: a second busy process on the cores skews the step times badly.

    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/train_speed.py [--steps 6] [--warmup 1] [--channels 64]
        [--targets all,attention_ff] [--algorithms LoRA,LoHa,LoKr,OFT,DoRA] [--gradient-checkpointing] [--threads N]

``--previews EVERY`` measures instead what sample previews cost a run (:func:`previews_child`): ``ours``
trains ``--preview-run-steps`` steps without previews and again with ``preview_every`` EVERY (previews
at step 0 and every EVERY steps), in one process; it reports both runs' wall times, the previews' own
time (sampling + decoding, summed over the previews) and the rest, which should be about 0 (target: a run
with previews costs at most the previews' own time, + 2 % of the run for timing noise).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import os
import pathlib
import re
import resource
import statistics
import subprocess
import sys
import time
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.append(
    str(ROOT)
)  # a fresh clone: d2f_core, training, d2f_host without installing (appended: ComfyUI's nodes.py wins)
BATCH, LATENT, CONTEXT, RANK, LR = 4, (4, 32, 32), 768, 8, 1e-4
STOCK_ALGORITHMS = ("LoRA", "LoHa", "LoKr", "OFT")  # the algorithm choices of ComfyUI 0.8.0's TrainLoraNode
QUICK_ALGORITHMS = "OFT"  # --quick: the 3 trainers once, on a non-LoRA algorithm so its choice must reach all three
# an adapter tensor's name after its module path (stock's and ours), e.g. ".lora_up.weight", ".oft_blocks"
ADAPTER_TENSOR = re.compile(
    r"\.(lora_(up|down|mid)\.weight|dora_scale|hada_w[12]_[ab]|hada_t[12]|lokr_w[12](_[ab])?|lokr_t2|"
    r"oft_blocks|rescale|alpha)$"
)


def check_comfyui() -> None:
    path = os.environ.get("COMFYUI_PATH", "")
    if (
        not (path and (pathlib.Path(path) / "comfy" / "model_management.py").is_file())
        and ROOT.parent.name != "custom_nodes"
    ):
        sys.exit(f"ComfyUI not found: set COMFYUI_PATH to a ComfyUI 0.8.0 source tree (got {path!r})")


def load_comfyui() -> tuple[Any, Any, Any]:
    """ComfyUI (via COMFYUI_PATH, the way the tests find it) with its nodes and this pack loaded:
    (NODE_CLASS_MAPPINGS, this pack's train_nodes module, its train_inputs module)."""
    check_comfyui()
    sys.path.insert(0, str(ROOT / "tests"))
    import comfy_harness  # puts ComfyUI on sys.path, picks CPU unless CUDA is present

    if comfy_harness.COMFYUI is None:
        sys.exit(comfy_harness.COMFYUI_IMPORT_ERROR or comfy_harness.SKIP_REASON)
    import comfy.utils

    import nodes

    comfy.utils.PROGRESS_BAR_ENABLED = False

    async def load() -> bool:
        await nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False)
        return await nodes.load_custom_node(str(ROOT))

    if not asyncio.run(load()):
        sys.exit("the Diff2Flow pack failed to load into ComfyUI")
    package = sys.modules[nodes.NODE_CLASS_MAPPINGS["D2F_ModelPatch"].__module__].__package__
    return (
        nodes.NODE_CLASS_MAPPINGS,
        importlib.import_module(package + ".train_nodes"),
        importlib.import_module(package + ".train_inputs"),
    )


def build_model(channels: int) -> Any:
    """SD1.5's UNet layout at width ``channels``, seed-fixed random fp32 weights, in a ModelPatcher."""
    import comfy.model_base
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models
    import torch
    from comfy_harness import TINY_UNET, randomize_

    unet = dict(
        TINY_UNET,
        model_channels=channels,
        context_dim=CONTEXT,
        num_res_blocks=[2, 2, 2, 2],
        channel_mult=[1, 2, 4, 4],
        transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0],
        transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
        transformer_depth_middle=1,
    )
    cfg = comfy.supported_models.SD15(unet)
    cfg.set_inference_dtype(torch.float32, None)
    model = comfy.model_base.BaseModel(cfg, model_type=comfy.model_base.ModelType.EPS, device=torch.device("cpu"))
    randomize_(model, seed=0)
    return comfy.model_patcher.ModelPatcher(
        model, load_device=comfy.model_management.get_torch_device(), offload_device=torch.device("cpu")
    )


def describe(unet: Any, lora_keys: list[str], algorithm: str) -> str:
    """Which layers a method trains, from its file's keys (``<module>.<adapter tensor>`` / ``.diff`` / ``.diff_b``)."""
    import torch

    paths = {ADAPTER_TENSOR.sub("", k).split("diffusion_model.", 1)[1] for k in lora_keys if ADAPTER_TENSOR.search(k)}
    mods = [unet.get_submodule(p) for p in sorted(paths)]
    lin = sum(isinstance(m, torch.nn.Linear) for m in mods)
    text = f"{algorithm} on {lin} Linear + {len(mods) - lin} Conv"
    diffs, biases = sum(k.endswith(".diff") for k in lora_keys), sum(k.endswith(".diff_b") for k in lora_keys)
    return text + (f" + {diffs} norm-weight diffs + {biases} bias diffs" if diffs or biases else "")


def child(args: argparse.Namespace) -> None:
    """Train with one method; print one ``RESULT {json}`` line."""
    import logging

    logging.disable(logging.WARNING)
    mappings, train_nodes, train_inputs = load_comfyui()
    import comfy.model_management
    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook

    from d2f_core import objective_loss
    from d2f_core.lora import adapters_state_dict, attach_parametrizations, make_adapter, select_target_modules
    from d2f_host.model_sampling import alignment_of
    from d2f_host.unet import gradient_checkpointing
    from training import TrainConfig

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    latents = torch.randn(BATCH, LATENT[0], args.size, args.size, generator=gen)
    context = torch.randn(1, 77, CONTEXT, generator=gen)
    model = build_model(args.channels)
    unet = model.model.diffusion_model
    total = args.warmup + args.steps
    cuda = comfy.model_management.get_torch_device().type == "cuda"
    marks: list[float] = []

    def on_step(*_: Any) -> None:
        if cuda:
            torch.cuda.synchronize()
        marks.append(time.perf_counter())

    register_optimizer_step_post_hook(on_step)
    unet_batch: list[int] = []
    unet.register_forward_pre_hook(
        lambda _m, a, k: unet_batch.append((a[0] if a else k["x"]).shape[0]), with_kwargs=True
    )
    setup_rss = (
        int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        if os.path.exists("/proc/self/statm")
        else 0
    )
    if args.only == "stock":
        import comfy.weight_adapter

        if args.algorithm not in comfy.weight_adapter.adapter_maps:
            sys.exit(f"stock TrainLoraNode has no algorithm {args.algorithm!r}")
        out = mappings["TrainLoraNode"].execute(
            model=[model],
            latents=[{"samples": latents}],
            positive=[[[context, {}]]],
            batch_size=[BATCH],
            grad_accumulation_steps=[1],
            steps=[total],
            learning_rate=[LR],
            rank=[RANK],
            optimizer=["AdamW"],
            loss_function=["MSE"],
            seed=[0],
            training_dtype=[args.dtype],
            lora_dtype=["fp32"],
            algorithm=[args.algorithm],
            gradient_checkpointing=[args.gradient_checkpointing],
            existing_lora=["[None]"],
            bucket_mode=[False],
        )
        lora = {k: v for k, v in out.result[1].items() if not k.endswith(".alpha")}
    elif args.only == "ours":
        config = TrainConfig(
            steps=total,
            batch_size=BATCH,
            rank=RANK,
            alpha=float(RANK),
            learning_rate=LR,
            targets=args.targets,
            algorithm=args.algorithm,
            dtype=args.dtype,
            gradient_checkpointing=args.gradient_checkpointing,
            seed=0,
        )
        inputs = train_inputs.TrainingInputs([{"samples": latents}], [[[context, {}]]])
        lora = train_nodes.train_lora(model, config, inputs, "bench").lora
        lora = {k: v for k, v in lora.items() if not k.endswith(".alpha")}
    else:
        d2f = alignment_of(model)
        device = comfy.model_management.get_torch_device()
        unet.requires_grad_(False)
        modules = select_target_modules(unet, args.targets)
        gen = torch.Generator().manual_seed(0)
        adapters = {
            n: make_adapter(args.algorithm, m.weight.shape, RANK, float(RANK), gen, weight=m.weight)
            for n, m in modules.items()
        }
        attach_parametrizations(modules, adapters)
        unet.to(device)
        optimizer = torch.optim.AdamW([p for a in adapters.values() for p in a.parameters()], lr=LR, weight_decay=0.01)
        x0 = model.model.process_latent_in(latents).to(device)
        cond = context.expand(BATCH, -1, -1).to(device)
        noise_gen = torch.Generator().manual_seed(0)
        # the same recompute granularity as the node (the layers inside the UNet's blocks)
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16")
        with gradient_checkpointing(unet, args.gradient_checkpointing):
            for _ in range(total):
                optimizer.zero_grad(set_to_none=True)
                with autocast:
                    loss = objective_loss(
                        "diff2flow", lambda x, t, **kw: unet(x, t, **kw), d2f, x0, generator=noise_gen, context=cond
                    ).loss
                loss.backward()
                optimizer.step()
        lora = {k: v for k, v in adapters_state_dict(adapters).items() if not k.endswith(".alpha")}
    if len(marks) != total:
        sys.exit(f"expected {total} optimizer steps, saw {len(marks)}")
    durations = [marks[i] - marks[i - 1] for i in range(args.warmup, total)]
    print(
        "RESULT "
        + json.dumps(
            {
                "sec_per_step": statistics.median(durations),
                "mean": statistics.mean(durations),
                "unet_batch": max(unet_batch),
                "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                "setup_rss": setup_rss,
                "cuda": torch.cuda.max_memory_allocated() if cuda else None,
                "trains": describe(unet, sorted(lora), args.algorithm),
                "params": sum(v.numel() for v in lora.values()),
                "threads": torch.get_num_threads(),
            }
        ),
        flush=True,
    )


class StandInVAE:
    """Decodes a latent [B, 4, h, w] to [B, 8h, 8w, 3] by upsampling (no VAE weights in this benchmark):
    the previews' time is then their sampling, and the decode's share stays small."""

    def decode(self, latent: Any) -> Any:
        import torch

        return torch.sigmoid(torch.nn.functional.interpolate(latent[:, :3], scale_factor=8)).permute(0, 2, 3, 1)


def previews_child(args: argparse.Namespace) -> None:
    """``ours`` without and with previews every ``args.previews`` steps: one ``RESULT {json}`` line."""
    import logging

    logging.disable(logging.WARNING)
    mappings, train_nodes, train_inputs = load_comfyui()
    import torch

    from training import TrainConfig
    from training.previews import Previewer

    if args.threads:
        torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(1)
    latents = torch.randn(BATCH, *LATENT, generator=gen)
    context = torch.randn(1, 77, CONTEXT, generator=gen)
    prompts = [[[torch.randn(1, 77, CONTEXT, generator=gen), {}]] for _ in range(args.preview_prompts)]
    negative = [[[torch.zeros(1, 77, CONTEXT), {}]]]
    model = build_model(args.channels)
    seconds: list[float] = []
    call = Previewer.__call__

    def timed(self: Previewer, trainer: Any) -> Any:
        made = call(self, trainer)
        seconds.append(made.seconds)
        return made

    Previewer.__call__ = timed  # the previews' own time, as each preview measures it

    def run(steps: int, every: int) -> float:
        config = TrainConfig(
            steps=steps,
            batch_size=BATCH,
            rank=RANK,
            alpha=float(RANK),
            learning_rate=LR,
            targets=args.targets,
            dtype="fp32",
            seed=0,
            preview_every=every,
            preview_steps=args.preview_steps,
            preview_width=LATENT[2] * 8,
            preview_height=LATENT[1] * 8,
        )
        start = time.perf_counter()
        inputs = train_inputs.TrainingInputs(
            [{"samples": latents}], [[[context, {}]]], negative, vae=StandInVAE(), preview_prompts=prompts
        )
        train_nodes.train_lora(model, config, inputs, "bench")
        return time.perf_counter() - start

    run(2, 1)  # warm-up (allocator, first-call costs) for both configurations
    seconds.clear()
    steps = args.preview_run_steps
    without = run(steps, 0)
    with_previews = run(steps, args.previews)
    print(
        "RESULT "
        + json.dumps(
            {"without": without, "with": with_previews, "previews": seconds, "threads": torch.get_num_threads()}
        ),
        flush=True,
    )


def previews_main(args: argparse.Namespace) -> None:
    """``--previews EVERY``: the cost of sample previews in a run (see the module docstring)."""
    check_comfyui()
    cmd = [
        sys.executable,
        __file__,
        "--only",
        "previews",
        "--previews",
        str(args.previews),
        "--targets",
        args.targets.split(",")[0],
        "--channels",
        str(args.channels),
        "--threads",
        str(args.threads),
        "--preview-run-steps",
        str(args.preview_run_steps),
        "--preview-steps",
        str(args.preview_steps),
        "--preview-prompts",
        str(args.preview_prompts),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.exit(f"previews failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    r = json.loads(lines[-1][len("RESULT ") :])
    own = sum(r["previews"])
    extra = r["with"] - r["without"] - own
    print(
        f"model_channels {args.channels}, batch {BATCH}x{LATENT}, rank {RANK}, fp32, targets {args.targets.split(',')[0]}, "
        f"{args.preview_run_steps} steps; previews every {args.previews} steps: {len(r['previews'])} previews of "
        f"{args.preview_prompts} prompts, {args.preview_steps} FM Euler steps at cfg 5, {LATENT[2] * 8}x{LATENT[1] * 8} "
        f"(stand-in decode); torch threads {r['threads']}"
    )
    print(f"run without previews      {r['without']:8.2f} s")
    print(f"run with previews         {r['with']:8.2f} s")
    print(f"previews' own time        {own:8.2f} s ({own / max(len(r['previews']), 1):.2f} s per preview)")
    verdict = "met" if extra <= 0.02 * r["without"] else "NOT met"
    print(
        f"previews: extra run time beyond the previews' own {extra:+.2f} s ({extra / r['without'] * 100:+.1f} % of the run; "
        f"target <= +2 %: {verdict})"
    )


def run_child(args: argparse.Namespace, only: str, algorithm: str, targets: str) -> dict[str, Any]:
    cmd = [
        sys.executable,
        __file__,
        "--only",
        only,
        "--algorithm",
        algorithm,
        "--targets",
        targets,
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--channels",
        str(args.channels),
        "--threads",
        str(args.threads),
        "--size",
        str(args.size),
        "--dtype",
        args.dtype,
    ] + (["--gradient-checkpointing"] if args.gradient_checkpointing else [])
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.exit(
            f"{only} {algorithm} ({targets}) failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        )
    return json.loads(lines[-1][len("RESULT ") :])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6, help="timed optimizer steps (after the warm-up)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed first steps")
    parser.add_argument("--channels", type=int, default=64, help="UNet model_channels (SD1.5: 320)")
    parser.add_argument(
        "--targets",
        default="all,attention_ff",
        help="comma list of targets for ours and bare (all, attention_ff, attention)",
    )
    parser.add_argument(
        "--algorithms",
        default="LoRA,LoHa,LoKr,OFT,DoRA",
        help="comma list of adapter algorithms (stock trains LoRA, LoHa, LoKr, OFT; DoRA: ours and bare only)",
    )
    parser.add_argument("--algorithm", default="LoRA", help="child mode: the one algorithm to train")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="for all three trainers")
    parser.add_argument("--size", type=int, default=LATENT[1], help="latent side (SD1.5 at 512 px: 64)")
    parser.add_argument(
        "--dtype", choices=["fp32", "bf16"], default="fp32", help="training precision of all three (bf16: autocast)"
    )
    parser.add_argument(
        "--threads", type=int, default=0, help="torch.set_num_threads in each trainer (0: torch's default)"
    )
    parser.add_argument(
        "--only", choices=["ours", "stock", "bare", "previews"], help="child mode: run one trainer, print RESULT json"
    )
    parser.add_argument("--quick", action="store_true", help="a short run that checks the script (figures meaningless)")
    parser.add_argument(
        "--previews",
        type=int,
        default=0,
        metavar="EVERY",
        help="measure the cost of sample previews every EVERY steps instead (see above)",
    )
    parser.add_argument("--preview-run-steps", type=int, default=200, help="steps of each run of --previews")
    parser.add_argument("--preview-steps", type=int, default=20, help="sampler steps of a preview (--previews)")
    parser.add_argument("--preview-prompts", type=int, default=2, help="prompts per preview (--previews)")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.warmup, args.channels, args.targets, args.algorithms = (
            1,
            1,
            32,
            "attention_ff",
            QUICK_ALGORITHMS,
        )
        if args.previews:
            args.previews, args.preview_run_steps, args.preview_steps, args.preview_prompts = 2, 4, 2, 1
    if args.only == "previews":
        return previews_child(args)
    if args.previews:
        return previews_main(args)
    if args.steps < 1 or args.warmup < 1:
        parser.error("--steps and --warmup must be >= 1")
    if args.only:
        args.targets = args.targets.split(",")[0]
        return child(args)
    check_comfyui()
    from d2f_core.lora import ALGORITHMS

    targets, algorithms = args.targets.split(","), args.algorithms.split(",")
    unknown = [a for a in algorithms if a not in ALGORITHMS]
    if unknown:
        parser.error(f"--algorithms: unknown {', '.join(unknown)} (choose from {', '.join(ALGORITHMS)})")
    load = os.getloadavg() if hasattr(os, "getloadavg") else (0.0, 0.0, 0.0)
    print(
        f"model_channels {args.channels}, batch {BATCH}x{(LATENT[0], args.size, args.size)}, rank {RANK}, {args.dtype}, "
        f"{args.warmup} warm-up + {args.steps} timed steps, "
        f"gradient checkpointing {'on' if args.gradient_checkpointing else 'off'}, {os.cpu_count()} CPUs, "
        f"load avg {load[0]:.2f} {load[1]:.2f} (1, 5 min)"
    )
    # rows: (method, algorithm, targets, result); stock only for the algorithms its node offers
    rows: list[tuple[str, str, str, dict[str, Any]]] = []
    for algorithm in algorithms:
        if algorithm in STOCK_ALGORITHMS:
            rows.append(("stock", algorithm, "(fixed)", run_child(args, "stock", algorithm, "all")))
        for t in targets:
            rows += [(m, algorithm, t, run_child(args, m, algorithm, t)) for m in ("ours", "bare")]
    cuda = rows[0][3]["cuda"] is not None
    load = os.getloadavg() if hasattr(os, "getloadavg") else (0.0, 0.0, 0.0)
    print(
        f"torch threads {rows[0][3]['threads']}, load avg after the runs {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} (1, 5, 15 min)"
    )
    print(
        f"\n{'method':<6} {'algo':<5} {'targets':<13} {'steps/s':>8} {'s/step':>7} {'(mean)':>7} {'UNet batch':>10} {'peak RSS':>9} {'setup RSS':>9}"
        + (f" {'CUDA peak':>9}" if cuda else "")
        + "  trains"
    )
    gb = lambda b: f"{b / 2**30:.2f} GB"  # noqa: E731
    for method, algorithm, t, r in rows:
        print(
            f"{method:<6} {algorithm:<5} {t:<13} {1 / r['sec_per_step']:>8.3f} {r['sec_per_step']:>7.2f} {r['mean']:>7.2f} {r['unet_batch']:>10}"
            f" {gb(r['rss']):>9} {gb(r['setup_rss']):>9}"
            + (f" {gb(r['cuda']):>9}" if cuda else "")
            + f"  {r['trains']} ({r['params'] / 1e6:.2f} M params)"
        )
    print()
    for algorithm in algorithms:
        stock = next((r for m, a, _, r in rows if m == "stock" and a == algorithm), None)
        for t in targets:
            ours, bare = (
                next(r for m, a, tt, r in rows if (m, a, tt) == (name, algorithm, t)) for name in ("ours", "bare")
            )
            rel = ours["sec_per_step"] / bare["sec_per_step"]
            if stock is None:
                vs_stock = "no stock trainer"
            else:
                speed, mem = stock["sec_per_step"] / ours["sec_per_step"], ours["rss"] / stock["rss"]
                vs_stock = (
                    f"ours/stock speed {speed:.2f}x (target >= 2), ours/stock peak RSS {mem:.2f}x (target <= 0.6)"
                    + (f", CUDA {ours['cuda'] / stock['cuda']:.2f}x" if cuda else "")
                )
            print(f"[{algorithm} {t}] {vs_stock}, ours/bare step time {rel:.3f}x (target <= 1.15)")


if __name__ == "__main__":
    main()
