"""Diff2Flow toolkit for ComfyUI.

ComfyUI imports this folder as a custom-node package. The nodes are registered only when
ComfyUI itself is importable; everywhere else (``pip install``, ``pytest d2f_core``, the headless
trainer) importing this file is harmless and registers nothing.
"""
from __future__ import annotations

import importlib.util
import os
import sys

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
WEB_DIRECTORY = "./web"


def _comfyui_importable() -> bool:
    return importlib.util.find_spec("comfy") is not None and importlib.util.find_spec("comfy_api") is not None


if _comfyui_importable() and __name__ != "__main__" and __package__:
    # d2f_core and training are imported by absolute name (they are also the headless
    # packages); make them importable from this folder when the pack was not pip-installed.
    # Appended, never prepended: this folder's nodes/ must not shadow ComfyUI's nodes.py.
    _here = os.path.dirname(os.path.abspath(__file__))
    if importlib.util.find_spec("d2f_core") is None and _here not in sys.path:
        sys.path.append(_here)
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: F811

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
