"""Finding ComfyUI and importing it as a library (headless use).

Importing this module never imports ComfyUI; :func:`bootstrap_comfyui` does, once.
"""

from __future__ import annotations

import os
import pathlib
import sys

import torch

from .errors import HostError

PACK_ROOT = pathlib.Path(__file__).resolve().parents[1]
COMFYUI_HINT = (
    "set COMFYUI_PATH to a ComfyUI source tree (0.8.0 or newer) whose requirements are installed in this "
    "Python, or run from a copy of this pack inside ComfyUI/custom_nodes/"
)


def find_comfyui() -> pathlib.Path | None:
    """A ComfyUI source tree: ``COMFYUI_PATH``, else the ComfyUI this pack is installed in."""
    candidates = [os.environ.get("COMFYUI_PATH", "")]
    if PACK_ROOT.parent.name == "custom_nodes":
        candidates.append(str(PACK_ROOT.parent.parent))
    for c in candidates:
        if c and (pathlib.Path(c) / "comfy" / "model_management.py").is_file():
            return pathlib.Path(c).resolve()
    return None


def bootstrap_comfyui(cpu: bool | None = None) -> pathlib.Path:
    """Make ComfyUI importable as a library (headless): put its tree first on ``sys.path`` (its
    ``nodes.py`` must win over this pack's ``nodes/`` package) and choose the device before
    ``comfy.model_management`` is imported (CPU when no CUDA GPU, or when ``cpu`` is true)."""
    if "comfy.model_management" in sys.modules:  # already inside ComfyUI (or bootstrapped)
        return pathlib.Path(sys.modules["comfy.model_management"].__file__).resolve().parents[1]
    root = find_comfyui()
    if root is None:
        given = os.environ.get("COMFYUI_PATH")
        found = f"COMFYUI_PATH={given!r} holds no comfy/model_management.py; " if given else ""
        raise HostError(f"ComfyUI was not found, and it is what reads SD checkpoints: {found}{COMFYUI_HINT}")
    if str(root) in sys.path:
        sys.path.remove(str(root))
    sys.path.insert(0, str(root))
    try:
        import comfy.cli_args

        comfy.cli_args.args.cpu = (not torch.cuda.is_available()) if cpu is None else cpu
        import comfy.model_management
        import comfy.sd
    except ImportError as exc:
        raise HostError(
            f"ComfyUI at {root} could not be imported ({exc}): install its requirements.txt into this Python"
        ) from exc
    return root
