"""Diff2Flow toolkit for ComfyUI.

ComfyUI imports this folder as a custom-node package and calls :func:`comfy_entrypoint` (V3 node
API). The nodes are registered only when ComfyUI itself is importable; everywhere else
(``pip install``, ``pytest d2f_core``, the headless trainer) importing this file is harmless and
registers nothing.
"""

from __future__ import annotations

import importlib.util
import os
import sys

WEB_DIRECTORY = "./web"


def _comfyui_importable() -> bool:
    return importlib.util.find_spec("comfy") is not None and importlib.util.find_spec("comfy_api") is not None


if __package__ and _comfyui_importable():
    # d2f_core, training and d2f_host are imported by absolute name (they are also the headless
    # packages); make them importable from this folder when the pack was not pip-installed.
    # Appended, never prepended: this folder's nodes/ must not shadow ComfyUI's nodes.py.
    _here = os.path.dirname(os.path.abspath(__file__))
    _missing = any(importlib.util.find_spec(name) is None for name in ("d2f_core", "training", "d2f_host"))
    if _missing and _here not in sys.path:
        sys.path.append(_here)
    from .nodes import comfy_entrypoint

    __all__ = ["WEB_DIRECTORY", "comfy_entrypoint"]
else:
    NODE_CLASS_MAPPINGS: dict = {}  # outside ComfyUI: nothing to register
    __all__ = ["WEB_DIRECTORY", "NODE_CLASS_MAPPINGS"]
