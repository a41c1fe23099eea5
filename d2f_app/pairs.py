"""``pairs``: a checkpoint (+ LoRA) + prompts -> reflow pairs (noise, image) of its ODE
(training/pairs.py); resumable, appendable, one process or many through torchrun (disjoint shards)."""

from __future__ import annotations

import argparse
import pathlib
import sys
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
RUN_KEYS = ("checkpoint", "lora", "prompts", "output")
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
    add_config_flags(r, PairsConfig, "pair options")
    return r


def pairs_values(args: argparse.Namespace) -> tuple[dict[str, Any], PairsConfig]:
    """(file options, PairsConfig): defaults < TOML < flags."""
    toml = read_toml(args.config, PairsConfig, RUN_KEYS, "pairs") if args.config else {}
    run = {k: getattr(args, k, None) or toml.get(k) for k in RUN_KEYS}
    missing = [k for k in ("checkpoint", "prompts", "output") if not run[k]]
    if missing:
        raise CliError("pairs needs " + ", ".join(flag(k) for k in missing) + " (as flags or keys of --config)")
    config = make_config(
        {k: v for k, v in toml.items() if k not in RUN_KEYS}, given_options(args, PairsConfig), PairsConfig, "pairs"
    )
    return run, config


def run(args: argparse.Namespace) -> int:
    from training.files import file_sha256, remove_stale_temporaries
    from training.pairs import PairSettings, generate_pairs

    from . import distributed

    run_options, config = pairs_values(args)
    prompts = read_prompt_lines(run_options["prompts"], "--prompts")
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

    # zero terminal SNR: on when asked, or when the teacher's LoRA was trained with it (its metadata)
    try:
        sm = load_sampling_model(
            run_options["checkpoint"], lora, config.lora_strength, config.zero_terminal_snr or None
        )
    except OptionError as exc:
        raise option_error(exc) from exc
    shape = (sm.model.model.latent_format.latent_channels, config.height // 8, config.width // 8)
    probe = torch.zeros(shape)
    conds = [text_cond_kwargs(sm.model, text, probe) for text in sm.encoders.encode_text(prompts)]
    uncond = text_cond_kwargs(sm.model, sm.encoders.encode_text([config.negative])[0], probe)
    teacher = {
        "checkpoint_hash": sm.base_hash,
        "lora_sha256": file_sha256(lora) if lora else None,
        "lora_strength": config.lora_strength if lora else None,
        "objective": sm.objective.name,
        "prediction": sm.d2f.prediction,
        "zero_terminal_snr": sm.d2f.zero_terminal_snr,
    }
    settings = PairSettings(
        shape,
        sm.d2f.sigma_max,
        config.sampler,
        config.steps,
        config.cfg,
        config.shift,
        config.seed,
        config.batch_size,
        teacher,
    )
    sources = {
        "checkpoint": str(pathlib.Path(run_options["checkpoint"]).resolve()),
        "negative": config.negative,
        "lora": str(pathlib.Path(lora).resolve()) if lora else None,
    }
    bar = progress_bar(0, "pairs", world.is_main and not args.no_progress, unit="pair")

    def progress(report: Any) -> None:
        bar.total = report.total
        bar.update(report.done - bar.n)

    output = run_options["output"]
    try:
        summary = generate_pairs(
            sm.velocity,
            conds,
            output,
            config.count,
            settings,
            uncond,
            shard_size=config.shard_size,
            device=sm.device,
            rank=world.rank,
            world_size=world.world_size,
            barrier=lambda: distributed.barrier(world),
            progress=progress,
            labels=prompts,
            sources=sources,
        )
    except KeyboardInterrupt:
        bar.close()
        print(
            f"interrupted: the finished shards in {output} are kept; run the same command again to generate the rest",
            file=sys.stderr,
        )
        distributed.finish(world, 130)
        return 130
    finally:
        bar.close()
    if world.is_main:
        remove_stale_temporaries(output, lambda name: name == PAIRS_TOML)  # a killed run's, of the file below
        write_toml(
            pathlib.Path(output) / PAIRS_TOML,
            {**{k: str(pathlib.Path(v).resolve()) for k, v in run_options.items() if v}, **config.to_dict()},
            "pairs",
        )
        print(summary.report())
    distributed.barrier(world)
    distributed.finish(world, 0)
    return 0
