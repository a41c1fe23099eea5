"""Every node of the pack is documented: a description, a tooltip on every input and output,
a common id prefix and a category of its own."""
from __future__ import annotations

from comfy_harness import require_comfyui

require_comfyui()


def test_every_node_has_description_and_tooltips(comfy_nodes) -> None:
    ours = {k: v for k, v in comfy_nodes.items() if k.startswith("D2F_")}
    assert len(ours) == 7
    missing = []
    for node_id, cls in ours.items():
        schema = cls.define_schema()
        assert schema.node_id == node_id and schema.category.startswith("Diff2Flow")
        if not schema.description:
            missing.append(f"{node_id}: description")
        for item in [*schema.inputs, *schema.outputs]:
            if not getattr(item, "tooltip", None):
                missing.append(f"{node_id}.{item.id or item.display_name}")
    assert missing == []
