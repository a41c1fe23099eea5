"""The headless Diff2Flow application: ``python -m training`` / ``diff2flow-train``.

It stands above the host: the engine (``training``) trains, ComfyUI read through ``d2f_host`` loads
checkpoints, and this package adds what a command line needs: argparse (``cli``; one module per
subcommand), files, progress bars, signals and torchrun (``headless``, ``distributed``).
"""
