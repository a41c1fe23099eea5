"""LoRA training on a base whose UNet weights are stored in fp8 (ComfyUI's ``fp8_e4m3fn`` weight dtype with
its manual cast): through the node, on a UNet loaded by stock UNETLoader with weight_dtype fp8_e4m3fn, and
through the ``train`` command's ``--weight-dtype``. ComfyUI casts each fp8 weight to the input's dtype when a
layer runs and applies the weight wrappers (the adapters) after that cast, so the adapters train in full
precision while the base stays fp8 and untouched."""

from __future__ import annotations

import math
import pathlib

import pytest
import torch
from comfy_harness import require_comfyui

require_comfyui()

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from d2f_app.cli import main  # noqa: E402
from training import TrainConfig  # noqa: E402

LATENT = (4, 8, 8)
CONTEXT = 768  # the SD1.5-shaped test checkpoint's (tests/sd15_checkpoint.py)


@pytest.fixture(scope="module")
def fp8_unet_name(tiny_sd15_file, tmp_path_factory) -> str:
    """The UNet of the SD1.5-shaped test checkpoint as a diffusion-model file that stock UNETLoader lists."""
    import folder_paths
    from safetensors.torch import load_file, save_file

    folder = tmp_path_factory.mktemp("diffusion_models")
    prefix = "model.diffusion_model."
    unet = {k[len(prefix) :]: v for k, v in load_file(str(tiny_sd15_file)).items() if k.startswith(prefix)}
    save_file(unet, str(folder / "d2f_tiny_unet.safetensors"))
    folder_paths.add_model_folder_path("diffusion_models", str(folder))
    return "d2f_tiny_unet.safetensors"


def unet_weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.model.diffusion_model.state_dict().items()}


def unet_output(model, x, sigma, cond) -> torch.Tensor:
    import comfy.model_management

    comfy.model_management.load_models_gpu([model])
    with torch.no_grad():
        return model.model.apply_model(x, sigma, c_crossattn=cond).float()


def test_lora_trains_on_an_fp8_base_from_unetloader_and_loads_in_stock_loraloader(
    pack, comfy_nodes, fp8_unet_name, loras_dir, recorded_trainers
) -> None:
    (base,) = comfy_nodes["UNETLoader"]().load_unet(fp8_unet_name, "fp8_e4m3fn")
    before = unet_weights(base)
    assert {v.dtype for k, v in before.items() if k.endswith(".weight")} >= {torch.float8_e4m3fn}
    gen = torch.Generator().manual_seed(0)
    latents = [{"samples": torch.randn(2, *LATENT, generator=gen)}]
    positive = [[[torch.randn(1, 77, CONTEXT, generator=gen), {}]]]
    config = TrainConfig(
        steps=4, batch_size=2, rank=4, alpha=4.0, learning_rate=1e-2, targets="attention_ff", dtype="bf16", seed=0
    )
    inputs = pack.train_inputs.TrainingInputs(latents, positive)
    _, lora, losses, steps, _ = pack.train_nodes.train_lora(base, config, inputs)
    assert steps == 4 and all(math.isfinite(v) for v in losses["loss"])
    # the adapters trained: LoRA's up factors start at zero
    (trainer,) = recorded_trainers
    assert all(a.up.abs().max() > 0 for a in trainer.adapters.values())
    assert all(v.dtype == torch.float32 for v in lora.values())
    assert lora.metadata.base_weight_dtype == "fp8_e4m3fn"
    # the base stayed fp8 and bit-for-bit unchanged
    after = unet_weights(base)
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert after[key].dtype == value.dtype, key
        assert torch.equal(after[key].view(torch.uint8), value.view(torch.uint8)), f"{key} changed"
    # the saved file loads in stock LoraLoaderModelOnly onto the fp8 base (every key) and changes its output
    (name,) = comfy_nodes["D2F_SaveLoRA"].execute(lora, "fp8_base", False).result
    (loaded,) = comfy_nodes["LoraLoaderModelOnly"]().load_lora_model_only(base, name, 1.0)
    assert len(loaded.patches) == len(lora) // 3  # (up, down, alpha) per adapter: every one became a patch
    x, sigma, cond = torch.randn(1, *LATENT, generator=gen), torch.tensor([5.0]), positive[0][0][0]
    plain, with_lora = unet_output(base, x, sigma, cond), unet_output(loaded, x, sigma, cond)
    assert torch.isfinite(with_lora).all()
    assert (with_lora - plain).abs().max() > 1e-3 * plain.abs().max(), "the LoRA changed nothing"


@pytest.fixture(scope="module")
def cache(tiny_sd15_file, tmp_path_factory, fp32_text_encoder_module) -> pathlib.Path:
    """A latent cache of two captioned images, prepared with the SD1.5-shaped test checkpoint."""
    images = tmp_path_factory.mktemp("images")
    gen = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray((gen.random((64, 64, 3)) * 255).astype(np.uint8)).save(images / f"img{i}.png")
        (images / f"img{i}.txt").write_text(f"a photo of thing {i}", encoding="utf-8")
    folder = tmp_path_factory.mktemp("cache")
    argv = ["prepare", "--dataset", str(images), "--checkpoint", str(tiny_sd15_file), "--cache", str(folder)]
    assert main([*argv, "--resolution", "64", "--no-progress"]) == 0
    return folder


def test_train_weight_dtype_loads_the_base_in_fp8_from_the_flag_and_the_toml_key(
    cache, tiny_sd15_file, tmp_path, monkeypatch
) -> None:
    """``--weight-dtype fp8_e4m3fn`` (and the TOML key ``weight_dtype``) store the base in fp8 for the run,
    and the run's TOML keeps it; without it the base is ComfyUI's default (fp32 on the CPU)."""
    import comfy.model_management

    from d2f_app.options import WEIGHT_DTYPES as FLAG_CHOICES
    from d2f_host import training_run
    from d2f_host.checkpoints import WEIGHT_DTYPES, weight_dtype_name

    assert tuple(WEIGHT_DTYPES) == FLAG_CHOICES
    seen: list[tuple[str, bool]] = []
    prepare_run = training_run.prepare_run

    def recording(model, *args, **kwargs):  # what the run trains on: the weights' dtype, manual cast or not
        seen.append((weight_dtype_name(model), model.model.manual_cast_dtype is not None))
        return prepare_run(model, *args, **kwargs)

    monkeypatch.setattr(training_run, "prepare_run", recording)
    common = ["--cache", str(cache), "--checkpoint", str(tiny_sd15_file), "--steps", "2", "--batch-size", "2"]
    common += ["--rank", "4", "--targets", "attention_ff", "--no-progress"]
    assert main(["train", *common, "--output", str(tmp_path / "flag"), "--weight-dtype", "fp8_e4m3fn"]) == 0
    written = (tmp_path / "flag" / "diff2flow_lora.toml").read_text(encoding="utf-8")
    assert 'weight_dtype = "fp8_e4m3fn"' in written
    toml = tmp_path / "fp8.toml"
    toml.write_text('[train]\nweight_dtype = "fp8_e5m2"\n', encoding="utf-8")
    assert main(["train", *common, "--output", str(tmp_path / "toml"), "--config", str(toml)]) == 0
    assert main(["train", *common, "--output", str(tmp_path / "default")]) == 0
    cpu = comfy.model_management.get_torch_device().type == "cpu"
    assert seen[:2] == [("fp8_e4m3fn", True), ("fp8_e5m2", True)]
    assert seen[2][0] != "fp8_e4m3fn" and (not cpu or seen[2][0] == "fp32")
    for run in ("flag", "toml"):
        assert (tmp_path / run / "diff2flow_lora.safetensors").is_file()
    bad = tmp_path / "bad.toml"
    bad.write_text('[train]\nweight_dtype = "fp4"\n', encoding="utf-8")
    assert main(["train", *common, "--output", str(tmp_path / "bad"), "--config", str(bad)]) == 2


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_lora_trains_on_a_half_precision_base_without_manual_cast(pack, tiny_model, dtype: str) -> None:
    """A base stored in fp16 without ComfyUI's manual cast (how ComfyUI loads SD on a GPU that computes in
    fp16): training in fp32 casts every layer's weight to fp32 as it runs (ComfyUI's compute dtype, as the stock
    training node sets it); bf16 autocast computes as it is. The base stays fp16 and unchanged."""
    base = tiny_model("eps", weight_dtype=torch.float16)
    assert base.model.get_dtype() == torch.float16 and base.model.manual_cast_dtype is None
    before = unet_weights(base)
    gen = torch.Generator().manual_seed(0)
    latents = [{"samples": torch.randn(2, *LATENT, generator=gen)}]
    positive = [[[torch.randn(1, 77, 64, generator=gen), {}]]]
    probe = (latents[0]["samples"][:1].half(), torch.tensor([1.0]), positive[0][0][0].half())
    output = unet_output(base, *probe)
    config = TrainConfig(steps=3, batch_size=2, rank=4, alpha=4.0, learning_rate=1e-2, dtype=dtype, seed=0)
    trained, lora, losses, _, _ = pack.train_nodes.train_lora(
        base, config, pack.train_inputs.TrainingInputs(latents, positive)
    )
    assert all(math.isfinite(v) for v in losses["loss"])
    assert any(v.abs().max() > 0 for k, v in lora.items() if k.endswith("lora_up.weight"))
    assert lora.metadata.base_weight_dtype == "fp16"
    after = unet_weights(base)
    assert all(after[k].dtype == v.dtype and torch.equal(after[k], v) for k, v in before.items())
    # the input MODEL samples as before (the compute dtype was the training clone's)
    assert torch.equal(unet_output(base, *probe), output)
    assert base.model.manual_cast_dtype is None
