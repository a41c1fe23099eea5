"""``train``: a latent cache (or a reflow pairs folder) + a checkpoint + options -> a LoRA, with
periodic saves, a resumable state, metrics.jsonl, loss.png and preview grids; one process, or many
through torchrun (data parallel). The run is assembled by ``d2f_host.training_run.prepare_run``, as
the node's is; this module adds the options' sources (flags, TOML, the resume state), the files and
the headless loop."""

from __future__ import annotations

import argparse
import logging
import pathlib
from typing import Any

from training.config import TrainConfig
from training.data import grid_share_problem, validation_problem
from training.files import STATE_SUFFIX
from training.optimizers import OPTIMIZERS

from .options import (
    CliError,
    add_config_flags,
    add_weight_dtype_flag,
    flag,
    given_options,
    make_config,
    option_error,
    read_prompt_lines,
    read_toml,
    require_checkpoint,
    start_host,
    weight_dtype_option,
    write_toml,
)

log = logging.getLogger("diff2flow")

# run options that are not fields of TrainConfig (also valid TOML keys)
RUN_KEYS = ("cache", "pairs", "checkpoint", "output", "name", "sample_prompts", "validation_cache", "weight_dtype")


def add_parser(sub: Any) -> argparse.ArgumentParser:
    t = sub.add_parser("train", help="latent cache (or reflow pairs) + checkpoint -> Diff2Flow LoRA")
    t.add_argument("--config", help="TOML file with any of the options below (flags override it)")
    t.add_argument("--cache", default=None, help="latent cache folder from prepare")
    t.add_argument(
        "--pairs",
        default=None,
        help="instead of --cache: a reflow pairs folder from the pairs command (train it with --objective reflow)",
    )
    t.add_argument("--checkpoint", default=None, help="the base SD checkpoint")
    t.add_argument(
        "--output", default=None, help="output folder for the LoRA, saves, state, metrics.jsonl and loss.png"
    )
    t.add_argument("--name", default=None, help="file name stem of the LoRA (default diff2flow_lora)")
    t.add_argument("--resume", default=None, help="a .d2fstate file to continue exactly (its options are used)")
    t.add_argument("--overwrite", action="store_true", help="replace the files of an earlier run with the same --name")
    t.add_argument(
        "--sample-prompts",
        default=None,
        help="a text file with one prompt per line: the prompts of the "
        "previews (--preview-every N; grids in OUTPUT/samples/step_XXXXXX.png, listed in metrics.jsonl)",
    )
    t.add_argument(
        "--validation-cache",
        default=None,
        help="a latent cache from prepare (other images than --cache) for the validation loss "
        "(--validation-every N); the alternative to --validation-split",
    )
    add_weight_dtype_flag(t)
    add_config_flags(t, TrainConfig, "training options")
    return t


def train_values(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any], dict | None]:
    """(run options, training-option overrides, resume state): defaults < resume state < TOML < flags."""
    toml = read_toml(args.config, TrainConfig, RUN_KEYS, "train") if args.config else {}
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
    overrides = {**{k: v for k, v in toml.items() if k not in RUN_KEYS}, **given_options(args, TrainConfig)}
    missing = [k for k in ("checkpoint", "output") if not run[k]]
    if not run["cache"] and not run["pairs"]:
        missing.insert(0, "cache")
    if missing:
        raise CliError(
            "train needs " + ", ".join(flag(k) for k in missing) + " (as flags or keys of --config; "
            "--pairs instead of --cache for a pairs folder)"
        )
    if run["cache"] and run["pairs"]:
        raise CliError("train takes --cache (a latent cache) or --pairs (a reflow pairs folder), not both")
    if run["validation_cache"] and run["pairs"]:
        raise CliError(
            "--validation-cache holds captioned latents, but --pairs trains on (noise, image) pairs: hold part of "
            "the pairs out with --validation-split instead"
        )
    run["name"] = run["name"] or "diff2flow_lora"
    return run, overrides, state


def check_resume(config: TrainConfig, state: dict, resume: str) -> None:
    """Refuse a state the options cannot continue, naming the options and the fix."""
    listed = config.resume_mismatch(TrainConfig.from_dict(state["config"]))
    if listed:
        raise CliError(
            f"--resume {resume} comes from a different configuration ({listed}): drop those options to "
            "continue the saved run, or start a new run without --resume"
        )
    if state["step"] > config.steps:
        raise CliError(
            f"--resume {resume} is already at step {state['step']}, past --steps {config.steps}: "
            f"raise --steps to train further"
        )


def run(args: argparse.Namespace) -> int:
    import d2f_core
    from training.cache import load_cache
    from training.files import RunFiles
    from training.pairs import load_pairs

    from . import distributed
    from .headless import run_headless

    run_options, overrides, state = train_values(args)
    # a state saved before an option existed trained with its value then (TrainConfig.from_dict), not today's default
    saved = TrainConfig.from_dict(state["config"]).to_dict() if state else {}
    config = make_config(saved, overrides, TrainConfig, "training")
    unavailable = OPTIMIZERS[config.optimizer].missing()
    if unavailable:
        raise CliError(f"--optimizer {config.optimizer}: {unavailable}")
    if state is not None:
        check_resume(config, state, args.resume)
    problem = validation_problem(config, bool(run_options["validation_cache"]))
    if problem is not None:
        raise CliError(f"{flag(problem[0])}: {problem[1]}")
    if config.inverted_share > 0 and not run_options["pairs"]:
        raise CliError(
            f"--inverted-share {config.inverted_share:g} mixes reflow pairs of inverted images into every batch: pass "
            "--pairs DIR (a folder with inverted images: pairs --invert-cache CACHE), or --inverted-share 0"
        )
    if d2f_core.get_objective(config.objective).paired_noise and not run_options["pairs"]:
        raise CliError(
            f"objective {config.objective} trains on (noise, image) pairs: pass --pairs DIR (a folder from "
            "`python -m training pairs`) instead of --cache"
        )
    world = distributed.world_from_env()
    if config.batch_size % world.world_size:
        raise CliError(
            f"--batch-size {config.batch_size} (the global batch) must be divisible by the {world.world_size} processes"
        )
    preview_prompts = None
    if config.preview_every > 0:
        if not run_options["sample_prompts"]:
            raise CliError(
                f"--preview-every {config.preview_every} needs --sample-prompts FILE (a text file with one "
                "prompt per line; also the TOML key sample_prompts), or --preview-every 0 for no previews"
            )
        preview_prompts = read_prompt_lines(run_options["sample_prompts"], "--sample-prompts")
    elif run_options["sample_prompts"]:
        log.warning("--sample-prompts is ignored: previews are off (set --preview-every N to sample every N steps)")
    files = RunFiles.named(run_options["output"], run_options["name"])
    if world.is_main:
        files.check_writable()
        files.check_new_run(resuming=state is not None, overwrite=args.overwrite)
        files.remove_stale_temporaries()
    cached = load_cache(run_options["cache"]) if run_options["cache"] else None
    validation_cache = None
    if run_options["validation_cache"]:
        from training.dataset import DatasetError

        try:
            validation_cache = load_cache(run_options["validation_cache"])
        except DatasetError as exc:
            raise CliError(f"--validation-cache: {exc}") from exc
    if validation_cache is not None and validation_cache.task != cached.task:
        raise CliError(
            f"--validation-cache holds {validation_cache.task} samples but --cache holds {cached.task} samples: "
            "prepare the validation images the way the training images were prepared"
        )
    pairs = load_pairs(run_options["pairs"]) if run_options["pairs"] else None
    task = cached.task if cached is not None else "image"
    problem = grid_share_problem(config, task)
    if problem is not None:
        raise CliError(f"{flag(problem[0])}: {problem[1]}")
    if task == "depth" and config.preview_every > 0:
        raise CliError(
            f"--preview-every {config.preview_every}: the cache holds image + depth pairs, and previews sample "
            "text prompts, which a depth model cannot (it needs an image): train with --preview-every 0"
        )
    checkpoint = require_checkpoint(run_options["checkpoint"])
    distributed.init(world)

    start_host(args)
    from d2f_host.checkpoints import load_checkpoint
    from d2f_host.errors import OptionError
    from d2f_host.training_run import RunData, prepare_run

    # previews encode their prompts and decode their latents with the checkpoint's own encoders
    model, clip, vae = load_checkpoint(
        checkpoint,
        encoders="required" if preview_prompts and world.is_main else "skip",
        weight_dtype=weight_dtype_option(run_options["weight_dtype"]),
    )

    def run_data() -> RunData:
        if cached is not None:
            if cached.settings.get("checkpoint") not in (None, str(checkpoint.resolve())):
                log.warning(
                    "the cache was prepared with %s, training uses %s: fine only if both share the VAE and text "
                    "encoder",
                    cached.settings["checkpoint"],
                    checkpoint,
                )
            validation = (
                training_data_from_cache(model, validation_cache, checkpoint) if validation_cache is not None else None
            )
            return RunData(training_data_from_cache(model, cached, checkpoint), task, validation=validation)
        return RunData(
            training_data_from_pairs(model, pairs, run_options["pairs"]), teacher_cfg=float(pairs.settings["cfg"])
        )

    try:
        prepared = prepare_run(model, config, run_data, state=state, rank=world.rank, world_size=world.world_size)
    except OptionError as exc:
        raise option_error(exc) from exc
    trainer = prepared.trainer
    if world.is_main:
        write_toml(
            files.config,
            {
                **{
                    k: files.name if k == "name" else v if k == "weight_dtype" else str(pathlib.Path(v).resolve())
                    for k, v in run_options.items()
                    if v
                },
                **config.to_dict(),
            },
            "train",
        )
    if state is not None:
        # a state at the last step (a run stopped between its last save and its final files): the run
        # below trains nothing and writes what is missing
        print(
            f"resuming {files.name} at step {trainer.step} of {config.steps}"
            + (": writing the final files" if trainer.step == config.steps else ""),
            flush=True,
        )
    launcher = "torchrun --nproc_per_node N -m training" if world.distributed else "python -m training"
    with prepared.training():
        previewer = None
        if preview_prompts and world.is_main:
            previewer = training_previewer(prepared, clip, vae, checkpoint, preview_prompts)
            clip = None  # the text encoder is not needed any more: ComfyUI may free it
        code = run_headless(
            trainer,
            files,
            prepared.metadata,
            world,
            progress=not args.no_progress,
            previewer=previewer,
            resume_hint=f"{launcher} train --config {files.config} --resume {files.state}",
        )
    distributed.barrier(world)
    distributed.finish(world, code)
    return code


def training_previewer(prepared: Any, clip: Any, vae: Any, checkpoint: pathlib.Path, prompts: list[str]) -> Any:
    """The :class:`training.previews.Previewer` of a CLI run: ``prompts`` and the empty negative
    encoded by the checkpoint's text encoder, decoded by its VAE (training/previews.py)."""
    import torch

    from d2f_host.conditioning import CheckpointEncoders, latent_decoder, text_cond_kwargs
    from training.previews import Previewer, PreviewSettings

    model, config = prepared.model, prepared.trainer.config
    settings = PreviewSettings.from_config(config)
    probe = torch.zeros(
        model.model.latent_format.latent_channels, config.preview_height // 8, config.preview_width // 8
    )
    texts = CheckpointEncoders(clip, vae, checkpoint).encode_text([*prompts, ""])  # the negative: the empty prompt
    conds = [text_cond_kwargs(model, text, probe) for text in texts]
    return Previewer(
        settings,
        conds[:-1],
        conds[-1],
        latent_decoder(model, vae, prepared.unet, prepared.device),
        model.model.latent_format.latent_channels,
    )


def training_data_from_cache(model: Any, cached: Any, checkpoint: pathlib.Path) -> Any:
    """TrainingData of a latent cache for ``model``: latents in the model's scale, each caption's
    UNet arguments, and the empty caption's per sample (SDXL's ``y`` carries each sample's size); a
    depth cache's image latents as the per-sample ``concat``."""
    from d2f_host.conditioning import text_cond_kwargs
    from training.data import TrainingData

    channels = model.model.latent_format.latent_channels
    if cached.latents[0].shape[0] != channels:
        raise CliError(
            f"the cache holds {cached.latents[0].shape[0]}-channel latents but {checkpoint.name} needs {channels}: "
            "run prepare with this checkpoint"
        )
    try:
        conds = [text_cond_kwargs(model, c, lat) for c, lat in zip(cached.conds, cached.latents)]
        unconds = [text_cond_kwargs(model, cached.uncond, lat) for lat in cached.latents]
    except ValueError as exc:
        raise CliError(
            f"the cache's text embeddings do not fit {checkpoint.name} ({exc}): run prepare with this checkpoint"
        ) from exc

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
