"""Fixtures for the tests that need ComfyUI (see comfy_harness for how ComfyUI is found)."""

from __future__ import annotations

import asyncio
import sys

import pytest
from comfy_harness import COMFYUI, COMFYUI_IMPORT_ERROR, CONTEXT_DIM, ROOT, SKIP_REASON, build_tiny_model


@pytest.fixture(scope="session")
def comfy_nodes():
    """ComfyUI's node registry with the built-in extra nodes and this pack loaded."""
    if COMFYUI is None:
        pytest.skip(COMFYUI_IMPORT_ERROR or SKIP_REASON)
    import nodes

    async def load() -> bool:
        await nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False)
        return await nodes.load_custom_node(str(ROOT))

    assert asyncio.run(load()), "the Diff2Flow pack failed to load into ComfyUI (see log)"
    assert "D2F_ModelPatch" in nodes.NODE_CLASS_MAPPINGS
    return nodes.NODE_CLASS_MAPPINGS


@pytest.fixture(scope="session")
def pack(comfy_nodes):
    """This pack's node modules as ComfyUI loaded them."""
    import importlib

    package = sys.modules[comfy_nodes["D2F_ModelPatch"].__module__].__package__  # "<pack>.nodes"

    class Pack:
        model_sampling = importlib.import_module("d2f_host.model_sampling")
        sampling_nodes = importlib.import_module(package + ".sampling_nodes")
        model_nodes = importlib.import_module(package + ".model_nodes")
        train_nodes = importlib.import_module(package + ".train_nodes")
        train_inputs = importlib.import_module(package + ".train_inputs")
        nodes = comfy_nodes

    return Pack


@pytest.fixture
def loras_dir(tmp_path, comfy_nodes):
    """ComfyUI's models/loras pointed at an empty temporary folder for one test."""
    import folder_paths

    folder = tmp_path / "loras"
    folder.mkdir()
    saved = folder_paths.folder_names_and_paths["loras"]
    folder_paths.folder_names_and_paths["loras"] = ([str(folder)], saved[1])
    folder_paths.filename_list_cache.clear() if hasattr(folder_paths, "filename_list_cache") else None
    yield folder
    folder_paths.folder_names_and_paths["loras"] = saved


@pytest.fixture
def tiny_model(comfy_nodes):
    return build_tiny_model


@pytest.fixture
def conditioning(comfy_nodes):
    import torch

    def make(seed: int = 0, batch: int = 1):
        gen = torch.Generator().manual_seed(seed)
        return [[torch.randn(batch, 77, CONTEXT_DIM, generator=gen), {}]]

    return make


@pytest.fixture(scope="session")
def tiny_sd15_file(comfy_nodes, tmp_path_factory):
    """An SD1.5-shaped checkpoint file with random weights (see sd15_checkpoint), written once per session."""
    from safetensors.torch import save_file
    from sd15_checkpoint import CKPT_NAME, tiny_sd15_state_dict

    path = tmp_path_factory.mktemp("checkpoints") / CKPT_NAME
    save_file(tiny_sd15_state_dict(), str(path))
    return path


@pytest.fixture(scope="module")
def fp32_text_encoder_module(comfy_nodes):
    """CLIP in fp32 for the tests of one module: fp16 matmuls are slow on the CPU."""
    import comfy.cli_args

    before = comfy.cli_args.args.fp32_text_enc
    comfy.cli_args.args.fp32_text_enc = True
    yield
    comfy.cli_args.args.fp32_text_enc = before


@pytest.fixture
def recorded_trainers(pack, monkeypatch) -> list:
    """The ``Trainer`` objects the training node creates during the test, in order (the run
    assembly's own class, subclassed only to record its instances), so a test can inspect the
    adapters as trained."""
    from d2f_host import training_run

    trainers: list = []

    class RecordingTrainer(training_run.Trainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            trainers.append(self)

    monkeypatch.setattr(training_run, "Trainer", RecordingTrainer)
    return trainers
