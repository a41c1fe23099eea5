"""Every training algorithm against the host: ComfyUI 0.8.0's stock loaders read each saved key and give
the trained model's outputs, and LoKr / OFT equal ComfyUI's own train modules (``comfy.weight_adapter``)."""

from __future__ import annotations

import pytest
import torch
from comfy_harness import require_comfyui

require_comfyui()

import comfy.model_management  # noqa: E402
import comfy.sd  # noqa: E402
import comfy.weight_adapter as weight_adapter  # noqa: E402
from comfy.weight_adapter.base import factorization as comfy_factorization  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from d2f_core.lora import ALGORITHMS, factorization, make_adapter  # noqa: E402
from d2f_core.lora_metadata import LoraMetadata  # noqa: E402
from d2f_core.tests.helpers import NATIVE_KEYS  # noqa: E402
from training import TrainConfig  # noqa: E402

LATENT = (4, 8, 8)
# what ComfyUI logs when a LoRA file does not load completely or a patch fails to apply
LOAD_PROBLEMS = (
    "lora key not loaded",
    "NOT LOADED",
    "ERROR",
    "Calculate Weight Failed",
    "SHAPE MISMATCH",
    "patch type not recognized",
)


def test_every_algorithm_is_covered() -> None:
    assert set(NATIVE_KEYS) == set(ALGORITHMS)


def test_factorization_equals_comfyuis() -> None:
    for dim in range(1, 1300):
        for factor in (-1, 0, 1, 2, 3, 4, 6, 8, 16, 32):
            assert factorization(dim, factor) == comfy_factorization(dim, factor), (dim, factor)


@pytest.mark.parametrize("shape", [(40, 36), (64, 32, 3, 3), (320, 768)])
@pytest.mark.parametrize("rank", [4, 8])
def test_lokr_and_oft_equal_comfyuis_train_modules(shape, rank) -> None:
    """Our LoKr / OFT have the factor shapes of ComfyUI's ``create_train`` and, on the same tensors,
    the forward of its ``LokrDiff`` / ``OFTDiff`` (what stock TrainLoraNode trains)."""
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(shape, generator=gen)
    for name, alpha in (("LoKr", 1.0), ("OFT", 1.0), ("OFT", 0.05)):
        ours = make_adapter(name, shape, rank, alpha, gen)
        theirs = weight_adapter.adapter_maps[name].create_train(weight, rank=rank, alpha=alpha)
        own = {k.rsplit(".", 1)[1]: v for k, v in ours.native_state_dict("k").items()}
        their_params = {k: v for k, v in theirs.state_dict().items() if k != "alpha"}
        assert {k: tuple(v.shape) for k, v in their_params.items()} == {k: tuple(own[k].shape) for k in their_params}
        with torch.no_grad():
            for p in ours.parameters():
                p.normal_(0, 0.3, generator=gen)
            for k, v in ours.native_state_dict("k").items():
                if k != "k.alpha":
                    getattr(theirs, k.rsplit(".", 1)[1]).copy_(v)
            torch.testing.assert_close(ours(weight), theirs(weight), rtol=1e-5, atol=1e-5)
            assert not torch.allclose(ours(weight), weight, atol=1e-3)


def batch(n: int = 2, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    latents = [{"samples": torch.randn(n, *LATENT, generator=gen) * 5}]
    positive = [[[torch.randn(1, 77, 64, generator=gen), {}]] for _ in range(n)]
    return latents, positive


def unet_output(model, x, sigma, cond) -> torch.Tensor:
    comfy.model_management.load_models_gpu([model])
    with torch.no_grad():
        return model.model.apply_model(x, sigma, c_crossattn=cond).float()


@pytest.fixture(scope="module")
def sd15_clip(tiny_sd15_file):
    """The CLIP-L of the SD1.5-shaped test checkpoint: its LoRA key map joins the UNet's in LoraLoader."""
    _, clip, _ = comfy.sd.load_checkpoint_guess_config(str(tiny_sd15_file), output_vae=False, output_clip=True)[:3]
    return clip


@pytest.mark.parametrize("algorithm", list(ALGORITHMS))
def test_saved_file_loads_completely_in_stock_loaders_and_gives_the_trained_outputs(
    pack, tiny_model, comfy_nodes, loras_dir, caplog, recorded_trainers, sd15_clip, algorithm
) -> None:
    base = tiny_model("eps")
    config = TrainConfig(
        steps=4,
        batch_size=2,
        learning_rate=3e-2,
        targets="all",
        algorithm=algorithm,
        rank=4,
        alpha=4.0,
        ema_decay=0.5,
        seed=2,
    )
    latents, positive = batch()
    _, lora, _, steps, _ = pack.train_nodes.train_lora(
        base, config, pack.train_inputs.TrainingInputs(latents, positive), output_name="run"
    )
    assert steps == 4
    # the network as trained: the saved (EMA) adapters as weight wrappers, the way the engine trains them
    # (the node's MODEL output cannot serve: it is the saved file loaded by ComfyUI's own loader)
    (trainer,) = recorded_trainers
    assert all(type(a) is ALGORITHMS[algorithm] for a in trainer.adapters.values())
    trained = base.clone()
    for n, adapter in trainer.saved_adapters().items():
        trained.add_weight_wrapper(f"diffusion_model.{n}.weight", adapter)
    (name,) = comfy_nodes["D2F_SaveLoRA"].execute(lora, f"{algorithm} file", False).result
    tensors = load_file(loras_dir / name)
    with safe_open(str(loras_dir / name), framework="pt") as f:
        assert LoraMetadata.from_header(f.metadata()).algorithm == algorithm
    # the file holds this algorithm's tensors, for every layer the node trained (targets "all": convs too)
    by_layer: dict[str, set[str]] = {}
    for key in tensors:
        suffix = next((s for s in NATIVE_KEYS[algorithm] if key.endswith("." + s)), None)
        assert suffix is not None, f"{key} is not a {algorithm} tensor"
        by_layer.setdefault(key[: -len(suffix) - 1], set()).add(suffix)
    assert all(s == NATIVE_KEYS[algorithm] for s in by_layer.values())
    weights = [k for k, v in base.model.diffusion_model.named_parameters() if k.endswith("weight") and v.dim() >= 2]
    assert set(by_layer) == {f"diffusion_model.{k[: -len('.weight')]}" for k in weights}

    x, cond, sigma = torch.randn(1, *LATENT), torch.randn(1, 77, 64), torch.tensor([0.5])
    flow = pack.model_sampling.patch_model
    expected = unet_output(flow(trained), x, sigma, cond)
    untrained = unet_output(flow(base), x, sigma, cond)
    assert not torch.allclose(untrained, expected, rtol=1e-3, atol=1e-3), "training changed nothing"
    loaders = {
        "LoraLoaderModelOnly": lambda: comfy_nodes["LoraLoaderModelOnly"]().load_lora_model_only(base, name, 1.0)[0],
        "LoraLoader, clip strength 0": lambda: comfy_nodes["LoraLoader"]().load_lora(base, None, name, 1.0, 0.0)[0],
        "LoraLoader with a CLIP": lambda: comfy_nodes["LoraLoader"]().load_lora(base, sd15_clip, name, 1.0, 1.0)[0],
    }
    for loader, load in loaders.items():
        caplog.clear()
        caplog.set_level("INFO")
        loaded = load()
        assert len(loaded.patches) == len(by_layer), (
            f"{loader}: {len(loaded.patches)} patches for {len(by_layer)} layers"
        )
        got = unet_output(flow(loaded), x, sigma, cond)
        problems = [line for line in caplog.text.splitlines() if any(p in line for p in LOAD_PROBLEMS)]
        assert not problems, f"{loader}: {problems[:3]}"
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item(), msg=loader)


def test_dora_starts_at_the_input_model_even_with_a_lora_loaded_before(tiny_model) -> None:
    """The input MODEL may carry patches (a LoRA loaded before training): DoRA's magnitude must start at
    the norms of the patched weight its wrapper is called on, so training starts at the input model."""
    from d2f_core.lora import adapters_state_dict, select_target_modules
    from d2f_host.unet import attach_adapters

    base = tiny_model("eps")
    unet = base.model.diffusion_model
    gen = torch.Generator().manual_seed(3)
    earlier = {
        n: make_adapter("LoRA", m.weight.shape, 2, 2.0, gen)
        for n, m in select_target_modules(unet, "attention").items()
    }
    with torch.no_grad():
        for a in earlier.values():
            a.up.normal_(0, 0.5, generator=gen)
    patched, _ = comfy.sd.load_lora_for_models(base, None, adapters_state_dict(earlier), 1.0, 0.0)
    x, cond, sigma = torch.randn(1, *LATENT), torch.randn(1, 77, 64), torch.tensor([0.5])
    expected = unet_output(patched, x, sigma, cond)
    assert not torch.allclose(expected, unet_output(base, x, sigma, cond), atol=1e-3), (
        "the earlier LoRA changed nothing"
    )
    with torch.inference_mode(False), torch.enable_grad():
        clone, _, adapters, _ = attach_adapters(patched, TrainConfig(algorithm="DoRA", targets="attention"))
    assert all(type(a) is ALGORITHMS["DoRA"] for a in adapters.values())
    torch.testing.assert_close(
        unet_output(clone, x, sigma, cond), expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item()
    )
