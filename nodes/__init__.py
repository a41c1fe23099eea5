"""ComfyUI adapters for the Diff2Flow toolkit (imported only inside ComfyUI).

Each node gathers its inputs, calls the layers below (``d2f_host`` for anything inside a model,
``training``, ``d2f_core``) and returns; the math lives in ``d2f_core``. Registration goes through ComfyUI's V3 API: :func:`comfy_entrypoint` returns a
``ComfyExtension`` listing every node; node ids share the prefix ``D2F_``.
"""

from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from .depth_nodes import NODES as DEPTH_NODES
from .model_nodes import NODES as MODEL_NODES
from .reflow_nodes import NODES as REFLOW_NODES
from .sampling_nodes import NODES as SAMPLING_NODES
from .train_nodes import NODES as TRAIN_NODES

NODES: list[type[io.ComfyNode]] = [*MODEL_NODES, *SAMPLING_NODES, *TRAIN_NODES, *REFLOW_NODES, *DEPTH_NODES]


class Diff2FlowExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)


async def comfy_entrypoint() -> Diff2FlowExtension:
    return Diff2FlowExtension()
