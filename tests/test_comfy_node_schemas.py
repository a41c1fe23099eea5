"""Every node of the pack is documented: a description, a tooltip on every input and output,
a common id prefix and a category of its own."""
from __future__ import annotations

from comfy_harness import require_comfyui

require_comfyui()


def test_every_node_has_description_and_tooltips(comfy_nodes) -> None:
    ours = {k: v for k, v in comfy_nodes.items() if k.startswith("D2F_")}
    assert len(ours) == 11  # 7 + Diff2Flow Reflow Pairs + the three depth nodes
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


def test_training_seeds_stay_fixed_between_runs(comfy_nodes) -> None:
    """The front-end gives an INT named seed a "control after generate" widget (randomize) unless the
    schema says otherwise: a randomized training seed changes every run and breaks resume. The
    training and reflow-pairs nodes turn it off; the KSampler keeps it (a fresh image per run)."""
    def seed_options(node_id: str) -> dict:
        info = comfy_nodes[node_id].GET_NODE_INFO_V1()
        return info["input"]["required"]["seed"][1]

    assert seed_options("D2F_TrainLoRA").get("control_after_generate") is False
    assert seed_options("D2F_ReflowPairs").get("control_after_generate") is False
    assert seed_options("D2F_DepthEstimate").get("control_after_generate") is False  # a depth map is reproducible
    assert seed_options("D2F_KSampler").get("control_after_generate") is True
