"""ComfyUI adapters for the Diff2Flow toolkit (imported only inside ComfyUI).

Each node gathers its inputs, calls ``d2f_core`` or ``training`` and returns; no math lives here.
"""
from __future__ import annotations

NODES: list = []

NODE_CLASS_MAPPINGS = {node.define_schema().node_id: node for node in NODES}
NODE_DISPLAY_NAME_MAPPINGS = {node.define_schema().node_id: node.define_schema().display_name for node in NODES}
