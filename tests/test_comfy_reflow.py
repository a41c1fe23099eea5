"""Diff2Flow Reflow Pairs -> Train Diff2Flow LoRA (objective reflow) in a real ComfyUI 0.8.0, on a
tiny random SD1.5-shaped model: the pairs, the training on them, and the LoRA in stock loaders."""
from __future__ import annotations

import logging

import pytest
import torch

from comfy_harness import CONTEXT_DIM, require_comfyui

require_comfyui()

import folder_paths  # noqa: E402

from d2f_core.lora_metadata import read_lora_metadata  # noqa: E402
from training.pairs import load_pairs  # noqa: E402


@pytest.fixture
def io_dirs(tmp_path, comfy_nodes):
    saved_out, saved_loras = folder_paths.get_output_directory(), folder_paths.folder_names_and_paths["loras"]
    folder_paths.set_output_directory(str(tmp_path / "output"))
    (tmp_path / "loras").mkdir()
    folder_paths.folder_names_and_paths["loras"] = ([str(tmp_path / "loras")], saved_loras[1])
    yield tmp_path
    folder_paths.set_output_directory(saved_out)
    folder_paths.folder_names_and_paths["loras"] = saved_loras


def prompts(n: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(n, 77, CONTEXT_DIM, generator=gen), {}]]


def make_pairs(comfy_nodes, model, count: int, **overrides):
    args = dict(model=model, positive=prompts(2), count=count, width=64, height=64, steps=2, cfg=1.0, sampler="euler",
                seed=3, batch_size=2, folder="tiny")
    args.update(overrides)
    return comfy_nodes["D2F_ReflowPairs"].execute(**args)[0]


def test_pairs_node_writes_deterministic_appendable_pairs(comfy_nodes, tiny_model, io_dirs) -> None:
    model = tiny_model("eps")
    folder = make_pairs(comfy_nodes, model, 4)
    assert folder.startswith(str(io_dirs / "output" / "diff2flow_pairs"))
    first = load_pairs(folder)
    assert first.latents.shape == (4, 4, 8, 8) and torch.isfinite(first.latents).all()
    assert first.prompt.tolist() == [0, 1, 0, 1]
    # a larger count appends: the first four pairs are the same bits
    more = load_pairs(make_pairs(comfy_nodes, model, 6))
    assert more.latents.shape[0] == 6
    assert torch.equal(more.latents[:4], first.latents) and torch.equal(more.noise[:4], first.noise)
    # another seed is another set of pairs, refused in the same folder
    with pytest.raises(ValueError):
        make_pairs(comfy_nodes, model, 6, seed=4)


def test_reflow_lora_trains_on_the_pairs_and_loads_in_stock_loaders(comfy_nodes, tiny_model, io_dirs, caplog) -> None:
    model = tiny_model("eps")
    folder = make_pairs(comfy_nodes, model, 4)
    node = comfy_nodes["D2F_TrainLoRA"]
    spec = {i.id: i for i in node.define_schema().inputs}
    args = {name: [getattr(i, "default", None)] for name, i in spec.items() if getattr(i, "default", None) is not None}
    args.update(model=[model], pairs=[folder], objective=["reflow"], steps=[3], rank=[2], alpha=[2.0], output_name=["reflowed"])
    _, lora, losses, steps, previews = node.execute(**args).args
    assert previews.shape == (1, 1, 1, 3)  # previews off: the 1x1 placeholder
    assert steps == 3 and len(losses["loss"]) == 3 and all(torch.isfinite(torch.tensor(losses["loss"])))
    assert lora.metadata.objective == "reflow"
    (name,) = comfy_nodes["D2F_SaveLoRA"].execute(lora, "reflowed", False).args
    path = io_dirs / "loras" / name
    assert read_lora_metadata(path).objective == "reflow"
    with caplog.at_level(logging.WARNING):
        (loaded,) = comfy_nodes["LoraLoaderModelOnly"]().load_lora_model_only(tiny_model("eps"), name, 1.0)
    assert loaded.patches and "lora key not loaded" not in caplog.text


def test_reflow_without_pairs_is_refused_before_training(comfy_nodes, tiny_model, io_dirs) -> None:
    node = comfy_nodes["D2F_TrainLoRA"]
    spec = {i.id: i for i in node.define_schema().inputs}
    args = {name: [getattr(i, "default", None)] for name, i in spec.items() if getattr(i, "default", None) is not None}
    gen = torch.Generator().manual_seed(0)
    args.update(model=[tiny_model("eps")], latents=[{"samples": torch.randn(2, 4, 8, 8, generator=gen)}],
                positive=[prompts(1)], objective=["reflow"], steps=[2])
    with pytest.raises(ValueError, match="pairs"):
        node.execute(**args)
