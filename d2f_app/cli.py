"""``python -m training`` / ``diff2flow-train``: headless Diff2Flow LoRA training.

One module per subcommand, each with ``add_parser(sub)`` and ``run(args) -> exit code``; a new
subcommand is a module and a line in ``SUBCOMMANDS``. ComfyUI reads the checkpoints
(``COMFYUI_PATH``, or the ComfyUI this pack is installed in), always through ``d2f_host``. Every
option of the Train Diff2Flow LoRA node is a ``train`` flag and a key of the ``--config`` TOML file
(both generated from ``TrainConfig``, training/config.py), every option of ``pairs`` likewise from
``PairsConfig``; flags win over the file, the file over the defaults.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from . import depth, pairs, prepare, sample, train
from .options import CliError, add_host_flags

SUBCOMMANDS = (prepare, train, pairs, sample, depth)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m training",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    names = [module.__name__.rsplit(".", 1)[1] for module in SUBCOMMANDS]
    sub = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(names) + "}")
    for module in SUBCOMMANDS:
        command = module.add_parser(sub)
        add_host_flags(command)
        command.set_defaults(func=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    args = build_parser().parse_args(argv)
    from d2f_host.errors import HostError
    from training.cache import DatasetError
    from training.engine import TrainingError
    from training.files import OutputExists
    from training.pairs import PairsError

    try:
        return args.func(args) or 0
    # OSError: an unwritable output folder or a full disk (the previous files were kept)
    except (CliError, DatasetError, HostError, OutputExists, PairsError, TrainingError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
