"""``python -m training`` / ``diff2flow-train``: headless Diff2Flow LoRA training.

    prepare  image folder (+ .txt captions) + checkpoint -> latent cache (safetensors shards)
    train    latent cache + checkpoint + options -> LoRA (+ periodic saves, resumable state,
             metrics.jsonl, loss.png, preview grids samples/step_XXXXXX.png with --preview-every N
             --sample-prompts FILE); one process, or many through torchrun (data parallel)
    pairs    checkpoint (+ LoRA) + prompts -> reflow pairs (noise, image) of its ODE (training/pairs.py);
             resumable, appendable, one process or many through torchrun (disjoint shards)
    sample   checkpoint (+ LoRA) + prompts -> PNGs with FM Euler / Heun (a LoRA's metadata sets the
             default sampler, steps and cfg: a reflow LoRA samples in 2 steps at cfg 1)
    depth    checkpoint + depth model (or a Marigold UNet) + images -> depth maps (16-bit grey PNG,
             colour PNG, .npy) with FM Euler in few steps and Marigold's ensemble

ComfyUI reads the checkpoints (``COMFYUI_PATH``, or the ComfyUI this pack is installed in), always
through ``d2f_host``. Every option of the Train Diff2Flow LoRA node is a ``train`` flag and a key of
the ``--config`` TOML file (both generated from ``TrainConfig``, training/config.py), every option of
``pairs`` likewise from ``PairsConfig``; flags win over the file, the file over the defaults. A resumed
run starts from the options saved in its state, so ``train --resume RUN.d2fstate`` with the same paths
is enough. ``train --pairs DIR`` trains on a pairs folder instead of a latent cache (objective
``reflow``: the straight line between each pair).
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import pathlib
import sys
from typing import Any, Optional, Sequence

from training.config import PairsConfig, TrainConfig, option_specs
from training.files import STATE_SUFFIX
from training.optimizers import OPTIMIZERS

log = logging.getLogger("diff2flow")

# run options of `train` / `pairs` that are not fields of their config class (also valid TOML keys)
RUN_KEYS = ("cache", "pairs", "checkpoint", "output", "name", "sample_prompts")
PAIRS_RUN_KEYS = ("checkpoint", "lora", "prompts", "output")
PAIRS_TOML = "pairs.toml"  # the options of a pairs run, in its folder (pairs --config reads it back)


class CliError(Exception):
    """A bad input: printed as one message, exit code 2."""


# ---------------------------------------------------------------------- options
def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def help_text(text: str) -> str:
    """Text generated from a registry or a config field, as argparse help: argparse %-formats every
    help string (for ``%(default)s``), so a literal ``%`` ("0.5 % (RMS)") must be doubled."""
    return text.replace("%", "%%")


def add_config_flags(parser: argparse.ArgumentParser, cls: type = TrainConfig, title: str = "training options") -> None:
    """One flag per option of ``cls`` (``TrainConfig`` or ``PairsConfig``), with the option's own help
    and choices (training/config.py); defaults are SUPPRESSed so only given flags override the TOML
    file and the resume state."""
    group = parser.add_argument_group(f"{title} (also TOML keys of --config)")
    for spec in option_specs(cls):
        text = help_text(f"{spec.help} (default {spec.default})")
        if spec.type is bool:
            group.add_argument(_flag(spec.name), dest=spec.name, action=argparse.BooleanOptionalAction,
                               default=argparse.SUPPRESS, help=text)
        else:
            group.add_argument(_flag(spec.name), dest=spec.name, type=spec.type, default=argparse.SUPPRESS, help=text,
                               choices=spec.choices, metavar=spec.name.upper())


def read_toml(path: str | os.PathLike, cls: type = TrainConfig, run_keys: Sequence[str] = RUN_KEYS,
              table: str = "train") -> dict[str, Any]:
    """The keys of a TOML file (its ``[table]`` table, or its top level) that are options of ``cls``
    or ``run_keys``; any other key is refused, named."""
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
    data = data.get(table, data)  # a [train] / [pairs] table or top-level keys
    allowed = {f.name for f in dataclasses.fields(cls)} | set(run_keys)
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise CliError(f"--config {path}: unknown keys {', '.join(unknown)} (allowed: {', '.join(sorted(allowed))})")
    return data


def write_toml(path: pathlib.Path, values: dict[str, Any], table: str = "train") -> None:
    """The run's options as a flat [train] (or [pairs]) table that ``--config`` reads back."""
    from training.files import atomic_write

    def literal(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'

    text = f"# Diff2Flow run: python -m training {table} --config THIS_FILE\n[{table}]\n"
    text += "".join(f"{k} = {literal(v)}\n" for k, v in values.items() if v is not None)
    atomic_write(path, lambda tmp: pathlib.Path(tmp).write_text(text, encoding="utf-8"))


def make_config(base: dict[str, Any], given: dict[str, Any], cls: type = TrainConfig) -> Any:
    names = {f.name for f in dataclasses.fields(cls)}
    values = {**{k: v for k, v in base.items() if k in names}, **{k: v for k, v in given.items() if k in names}}
    try:
        return cls(**values)
    except (TypeError, ValueError) as exc:
        what = "training" if cls is TrainConfig else "pairs"
        raise CliError(f"invalid {what} option: {exc}") from exc


# ---------------------------------------------------------------------- commands
def require_checkpoint(path: str | os.PathLike) -> pathlib.Path:
    """Fail before ComfyUI is even imported when the checkpoint file is missing."""
    p = pathlib.Path(path)
    if not p.is_file():
        raise CliError(f"--checkpoint {p} does not exist: pass the .safetensors / .ckpt file of an SD1.x, SD2.x or SDXL model")
    return p


def _progress_bar(total: int, desc: str, enabled: bool, unit: str = "img"):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, disable=not enabled)


def _host(args: argparse.Namespace) -> None:
    """Import ComfyUI (the host library that reads checkpoints) for this command."""
    from d2f_host.bootstrap import bootstrap_comfyui

    bootstrap_comfyui(cpu=args.cpu or None)


def cmd_prepare(args: argparse.Namespace) -> int:
    from training.cache import prepare_cache
    from training.dataset import bucket_resolutions, scan_folder
    from training.depth_dataset import pair_depth_maps

    records = scan_folder(args.dataset)  # a missing / empty folder fails before ComfyUI loads
    # a folder with depth maps (name.depth.png / .npy) is one of image + depth pairs: every image needs its own,
    # of its size (refused here, before ComfyUI loads)
    records = pair_depth_maps(pathlib.Path(args.dataset), records)
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
        from training.files import load_training_state

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
    missing = [k for k in ("checkpoint", "output") if not run[k]]
    if not run["cache"] and not run["pairs"]:
        missing.insert(0, "cache")
    if missing:
        raise CliError("train needs " + ", ".join(_flag(k) for k in missing) + " (as flags or keys of --config; "
                       "--pairs instead of --cache for a pairs folder)")
    if run["cache"] and run["pairs"]:
        raise CliError("train takes --cache (a latent cache) or --pairs (a reflow pairs folder), not both")
    run["name"] = run["name"] or "diff2flow_lora"
    return run, overrides, state


def cmd_train(args: argparse.Namespace) -> int:
    from . import distributed
    import d2f_core

    from training.cache import load_cache
    from training.files import RunFiles
    from .headless import run_headless
    from training.pairs import load_pairs

    run, overrides, state = _train_values(args)
    config = make_config(state["config"] if state else {}, overrides)
    unavailable = OPTIMIZERS[config.optimizer].missing()
    if unavailable:
        raise CliError(f"--optimizer {config.optimizer}: {unavailable}")
    if state is not None:
        saved = TrainConfig.from_dict(state["config"])
        listed = config.resume_mismatch(saved)
        if listed:
            raise CliError(f"--resume {args.resume} comes from a different configuration ({listed}): drop those options to "
                           "continue the saved run, or start a new run without --resume")
        if state["step"] > config.steps:
            raise CliError(f"--resume {args.resume} is already at step {state['step']}, past --steps {config.steps}: "
                           f"raise --steps to train further")
    if d2f_core.get_objective(config.objective).paired_noise and not run["pairs"]:
        raise CliError(f"objective {config.objective} trains on (noise, image) pairs: pass --pairs DIR (a folder from "
                       "`python -m training pairs`) instead of --cache")
    world = distributed.world_from_env()
    if config.batch_size % world.world_size:
        raise CliError(f"--batch-size {config.batch_size} (the global batch) must be divisible by the {world.world_size} processes")
    preview_prompts = None
    if config.preview_every > 0:
        if not run["sample_prompts"]:
            raise CliError(f"--preview-every {config.preview_every} needs --sample-prompts FILE (a text file with one "
                           "prompt per line; also the TOML key sample_prompts), or --preview-every 0 for no previews")
        preview_prompts = read_prompt_lines(run["sample_prompts"], "--sample-prompts")
    elif run["sample_prompts"]:
        log.warning("--sample-prompts is ignored: previews are off (set --preview-every N to sample every N steps)")
    files = RunFiles.named(run["output"], run["name"])
    if world.is_main:
        files.check_writable()
        files.check_new_run(resuming=state is not None, overwrite=args.overwrite)
        files.remove_stale_temporaries()
    cached = load_cache(run["cache"]) if run["cache"] else None
    pairs = load_pairs(run["pairs"]) if run["pairs"] else None
    task = cached.task if cached is not None else "image"
    if task == "depth" and config.preview_every > 0:
        raise CliError(f"--preview-every {config.preview_every}: the cache holds image + depth pairs, and previews sample "
                       "text prompts, which a depth model cannot (it needs an image): train with --preview-every 0")
    require_checkpoint(run["checkpoint"])
    distributed.init(world)

    import torch

    _host(args)
    from d2f_host.checkpoints import load_checkpoint, lora_metadata_for
    from d2f_host.depth import widen_model
    from d2f_host.model_sampling import alignment_of
    from d2f_host.unet import attach_adapters, gradient_checkpointing, unet_network

    from training.engine import Trainer

    checkpoint = pathlib.Path(run["checkpoint"])
    # previews encode their prompts and decode their latents with the checkpoint's own encoders
    model, clip, vae = load_checkpoint(checkpoint, encoders="required" if preview_prompts and world.is_main else "skip")
    try:
        d2f = alignment_of(model, config.zero_terminal_snr)
    except ValueError as exc:
        raise CliError(f"--zero-terminal-snr: {exc}") from exc
    if cached is not None:
        if cached.settings.get("checkpoint") not in (None, str(checkpoint.resolve())):
            log.warning("the cache was prepared with %s, training uses %s: fine only if both share the VAE and text encoder",
                        cached.settings["checkpoint"], checkpoint)
        data = training_data_from_cache(model, cached, checkpoint)
        teacher_cfg = None
    else:
        data = training_data_from_pairs(model, pairs, run["pairs"])
        teacher_cfg = float(pairs.settings["cfg"])
    # the metadata names the base model (a depth file loads onto the base, widened the same way)
    metadata = lora_metadata_for(model, config, d2f, teacher_cfg=teacher_cfg, task=task)
    if task == "depth":
        # image + depth pairs: the first convolution widened to take the image latent (d2f_host.depth), trained in full
        model = widen_model(model)
    if world.is_main:
        write_toml(files.config, {**{k: str(pathlib.Path(v).resolve()) if k != "name" else files.name
                                     for k, v in run.items() if v},
                                  **config.to_dict()})
    launcher = "torchrun --nproc_per_node N -m training" if world.distributed else "python -m training"
    hint = f"{launcher} train --config {files.config} --resume {files.state}"
    with torch.inference_mode(False), torch.enable_grad():
        clone, unet, adapters, device = attach_adapters(model, config)
        trainer = Trainer(unet_network(unet), adapters, d2f, config, data, device, world.rank, world.world_size)
        if state is not None:
            trainer.load_state_dict(state)
            # a state at the last step (a run stopped between its last save and its final files): the run
            # below trains nothing and writes what is missing
            print(f"resuming {files.name} at step {trainer.step} of {config.steps}"
                  + (": writing the final files" if trainer.step == config.steps else ""), flush=True)
        previewer = None
        if preview_prompts and world.is_main:
            previewer = training_previewer(model, clip, vae, checkpoint, config, preview_prompts, unet, device)
            clip = None  # the text encoder is not needed any more: ComfyUI may free it
        with gradient_checkpointing(unet, config.gradient_checkpointing):
            code = run_headless(trainer, files, metadata, world, resume_hint=hint, progress=not args.no_progress,
                                previewer=previewer)
    distributed.barrier(world)
    distributed.finish(world, code)
    return code


def training_previewer(model: Any, clip: Any, vae: Any, checkpoint: pathlib.Path, config: TrainConfig,
                       prompts: list[str], unet: Any, device: Any) -> Any:
    """The :class:`training.previews.Previewer` of a CLI run: ``prompts`` and the empty negative
    encoded by the checkpoint's text encoder, decoded by its VAE (training/previews.py)."""
    import torch

    from d2f_host.conditioning import CheckpointEncoders, latent_decoder, text_cond_kwargs

    from training.previews import Previewer, PreviewSettings

    settings = PreviewSettings.from_config(config)
    probe = torch.zeros(model.model.latent_format.latent_channels, config.preview_height // 8, config.preview_width // 8)
    texts = CheckpointEncoders(clip, vae, checkpoint).encode_text([*prompts, ""])  # the negative: the empty prompt
    conds = [text_cond_kwargs(model, text, probe) for text in texts]
    return Previewer(settings, conds[:-1], conds[-1], latent_decoder(model, vae, unet, device),
                     model.model.latent_format.latent_channels)


def training_data_from_cache(model: Any, cached: Any, checkpoint: pathlib.Path) -> Any:
    """TrainingData of a latent cache for ``model``: latents in the model's scale, each caption's
    UNet arguments, and the empty caption's per sample (SDXL's ``y`` carries each sample's size); a
    depth cache's image latents as the per-sample ``concat``."""
    from d2f_host.conditioning import text_cond_kwargs

    from training.data import TrainingData

    channels = model.model.latent_format.latent_channels
    if cached.latents[0].shape[0] != channels:
        raise CliError(f"the cache holds {cached.latents[0].shape[0]}-channel latents but {checkpoint.name} needs {channels}: "
                       "run prepare with this checkpoint")
    try:
        conds = [text_cond_kwargs(model, c, lat) for c, lat in zip(cached.conds, cached.latents)]
        unconds = [text_cond_kwargs(model, cached.uncond, lat) for lat in cached.latents]
    except ValueError as exc:
        raise CliError(f"the cache's text embeddings do not fit {checkpoint.name} ({exc}): run prepare with this checkpoint") from exc
    def scaled(lat: Any) -> Any:
        return model.model.process_latent_in(lat[None].float()).squeeze(0)

    latents = [scaled(lat) for lat in cached.latents]
    # a depth cache: each depth latent's image latent, in the model's latent scale (d2f_host.depth's convention)
    extras = [{"concat": scaled(c)} for c in cached.concats] if cached.concats is not None else None
    return TrainingData(latents, conds, unconds, extras)


def training_data_from_pairs(model: Any, pairs: Any, folder: str) -> Any:
    """TrainingData of a pairs folder for ``model`` (the pairs hold the teacher's network arguments
    and latents in the model's scale already), checked to fit it."""
    from d2f_host.checkpoints import check_pairs_fit

    try:
        check_pairs_fit(model, pairs, folder)
    except ValueError as exc:
        raise CliError(f"--pairs: {exc}") from exc
    return pairs.training_data()


# ---------------------------------------------------------------------- pairs: a teacher's ODE couplings
def _pairs_values(args: argparse.Namespace) -> tuple[dict[str, Any], PairsConfig]:
    """(file options, PairsConfig): defaults < TOML < flags."""
    given = {k: v for k, v in vars(args).items() if k in {f.name for f in dataclasses.fields(PairsConfig)}}
    toml = read_toml(args.config, PairsConfig, PAIRS_RUN_KEYS, "pairs") if args.config else {}
    run = {k: getattr(args, k, None) or toml.get(k) for k in PAIRS_RUN_KEYS}
    missing = [k for k in ("checkpoint", "prompts", "output") if not run[k]]
    if missing:
        raise CliError("pairs needs " + ", ".join(_flag(k) for k in missing) + " (as flags or keys of --config)")
    config = make_config({k: v for k, v in toml.items() if k not in PAIRS_RUN_KEYS}, given, PairsConfig)
    return run, config


def read_prompt_lines(path: str | os.PathLike, flag: str) -> list[str]:
    """The non-empty lines of a prompt file, or a CliError naming ``flag``."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise CliError(f"{flag} {path} does not exist: pass a text file with one prompt per line")
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise CliError(f"{flag} {path} holds no prompt (only empty lines): write one prompt per line")
    return prompts


def cmd_pairs(args: argparse.Namespace) -> int:
    from . import distributed
    from training.files import file_sha256, remove_stale_temporaries
    from training.pairs import PairSettings, generate_pairs

    run, config = _pairs_values(args)
    prompts = read_prompt_lines(run["prompts"], "--prompts")
    require_checkpoint(run["checkpoint"])
    if run["lora"] and not pathlib.Path(run["lora"]).is_file():
        raise CliError(f"--lora {run['lora']} does not exist")
    world = distributed.world_from_env()
    distributed.init(world)

    import torch

    _host(args)
    from d2f_host.conditioning import text_cond_kwargs

    # zero terminal SNR: on when asked, or when the teacher's LoRA was trained with it (its metadata)
    sm = load_sampling_model(run["checkpoint"], run["lora"], config.lora_strength, config.zero_terminal_snr or None)
    shape = (sm.model.model.latent_format.latent_channels, config.height // 8, config.width // 8)
    probe = torch.zeros(shape)
    conds = [text_cond_kwargs(sm.model, text, probe) for text in sm.encoders.encode_text(prompts)]
    uncond = text_cond_kwargs(sm.model, sm.encoders.encode_text([config.negative])[0], probe)
    teacher = {"checkpoint_hash": sm.base_hash, "lora_sha256": file_sha256(run["lora"]) if run["lora"] else None,
               "lora_strength": config.lora_strength if run["lora"] else None, "objective": sm.objective.name,
               "prediction": sm.d2f.prediction, "zero_terminal_snr": sm.d2f.zero_terminal_snr}
    settings = PairSettings(shape, sm.d2f.sigma_max, config.sampler, config.steps, config.cfg, config.shift, config.seed,
                            config.batch_size, teacher)
    sources = {"checkpoint": str(pathlib.Path(run["checkpoint"]).resolve()), "negative": config.negative,
               "lora": str(pathlib.Path(run["lora"]).resolve()) if run["lora"] else None}
    bar = _progress_bar(0, "pairs", world.is_main and not args.no_progress, unit="pair")

    def progress(report: Any) -> None:
        bar.total = report.total
        bar.update(report.done - bar.n)

    try:
        summary = generate_pairs(sm.velocity, conds, run["output"], config.count, settings, uncond,
                                 shard_size=config.shard_size, device=sm.device, rank=world.rank,
                                 world_size=world.world_size, barrier=lambda: distributed.barrier(world),
                                 progress=progress, labels=prompts, sources=sources)
    except KeyboardInterrupt:
        bar.close()
        print(f"interrupted: the finished shards in {run['output']} are kept; run the same command again to generate "
              "the rest", file=sys.stderr)
        distributed.finish(world, 130)
        return 130
    finally:
        bar.close()
    if world.is_main:
        remove_stale_temporaries(run["output"], lambda name: name == PAIRS_TOML)  # a killed run's, of the file below
        write_toml(pathlib.Path(run["output"]) / PAIRS_TOML,
                   {**{k: str(pathlib.Path(v).resolve()) for k, v in run.items() if v}, **config.to_dict()}, table="pairs")
        print(summary.report())
    distributed.barrier(world)
    distributed.finish(world, 0)
    return 0


# ---------------------------------------------------------------------- sample: load, sample, save
def read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompts_file:
        prompts += read_prompt_lines(args.prompts_file, "--prompts-file")
    if not prompts:
        raise CliError("sample needs at least one --prompt (or a --prompts-file with one prompt per line)")
    return prompts


@dataclasses.dataclass
class SamplingModel:
    """A checkpoint (+ LoRA) ready for headless FM sampling: the velocity function of the
    objective it was trained with, its alignment, encoders, the device it runs on, the LoRA's
    Diff2Flow metadata (``None`` without one) and the base UNet's fingerprint."""

    model: Any
    vae: Any
    encoders: Any
    d2f: Any
    velocity: Any  # fn(x_sigma, sigma, cond kwargs) -> v
    device: Any
    objective: Any  # the d2f_core.Objective the model samples as
    metadata: Any
    base_hash: str

    def sampling_defaults(self) -> Any:
        """Sampler, steps and cfg when none are given: the LoRA's recorded ones, else its objective's."""
        from d2f_core.lora_metadata import SamplingDefaults

        if self.metadata is not None:
            return self.metadata.sampling_defaults()
        return SamplingDefaults(self.objective.sampler, self.objective.steps, self.objective.cfg)


def load_sampling_model(checkpoint: str | os.PathLike, lora: Optional[str] = None, lora_strength: float = 1.0,
                        zero_terminal_snr: Optional[bool] = None) -> SamplingModel:
    import d2f_core
    from d2f_host.checkpoints import apply_lora, base_model_hash, load_checkpoint
    from d2f_host.conditioning import CheckpointEncoders
    from d2f_host.model_sampling import alignment_of
    from d2f_host.unet import inference_network

    model, clip, vae = load_checkpoint(checkpoint)
    base_hash = base_model_hash(model)  # before a LoRA is merged into the weights
    metadata = None
    if lora:
        from d2f_core.lora_metadata import read_lora_metadata

        if getattr(read_lora_metadata(lora), "task", "image") == "depth":
            raise CliError(f"--lora {lora} is an image-to-depth model: it draws depth maps of images (python -m training "
                           "depth --depth-model FILE), not images from prompts: pass a text-to-image LoRA, or none")
        try:
            model, clip, metadata = apply_lora(model, clip, lora, lora_strength, lora_strength)
        except ValueError as exc:
            raise CliError(f"--lora {lora}: {exc}") from exc
    zsnr = zero_terminal_snr if zero_terminal_snr is not None else bool(metadata and metadata.zero_terminal_snr)
    try:
        d2f = alignment_of(model, zsnr)
    except ValueError as exc:
        raise CliError(f"--zero-terminal-snr: {exc}") from exc
    network, device = inference_network(model)
    objective = d2f_core.get_objective(metadata.objective if metadata else "diff2flow")
    velocity = objective.velocity_fn(lambda x, t, c: network(x, t, **c), d2f)
    return SamplingModel(model, vae, CheckpointEncoders(clip, vae, checkpoint), d2f, velocity, device, objective, metadata,
                         base_hash)


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
    if args.steps is not None and args.steps < 1:
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

    sm = load_sampling_model(args.checkpoint, args.lora, args.lora_strength, args.zero_terminal_snr)
    # what is not given comes from the LoRA's metadata (a reflow LoRA: 2 steps at cfg 1) or its objective
    defaults = sm.sampling_defaults()
    given = {"sampler": args.sampler, "steps": args.steps, "cfg": args.cfg}
    args.sampler, args.steps, args.cfg = (v if v is not None else d for v, d in zip(given.values(), defaults))
    if any(v is None for v in given.values()):
        print(f"sampling with FM {args.sampler}, {args.steps} steps, cfg {args.cfg:g}"
              + (f" ({sm.objective.name} LoRA defaults)" if sm.metadata is not None else ""), flush=True)
    latent_shape = (sm.model.model.latent_format.latent_channels, args.height // 8, args.width // 8)
    probe = torch.zeros(latent_shape)

    def cond_of(text: dict) -> dict:
        return {k: v.to(sm.device) for k, v in text_cond_kwargs(sm.model, text, probe).items()}

    uncond = cond_of(sm.encoders.encode_text([args.negative])[0])
    sigmas = d2f_core.fm_sigmas(args.steps, sigma_max=sm.d2f.sigma_max, shift=args.shift, start=args.start)
    from training.previews import preview_noise, sample_latent

    written = []
    with torch.inference_mode():
        for i, prompt in enumerate(tqdm(prompts, desc="sample", unit="prompt", disable=args.no_progress)):
            cond = cond_of(sm.encoders.encode_text([prompt])[0])
            for j in range(args.images_per_prompt):
                seed = args.seed + i * args.images_per_prompt + j
                # the same path as the training previews (training/previews.py): x = sigmas[0] * noise of this seed
                latent = sample_latent(sm.velocity, cond, uncond, args.cfg, args.sampler, sigmas,
                                       preview_noise(seed, latent_shape).to(sm.device))
                image = sm.vae.decode(sm.model.model.process_latent_out(latent.cpu().float()))[0]
                parameters = (f"{prompt}\nsteps {args.steps}, cfg {args.cfg}, shift {args.shift}, seed {seed}, "
                              f"sampler FM {args.sampler}, lora {args.lora or '-'}")
                written.append(save_png(out / f"{i:03d}_{j:02d}_seed{seed}.png", image, parameters))
    print(f"wrote {len(written)} images to {out.resolve()}")
    return 0


# ---------------------------------------------------------------------- depth: image -> depth maps
def cmd_depth(args: argparse.Namespace) -> int:
    """Depth maps of images with a depth model (a trained depth file on --checkpoint, or a Marigold UNet
    with --checkpoint's text encoder and VAE): grey 16-bit PNG, colour PNG and .npy per image."""
    from d2f_core.colormap import COLORMAPS
    from d2f_core.depth_settings import DepthSettings

    from .depth_files import ImageListError, list_images, load_image, save_depth

    settings = DepthSettings(args.steps, args.ensemble, args.resolution, args.seed)
    try:
        settings.validate()
        paths = list_images(args.images)
    except ValueError as exc:
        flag = {"steps": "--steps", "ensemble_size": "--ensemble", "processing_resolution": "--resolution", "seed": "--seed"}
        message = str(exc)
        for name, option in flag.items():
            message = message.replace(f"{name} must", f"{option} must", 1)
        raise CliError(message) from exc
    if args.colormap not in COLORMAPS:
        raise CliError(f"--colormap must be one of {', '.join(COLORMAPS)}, got {args.colormap!r}")
    require_checkpoint(args.checkpoint)
    model_file = args.depth_model or args.marigold
    if not pathlib.Path(model_file).is_file():
        raise CliError(f"{'--depth-model' if args.depth_model else '--marigold'} {model_file} does not exist")
    out = pathlib.Path(args.output)
    out.mkdir(parents=True, exist_ok=True)

    import torch

    _host(args)
    from d2f_host.depth_estimate import depth_steps, empty_prompt, estimate_depth, load_depth_pipeline

    model, clip, vae, what = load_depth_pipeline(args.checkpoint, depth_model=args.depth_model, marigold=args.marigold,
                                                 strength=args.strength, zero_terminal_snr=args.zero_terminal_snr)
    steps, source = depth_steps(model, args.steps)
    settings = DepthSettings(steps, args.ensemble, args.resolution, args.seed)
    print(f"{what}: FM Euler, {steps} steps ({source}), ensemble {args.ensemble}, "
          f"resolution {args.resolution or 'as is'}", flush=True)
    positive = empty_prompt(clip)
    bar = _progress_bar(len(paths) * args.ensemble, "depth", not args.no_progress, unit="member")
    with torch.inference_mode(), bar:
        for path in paths:
            try:
                image = load_image(path)
                depth = estimate_depth(model, vae, positive, image, settings, on_member=lambda done, total: bar.update(1))
            except (ImageListError, ValueError) as exc:
                raise CliError(f"{path}: {exc}") from exc
            save_depth(out, path, depth[0], args.colormap)
    print(f"wrote depth maps of {len(paths)} images to {out.resolve()}")
    return 0


def add_depth_parser(sub: Any) -> argparse.ArgumentParser:
    from d2f_core.colormap import COLORMAPS
    from d2f_core.depth_settings import MAX_ENSEMBLE, MAX_STEPS

    d = sub.add_parser("depth", help="images + depth model -> depth maps (grey 16-bit PNG, colour PNG, .npy)")
    d.add_argument("--checkpoint", required=True, help="the SD checkpoint: the base of --depth-model, or (with --marigold) "
                   "the SD2 checkpoint whose text encoder and VAE the Marigold UNet uses")
    which = d.add_mutually_exclusive_group(required=True)
    which.add_argument("--depth-model", default=None, help="a depth model file from depth training (metadata task = depth)")
    which.add_argument("--marigold", default=None, help="a Marigold-layout UNet (unet/diffusion_pytorch_model.safetensors: "
                       "SD2, v-prediction, 8 input channels), converted zero-shot")
    d.add_argument("--images", nargs="+", required=True, help="image files and / or folders of images")
    d.add_argument("--output", required=True, help="folder for NAME_depth.png (16-bit, 0 = near), NAME_depth_color.png, NAME_depth.npy")
    d.add_argument("--steps", type=int, default=0, help=f"FM Euler steps, 1-{MAX_STEPS} (default 0: the depth file's "
                   "recommended steps; Marigold: 4)")
    d.add_argument("--ensemble", type=int, default=1, help=f"predictions per image, aligned and merged by their median "
                   f"(1-{MAX_ENSEMBLE}, default 1)")
    d.add_argument("--resolution", type=int, default=768, help="long side the model sees in pixels (0: the image's own "
                   "size; default 768, Marigold's); the depth is resized back")
    d.add_argument("--seed", type=int, default=0, help="member m of every image starts from the noise of seed + m")
    d.add_argument("--colormap", choices=list(COLORMAPS), default="spectral", help="colours of NAME_depth_color.png")
    d.add_argument("--strength", type=float, default=1.0, help="strength of --depth-model's weights")
    d.add_argument("--zero-terminal-snr", action="store_true", help="with --marigold: sample from pure noise (only for a "
                   "model fine-tuned with zero terminal SNR)")
    d.add_argument("--cpu", action="store_true", help="run on the CPU even when a GPU is present")
    d.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    d.set_defaults(func=cmd_depth)
    return d


# ---------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    from d2f_core import SAMPLERS, START_RULES

    parser = argparse.ArgumentParser(prog="python -m training", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="{prepare,train,pairs,sample,depth}")

    p = sub.add_parser("prepare", help="image folder + captions (or image + depth pairs) -> latent cache")
    p.add_argument("--dataset", required=True, help="folder of images with same-name .txt captions (nested folders "
                   "allowed); or of image + depth pairs for a depth model: photo.png with photo.depth.png (8/16-bit "
                   "grayscale) or photo.depth.npy (float [H, W], NaN = unknown), found by themselves")
    p.add_argument("--checkpoint", required=True, help="SD1.x / SD2.x / SDXL checkpoint whose VAE and text encoder encode the data")
    p.add_argument("--cache", required=True, help="cache folder (created; unchanged entries of an earlier run are reused)")
    p.add_argument("--resolution", type=int, default=512, help="bucket area = resolution^2 pixels, multiple of 64 (default 512)")
    p.add_argument("--max-aspect", type=float, default=2.0, help="widest bucket aspect ratio (default 2.0)")
    p.add_argument("--batch-size", type=int, default=4, help="images per VAE call (default 4)")
    p.set_defaults(func=cmd_prepare)

    t = sub.add_parser("train", help="latent cache (or reflow pairs) + checkpoint -> Diff2Flow LoRA")
    t.add_argument("--config", help="TOML file with any of the options below (flags override it)")
    t.add_argument("--cache", default=None, help="latent cache folder from prepare")
    t.add_argument("--pairs", default=None, help="instead of --cache: a reflow pairs folder from the pairs command "
                   "(train it with --objective reflow)")
    t.add_argument("--checkpoint", default=None, help="the base SD checkpoint")
    t.add_argument("--output", default=None, help="output folder for the LoRA, saves, state, metrics.jsonl and loss.png")
    t.add_argument("--name", default=None, help="file name stem of the LoRA (default diff2flow_lora)")
    t.add_argument("--resume", default=None, help="a .d2fstate file to continue exactly (its options are used)")
    t.add_argument("--overwrite", action="store_true", help="replace the files of an earlier run with the same --name")
    t.add_argument("--sample-prompts", default=None, help="a text file with one prompt per line: the prompts of the "
                   "previews (--preview-every N; grids in OUTPUT/samples/step_XXXXXX.png, listed in metrics.jsonl)")
    add_config_flags(t)
    t.set_defaults(func=cmd_train)

    r = sub.add_parser("pairs", help="checkpoint (+ LoRA) + prompts -> reflow pairs of its ODE")
    r.add_argument("--config", help="TOML file with any of the options below (flags override it)")
    r.add_argument("--checkpoint", default=None, help="the teacher's SD1.x / SD2.x / SDXL checkpoint")
    r.add_argument("--lora", default=None, help="a LoRA applied to the teacher (k-times reflow: the previous reflow LoRA)")
    r.add_argument("--prompts", default=None, help="a text file with one prompt per line (pair i uses prompt i mod N)")
    r.add_argument("--output", default=None, help="the pairs folder (created; a rerun resumes or appends to it)")
    add_config_flags(r, PairsConfig, "pair options")
    r.set_defaults(func=cmd_pairs)

    s = sub.add_parser("sample", help="checkpoint (+ LoRA) + prompts -> PNGs with FM Euler")
    s.add_argument("--checkpoint", required=True)
    s.add_argument("--lora", default=None, help="a LoRA (its Diff2Flow metadata sets the objective and zero terminal SNR)")
    s.add_argument("--lora-strength", type=float, default=1.0)
    s.add_argument("--prompt", action="append", help="a prompt (repeat for several)")
    s.add_argument("--prompts-file", default=None, help="a text file with one prompt per line")
    s.add_argument("--negative", default="", help="negative prompt for CFG (default empty)")
    s.add_argument("--output", required=True, help="folder for the PNGs")
    s.add_argument("--steps", type=int, default=None,
                   help="sampler steps (default: the LoRA's recommended steps, else its objective's: 20)")
    s.add_argument("--cfg", type=float, default=None,
                   help="guidance scale (default: the LoRA's recommended cfg, else its objective's: 5)")
    s.add_argument("--shift", type=float, default=1.0, help="SD3-style time shift of the FM grid (1 = uniform)")
    s.add_argument("--start", choices=list(START_RULES), default="sigma_max",
                   help="where sampling starts on SD models without zero terminal SNR: sigma_max (0.936 * noise) "
                        "or noise (pure noise at sigma 1; only the first step changes; docs/MATH.md section 10)")
    s.add_argument("--sampler", choices=list(SAMPLERS), default=None,
                   help=help_text("; ".join(f"{n}: {r.description}" for n, r in SAMPLERS.items())
                                  + " (default: the LoRA's recommended sampler, else euler)"))
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--width", type=int, default=512)
    s.add_argument("--height", type=int, default=512)
    s.add_argument("--images-per-prompt", type=int, default=1)
    s.add_argument("--zero-terminal-snr", action=argparse.BooleanOptionalAction, default=None,
                   help="override the LoRA metadata's zero terminal SNR (v models only)")
    s.set_defaults(func=cmd_sample)

    for sp in (p, t, r, s):
        sp.add_argument("--cpu", action="store_true", help="run on the CPU even when a GPU is present")
        sp.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    add_depth_parser(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    args = build_parser().parse_args(argv)
    from training.cache import DatasetError
    from training.engine import TrainingError
    from d2f_host.bootstrap import HostError

    from training.files import OutputExists
    from training.pairs import PairsError

    try:
        return args.func(args) or 0
    # OSError: an unwritable output folder or a full disk (the previous files were kept)
    except (CliError, DatasetError, HostError, OutputExists, PairsError, TrainingError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
