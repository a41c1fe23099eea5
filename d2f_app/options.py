"""What every subcommand shares: its errors, the flags and TOML keys generated from the option
registries (``TrainConfig``, ``PairsConfig``), the input files it checks before ComfyUI loads, the
host it loads, and its progress bar."""

from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import sys
from collections.abc import Sequence
from typing import Any

from training.config import option_specs
from training.files import atomic_write


class CliError(Exception):
    """A bad input: printed as one message, exit code 2."""


# ---------------------------------------------------------------------- flags and TOML from the registries
def flag(name: str) -> str:
    """The flag of an option: ``zero_terminal_snr`` -> ``--zero-terminal-snr``."""
    return "--" + name.replace("_", "-")


def help_text(text: str) -> str:
    """Text generated from a registry or a config field, as argparse help: argparse %-formats every
    help string (for ``%(default)s``), so a literal ``%`` ("0.5 % (RMS)") must be doubled."""
    return text.replace("%", "%%")


def add_config_flags(parser: argparse.ArgumentParser, cls: type, title: str) -> None:
    """One flag per option of ``cls`` (``TrainConfig`` or ``PairsConfig``), with the option's own help
    and choices (training/config.py); defaults are SUPPRESSed so only given flags override the TOML
    file and the resume state."""
    group = parser.add_argument_group(f"{title} (also TOML keys of --config)")
    for spec in option_specs(cls):
        text = help_text(f"{spec.help} (default {spec.default})")
        if spec.type is bool:
            group.add_argument(
                flag(spec.name),
                dest=spec.name,
                action=argparse.BooleanOptionalAction,
                default=argparse.SUPPRESS,
                help=text,
            )
        else:
            group.add_argument(
                flag(spec.name),
                dest=spec.name,
                type=spec.type,
                default=argparse.SUPPRESS,
                help=text,
                choices=spec.choices,
                metavar=spec.name.upper(),
            )


def given_options(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The options of ``cls`` given as flags (their defaults are suppressed)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in vars(args).items() if k in names}


def read_toml(path: str | os.PathLike, cls: type, run_keys: Sequence[str], table: str) -> dict[str, Any]:
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


def write_toml(path: pathlib.Path, values: dict[str, Any], table: str) -> None:
    """A run's options as a flat [train] (or [pairs]) table that ``--config`` reads back."""

    def literal(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'

    text = f"# Diff2Flow run: python -m training {table} --config THIS_FILE\n[{table}]\n"
    text += "".join(f"{k} = {literal(v)}\n" for k, v in values.items() if v is not None)
    atomic_write(path, lambda tmp: pathlib.Path(tmp).write_text(text, encoding="utf-8"))


def make_config(base: dict[str, Any], given: dict[str, Any], cls: type, what: str) -> Any:
    """``cls`` of ``base`` overridden by ``given`` (other keys ignored); a bad value is a CliError
    naming ``what`` options they are ("training", "pairs")."""
    names = {f.name for f in dataclasses.fields(cls)}
    values = {**{k: v for k, v in base.items() if k in names}, **{k: v for k, v in given.items() if k in names}}
    try:
        return cls(**values)
    except (TypeError, ValueError) as exc:
        raise CliError(f"invalid {what} option: {exc}") from exc


def option_error(exc: Exception) -> CliError:
    """A host's ``OptionError`` (d2f_host.errors), shown with the option as its flag."""
    return CliError(f"{flag(exc.option)}: {exc.reason}")


# ---------------------------------------------------------------------- input files
def require_checkpoint(path: str | os.PathLike) -> pathlib.Path:
    """Fail before ComfyUI is even imported when the checkpoint file is missing."""
    p = pathlib.Path(path)
    if not p.is_file():
        raise CliError(
            f"--checkpoint {p} does not exist: pass the .safetensors / .ckpt file of an SD1.x, SD2.x or SDXL model"
        )
    return p


def read_prompt_lines(path: str | os.PathLike, option: str) -> list[str]:
    """The non-empty lines of a prompt file, or a CliError naming ``option`` (its flag)."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise CliError(f"{option} {path} does not exist: pass a text file with one prompt per line")
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise CliError(f"{option} {path} holds no prompt (only empty lines): write one prompt per line")
    return prompts


# ---------------------------------------------------------------------- the host and progress
def add_host_flags(parser: argparse.ArgumentParser) -> None:
    """The flags of every subcommand: where the host runs and whether a progress bar is drawn."""
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even when a GPU is present")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")


# how the base UNet's weights are stored (d2f_host.checkpoints.WEIGHT_DTYPES, whose names UNETLoader's
# weight_dtype uses): named here too, as the flag exists before ComfyUI is imported
WEIGHT_DTYPES = ("default", "fp8_e4m3fn", "fp8_e5m2")


def add_weight_dtype_flag(parser: argparse.ArgumentParser) -> None:
    """``--weight-dtype``: the base weights' storage dtype (also the TOML key ``weight_dtype``)."""
    parser.add_argument(
        "--weight-dtype",
        default=None,
        choices=WEIGHT_DTYPES,
        help="how the checkpoint's UNet weights are stored, as UNETLoader's weight_dtype: default (ComfyUI's "
        "choice for the device), or fp8_e4m3fn / fp8_e5m2 (half the memory of fp16; each layer is cast to the "
        "compute dtype as it runs, the adapters apply after the cast and train in full precision)",
    )


def weight_dtype_option(value: str | None) -> str:
    """The ``--weight-dtype`` of a run (flag or TOML key), ``default`` when not given; a CliError for another value."""
    if value is None:
        return "default"
    if value not in WEIGHT_DTYPES:
        raise CliError(f"weight_dtype {value!r} is not one of {', '.join(WEIGHT_DTYPES)}")
    return value


def start_host(args: argparse.Namespace) -> None:
    """Import ComfyUI (the host library that reads checkpoints) for this command."""
    from d2f_host.bootstrap import bootstrap_comfyui

    bootstrap_comfyui(cpu=args.cpu or None)


def progress_bar(total: int, desc: str, enabled: bool, unit: str = "img") -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, disable=not enabled)
