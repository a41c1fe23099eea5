"""The Diff2Flow model patch on tiny SD1.x-eps and SD2.x-v models in a real ComfyUI."""
from __future__ import annotations

import pytest
import torch

from comfy_harness import require_comfyui

require_comfyui()
