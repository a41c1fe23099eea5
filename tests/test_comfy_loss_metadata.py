"""A LoRA records the per-sample loss it was trained with, huber_c when it was set, and the share of its
training sigmas on the sampling grid when there was one (the host's ``lora_metadata_for``, shared by the node
and the CLI)."""

from __future__ import annotations

from comfy_harness import require_comfyui

require_comfyui()

from d2f_core.lora_metadata import LoraMetadata  # noqa: E402
from training import TrainConfig  # noqa: E402


def test_the_lora_metadata_records_the_loss_and_a_set_c(comfy_nodes, tiny_model) -> None:
    from d2f_host.checkpoints import lora_metadata_for
    from d2f_host.model_sampling import alignment_of

    model = tiny_model("eps")
    d2f = alignment_of(model)
    meta = lora_metadata_for(model, TrainConfig(loss="pseudo_huber", huber_c=0.05), d2f)(3)
    assert (meta.loss, meta.huber_c, meta.steps) == ("pseudo_huber", 0.05, 3)
    header = meta.to_header()
    assert header["diff2flow.loss"] == "pseudo_huber" and header["diff2flow.huber_c"] == "0.05"
    assert LoraMetadata.from_header(header) == meta
    default_c = lora_metadata_for(model, TrainConfig(loss="pseudo_huber"), d2f)(3)  # the paper's c: not recorded
    assert (default_c.loss, default_c.huber_c) == ("pseudo_huber", None)
    assert "diff2flow.huber_c" not in default_c.to_header()
    assert lora_metadata_for(model, TrainConfig(), d2f)(3).loss == "mse"
    # the default "recommended" is recorded as the loss it trained with
    assert lora_metadata_for(model, TrainConfig(objective="reflow"), d2f)(3).loss == "pseudo_huber"


def test_the_lora_metadata_records_the_grid_share_as_trained(comfy_nodes, tiny_model) -> None:
    from d2f_host.checkpoints import lora_metadata_for
    from d2f_host.model_sampling import alignment_of

    model = tiny_model("eps")
    d2f = alignment_of(model)
    recommended = lora_metadata_for(model, TrainConfig(objective="reflow"), d2f)(3)  # -1: reflow's 0.5
    assert recommended.grid_share == 0.5 and recommended.to_header()["diff2flow.grid_share"] == "0.5"
    assert LoraMetadata.from_header(recommended.to_header()) == recommended
    assert lora_metadata_for(model, TrainConfig(grid_share=0.25), d2f)(3).grid_share == 0.25
    none = lora_metadata_for(model, TrainConfig(objective="reflow", grid_share=0.0), d2f)(3)
    assert none.grid_share is None and "diff2flow.grid_share" not in none.to_header()
    assert lora_metadata_for(model, TrainConfig(), d2f)(3).grid_share is None  # diff2flow recommends none
