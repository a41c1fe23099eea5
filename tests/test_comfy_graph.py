"""Whole graphs through ComfyUI's own executor, in-process, on an SD1.5-shaped checkpoint with random weights.

D2F_CheckpointLoader -> CLIPTextEncode (+/-) -> EmptyLatentImage / LoadImage+VAEEncode -> D2F_KSampler
-> VAEDecode -> SaveImage, validated with ``execution.validate_prompt`` and run by ``execution.PromptExecutor``.

The checkpoint (written once per session) comes from ``sd15_checkpoint.tiny_sd15_state_dict``.
"""

from __future__ import annotations

import ast
import asyncio
import logging
import re
import uuid

import pytest
from comfy_harness import require_comfyui

require_comfyui()

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from sd15_checkpoint import CKPT_NAME, CLIP_UNLOADABLE  # noqa: E402

IMAGE_SIZE = 64


@pytest.fixture(scope="session")
def tiny_sd15_checkpoint(tiny_sd15_file):
    """CKPT_NAME in a temporary folder registered as a ComfyUI "checkpoints" folder (for the session)."""
    import folder_paths

    folder = str(tiny_sd15_file.parent)
    folder_paths.add_model_folder_path("checkpoints", folder)
    yield CKPT_NAME
    paths = folder_paths.folder_names_and_paths["checkpoints"][0]
    if folder in paths:
        paths.remove(folder)


@pytest.fixture
def fp32_text_encoder(comfy_nodes, monkeypatch):
    """ComfyUI's default text-encoder dtype is fp16 even on CPU, where fp16 matmuls are slow: loading CLIP
    in fp32 (ComfyUI's --fp32-text-enc option) halves the time of each CLIPTextEncode here."""
    import comfy.cli_args

    monkeypatch.setattr(comfy.cli_args.args, "fp32_text_enc", True)


@pytest.fixture
def io_dirs(comfy_nodes, tmp_path, fp32_text_encoder):
    """Temporary ComfyUI input / output directories (restored afterwards)."""
    import folder_paths

    before = folder_paths.get_input_directory(), folder_paths.get_output_directory()
    dirs = tmp_path / "input", tmp_path / "output"
    for d in dirs:
        d.mkdir()
    folder_paths.set_input_directory(str(dirs[0]))
    folder_paths.set_output_directory(str(dirs[1]))
    yield dirs
    folder_paths.set_input_directory(before[0])
    folder_paths.set_output_directory(before[1])


class StubServer:
    """What PromptExecutor uses of ComfyUI's PromptServer; records the events it is sent."""

    def __init__(self) -> None:
        self.client_id = None
        self.last_node_id = None
        self.sockets_metadata: dict = {}
        self.events: list[tuple] = []

    def send_sync(self, event, data, sid=None) -> None:
        self.events.append((event, data))

    def queue_updated(self) -> None:
        pass


def run_prompts(*prompts: dict) -> list[dict]:
    """Validate and run the prompts one after the other on one PromptExecutor (so with ComfyUI's node cache);
    per prompt: {"messages": status messages, "outputs": UI outputs per node id}."""
    import execution

    async def run() -> list[dict]:
        executor = execution.PromptExecutor(
            StubServer(), cache_type=execution.CacheType.CLASSIC, cache_args={"lru": 0, "ram": 0}
        )
        results = []
        for prompt in prompts:
            prompt_id = str(uuid.uuid4())
            ok, error, outputs, node_errors = await execution.validate_prompt(prompt_id, prompt, None)
            assert ok, f"prompt failed validation: {error} {node_errors}"
            await executor.execute_async(prompt, prompt_id, extra_data={}, execute_outputs=outputs)
            errors = [data for event, data in executor.status_messages if event == "execution_error"]
            assert executor.success, "graph failed: " + "\n".join(
                f"{e.get('node_type')}: {e.get('exception_message')}\n{''.join(e.get('traceback', []))}" for e in errors
            )
            results.append({"messages": list(executor.status_messages), "outputs": executor.history_result["outputs"]})
        return results

    return asyncio.run(run())


def events(result: dict) -> list[str]:
    return [event for event, _ in result["messages"]]


def cached_nodes(result: dict) -> set[str]:
    return {n for event, data in result["messages"] if event == "execution_cached" for n in data["nodes"]}


def graph(
    ckpt_name: str, seed: int = 0, sampler: str = "euler", denoise: float = 1.0, image: str | None = None
) -> dict:
    """API-format prompt; text-to-image from an empty latent, or image-to-image from `image` (input folder)."""
    prompt = {
        "1": {
            "class_type": "D2F_CheckpointLoader",
            "inputs": {"ckpt_name": ckpt_name, "lora_name": "None", "lora_strength": 1.0, "zero_terminal_snr": False},
        },
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a photo of a red fox in the snow", "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry, low quality", "clip": ["1", 1]}},
        "5": {
            "class_type": "D2F_KSampler",
            "inputs": {
                "model": ["1", 0],
                "seed": seed,
                "steps": 3,
                "cfg": 5.0,
                "sampler": sampler,
                "shift": 1.0,
                "positive": ["2", 0],
                "negative": ["3", 0],
                "latent_image": ["4", 0],
                "denoise": denoise,
            },
        },
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": "d2f_test"}},
    }
    if image is None:
        prompt["4"] = {
            "class_type": "EmptyLatentImage",
            "inputs": {"width": IMAGE_SIZE, "height": IMAGE_SIZE, "batch_size": 1},
        }
    else:
        prompt["8"] = {"class_type": "LoadImage", "inputs": {"image": image}}
        prompt["4"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["8", 0], "vae": ["1", 2]}}
    return prompt


def saved_image(result: dict, output_dir) -> np.ndarray:
    """The one image SaveImage (node "7") wrote in a run, as uint8 RGB; checks it is a 64x64 PNG in output_dir."""
    images = result["outputs"]["7"]["images"]
    assert len(images) == 1 and images[0]["type"] == "output"
    path = output_dir / images[0]["subfolder"] / images[0]["filename"]
    assert path.is_file() and path.name.startswith("d2f_test") and path.suffix == ".png"
    with Image.open(path) as img:
        assert img.format == "PNG" and img.size == (IMAGE_SIZE, IMAGE_SIZE)
        pixels = np.asarray(img.convert("RGB"))
    assert np.isin(pixels, (0, 255)).mean() < 0.5, "mostly clipped pixels: the latent is not finite / sane"
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 1, "every pixel is the same colour"
    return pixels


# ComfyUI's log lines about keys a checkpoint lacks or has in excess (comfy.model_base, comfy.sd)
KEY_REPORT = re.compile(
    r"^(unet missing|unet unexpected|clip missing|clip unexpected|Missing VAE keys|Leftover VAE keys):? (\[.*\]):?$",
    re.S,
)


def key_reports(records) -> dict[str, list[str]]:
    """ComfyUI's missing / unexpected key log messages (any level) as {report: keys}."""
    found: dict[str, list[str]] = {}
    for record in records:
        match = KEY_REPORT.match(record.getMessage())
        if match:
            found.setdefault(match[1], []).extend(ast.literal_eval(match[2]))
    return found


def test_tiny_checkpoint_loads_as_sd15_with_every_key(pack, tiny_sd15_checkpoint, fp32_text_encoder, caplog) -> None:
    import comfy.sd
    import comfy.supported_models
    import comfy.taesd.taesd

    caplog.set_level(logging.DEBUG)
    model, clip, vae = pack.nodes["D2F_CheckpointLoader"].execute(tiny_sd15_checkpoint, "None", 1.0, False).result
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert not any("not a checkpoint" in w or "no CLIP" in w or "No VAE" in w for w in warnings), warnings
    reports = key_reports(caplog.records)
    # every key in the file is used, and the only key not in it is CLIP-L's text_projection (unused by SD1.x)
    assert reports == {"clip missing": sorted(CLIP_UNLOADABLE)}, reports
    assert type(model.model.model_config) is comfy.supported_models.SD15
    assert pack.model_sampling.is_patched(model)
    assert isinstance(clip, comfy.sd.CLIP) and clip.cond_stage_model is not None
    assert isinstance(vae, comfy.sd.VAE) and isinstance(vae.first_stage_model, comfy.taesd.taesd.TAESD)
    # random weights that give finite, non-trivial conditioning
    cond = clip.encode_from_tokens_scheduled(clip.tokenize("a photo of a red fox"))[0][0]
    assert cond.shape == (1, 77, 768) and torch.isfinite(cond).all() and cond.std() > 0.1


def test_text_to_image_graph_runs_through_comfyui_executor(tiny_sd15_checkpoint, io_dirs) -> None:
    first, second = run_prompts(graph(tiny_sd15_checkpoint, seed=0), graph(tiny_sd15_checkpoint, seed=1))
    for result in (first, second):
        assert events(result)[0] == "execution_start" and events(result)[-1] == "execution_success"
        assert "execution_error" not in events(result)
    assert cached_nodes(first) == set()
    # a new seed re-runs the sampler and what follows it, not the checkpoint loader or the text encoders
    assert cached_nodes(second) == {"1", "2", "3", "4"}
    images = [saved_image(result, io_dirs[1]) for result in (first, second)]
    assert len(list(io_dirs[1].rglob("*.png"))) == 2
    # the image follows the sampled latent: another seed, another image
    assert np.abs(images[0].astype(int) - images[1].astype(int)).mean() > 1.0


def test_image_to_image_graph_with_heun_and_half_denoise(tiny_sd15_checkpoint, io_dirs) -> None:
    y, x = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE]
    source = np.stack([x * 4, y * 4, (x + y) * 2], axis=-1).astype(np.uint8)
    Image.fromarray(source).save(io_dirs[0] / "gradient.png")
    (result,) = run_prompts(graph(tiny_sd15_checkpoint, sampler="heun", denoise=0.5, image="gradient.png"))
    assert events(result)[-1] == "execution_success" and "execution_error" not in events(result)
    saved_image(result, io_dirs[1])


@pytest.fixture
def loras_folder(comfy_nodes, tmp_path):
    import folder_paths

    folder = tmp_path / "loras"
    folder.mkdir()
    folder_paths.add_model_folder_path("loras", str(folder), is_default=True)
    yield folder
    paths = folder_paths.folder_names_and_paths["loras"][0]
    if str(folder) in paths:
        paths.remove(str(folder))


def write_lora(checkpoint: str, folder, name: str, metadata) -> None:
    """A small random LoRA on two attention layers of the checkpoint's UNet (with metadata)."""
    import comfy.sd
    import folder_paths

    from d2f_core.lora import adapters_state_dict, make_adapter, select_target_modules
    from training.files import save_lora

    model = comfy.sd.load_checkpoint_guess_config(
        folder_paths.get_full_path_or_raise("checkpoints", checkpoint), output_vae=False, output_clip=False
    )[0]
    modules = dict(list(select_target_modules(model.model.diffusion_model, "attention").items())[:2])
    gen = torch.Generator().manual_seed(0)
    adapters = {n: make_adapter("LoRA", m.weight.shape, 2, 2.0, gen) for n, m in modules.items()}
    for a in adapters.values():
        torch.nn.init.normal_(a.up, std=0.1, generator=gen)
    save_lora(folder / name, adapters_state_dict(adapters), metadata)


def test_loader_configures_the_patch_from_lora_metadata(
    pack, tiny_sd15_checkpoint, loras_folder, fp32_text_encoder
) -> None:
    from d2f_core.lora_metadata import LoraMetadata

    loader = pack.nodes["D2F_CheckpointLoader"]
    write_lora(
        tiny_sd15_checkpoint,
        loras_folder,
        "d2f.safetensors",
        LoraMetadata("diff2flow", "eps", False, rank=2, alpha=2.0),
    )
    write_lora(tiny_sd15_checkpoint, loras_folder, "naive.safetensors", LoraMetadata("naive_fm", "eps", False))
    write_lora(tiny_sd15_checkpoint, loras_folder, "vpred.safetensors", LoraMetadata("diff2flow", "v", True))
    write_lora(tiny_sd15_checkpoint, loras_folder, "plain.safetensors", None)

    model = loader.execute(tiny_sd15_checkpoint, "d2f.safetensors", 1.0, False).result[0]
    assert pack.model_sampling.is_patched(model) and len(model.patches) == 2
    assert model.get_model_object("model_sampling").prediction == "eps"

    naive = loader.execute(tiny_sd15_checkpoint, "naive.safetensors", 1.0, False).result[0]
    ms = naive.get_model_object("model_sampling")
    assert not pack.model_sampling.is_patched(naive)  # naive FM: x_sigma in, T * sigma, output = velocity
    assert (
        float(ms.timestep(torch.tensor(0.5))) == pytest.approx(500.0)
        and ms.calculate_input(0.5, torch.ones(1)).item() == 1.0
    )

    with pytest.raises(ValueError, match="trained on a v-prediction model, but checkpoint .* predicts eps"):
        loader.execute(tiny_sd15_checkpoint, "vpred.safetensors", 1.0, False)

    plain = loader.execute(tiny_sd15_checkpoint, "plain.safetensors", 0.5, False).result[0]
    assert pack.model_sampling.is_patched(plain) and len(plain.patches) == 2
