"""Peak memory and step time of one LoRA training step at real size: full-size SD1.5 (512 px) and SDXL
(1024 px) UNets with random weights, built through ComfyUI's own classes, trained by this pack's run
assembly (``d2f_host.training_run.prepare_run``, as the node and the ``train`` command assemble a run):
``diff2flow`` objective, LoRA rank 16 (alpha 16) on the ``attention_ff`` targets (attn1 / attn2 q, k, v,
out + ff.net.0.proj, ff.net.2, the definition train_speed.py uses), AdamW lr 1e-4.

Each configuration runs in its own subprocess: the UNet is built (``comfy.supported_models.SD15`` / ``SDXL``
with the real UNet configuration, ``comfy.model_base.BaseModel`` / ``SDXL``, a ``ModelPatcher``), its base
weights stored in the configuration's dtype the way UNETLoader's ``weight_dtype`` stores them (the dtype, and
ComfyUI's manual cast where ``comfy.model_management.unet_manual_cast`` picks one), then one step is
trained and timed (``--steps N``: N steps, the last timed; peak memory is the figure that
matters: a later step adds the AdamW state, 8 bytes per LoRA parameter, to it). Configurations:

- weights ``fp32`` / ``bf16`` / ``fp8_e4m3fn``: the dtype the base UNet is stored in;
- ``dtype`` (``TrainConfig.dtype``): ``fp32``, or ``bf16`` autocast (the trainer's mixed precision; the
  adapters stay fp32);
- gradient checkpointing off / on (``TrainConfig.gradient_checkpointing``);
- text conditioning cached (what the trainer takes: encoded captions; the default) or the text encoder(s)
  resident: ComfyUI's CLIP-L (SD1.5) / CLIP-L + OpenCLIP bigG (SDXL) with random fp16 weights (the dtype
  ComfyUI gives text encoders) encode the captions and stay loaded through the training step, as in a graph
  that encodes the captions and trains in one run.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` over the whole child, the base weights included; on
the CPU the child's peak resident set (``ru_maxrss``) minus its resident set right after the imports, before
the model is built (so it is the model + the step, comparable to the CUDA figure), with glibc's mmap threshold
fixed at 256 KiB so that freed tensors leave the resident set (RSS still counts some allocator slack). Attention is PyTorch's scaled-dot-product attention, which ComfyUI picks on NVIDIA GPUs
(memory linear in the tokens; on the CPU ComfyUI would pick its sub-quadratic attention, whose chunks the
backward pass keeps: see ``import_host``). On the CPU each child's data segment
is limited (``RLIMIT_DATA``, ``--limit-gib``, 17 GiB by default) so that a configuration that does not fit
fails with an allocation error: it is reported as not fitting, and batch 1 and 2 give its per-sample slope
(SDXL, minutes a step on the CPU: batch 1 and 2). The run also measures the optimizer state of the LoRA under torch's AdamW, bitsandbytes' AdamW8bit
and torchao's AdamW8bit / AdamW4bit / AdamWFp8 where those packages import (one step on the real adapter
shapes). Full runs write benchmarks/results/memory.md and .json; ``--quick`` (small UNets, tiny latents)
checks the script and writes to a temporary folder.

    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/memory.py [--device cpu|cuda] [--models sd15,sdxl]
        [--threads N] [--limit-gib 17] [--out DIR] [--quick]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import resource
import subprocess
import sys
import time
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.append(str(ROOT))  # a fresh clone: the layers without installing (appended: ComfyUI's nodes.py wins)
RANK, TARGETS, LR = 16, "attention_ff", 1e-4
GIB = 2**30
FIT_BUDGETS_GB = (8, 12, 16, 24)
# a GPU of N GB runs a training step whose peak allocation is at most N GiB less this (the CUDA context and
# the caching allocator's slack)
GPU_HEADROOM_GIB = 1.0
MMAP_THRESHOLD = 256 * 1024  # bytes: the CPU children's glibc mmap threshold (run_child)


@dataclasses.dataclass(frozen=True)
class Shape:
    """A model family at its training resolution: the UNet configuration of ComfyUI's detection
    (``comfy.model_detection.unet_config_from_diffusers_unet``), the latent side, the text encoders."""

    name: str
    family: str  # the class of comfy.supported_models
    unet: dict
    pixels: int
    context_dim: int
    pooled_dim: int | None  # SDXL's pooled text embedding (the y vector)
    text_encoders: str  # what --text-encoders makes resident


_BASE = {
    "use_checkpoint": False,
    "image_size": 32,
    "out_channels": 4,
    "use_spatial_transformer": True,
    "legacy": False,
    "in_channels": 4,
    "model_channels": 320,
    "use_temporal_attention": False,
    "use_temporal_resblock": False,
}
SHAPES = {
    "sd15": Shape(
        "sd15",
        "SD15",
        dict(
            _BASE,
            adm_in_channels=None,
            num_res_blocks=[2, 2, 2, 2],
            transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0],
            channel_mult=[1, 2, 4, 4],
            transformer_depth_middle=1,
            use_linear_in_transformer=False,
            context_dim=768,
            num_heads=8,
            transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
        ),
        512,
        768,
        None,
        "CLIP-L",
    ),
    "sdxl": Shape(
        "sdxl",
        "SDXL",
        dict(
            _BASE,
            num_classes="sequential",
            adm_in_channels=2816,
            num_res_blocks=[2, 2, 2],
            transformer_depth=[0, 0, 2, 2, 10, 10],
            channel_mult=[1, 2, 4],
            transformer_depth_middle=10,
            use_linear_in_transformer=True,
            context_dim=2048,
            num_head_channels=64,
            transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10],
        ),
        1024,
        2048,
        1280,
        "CLIP-L + OpenCLIP bigG",
    ),
}
# --quick: the same families, shrunk (2 levels, 32 / 64 channels, 128 px); text encoders of 3 layers
QUICK_SHAPES = {
    "sd15": dataclasses.replace(
        SHAPES["sd15"],
        unet=dict(
            SHAPES["sd15"].unet,
            model_channels=32,
            num_res_blocks=[1, 1],
            channel_mult=[1, 2],
            transformer_depth=[1, 1],
            transformer_depth_output=[1, 1, 1, 1],
        ),
        pixels=128,
    ),
    "sdxl": dataclasses.replace(
        SHAPES["sdxl"],
        unet=dict(
            SHAPES["sdxl"].unet,
            model_channels=64,
            num_res_blocks=[1, 1],
            channel_mult=[1, 2],
            transformer_depth=[0, 1],
            transformer_depth_output=[0, 0, 1, 1],
            transformer_depth_middle=1,
            num_head_channels=32,
        ),
        pixels=128,
    ),
}
QUICK_TEXT_ENCODER_LAYERS = 3  # SDXL reads the penultimate layer: ComfyUI needs 3 at least


@dataclasses.dataclass(frozen=True)
class Config:
    """One configuration of a training step (a row of the table)."""

    name: str
    weights: str = "fp32"  # the base UNet's stored dtype: fp32, bf16, fp8_e4m3fn (UNETLoader's weight_dtype)
    dtype: str = "fp32"  # TrainConfig.dtype: fp32, or bf16 autocast
    checkpointing: bool = False
    text_encoders: bool = False  # the text encoders resident (else: cached conditioning)
    optimizer: str = "AdamW"

    def describe(self) -> str:
        parts = [f"weights {self.weights}", "bf16 autocast" if self.dtype == "bf16" else "fp32 compute"]
        parts.append("checkpointing" if self.checkpointing else "no checkpointing")
        parts.append("text encoders resident" if self.text_encoders else "cached conditioning")
        if self.optimizer != "AdamW":
            parts.append(self.optimizer)
        return ", ".join(parts)


CONFIGS = {
    c.name: c
    for c in (
        Config("fp32"),
        Config("bf16 autocast", dtype="bf16"),
        Config("bf16 weights", weights="bf16", dtype="bf16"),
        Config("fp32 + ckpt", checkpointing=True),
        Config("bf16 weights + ckpt", weights="bf16", dtype="bf16", checkpointing=True),
        Config("fp8 weights", weights="fp8_e4m3fn", dtype="bf16"),
        Config("fp8 weights + ckpt", weights="fp8_e4m3fn", dtype="bf16", checkpointing=True),
        Config("bf16 weights + text encoders", weights="bf16", dtype="bf16", text_encoders=True),
        Config(
            "bf16 weights + ckpt + text encoders", weights="bf16", dtype="bf16", checkpointing=True, text_encoders=True
        ),
        Config("bf16 weights + AdamW8bit", weights="bf16", dtype="bf16", optimizer="AdamW8bit"),
    )
}
# (model, configuration, batches), in the order they run (SDXL first: its steps are the long ones). SD1.5 at
# batch 1 and, for the rows the 8-24 GB question turns on, 4; SDXL (minutes a step on 1 CPU core) at batch 1,
# and 2 for the slope of the rows that fit. A batch that does not fit is followed by batch 2 (the measured
# slope) when batch 1 fits.
PLAN = [
    ("sdxl", "bf16 weights + ckpt", (1, 2)),
    ("sdxl", "fp8 weights + ckpt", (1, 2)),
    ("sdxl", "bf16 weights", (1,)),
    ("sdxl", "fp32", (1,)),
    ("sd15", "fp32", (1, 4)),
    ("sd15", "bf16 autocast", (1,)),
    ("sd15", "bf16 weights", (1, 4)),
    ("sd15", "fp32 + ckpt", (1,)),
    ("sd15", "bf16 weights + ckpt", (1, 4)),
    ("sd15", "fp8 weights", (1,)),
    ("sd15", "fp8 weights + ckpt", (1,)),
    ("sd15", "bf16 weights + text encoders", (1,)),
    ("sd15", "bf16 weights + AdamW8bit", (1,)),
]
QUICK_PLAN = [  # every code path once: a slope, fp8 and bf16 weights, checkpointing, the text encoders, SDXL's y
    ("sd15", "fp32", (1, 2)),
    ("sd15", "bf16 weights + text encoders", (1,)),
    ("sdxl", "fp8 weights + ckpt", (1,)),
]


# ---------------------------------------------------------------------- the child: one training step
def resident_bytes() -> int:
    """The process's resident set now (Linux: /proc/self/statm)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_resident_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def import_host() -> Any:
    """ComfyUI on sys.path the way the tests put it (CPU unless CUDA is present), with PyTorch's attention
    (``--use-pytorch-cross-attention``): what ComfyUI picks on NVIDIA GPUs, where its memory is linear in the
    tokens. On the CPU ComfyUI would pick its sub-quadratic attention, whose chunks autograd keeps for the
    backward pass (SD1.5 at 512 px, fp32, batch 1: 10.0 GiB instead of 6.3)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from patch_overhead import import_comfyui

    harness = import_comfyui()
    import comfy.cli_args

    assert "comfy.model_management" not in sys.modules, "the attention must be chosen before ComfyUI starts"
    comfy.cli_args.args.use_pytorch_cross_attention = True
    return harness


def build_unet(harness: Any, shape: Shape, weights: str) -> Any:
    """The full-size (or --quick) UNet of ``shape`` in a ModelPatcher, base weights stored as ``weights``
    with ComfyUI's manual cast where it picks one (as a UNETLoader with that weight_dtype loads it)."""
    import comfy.model_base
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp8_e4m3fn": torch.float8_e4m3fn}[weights]
    device = comfy.model_management.get_torch_device()
    cfg = getattr(comfy.supported_models, shape.family)(dict(shape.unet))
    cfg.set_inference_dtype(
        dtype, comfy.model_management.unet_manual_cast(dtype, device, cfg.supported_inference_dtypes)
    )
    model_class = comfy.model_base.SDXL if shape.family == "SDXL" else comfy.model_base.BaseModel
    model = model_class(cfg, model_type=comfy.model_base.ModelType.EPS, device=torch.device("cpu"))
    harness.randomize_(model, seed=0)
    return comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=torch.device("cpu"))


def text_encoders(shape: Shape, quick: bool) -> Any:
    """ComfyUI's CLIP of ``shape`` (SD1.5: CLIP-L; SDXL: CLIP-L + OpenCLIP bigG) with random weights in the
    dtype ComfyUI gives text encoders; ``quick``: 3 layers each."""
    import comfy.sd
    import comfy.sd1_clip
    import comfy.sdxl_clip
    import comfy.supported_models_base
    from comfy_harness import randomize_

    options = {}
    if quick:
        layers = {"num_hidden_layers": QUICK_TEXT_ENCODER_LAYERS}
        options = {"clip_l_model_config": layers, "clip_g_model_config": layers}
    if shape.family == "SDXL":
        target = comfy.supported_models_base.ClipTarget(comfy.sdxl_clip.SDXLTokenizer, comfy.sdxl_clip.SDXLClipModel)
    else:
        target = comfy.supported_models_base.ClipTarget(comfy.sd1_clip.SD1Tokenizer, comfy.sd1_clip.SD1ClipModel)
    clip = comfy.sd.CLIP(target, model_options=options)
    randomize_(clip.cond_stage_model, seed=1, std=0.02)
    return clip


def child(args: argparse.Namespace) -> None:
    """One configuration at one batch size: prints one ``RESULT {json}`` line."""
    import logging

    logging.disable(logging.WARNING)
    harness = import_host()
    import comfy.model_management
    import torch

    from d2f_host.conditioning import cond_kwargs
    from d2f_host.training_run import RunData, prepare_run
    from training import TrainConfig, TrainingData

    if args.threads:
        torch.set_num_threads(args.threads)
    shape = (QUICK_SHAPES if args.quick else SHAPES)[args.model]
    config = CONFIGS[args.config]
    device = comfy.model_management.get_torch_device()
    cuda = device.type == "cuda"
    after_imports = resident_bytes()
    result: dict[str, Any] = {"rss_after_imports": after_imports, "device": str(device)}
    try:
        model = build_unet(harness, shape, config.weights)
        unet = model.model.diffusion_model
        result["unet_params"] = sum(p.numel() for p in unet.parameters())
        result["weight_bytes"] = sum(p.numel() * p.element_size() for p in unet.parameters())
        result["rss_after_model"] = resident_bytes() - after_imports
        gen = torch.Generator().manual_seed(0)
        side = shape.pixels // 8
        latents = torch.randn(args.batch, 4, side, side, generator=gen)
        encoders = None
        if config.text_encoders:
            encoders = text_encoders(shape, args.quick)
            tokens = encoders.tokenize("a photograph of an astronaut riding a horse")
            context, pooled = encoders.encode_from_tokens(tokens, return_pooled=True)
            entry = (context.float(), {"pooled_output": pooled.float()} if shape.pooled_dim else {})
        else:
            context = torch.randn(1, 77, shape.context_dim, generator=gen)
            pooled = torch.randn(1, shape.pooled_dim, generator=gen) if shape.pooled_dim else None
            entry = (context, {"pooled_output": pooled} if pooled is not None else {})
        scaled = model.model.process_latent_in(latents)
        data = TrainingData(
            list(scaled),
            [cond_kwargs(model, entry, lat) for lat in latents],
            [cond_kwargs(model, entry, lat) for lat in latents],
        )
        train = TrainConfig(
            objective="diff2flow",
            steps=args.steps,
            batch_size=args.batch,
            rank=RANK,
            alpha=float(RANK),
            targets=TARGETS,
            learning_rate=LR,
            optimizer=config.optimizer,
            dtype=config.dtype,
            gradient_checkpointing=config.checkpointing,
            seed=0,
        )
        if cuda:
            torch.cuda.synchronize()
        run = prepare_run(model, train, lambda: RunData(data))
        result["lora_params"] = sum(p.numel() for a in run.adapters.values() for p in a.parameters())
        result["adapters"] = len(run.adapters)
        marks = [time.perf_counter()]

        def on_step(*_: Any) -> None:
            if cuda:
                torch.cuda.synchronize()
            marks.append(time.perf_counter())

        with run.training() as trainer:
            trainer.run(on_step=on_step)
        result["step_seconds"] = [b - a for a, b in zip(marks, marks[1:])]
        result["loss"] = run.trainer.losses[-1]
        result["fits"] = True
        del encoders  # resident until here: through the training step
    except (MemoryError, RuntimeError) as exc:  # the allocation that did not fit (RLIMIT_DATA, or the GPU's memory)
        text = str(exc)
        if not isinstance(exc, MemoryError) and "allocate" not in text and "out of memory" not in text:
            raise
        result["fits"] = False
        result["error"] = text.splitlines()[0][:300]
    result["peak"] = torch.cuda.max_memory_allocated() if cuda else peak_resident_bytes() - after_imports
    result["peak_reserved"] = torch.cuda.max_memory_reserved() if cuda else None
    result["threads"] = torch.get_num_threads()
    print("RESULT " + json.dumps(result), flush=True)


def encoders_child(args: argparse.Namespace) -> None:
    """The text encoders alone: built, one caption encoded; prints ``RESULT {json}`` (peak over the imports)."""
    import logging

    logging.disable(logging.WARNING)
    import_host()
    import torch

    cuda = torch.cuda.is_available()
    after_imports = resident_bytes()
    clip = text_encoders((QUICK_SHAPES if args.quick else SHAPES)[args.model], args.quick)
    clip.encode_from_tokens(clip.tokenize("a photograph of an astronaut riding a horse"), return_pooled=True)
    params = sum(p.numel() for p in clip.cond_stage_model.parameters())
    peak = torch.cuda.max_memory_allocated() if cuda else peak_resident_bytes() - after_imports
    print("RESULT " + json.dumps({"params": params, "peak": peak}), flush=True)


# ---------------------------------------------------------------------- the optimizer state of the LoRA
def optimizer_states_child(args: argparse.Namespace) -> None:
    """The state bytes of each optimizer over the LoRA's real parameter shapes: prints ``RESULT {json}``."""
    import logging

    logging.disable(logging.WARNING)
    harness = import_host()
    import comfy.model_base
    import comfy.supported_models
    import torch

    from d2f_core.lora import make_adapter, select_target_modules

    shape = (QUICK_SHAPES if args.quick else SHAPES)[args.model]
    cfg = getattr(comfy.supported_models, shape.family)(dict(shape.unet))
    cfg.set_inference_dtype(torch.float32, None)
    model_class = comfy.model_base.SDXL if shape.family == "SDXL" else comfy.model_base.BaseModel
    unet = model_class(cfg, device=torch.device("meta")).diffusion_model  # shapes only
    del harness
    gen = torch.Generator().manual_seed(0)
    shapes = [m.weight.shape for m in select_target_modules(unet, TARGETS).values()]

    def parameters() -> list[torch.nn.Parameter]:
        params = [p for s in shapes for p in make_adapter("LoRA", s, RANK, float(RANK), gen).parameters()]
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen) * 1e-3
        return params

    def state_bytes(optimizer: torch.optim.Optimizer) -> int:
        total = 0
        for state in optimizer.state.values():
            for value in state.values():
                if not torch.is_tensor(value):
                    continue
                inner = value.__tensor_flatten__()[0] if hasattr(value, "__tensor_flatten__") else None
                tensors = [getattr(value, n) for n in inner] if inner else [value]
                total += sum(t.numel() * t.element_size() for t in tensors)
        return total

    def torchao(name: str) -> Any:
        def build(p: list) -> Any:
            import torchao.optim

            return getattr(torchao.optim, name)(p, lr=LR)

        return build

    def bnb(p: list) -> Any:
        import bitsandbytes

        return bitsandbytes.optim.AdamW8bit(p, lr=LR)

    candidates = {
        "torch AdamW (fp32 states)": ("torch", lambda p: torch.optim.AdamW(p, lr=LR)),
        "bitsandbytes AdamW8bit": ("bitsandbytes", bnb),
        "torchao AdamW8bit": ("torchao", torchao("AdamW8bit")),
        "torchao AdamW4bit": ("torchao", torchao("AdamW4bit")),
        "torchao AdamWFp8": ("torchao", torchao("AdamWFp8")),
    }
    params = parameters()
    rows = {}
    for name, (package, build) in candidates.items():
        try:
            optimizer = build(params)
            optimizer.step()
            rows[name] = {"package": package, "bytes": state_bytes(optimizer)}
        except Exception as exc:  # a package that is missing or does not run here: said in the report
            rows[name] = {"package": package, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen) * 1e-3
    n = sum(p.numel() for p in params)
    print("RESULT " + json.dumps({"lora_params": n, "adapters": len(shapes), "optimizers": rows}), flush=True)


# ---------------------------------------------------------------------- the parent: the plan and the report
def run_child(args: argparse.Namespace, extra: list[str]) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--device", args.device, "--threads", str(args.threads), *extra]
    if args.quick:
        cmd.append("--quick")
    env = dict(os.environ)
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # the harness picks CUDA whenever it is there
        # glibc returns a freed block of this size or more to the system at once (mmap), so the resident set
        # follows the live tensors as CUDA's allocated bytes do, rather than keeping freed heap (its default
        # threshold grows to 32 MiB; SD1.5 bf16 batch 1 then peaks 0.38 GiB higher)
        env.setdefault("MALLOC_MMAP_THRESHOLD_", str(MMAP_THRESHOLD))
    limit = int(args.limit_gib * GIB)

    def limit_memory() -> None:  # in the child, before it runs: a configuration that does not fit fails to allocate
        resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))

    start = time.perf_counter()
    proc = subprocess.run(
        cmd, capture_output=True, text=True, env=env, preexec_fn=limit_memory if args.device == "cpu" else None
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stdout[-1500:] + proc.stderr[-3000:]).strip()
        print(f"  child {' '.join(extra)} failed (exit {proc.returncode}):\n{tail}", flush=True)
        return {"fits": False, "error": f"exit {proc.returncode}: {tail.splitlines()[-1] if tail else ''}"}
    result = json.loads(lines[-1][len("RESULT ") :])
    result["wall_seconds"] = time.perf_counter() - start
    return result


def gib(n: float | None) -> str:
    return "-" if n is None else f"{n / GIB:.2f} GiB"


def measure(args: argparse.Namespace, model: str, name: str, batches: tuple[int, ...]) -> dict[str, Any]:
    """The configuration's runs at ``batches``; a batch that does not fit is followed by batch 2 (for the
    per-sample slope) when batch 1 fitted. Returns the row: runs by batch, the slope and the fit."""
    steps = args.steps
    runs: dict[int, dict[str, Any]] = {}
    todo = list(batches)
    while todo:
        batch = todo.pop(0)
        r = run_child(
            args, ["--child", "--model", model, "--config", name, "--batch", str(batch), "--steps", str(steps)]
        )
        runs[batch] = r
        time_text = f"{r['step_seconds'][-1]:.1f} s/step" if r.get("fits") else r.get("error", "")[:120]
        print(f"  {model} {name:<36} batch {batch}: {gib(r.get('peak'))} {time_text}", flush=True)
        if not r.get("fits"):
            if batch == 1:
                break
            if 2 not in runs and 2 not in todo and runs.get(1, {}).get("fits"):
                todo.append(2)
    row: dict[str, Any] = {"model": model, "config": name, "describe": CONFIGS[name].describe(), "steps": steps}
    row["runs"] = {str(b): r for b, r in runs.items()}
    return summarize(row, args.device)


def summarize(row: dict[str, Any], device: str) -> dict[str, Any]:
    """``row`` with its per-sample memory: the slope between the two smallest batches that fitted, and the
    estimate from batch 1 alone (its peak less the model as built: an upper bound, as the step's
    batch-independent memory counts as per-sample)."""
    fitted = {int(b): r for b, r in row["runs"].items() if r.get("fits")}
    if len(fitted) >= 2:
        (b0, r0), (b1, r1) = sorted(fitted.items())[:2]
        row["slope"] = (r1["peak"] - r0["peak"]) / (b1 - b0)
        row["base"] = r0["peak"] - b0 * row["slope"]
    if 1 in fitted:
        row["per_sample_from_batch1"] = fitted[1]["peak"] - weights_memory(fitted[1], device)
    return row


def weights_memory(run: dict[str, Any], device: str) -> float:
    """The batch-independent memory of a run: the model as built (CPU: its RSS; CUDA: its weights' bytes)."""
    return run["weight_bytes"] if device == "cuda" else run["rss_after_model"]


def estimate(row: dict[str, Any], batch: int, rows: list[dict[str, Any]] = ()) -> tuple[float | None, str]:
    """The peak at ``batch``: measured; else from the row's slope; else batch 1 plus the slope of a row of
    ``rows`` that computes the same way (same model, autocast dtype and checkpointing: its activations per
    sample are the same, only the weights' storage or what stays resident differs); else batch 1 plus the
    batch-1 estimate (an upper bound); or None."""
    r = row["runs"].get(str(batch))
    if r is not None and r.get("fits"):
        return r["peak"], "measured"
    if r is not None and batch <= 2:
        return None, "does not fit"
    if "slope" in row:
        return row["base"] + batch * row["slope"], "from the slope"
    one = row["runs"].get("1", {})
    if not one.get("fits"):
        return None, "not measured" if r is None else "does not fit"
    config = CONFIGS[row["config"]]
    for other in rows:
        same = CONFIGS[other["config"]]
        if (
            other["model"] == row["model"]
            and "slope" in other
            and (same.dtype, same.checkpointing)
            == (
                config.dtype,
                config.checkpointing,
            )
        ):
            return one["peak"] + (batch - 1) * other["slope"], f"slope of {other['config']}"
    return one["peak"] + (batch - 1) * row["per_sample_from_batch1"], "upper bound from batch 1"


def fits(peak: float | None, budget_gb: int) -> bool:
    return peak is not None and peak <= (budget_gb - GPU_HEADROOM_GIB) * GIB


def report(
    args: argparse.Namespace, rows: list[dict], encoders: dict[str, Any], optimizers: dict[str, Any], seconds: float
) -> str:
    device = (
        "CUDA (torch.cuda.max_memory_allocated)" if args.device == "cuda" else "CPU (peak RSS over RSS after imports)"
    )
    shapes = QUICK_SHAPES if args.quick else SHAPES
    lines = [
        "# Memory at real size" + (" (quick run: figures meaningless)" if args.quick else ""),
        "",
        f"Generated by `benchmarks/memory.py{' --quick' if args.quick else ''} --device {args.device}` in "
        f"{seconds / 60:.0f} min; {device}; torch threads {args.threads or 'default'} on {os.cpu_count()} CPUs; the "
        f"CPU children's data segment limited to {args.limit_gib:g} GiB. LoRA rank {RANK} on {TARGETS}, diff2flow, "
        f"AdamW, through d2f_host.training_run.prepare_run.",
        "",
        "## Models",
        "",
        "| model | resolution | latent | UNet | UNet parameters | LoRA parameters (adapters) |",
        "|---|---|---|---|---|---|",
    ]
    for name in dict.fromkeys(r["model"] for r in rows):
        shape = shapes[name]
        run = next((r for row in rows if row["model"] == name for r in row["runs"].values() if "unet_params" in r), {})
        lora = next((r for row in rows if row["model"] == name for r in row["runs"].values() if "lora_params" in r), {})
        u = shape.unet
        lines.append(
            f"| {name} | {shape.pixels} px | 4x{shape.pixels // 8}x{shape.pixels // 8} | model_channels "
            f"{u['model_channels']}, channel_mult {u['channel_mult']}, transformer_depth {u['transformer_depth']}, "
            f"context {shape.context_dim}"
            + (f", ADM {u['adm_in_channels']}" if u.get("adm_in_channels") else "")
            + f" | {run.get('unet_params', 0) / 1e6:.1f} M | {lora.get('lora_params', 0) / 1e6:.2f} M "
            f"({lora.get('adapters', '-')}) |"
        )
    lines += [
        "",
        "## Peak memory and step time",
        "",
        "| model | configuration | batch | peak memory | step time | weights (RSS after build) | what it is |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        for batch, r in sorted(row["runs"].items(), key=lambda kv: int(kv[0])):
            if r.get("fits"):
                t = r["step_seconds"][-1]
                cells = f"{gib(r['peak'])} | {t:.1f} s"
            else:
                cells = f"does not fit in {args.limit_gib:g} GiB here | -"
            lines.append(
                f"| {row['model']} | {row['config']} | {batch} | {cells} | {gib(r.get('rss_after_model'))} | "
                f"{row['describe']} |"
            )
    lines += [
        "",
        "Per-sample memory: the slope between two batch sizes that fitted (peak = base + batch x slope), and the "
        "estimate from batch 1 alone (its peak less the model as built: an upper bound, as it counts the step's "
        "batch-independent memory as per-sample). Batch 4, where it was not measured: from the row's slope, else "
        "batch 1 plus the slope of a measured row that computes the same way (same autocast dtype and "
        "checkpointing: the weights' storage and resident text encoders do not change the per-sample memory), "
        "else the batch-1 upper bound.",
        "",
        "| model | configuration | per sample (slope) | per sample (from batch 1) | batch 4 |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        if "slope" in row or "per_sample_from_batch1" in row:
            four, how = estimate(row, 4, rows)
            lines.append(
                f"| {row['model']} | {row['config']} | {gib(row.get('slope'))} | "
                f"{gib(row.get('per_sample_from_batch1'))} | {gib(four)} ({how}) |"
            )
    if encoders:
        lines += [
            "",
            "Text encoders alone (random fp16 weights as ComfyUI loads them; built and one caption encoded, no UNet): "
            "what keeping them resident adds to a row with cached conditioning.",
            "",
            "| model | text encoders | parameters | peak memory |",
            "|---|---|---|---|",
        ]
        for model, e in encoders.items():
            if "peak" in e:
                lines.append(
                    f"| {model} | {shapes[model].text_encoders} | {e['params'] / 1e6:.1f} M | {gib(e['peak'])} |"
                )
            else:
                lines.append(f"| {model} | {shapes[model].text_encoders} | - | failed: {e.get('error', '')} |")
    lines += [
        "",
        "## What fits a GPU of 8 / 12 / 16 / 24 GB",
        "",
        f"A configuration fits N GB when its peak is at most N - {GPU_HEADROOM_GIB:g} GiB (the CUDA context and the "
        "caching allocator's slack); batch 4 estimated as above where it was not measured.",
        "",
        "| model | configuration | batch | peak | " + " | ".join(f"{b} GB" for b in FIT_BUDGETS_GB) + " |",
        "|---|---|---|---|" + "---|" * len(FIT_BUDGETS_GB),
    ]
    for row in rows:
        for batch in (1, 4):
            peak, how = estimate(row, batch, rows)
            if how == "not measured":
                continue
            marks = " | ".join("yes" if fits(peak, b) else "no" for b in FIT_BUDGETS_GB)
            peak_text = (gib(peak) + ("" if how == "measured" else f" ({how})")) if peak else how
            lines.append(f"| {row['model']} | {row['config']} | {batch} | {peak_text} | {marks} |")
    if optimizers:
        lines += [
            "",
            "## Optimizer state of the LoRA",
            "",
            "One step of each optimizer over the LoRA's parameters (the real adapter shapes; the bytes of every state "
            "tensor, quantisation scales included).",
            "",
            "| model | LoRA parameters | optimizer | state | saving against AdamW |",
            "|---|---|---|---|---|",
        ]
        for model, found in optimizers.items():
            if "optimizers" not in found:
                lines.append(f"| {model} | - | - | {found.get('error', 'failed')} | - |")
                continue
            base = found["optimizers"]["torch AdamW (fp32 states)"].get("bytes")
            for name, o in found["optimizers"].items():
                if "bytes" in o:
                    saving = f"{(base - o['bytes']) / 2**20:.1f} MiB" if base else "-"
                    lines.append(
                        f"| {model} | {found['lora_params'] / 1e6:.2f} M | {name} | {o['bytes'] / 2**20:.1f} MiB | {saving} |"
                    )
                else:
                    lines.append(
                        f"| {model} | {found['lora_params'] / 1e6:.2f} M | {name} | not measured: {o['error']} | - |"
                    )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--models", default="sd15,sdxl", help="comma list of sd15, sdxl")
    parser.add_argument(
        "--threads", type=int, default=0, help="torch.set_num_threads in each child (0: torch's default)"
    )
    parser.add_argument("--steps", type=int, default=1, help="training steps per configuration (the last is timed)")
    parser.add_argument("--limit-gib", type=float, default=17.0, help="the CPU children's data segment limit")
    parser.add_argument(
        "--no-optimizers", dest="optimizers", action="store_false", help="skip the optimizer-state table"
    )
    parser.add_argument("--out", type=pathlib.Path, default=None, help="report folder (full run: benchmarks/results)")
    parser.add_argument(
        "--quick", action="store_true", help="small UNets and latents: checks the script (figures meaningless)"
    )
    # child mode
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--optimizer-states", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--encoders-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", choices=sorted(SHAPES), help=argparse.SUPPRESS)
    parser.add_argument("--config", choices=sorted(CONFIGS), help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    if args.optimizer_states:
        return optimizer_states_child(args)
    if args.encoders_only:
        return encoders_child(args)
    models = args.models.split(",")
    unknown = [m for m in models if m not in SHAPES]
    if unknown:
        parser.error(f"--models: unknown {', '.join(unknown)} (choose from {', '.join(SHAPES)})")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            parser.error("--device cuda: torch sees no CUDA device")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from paper_comparison import report_folder
    from train_speed import check_comfyui

    check_comfyui()
    out = report_folder(args.out, args.quick, "memory")
    out.mkdir(parents=True, exist_ok=True)
    stem = "memory_quick" if args.quick else "memory"
    start = time.perf_counter()
    rows: list[dict] = []
    encoders: dict[str, Any] = {}
    optimizers: dict[str, Any] = {}

    def write() -> str:  # after every row: a long run that is stopped keeps what it measured
        text = report(args, rows, encoders, optimizers, time.perf_counter() - start)
        (out / f"{stem}.md").write_text(text, encoding="utf-8")
        record = {
            "device": args.device,
            "threads": args.threads,
            "limit_gib": args.limit_gib,
            "quick": args.quick,
            "rows": rows,
            "text_encoders": encoders,
            "optimizers": optimizers,
        }
        (out / f"{stem}.json").write_text(json.dumps(record, indent=1), encoding="utf-8")
        return text

    for model, name, batches in (p for p in (QUICK_PLAN if args.quick else PLAN) if p[0] in models):
        rows.append(measure(args, model, name, batches))
        write()
    for model in models[:1] if args.quick else models:
        encoders[model] = run_child(args, ["--encoders-only", "--model", model])
        if args.optimizers:
            optimizers[model] = run_child(args, ["--optimizer-states", "--model", model])
        write()
    print()
    print(write())
    print(f"wrote {out / stem}.md and .json")


if __name__ == "__main__":
    main()
