"""Harness for tests that run against a real ComfyUI (found via COMFYUI_PATH).

ComfyUI is not on the package index: point ``COMFYUI_PATH`` at a ComfyUI 0.8.0 source tree (with
its requirements installed in the test environment), or place this repository in
``<ComfyUI>/custom_nodes/``. Without it, every ComfyUI test skips with that reason.
Models are tiny SD-architecture UNets with random weights built through ComfyUI's own classes.
"""

from __future__ import annotations

import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
from d2f_host.bootstrap import find_comfyui  # noqa: E402  (COMFYUI_PATH, or the custom_nodes folder this pack is in)

SKIP_REASON = (
    "ComfyUI not found: set COMFYUI_PATH to a ComfyUI 0.8.0 source tree (or install this pack in ComfyUI/custom_nodes)"
)


COMFYUI = find_comfyui()
if COMFYUI is not None and str(COMFYUI) not in sys.path:
    sys.path.insert(0, str(COMFYUI))
    try:
        import comfy.cli_args

        # choose the device before comfy.model_management is imported (CPU unless CUDA is present)
        import torch

        comfy.cli_args.args.cpu = not torch.cuda.is_available()
        import utils.install_util  # noqa: F401  (ComfyUI's utils package, before `nodes` shadows it)
    except ImportError as exc:  # a tree whose requirements are not installed
        COMFYUI_IMPORT_ERROR = f"ComfyUI at {COMFYUI} could not be imported ({exc}); install its requirements.txt"
        COMFYUI = None
    else:
        COMFYUI_IMPORT_ERROR = ""
else:
    COMFYUI_IMPORT_ERROR = ""


def require_comfyui() -> None:
    """Skip the calling test module when ComfyUI is unavailable (call at module top)."""
    if COMFYUI is None:
        pytest.skip(COMFYUI_IMPORT_ERROR or SKIP_REASON, allow_module_level=True)


TINY_UNET = {
    "use_checkpoint": False,
    "image_size": 32,
    "use_spatial_transformer": True,
    "legacy": False,
    "adm_in_channels": None,
    "in_channels": 4,
    "out_channels": 4,
    "model_channels": 32,
    "num_res_blocks": [1, 1],
    "channel_mult": [1, 2],
    "transformer_depth": [1, 1],
    "transformer_depth_output": [1, 1, 1, 1],
    "transformer_depth_middle": 1,
    "context_dim": 64,
    "use_linear_in_transformer": False,
    "use_temporal_resblock": False,
    "use_temporal_attention": False,
}
CONTEXT_DIM = 64


def randomize_(module, seed: int = 0, std: float = 0.05):
    """comfy.ops layers skip initialisation: fill every parameter deterministically."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "norm" in name and p.ndim == 1 and name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
    return module


def build_tiny_model(kind: str = "eps", seed: int = 0, weight_dtype=None):
    """A ModelPatcher around a tiny SD1.x-eps ("eps") or SD2.x-v ("v") UNet with random weights, stored in
    ``weight_dtype`` (default float32) without manual cast, as ComfyUI loads a half-precision model on a GPU."""
    import comfy.model_base
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models
    import torch

    if kind == "eps":
        cfg = comfy.supported_models.SD15(dict(TINY_UNET))
        model_type = comfy.model_base.ModelType.EPS
    else:
        cfg = comfy.supported_models.SD20(dict(TINY_UNET, use_linear_in_transformer=True, model_channels=64))
        model_type = comfy.model_base.ModelType.V_PREDICTION
    cfg.set_inference_dtype(weight_dtype or torch.float32, None)
    device = comfy.model_management.get_torch_device()
    model = comfy.model_base.BaseModel(cfg, model_type=model_type, device=torch.device("cpu"))
    randomize_(model, seed)
    return comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=torch.device("cpu"))


def run_cli_in_one_and_two_processes(
    args: list, folder: pathlib.Path, timeout: float = 600
) -> tuple[pathlib.Path, pathlib.Path]:
    """``python -m training <args>`` once as one process and once under ``torchrun`` with 2 gloo
    processes, each with ``--output`` in its own subfolder of ``folder`` (asserting both succeed);
    returns the two output folders (``one``, ``two``) for the caller to compare."""
    import os
    import subprocess

    env = {
        **os.environ,
        "COMFYUI_PATH": str(COMFYUI),
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    launchers = {
        "one": [sys.executable, "-m", "training"],
        "two": [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "training",
        ],
    }
    for name, launcher in launchers.items():
        done = subprocess.run(
            [*launcher, *map(str, args), "--output", str(folder / name)],
            env=env,
            cwd=folder,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        assert done.returncode == 0, f"{name} process(es): {done.stderr[-3000:]}"
    return folder / "one", folder / "two"
