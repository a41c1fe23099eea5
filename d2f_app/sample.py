"""``sample``: a checkpoint (+ LoRA) + prompts -> PNGs with an FM sampler; a LoRA's metadata sets the
default sampler, steps and cfg (a reflow LoRA samples in 2 steps at cfg 1)."""

from __future__ import annotations

import argparse
import pathlib
from typing import Any

from .options import CliError, help_text, option_error, read_prompt_lines, require_checkpoint, start_host


def add_parser(sub: Any) -> argparse.ArgumentParser:
    from d2f_core import SAMPLERS, START_RULES, get_objective

    plain = get_objective("diff2flow")  # how a checkpoint without a Diff2Flow LoRA samples
    s = sub.add_parser("sample", help="checkpoint (+ LoRA) + prompts -> PNGs with an FM sampler")
    s.add_argument("--checkpoint", required=True)
    s.add_argument(
        "--lora", default=None, help="a LoRA (its Diff2Flow metadata sets the objective and zero terminal SNR)"
    )
    s.add_argument("--lora-strength", type=float, default=1.0)
    s.add_argument("--prompt", action="append", help="a prompt (repeat for several)")
    s.add_argument("--prompts-file", default=None, help="a text file with one prompt per line")
    s.add_argument("--negative", default="", help="negative prompt for CFG (default empty)")
    s.add_argument("--output", required=True, help="folder for the PNGs")
    s.add_argument(
        "--steps",
        type=int,
        default=None,
        help=f"sampler steps (default: the LoRA's recommended steps, else its objective's: {plain.steps})",
    )
    s.add_argument(
        "--cfg",
        type=float,
        default=None,
        help=f"guidance scale (default: the LoRA's recommended cfg, else its objective's: {plain.cfg:g})",
    )
    s.add_argument("--shift", type=float, default=1.0, help="SD3-style time shift of the FM grid (1 = uniform)")
    s.add_argument(
        "--start",
        choices=list(START_RULES),
        default="sigma_max",
        help=help_text(
            "where sampling starts on SD models without zero terminal SNR (docs/MATH.md section "
            "10): " + "; ".join(f"{name}: {text}" for name, text in START_RULES.items())
        ),
    )
    s.add_argument(
        "--sampler",
        choices=list(SAMPLERS),
        default=None,
        help=help_text(
            "; ".join(f"{n}: {r.description}" for n, r in SAMPLERS.items())
            + f" (default: the LoRA's recommended sampler, else {plain.sampler})"
        ),
    )
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--width", type=int, default=512)
    s.add_argument("--height", type=int, default=512)
    s.add_argument("--images-per-prompt", type=int, default=1)
    s.add_argument(
        "--zero-terminal-snr",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="override the LoRA metadata's zero terminal SNR (v models only)",
    )
    return s


def read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompts_file:
        prompts += read_prompt_lines(args.prompts_file, "--prompts-file")
    if not prompts:
        raise CliError("sample needs at least one --prompt (or a --prompts-file with one prompt per line)")
    return prompts


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


def run(args: argparse.Namespace) -> int:
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

    start_host(args)
    from d2f_host.conditioning import text_cond_kwargs
    from d2f_host.errors import OptionError
    from d2f_host.sampling_model import load_sampling_model
    from training.previews import preview_noise, sample_latent

    try:
        sm = load_sampling_model(args.checkpoint, args.lora, args.lora_strength, args.zero_terminal_snr)
    except OptionError as exc:
        raise option_error(exc) from exc
    # what is not given comes from the LoRA's metadata (a reflow LoRA: 2 steps at cfg 1) or its objective
    defaults = sm.sampling_defaults()
    given = {"sampler": args.sampler, "steps": args.steps, "cfg": args.cfg}
    args.sampler, args.steps, args.cfg = (v if v is not None else d for v, d in zip(given.values(), defaults))
    if any(v is None for v in given.values()):
        print(
            f"sampling with FM {args.sampler}, {args.steps} steps, cfg {args.cfg:g}"
            + (f" ({sm.objective.name} LoRA defaults)" if sm.metadata is not None else ""),
            flush=True,
        )
    latent_shape = (sm.model.model.latent_format.latent_channels, args.height // 8, args.width // 8)
    probe = torch.zeros(latent_shape)

    def cond_of(text: dict) -> dict:
        return {k: v.to(sm.device) for k, v in text_cond_kwargs(sm.model, text, probe).items()}

    uncond = cond_of(sm.encoders.encode_text([args.negative])[0])
    sigmas = d2f_core.fm_sigmas(args.steps, sigma_max=sm.d2f.sigma_max, shift=args.shift, start=args.start)
    written = []
    with torch.inference_mode():
        for i, prompt in enumerate(tqdm(prompts, desc="sample", unit="prompt", disable=args.no_progress)):
            cond = cond_of(sm.encoders.encode_text([prompt])[0])
            for j in range(args.images_per_prompt):
                seed = args.seed + i * args.images_per_prompt + j
                # the same path as the training previews (training/previews.py): x = sigmas[0] * noise of this seed
                latent = sample_latent(
                    sm.velocity,
                    cond,
                    uncond,
                    args.cfg,
                    args.sampler,
                    sigmas,
                    preview_noise(seed, latent_shape).to(sm.device),
                )
                image = sm.vae.decode(sm.model.model.process_latent_out(latent.cpu().float()))[0]
                parameters = (
                    f"{prompt}\nsteps {args.steps}, cfg {args.cfg}, shift {args.shift}, seed {seed}, "
                    f"sampler FM {args.sampler}, lora {args.lora or '-'}"
                )
                written.append(save_png(out / f"{i:03d}_{j:02d}_seed{seed}.png", image, parameters))
    print(f"wrote {len(written)} images to {out.resolve()}")
    return 0
