"""``python -m training`` / ``diff2flow-train``: headless Diff2Flow LoRA training.

    prepare  image folder (+ .txt captions) + checkpoint -> latent cache (safetensors shards)
    train    latent cache + checkpoint + options -> LoRA (+ periodic saves, resumable state,
             metrics.jsonl, loss.png); one process, or many through torchrun (data parallel)
    sample   checkpoint (+ LoRA) + prompts -> PNGs with FM Euler / Heun

ComfyUI reads the checkpoints (``COMFYUI_PATH``, or the ComfyUI this pack is installed in), always
through ``d2f_host``. Every option of the Train Diff2Flow LoRA node is a ``train`` flag and a key of
the ``--config`` TOML file (both generated from ``TrainConfig``, training/config.py); flags win over the file, the file over the defaults. A resumed run starts from the options
saved in its state, so ``train --resume RUN.d2fstate`` with the same paths is enough.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import pathlib
import sys
from typing import Any, Optional, Sequence

from .config import TrainConfig, option_specs
from .files import STATE_SUFFIX

log = logging.getLogger("diff2flow")

# run options of `train` that are not TrainConfig fields (also valid TOML keys)
RUN_KEYS = ("cache", "checkpoint", "output", "name")


class CliError(Exception):
    """A bad input: printed as one message, exit code 2."""


# ---------------------------------------------------------------------- options
def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_train_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig option, with the option's own help and choices (training/config.py);
    defaults are SUPPRESSed so only given flags override the TOML file and the resume state."""
    group = parser.add_argument_group("training options (also TOML keys of --config)")
    for spec in option_specs():
        help_text = f"{spec.help} (default {spec.default})"
        if spec.type is bool:
            group.add_argument(_flag(spec.name), dest=spec.name, action=argparse.BooleanOptionalAction,
                               default=argparse.SUPPRESS, help=help_text)
        else:
            group.add_argument(_flag(spec.name), dest=spec.name, type=spec.type, default=argparse.SUPPRESS, help=help_text,
                               choices=spec.choices, metavar=spec.name.upper())


def read_toml(path: str | os.PathLike) -> dict[str, Any]:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        import tomli as tomllib
    path = pathlib.Path(path)
    if not path.is_file():
        raise CliError(f"--config {path} does not exist")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise CliError(f"--config {path} is not valid TOML: {exc}") from exc
    data = data.get("train", data)  # a [train] table or top-level keys
    allowed = {f.name for f in dataclasses.fields(TrainConfig)} | set(RUN_KEYS)
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise CliError(f"--config {path}: unknown keys {', '.join(unknown)} (allowed: {', '.join(sorted(allowed))})")
    return data


def write_toml(path: pathlib.Path, values: dict[str, Any]) -> None:
    """The run's options as a flat [train] table that ``--config`` reads back."""
    from .files import atomic_write

    def literal(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'

    text = "# Diff2Flow training run: python -m training train --config THIS_FILE\n[train]\n"
    text += "".join(f"{k} = {literal(v)}\n" for k, v in values.items() if v is not None)
    atomic_write(path, lambda tmp: pathlib.Path(tmp).write_text(text, encoding="utf-8"))


def make_config(base: dict[str, Any], given: dict[str, Any]) -> TrainConfig:
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {**{k: v for k, v in base.items() if k in names}, **{k: v for k, v in given.items() if k in names}}
    try:
        return TrainConfig(**values)
    except (TypeError, ValueError) as exc:
        raise CliError(f"invalid training option: {exc}") from exc


# ---------------------------------------------------------------------- commands
def require_checkpoint(path: str | os.PathLike) -> pathlib.Path:
    """Fail before ComfyUI is even imported when the checkpoint file is missing."""
    p = pathlib.Path(path)
    if not p.is_file():
        raise CliError(f"--checkpoint {p} does not exist: pass the .safetensors / .ckpt file of an SD1.x, SD2.x or SDXL model")
    return p


def _progress_bar(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="img", dynamic_ncols=True, disable=not enabled)


def _host(args: argparse.Namespace) -> None:
    """Import ComfyUI (the host library that reads checkpoints) for this command."""
    from d2f_host.bootstrap import bootstrap_comfyui

    bootstrap_comfyui(cpu=args.cpu or None)


def cmd_prepare(args: argparse.Namespace) -> int:
    from .cache import prepare_cache
    from .dataset import bucket_resolutions, scan_folder

    records = scan_folder(args.dataset)  # a missing / empty folder fails before ComfyUI loads
    bucket_resolutions(args.resolution, args.max_aspect)
    if args.batch_size < 1:
        raise CliError(f"--batch-size must be >= 1, got {args.batch_size}")
    require_checkpoint(args.checkpoint)
    _host(args)
    from d2f_host.checkpoints import load_checkpoint
    from d2f_host.conditioning import CheckpointEncoders

    _, clip, vae = load_checkpoint(args.checkpoint)
    encoders = CheckpointEncoders(clip, vae, args.checkpoint)
    bar = _progress_bar(len(records), "prepare", not args.no_progress)
    try:
        summary = prepare_cache(records, args.cache, encoders, args.resolution, args.max_aspect, args.batch_size,
                                progress=lambda done, total: bar.update(done - bar.n),
                                extra_settings={"checkpoint": str(pathlib.Path(args.checkpoint).resolve())})
    finally:
        bar.close()
    if summary.missing_captions:
        log.warning("%d images have no .txt caption (empty caption used): %s", len(summary.missing_captions),
                    ", ".join(summary.missing_captions[:10]) + (" ..." if len(summary.missing_captions) > 10 else ""))
    print(summary.report())
    print(f"cache: {pathlib.Path(args.cache).resolve()}")
    return 0


def _train_values(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any], Optional[dict]]:
    """(run options, training-option overrides, resume state): defaults < resume state < TOML < flags."""
    given = {k: v for k, v in vars(args).items() if k in {f.name for f in dataclasses.fields(TrainConfig)}}
    toml = read_toml(args.config) if args.config else {}
    run = {k: getattr(args, k, None) or toml.get(k) for k in RUN_KEYS}
    state = None
    if args.resume:
        from .files import load_training_state

        state_path = pathlib.Path(args.resume)
        try:
            state = load_training_state(state_path)
        except FileNotFoundError as exc:
            raise CliError(str(exc)) from exc
        if not run["name"] and state_path.name.endswith(STATE_SUFFIX):
            run["name"] = state_path.name[: -len(STATE_SUFFIX)]
        if not run["output"]:
            run["output"] = str(state_path.parent)
    overrides = {**{k: v for k, v in toml.items() if k not in RUN_KEYS}, **given}
    missing = [k for k in ("cache", "checkpoint", "output") if not run[k]]
    if missing:
        raise CliError("train needs " + ", ".join(_flag(k) for k in missing) + " (as flags or keys of --config)")
    run["name"] = run["name"] or "diff2flow_lora"
    return run, overrides, state


def cmd_train(args: argparse.Namespace) -> int:
    from . import distributed
    from .cache import load_cache
    from .files import RunFiles
    from .headless import run_headless

    run, overrides, state = _train_values(args)
    config = make_config(state["config"] if state else {}, overrides)
    if state is not None:
        saved = TrainConfig.from_dict(state["config"])
        listed = config.resume_mismatch(saved)
        if listed:
            raise CliError(f"--resume {args.resume} comes from a different configuration ({listed}): drop those options to "
                           "continue the saved run, or start a new run without --resume")
        if state["step"] >= config.steps:
            raise CliError(f"--resume {args.resume} is already at step {state['step']} of {config.steps}: raise --steps to train further")
    world = distributed.world_from_env()
    if config.batch_size % world.world_size:
        raise CliError(f"--batch-size {config.batch_size} (the global batch) must be divisible by the {world.world_size} processes")
    files = RunFiles.named(run["output"], run["name"])
    if world.is_main:
        files.check_writable()
        files.check_new_run(resuming=state is not None, overwrite=args.overwrite)
    cached = load_cache(run["cache"])
    require_checkpoint(run["checkpoint"])
    distributed.init(world)

    import torch

    _host(args)
    from d2f_host.checkpoints import load_checkpoint, lora_metadata_for
    from d2f_host.model_sampling import alignment_of
    from d2f_host.unet import attach_adapters, gradient_checkpointing, unet_network

    from .engine import Trainer

    checkpoint = pathlib.Path(run["checkpoint"])
    model, _, _ = load_checkpoint(checkpoint, encoders="skip")
    if cached.settings.get("checkpoint") not in (None, str(checkpoint.resolve())):
        log.warning("the cache was prepared with %s, training uses %s: fine only if both share the VAE and text encoder",
                    cached.settings["checkpoint"], checkpoint)
    try:
        d2f = alignment_of(model, config.zero_terminal_snr)
    except ValueError as exc:
        raise CliError(f"--zero-terminal-snr: {exc}") from exc
    data = training_data_from_cache(model, cached, checkpoint)
    metadata = lora_metadata_for(model, config, d2f)
    if world.is_main:
        write_toml(files.config, {**{k: str(pathlib.Path(v).resolve()) if k != "name" else files.name for k, v in run.items()},
                                  **config.to_dict()})
    launcher = "torchrun --nproc_per_node N -m training" if world.distributed else "python -m training"
    hint = f"{launcher} train --config {files.config} --resume {files.state}"
    with torch.inference_mode(False), torch.enable_grad():
        clone, unet, adapters, device = attach_adapters(model, config)
        trainer = Trainer(unet_network(unet), adapters, d2f, config, data, device, world.rank, world.world_size)
        if state is not None:
            trainer.load_state_dict(state)
            print(f"resuming {files.name} at step {trainer.step} of {config.steps}", flush=True)
        with gradient_checkpointing(unet, config.gradient_checkpointing):
            code = run_headless(trainer, files, metadata, world, resume_hint=hint, progress=not args.no_progress)
    distributed.barrier(world)
    distributed.finish(world, code)
    return code


def training_data_from_cache(model: Any, cached: Any, checkpoint: pathlib.Path) -> Any:
    """TrainingData of a latent cache for ``model``: latents in the model's scale, each caption's
    UNet arguments, and the empty caption's per sample (SDXL's ``y`` carries each sample's size)."""
    from d2f_host.conditioning import text_cond_kwargs

    from .data import TrainingData

    channels = model.model.latent_format.latent_channels
    if cached.latents[0].shape[0] != channels:
        raise CliError(f"the cache holds {cached.latents[0].shape[0]}-channel latents but {checkpoint.name} needs {channels}: "
                       "run prepare with this checkpoint")
    try:
        conds = [text_cond_kwargs(model, c, lat) for c, lat in zip(cached.conds, cached.latents)]
        unconds = [text_cond_kwargs(model, cached.uncond, lat) for lat in cached.latents]
    except ValueError as exc:
        raise CliError(f"the cache's text embeddings do not fit {checkpoint.name} ({exc}): run prepare with this checkpoint") from exc
    latents = [model.model.process_latent_in(lat[None].float()).squeeze(0) for lat in cached.latents]
    return TrainingData(latents, conds, unconds)


# ---------------------------------------------------------------------- sample: load, sample, save
def read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompts_file:
        path = pathlib.Path(args.prompts_file)
        if not path.is_file():
            raise CliError(f"--prompts-file {path} does not exist")
        prompts += [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise CliError("sample needs at least one --prompt (or a --prompts-file with one prompt per line)")
    return prompts


@dataclasses.dataclass
class SamplingModel:
    """A checkpoint (+ LoRA) ready for headless FM sampling: the velocity function of the
    objective it was trained with, its alignment, encoders and the device it runs on."""

    model: Any
    vae: Any
    encoders: Any
    d2f: Any
    velocity: Any  # fn(x_sigma, sigma, cond kwargs) -> v
    device: Any


def load_sampling_model(args: argparse.Namespace) -> SamplingModel:
    import d2f_core
    from d2f_host.checkpoints import apply_lora, load_checkpoint
    from d2f_host.conditioning import CheckpointEncoders
    from d2f_host.model_sampling import alignment_of
    from d2f_host.unet import inference_network

    model, clip, vae = load_checkpoint(args.checkpoint)
    metadata = None
    if args.lora:
        try:
            model, clip, metadata = apply_lora(model, clip, args.lora, args.lora_strength, args.lora_strength)
        except ValueError as exc:
            raise CliError(f"--lora {args.lora}: {exc}") from exc
    zsnr = args.zero_terminal_snr if args.zero_terminal_snr is not None else bool(metadata and metadata.zero_terminal_snr)
    try:
        d2f = alignment_of(model, zsnr)
    except ValueError as exc:
        raise CliError(f"--zero-terminal-snr: {exc}") from exc
    network, device = inference_network(model)
    objective = d2f_core.get_objective(metadata.objective if metadata else "diff2flow")
    velocity = objective.velocity_fn(lambda x, t, c: network(x, t, **c), d2f)
    return SamplingModel(model, vae, CheckpointEncoders(clip, vae, args.checkpoint), d2f, velocity, device)


def save_png(path: pathlib.Path, image: Any, parameters: str) -> pathlib.Path:
    """An image [H, W, 3] in [0, 1] as PNG with its sampling parameters as text."""
    import numpy as np
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    pixels = (image.clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8)
    info = PngInfo()
    info.add_text("parameters", parameters)
    Image.fromarray(pixels).save(path, pnginfo=info)
    return path


def cmd_sample(args: argparse.Namespace) -> int:
    prompts = read_prompts(args)
    for name in ("width", "height"):
        if getattr(args, name) < 64 or getattr(args, name) % 8:
            raise CliError(f"--{name} must be a multiple of 8 and at least 64, got {getattr(args, name)}")
    if args.steps < 1:
        raise CliError(f"--steps must be >= 1, got {args.steps}")
    require_checkpoint(args.checkpoint)
    if args.lora and not pathlib.Path(args.lora).is_file():
        raise CliError(f"--lora {args.lora} does not exist")
    out = pathlib.Path(args.output)
    out.mkdir(parents=True, exist_ok=True)

    import torch
    from tqdm import tqdm

    import d2f_core

    _host(args)
    from d2f_host.conditioning import text_cond_kwargs

    sm = load_sampling_model(args)
    latent_shape = (sm.model.model.latent_format.latent_channels, args.height // 8, args.width // 8)
    probe = torch.zeros(latent_shape)

    def cond_of(text: dict) -> dict:
        return {k: v.to(sm.device) for k, v in text_cond_kwargs(sm.model, text, probe).items()}

    uncond = cond_of(sm.encoders.encode_text([args.negative])[0])
    sigmas = d2f_core.fm_sigmas(args.steps, sigma_max=sm.d2f.sigma_max, shift=args.shift, start=args.start)
    sampler = d2f_core.get_sampler(args.sampler)
    written = []
    with torch.inference_mode():
        for i, prompt in enumerate(tqdm(prompts, desc="sample", unit="prompt", disable=args.no_progress)):
            cond = cond_of(sm.encoders.encode_text([prompt])[0])
            for j in range(args.images_per_prompt):
                seed = args.seed + i * args.images_per_prompt + j
                noise = torch.randn((1, *latent_shape), generator=torch.Generator().manual_seed(seed))
                x = (float(sigmas[0]) * noise).to(sm.device)  # the state at the grid's first sigma
                latent = sampler(d2f_core.cfg_velocity(sm.velocity, cond, uncond, args.cfg), x, sigmas)
                image = sm.vae.decode(sm.model.model.process_latent_out(latent.cpu().float()))[0]
                parameters = (f"{prompt}\nsteps {args.steps}, cfg {args.cfg}, shift {args.shift}, seed {seed}, "
                              f"sampler FM {args.sampler}, lora {args.lora or '-'}")
                written.append(save_png(out / f"{i:03d}_{j:02d}_seed{seed}.png", image, parameters))
    print(f"wrote {len(written)} images to {out.resolve()}")
    return 0


# ---------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    from d2f_core import SAMPLERS, START_RULES

    parser = argparse.ArgumentParser(prog="python -m training", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="{prepare,train,sample}")

    p = sub.add_parser("prepare", help="image folder + captions -> latent cache")
    p.add_argument("--dataset", required=True, help="folder of images with same-name .txt captions (nested folders allowed)")
    p.add_argument("--checkpoint", required=True, help="SD1.x / SD2.x / SDXL checkpoint whose VAE and text encoder encode the data")
    p.add_argument("--cache", required=True, help="cache folder (created; unchanged entries of an earlier run are reused)")
    p.add_argument("--resolution", type=int, default=512, help="bucket area = resolution^2 pixels, multiple of 64 (default 512)")
    p.add_argument("--max-aspect", type=float, default=2.0, help="widest bucket aspect ratio (default 2.0)")
    p.add_argument("--batch-size", type=int, default=4, help="images per VAE call (default 4)")
    p.set_defaults(func=cmd_prepare)

    t = sub.add_parser("train", help="latent cache + checkpoint -> Diff2Flow LoRA")
    t.add_argument("--config", help="TOML file with any of the options below (flags override it)")
    t.add_argument("--cache", default=None, help="latent cache folder from prepare")
    t.add_argument("--checkpoint", default=None, help="the base SD checkpoint")
    t.add_argument("--output", default=None, help="output folder for the LoRA, saves, state, metrics.jsonl and loss.png")
    t.add_argument("--name", default=None, help="file name stem of the LoRA (default diff2flow_lora)")
    t.add_argument("--resume", default=None, help="a .d2fstate file to continue exactly (its options are used)")
    t.add_argument("--overwrite", action="store_true", help="replace the files of an earlier run with the same --name")
    add_train_config_flags(t)
    t.set_defaults(func=cmd_train)

    s = sub.add_parser("sample", help="checkpoint (+ LoRA) + prompts -> PNGs with FM Euler")
    s.add_argument("--checkpoint", required=True)
    s.add_argument("--lora", default=None, help="a LoRA (its Diff2Flow metadata sets the objective and zero terminal SNR)")
    s.add_argument("--lora-strength", type=float, default=1.0)
    s.add_argument("--prompt", action="append", help="a prompt (repeat for several)")
    s.add_argument("--prompts-file", default=None, help="a text file with one prompt per line")
    s.add_argument("--negative", default="", help="negative prompt for CFG (default empty)")
    s.add_argument("--output", required=True, help="folder for the PNGs")
    s.add_argument("--steps", type=int, default=20)
    s.add_argument("--cfg", type=float, default=5.0)
    s.add_argument("--shift", type=float, default=1.0, help="SD3-style time shift of the FM grid (1 = uniform)")
    s.add_argument("--start", choices=list(START_RULES), default="sigma_max",
                   help="where sampling starts on SD models without zero terminal SNR: sigma_max (0.936 * noise) "
                        "or noise (pure noise at sigma 1; only the first step changes; docs/MATH.md section 10)")
    s.add_argument("--sampler", choices=list(SAMPLERS), default="euler",
                   help="; ".join(f"{n}: {r.description}" for n, r in SAMPLERS.items()))
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--width", type=int, default=512)
    s.add_argument("--height", type=int, default=512)
    s.add_argument("--images-per-prompt", type=int, default=1)
    s.add_argument("--zero-terminal-snr", action=argparse.BooleanOptionalAction, default=None,
                   help="override the LoRA metadata's zero terminal SNR (v models only)")
    s.set_defaults(func=cmd_sample)

    for sp in (p, t, s):
        sp.add_argument("--cpu", action="store_true", help="run on the CPU even when a GPU is present")
        sp.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    args = build_parser().parse_args(argv)
    from .cache import DatasetError
    from .engine import TrainingError
    from d2f_host.bootstrap import HostError

    from .files import OutputExists

    try:
        return args.func(args) or 0
    # OSError: an unwritable output folder or a full disk (the previous files were kept)
    except (CliError, DatasetError, HostError, OutputExists, TrainingError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
