"""``pairs``: a checkpoint (+ LoRA) + prompts -> reflow pairs (noise, image) of its ODE, and with
``--invert-cache`` the images of a latent cache inverted through the same ODE into the same folder
(training/pairs.py); resumable, appendable, one process or many through torchrun (disjoint shards)."""

from __future__ import annotations

import argparse
import contextlib
import pathlib
import sys
from collections.abc import Callable, Iterator
from typing import Any

from training.config import PairsConfig

from .options import (
    CliError,
    add_config_flags,
    flag,
    given_options,
    make_config,
    option_error,
    progress_bar,
    read_prompt_lines,
    read_toml,
    require_checkpoint,
    start_host,
    write_toml,
)

# run options that are not fields of PairsConfig (also valid TOML keys)
RUN_KEYS = ("checkpoint", "lora", "prompts", "output", "invert_cache")
PAIRS_TOML = "pairs.toml"  # the options of a pairs run, in its folder (pairs --config reads it back)


def add_parser(sub: Any) -> argparse.ArgumentParser:
    r = sub.add_parser("pairs", help="checkpoint (+ LoRA) + prompts -> reflow pairs of its ODE")
    r.add_argument("--config", help="TOML file with any of the options below (flags override it)")
    r.add_argument("--checkpoint", default=None, help="the teacher's SD1.x / SD2.x / SDXL checkpoint")
    r.add_argument(
        "--lora", default=None, help="a LoRA applied to the teacher (k-times reflow: the previous reflow LoRA)"
    )
    r.add_argument("--prompts", default=None, help="a text file with one prompt per line (pair i uses prompt i mod N)")
    r.add_argument("--output", default=None, help="the pairs folder (created; a rerun resumes or appends to it)")
    r.add_argument(
        "--invert-cache",
        default=None,
        metavar="CACHE",
        help="a latent cache of your own captioned images (`prepare` with the same --checkpoint, one size: "
        "--width x --height) to invert through the teacher's ODE into the same folder, marked as inverted pairs "
        "(train mixes them in with --inverted-share); with --prompts the --count generated pairs too, without "
        "them only the images",
    )
    add_config_flags(r, PairsConfig, "pair options")
    return r


def pairs_values(args: argparse.Namespace) -> tuple[dict[str, Any], PairsConfig]:
    """(file options, PairsConfig): defaults < TOML < flags."""
    toml = read_toml(args.config, PairsConfig, RUN_KEYS, "pairs") if args.config else {}
    if "sampler" in toml and "grid" not in toml:  # a pairs.toml written before the grid option: its pairs ran uniform
        toml["grid"] = "uniform"
    run = {k: getattr(args, k, None) or toml.get(k) for k in RUN_KEYS}
    # --invert-cache alone inverts the cache's images only; --prompts (generated pairs) is needed otherwise
    needed = ("checkpoint", "output") if run["invert_cache"] else ("checkpoint", "prompts", "output")
    missing = [k for k in needed if not run[k]]
    if missing:
        raise CliError("pairs needs " + ", ".join(flag(k) for k in missing) + " (as flags or keys of --config)")
    given = given_options(args, PairsConfig)
    values = {k: v for k, v in toml.items() if k not in RUN_KEYS}
    if run["invert_cache"] and not run["prompts"]:
        count = given.get("count", values.get("count", 0))
        if count:
            raise CliError(
                f"--count {count} generates pairs from prompts, but no --prompts is given: give --prompts FILE too, "
                "or leave --count out to only invert --invert-cache"
            )
        values["count"] = 0
    config = make_config(values, given, PairsConfig, "pairs")
    if config.count == 0 and run["prompts"]:
        if not run["invert_cache"]:
            raise CliError(
                "--count 0 generates nothing: give --count N, or --invert-cache CACHE to invert a latent cache"
            )
        raise CliError(
            "--prompts is unused with --count 0: leave it out to only invert --invert-cache, or give --count N"
        )
    return run, config


def check_invert_cache(path: str, config: PairsConfig) -> Any:
    """The latent cache of ``--invert-cache`` (``training.cache.CachedDataset``), checked to hold captioned
    images of the pairs' size, before ComfyUI starts."""
    from training.cache import load_cache
    from training.dataset import DatasetError

    try:
        cache = load_cache(path)
    except DatasetError as exc:
        raise CliError(f"--invert-cache: {exc}") from exc
    if cache.task != "image":
        raise CliError(
            f"--invert-cache {path} holds image + depth pairs (a depth model's data): invert a cache of captioned "
            "images (`prepare` on a folder of images with .txt captions)"
        )
    size = (config.height // 8, config.width // 8)
    sizes: dict[str, int] = {}
    for latent in cache.latents:
        name = f"{latent.shape[-1] * 8}x{latent.shape[-2] * 8}"
        sizes[name] = sizes.get(name, 0) + 1
    if any(tuple(latent.shape[-2:]) != size for latent in cache.latents):
        raise CliError(
            f"--invert-cache {path} holds images of other sizes than --width {config.width} --height "
            f"{config.height} (width x height: images: {', '.join(f'{k}: {v}' for k, v in sorted(sizes.items()))}): "
            "the pairs of a folder have one size: set --width / --height to the cache's size, or prepare the "
            "images at one size into another cache (prepare --max-aspect 1 gives one square bucket)"
        )
    return cache


def check_cache_checkpoint(path: str, cache: Any, checkpoint: str) -> None:
    """Refuse a cache whose latents and captions another checkpoint's VAE and text encoder encoded: the
    teacher inverts its own latent space, with its own text embeddings."""
    from d2f_host.checkpoints import file_fingerprint

    fingerprint = file_fingerprint(checkpoint)
    mine = {"image_encoder": "vae:" + fingerprint, "text_encoder": "text:" + fingerprint}
    if any(cache.settings.get(k) != v for k, v in mine.items()):
        raise CliError(
            f"--invert-cache {path} was prepared with another checkpoint ({cache.settings.get('checkpoint', 'unknown')}"
            f", or that file changed since) than --checkpoint {checkpoint}: the teacher inverts latents of its own "
            f"VAE with captions of its own text encoder: run prepare --dataset DIR --checkpoint {checkpoint} "
            "--cache NEW_CACHE and invert that"
        )


def run(args: argparse.Namespace) -> int:
    from training.files import file_sha256, remove_stale_temporaries
    from training.pairs import generate_pairs, invert_pairs, pair_settings

    from . import distributed

    run_options, config = pairs_values(args)
    prompts = read_prompt_lines(run_options["prompts"], "--prompts") if run_options["prompts"] else []
    cache_path = run_options["invert_cache"]
    cache = check_invert_cache(cache_path, config) if cache_path else None
    require_checkpoint(run_options["checkpoint"])
    lora = run_options["lora"]
    if lora and not pathlib.Path(lora).is_file():
        raise CliError(f"--lora {lora} does not exist")
    world = distributed.world_from_env()
    distributed.init(world)

    import torch

    start_host(args)
    from d2f_host.conditioning import text_cond_kwargs
    from d2f_host.errors import OptionError
    from d2f_host.sampling_model import load_sampling_model

    if cache is not None:
        check_cache_checkpoint(cache_path, cache, run_options["checkpoint"])

    # zero terminal SNR: on when asked, or when the teacher's LoRA was trained with it (its metadata)
    try:
        sm = load_sampling_model(
            run_options["checkpoint"], lora, config.lora_strength, config.zero_terminal_snr or None
        )
    except OptionError as exc:
        raise option_error(exc) from exc
    shape = (sm.model.model.latent_format.latent_channels, config.height // 8, config.width // 8)
    probe = torch.zeros(shape)
    conds = [text_cond_kwargs(sm.model, text, probe) for text in sm.encoders.encode_text(prompts)] if prompts else []
    uncond = text_cond_kwargs(sm.model, sm.encoders.encode_text([config.negative])[0], probe)
    teacher = {
        "checkpoint_hash": sm.base_hash,
        "lora_sha256": file_sha256(lora) if lora else None,
        "lora_strength": config.lora_strength if lora else None,
        "objective": sm.objective.name,
        "prediction": sm.d2f.prediction,
        "zero_terminal_snr": sm.d2f.zero_terminal_snr,
    }
    settings = pair_settings(config, shape, sm.d2f.sigma_max, sm.d2f.sigma_min, teacher)
    sources = {
        "checkpoint": str(pathlib.Path(run_options["checkpoint"]).resolve()),
        "negative": config.negative,
        "lora": str(pathlib.Path(lora).resolve()) if lora else None,
    }
    if cache is not None:  # the images in the model's latent scale, their captions as its UNet arguments
        images = [sm.model.model.process_latent_in(lat[None].float()).squeeze(0) for lat in cache.latents]
        try:
            captions = [text_cond_kwargs(sm.model, text, probe) for text in cache.conds]
        except ValueError as exc:
            raise CliError(f"--invert-cache {cache_path}: its captions do not fit the checkpoint ({exc})") from exc
    output = run_options["output"]
    place = dict(
        shard_size=config.shard_size,
        device=sm.device,
        rank=world.rank,
        world_size=world.world_size,
        barrier=lambda: distributed.barrier(world),
    )
    summaries = []
    try:
        if config.count:
            with progress_reports("pairs", world.is_main and not args.no_progress) as progress:
                summaries.append(
                    generate_pairs(
                        sm.velocity,
                        conds,
                        output,
                        config.count,
                        settings,
                        uncond,
                        **place,
                        progress=progress,
                        labels=prompts,
                        sources=sources,
                    )
                )
        if cache is not None:
            with progress_reports("invert", world.is_main and not args.no_progress) as progress:
                summaries.append(
                    invert_pairs(
                        sm.velocity,
                        images,
                        captions,
                        output,
                        settings,
                        uncond,
                        **place,
                        progress=progress,
                        labels=cache.sources,
                        sources={"cache": str(pathlib.Path(cache_path).resolve())},
                    )
                )
    except KeyboardInterrupt:
        print(
            f"interrupted: the finished shards in {output} are kept; run the same command again to generate the rest",
            file=sys.stderr,
        )
        distributed.finish(world, 130)
        return 130
    if world.is_main:
        remove_stale_temporaries(output, lambda name: name == PAIRS_TOML)  # a killed run's, of the file below
        write_toml(
            pathlib.Path(output) / PAIRS_TOML,
            {**{k: str(pathlib.Path(v).resolve()) for k, v in run_options.items() if v}, **config.to_dict()},
            "pairs",
        )
        for summary in summaries:
            print(summary.report())
    distributed.barrier(world)
    distributed.finish(world, 0)
    return 0


@contextlib.contextmanager
def progress_reports(what: str, show: bool) -> Iterator[Callable[[Any], None]]:
    """A progress bar for one ``generate_pairs`` / ``invert_pairs`` run, fed by its progress reports."""
    bar = progress_bar(0, what, show, unit="pair")

    def progress(report: Any) -> None:
        bar.total = report.total
        bar.update(report.done - bar.n)

    try:
        yield progress
    finally:
        bar.close()
