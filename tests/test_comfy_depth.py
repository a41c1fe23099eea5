"""Image-conditioned (depth) models in a real ComfyUI: the widened first convolution, the image latent
through ComfyUI's concat conditioning into every stock sampler, depth model files, the Marigold
conversion, the three depth nodes and the headless ``depth`` command (docs/MATH.md section 13).

Models are tiny random-weight UNets of the SD1.5 (eps), SD2 (v) and SDXL layouts built through ComfyUI's
own classes; the behaviour tests of the estimate use a stand-in VAE (average pooling / upsampling) whose
latent follows the image, so the depth follows the model's output.
"""

from __future__ import annotations

import logging
import pathlib

import numpy as np
import pytest
import torch
from comfy_harness import TINY_UNET, require_comfyui

require_comfyui()

import comfy.model_base  # noqa: E402
import comfy.model_management  # noqa: E402
import comfy.model_patcher  # noqa: E402
import comfy.sample  # noqa: E402
import comfy.samplers  # noqa: E402
import comfy.supported_models  # noqa: E402
import comfy.utils  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from sd15_checkpoint import randomize_  # noqa: E402
from stand_ins import StandInClip, StandInVae  # noqa: E402

from d2f_core import Diff2Flow, fm_sigmas, get_objective, get_sampler  # noqa: E402
from d2f_core.colormap import apply_colormap  # noqa: E402
from d2f_core.depth import ensemble_depth  # noqa: E402
from d2f_core.depth_settings import DepthSettings, processing_size  # noqa: E402
from d2f_core.lora import adapters_state_dict  # noqa: E402
from d2f_core.lora_metadata import DEPTH_NORMALIZATION, LoraMetadata  # noqa: E402
from d2f_host.checkpoints import base_model_hash, recommended_sampling_of  # noqa: E402
from d2f_host.depth import input_conv, is_image_conditioned, load_depth_model, widen_model  # noqa: E402
from d2f_host.depth_estimate import estimate_depth  # noqa: E402
from d2f_host.errors import HostError  # noqa: E402
from d2f_host.marigold import diffusers_unet_config, load_marigold, load_marigold_file  # noqa: E402
from d2f_host.model_sampling import flow_model_for, is_patched, patch_model, schedule_of  # noqa: E402
from d2f_host.unet import attach_adapters  # noqa: E402
from training import TrainConfig  # noqa: E402

LATENT = (4, 8, 8)
CONTEXT = 64
LOAD_PROBLEMS = ("lora key not loaded", "NOT LOADED", "ERROR", "SHAPE MISMATCH")


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """One intra-op thread for this module: on a loaded 2-core machine, two threads per tiny op made each
    tiny-UNet evaluation ~80x slower (measured: one 3-step estimate 52 s with 2 threads, 0.65 s with 1)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------------
# tiny models, a stand-in VAE and CLIP


def build_tiny_sdxl(seed: int = 0):
    """A ModelPatcher around a tiny SDXL-layout UNet (ADM input 2816, linear transformers), random weights."""
    from comfy_harness import randomize_ as fill

    unet = dict(
        TINY_UNET,
        model_channels=64,
        adm_in_channels=2816,
        num_classes="sequential",
        use_linear_in_transformer=True,
        transformer_depth=[0, 1],
        transformer_depth_output=[0, 0, 1, 1],
    )
    cfg = comfy.supported_models.SDXL(unet)
    cfg.set_inference_dtype(torch.float32, None)
    model = comfy.model_base.SDXL(cfg, model_type=comfy.model_base.ModelType.EPS, device=torch.device("cpu"))
    fill(model, seed)
    return comfy.model_patcher.ModelPatcher(
        model, load_device=comfy.model_management.get_torch_device(), offload_device=torch.device("cpu")
    )


def build(kind: str):
    from comfy_harness import build_tiny_model

    return build_tiny_sdxl() if kind == "sdxl" else build_tiny_model(kind)


def conditioning(seed: int = 0, pooled: bool = False) -> list:
    gen = torch.Generator().manual_seed(seed)
    extras = {"pooled_output": torch.randn(1, 1280, generator=gen)} if pooled else {}
    return [[torch.randn(1, 77, CONTEXT, generator=gen), extras]]


def unet_output(model, x, sigma, context, **kwargs) -> torch.Tensor:
    comfy.model_management.load_models_gpu([model])
    with torch.no_grad():
        return model.model.apply_model(x, sigma, c_crossattn=context, **kwargs).float()


class CountingWrapper:
    """A UNet function wrapper that counts the model's evaluations and records the latent sizes it sees."""

    def __init__(self) -> None:
        self.calls, self.sizes, self.on_call = 0, [], None

    def __call__(self, apply_model, args):
        self.calls += 1
        self.sizes.append(tuple(args["input"].shape[-2:]))
        if self.on_call is not None:
            self.on_call(self.calls)
        return apply_model(args["input"], args["timestep"], **args["c"])


def counted(model):
    clone = model.clone()
    wrapper = CountingWrapper()
    # a plain function: ModelPatcher.clone() deep-copies model_options, and a function is copied as itself
    clone.set_model_unet_function_wrapper(lambda apply_model, args: wrapper(apply_model, args))
    return clone, wrapper


def images(batch: int = 1, height: int = 64, width: int = 80, seed: int = 0) -> torch.Tensor:
    """Smooth random images (a few large blobs), so pooled latents differ between images."""
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.rand(batch, 3, 4, 5, generator=gen)
    return torch.nn.functional.interpolate(coarse, size=(height, width), mode="bilinear").movedim(1, -1)


# ---------------------------------------------------------------------------------------------
# 1. the widened model and the concat conditioning


@pytest.mark.parametrize("kind", ["eps", "v", "sdxl"], ids=["sd15_eps", "sd2_v", "sdxl"])
def test_widened_model_equals_the_base_model_on_duplicated_input(comfy_nodes, kind) -> None:
    base = build(kind)
    widened = widen_model(base)
    assert is_image_conditioned(widened) and not is_image_conditioned(base)
    assert input_conv(base).weight.shape[1] == 4 and input_conv(widened).weight.shape[1] == 8  # the base is untouched
    gen = torch.Generator().manual_seed(1)
    x, sigma, context = (
        torch.randn(1, *LATENT, generator=gen),
        torch.tensor([3.0]),
        torch.randn(1, 77, CONTEXT, generator=gen),
    )
    extra = {"y": torch.randn(1, 2816, generator=gen)} if kind == "sdxl" else {}
    expected = unet_output(base, x, sigma, context, **extra)
    # apply_model appends c_concat after the scaled input: the duplicate of the UNet's input is calculate_input(x)
    duplicate = base.get_model_object("model_sampling").calculate_input(sigma, x)
    got = unet_output(widened, x, sigma, context, c_concat=duplicate, **extra)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    other = unet_output(widened, x, sigma, context, c_concat=torch.randn(1, *LATENT, generator=gen), **extra)
    assert not torch.allclose(other, expected, atol=1e-3), "the image half of the convolution is not used"
    with pytest.raises(HostError, match="already takes an image latent"):
        widen_model(widened)


@pytest.mark.slow
@pytest.mark.parametrize("sampler", comfy.samplers.KSampler.SAMPLERS)
def test_concat_conditioning_reaches_the_unet_through_the_patch_and_every_stock_sampler(comfy_nodes, sampler) -> None:
    """Two images, one noise: every stock sampler on the Diff2Flow-patched depth model gives two different
    results (no stock sampler needs an input the depth conditioning lacks; none is skipped)."""
    flow = patch_model(widen_model(build("v")))
    assert is_patched(flow) and is_image_conditioned(flow)
    gen = torch.Generator().manual_seed(0)
    noise, empty = torch.randn(1, *LATENT, generator=gen), torch.zeros(1, *LATENT)
    ((context, _),) = conditioning()
    out = []
    for _ in range(2):
        positive = [[context, {"concat_latent_image": torch.randn(1, *LATENT, generator=gen)}]]
        with torch.no_grad():
            out.append(
                comfy.sample.sample(
                    flow, noise, 3, 1.0, sampler, "simple", positive, positive, empty, disable_pbar=True, seed=0
                )
            )
    assert all(torch.isfinite(o).all() for o in out)
    assert (out[0] - out[1]).abs().max() > 1e-3, f"{sampler}: the image latent did not change the result"


def test_concat_through_stock_instructpix2pix_conditioning(comfy_nodes) -> None:
    """The stock node that writes concat_latent_image (InstructPixToPixConditioning) drives the depth model too."""
    flow = patch_model(widen_model(build("v")))
    vae = StandInVae()
    node = comfy_nodes["InstructPixToPixConditioning"]
    outputs = []
    for seed in (0, 1):
        result = node.execute(conditioning(), conditioning(), images(1, 64, 64, seed), vae)
        positive, negative, latent = result.result if hasattr(result, "result") else result
        noise = torch.randn(latent["samples"].shape, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            outputs.append(
                comfy.sample.sample(
                    flow,
                    noise,
                    2,
                    1.0,
                    "euler",
                    "simple",
                    positive,
                    negative,
                    latent["samples"],
                    disable_pbar=True,
                    seed=0,
                )
            )
    assert (outputs[0] - outputs[1]).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------
# 2. depth model files: save (adapters on a widened model) -> load with equal outputs


def write_depth_file(
    path: pathlib.Path,
    adapters: dict,
    model,
    objective: str = "diff2flow",
    task: str = "depth",
    steps: int = 2,
    with_metadata: bool = True,
    prediction: str | None = None,
) -> pathlib.Path:
    """A depth model file as the depth trainer writes it: ComfyUI-native adapter keys, Diff2Flow metadata."""
    _, model_prediction = schedule_of(model.get_model_object("model_sampling"))
    metadata = LoraMetadata(
        objective=objective,
        prediction=prediction or model_prediction,
        zero_terminal_snr=False,
        rank=4,
        alpha=4.0,
        algorithm="LoRA",
        base_model_hash=base_model_hash(model),
        sampler="euler",
        sampling_steps=steps,
        sampling_cfg=1.0,
        task=task,
        normalization=DEPTH_NORMALIZATION if task == "depth" else None,
    )
    tensors = {k: v.detach().float().contiguous() for k, v in adapters_state_dict(adapters).items()}
    save_file(tensors, str(path), metadata=metadata.to_header() if with_metadata else None)
    return path


def trained_depth_adapters(base, seed: int = 0):
    """A widened model with LoRA adapters on its attention and a Full adapter on its first convolution
    (d2f_host.unet.attach_adapters), all set to random values as if trained."""
    with torch.inference_mode(False), torch.enable_grad():
        clone, _, adapters, _ = attach_adapters(widen_model(base), TrainConfig(algorithm="LoRA", rank=4, alpha=4.0))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for adapter in adapters.values():
            for p in adapter.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return clone, adapters


@pytest.mark.parametrize("objective", ["diff2flow", "naive_fm"])
def test_depth_file_loads_back_with_equal_outputs(comfy_nodes, tmp_path, caplog, objective) -> None:
    base = build("v")
    trained, adapters = trained_depth_adapters(base)
    assert type(adapters["input_blocks.0.0"]).__name__ == "FullAdapter"
    path = write_depth_file(tmp_path / "depth.safetensors", adapters, base, objective=objective, steps=3)
    caplog.set_level(logging.INFO)
    loaded, metadata = load_depth_model(base, path)
    problems = [line for line in caplog.text.splitlines() if any(p in line for p in LOAD_PROBLEMS)]
    assert not problems, problems
    assert metadata.task == "depth" and is_image_conditioned(loaded)
    assert recommended_sampling_of(loaded).steps == 3
    assert is_patched(loaded) == (objective == "diff2flow")
    gen = torch.Generator().manual_seed(3)
    x, sigma, context, image = (
        torch.randn(1, *LATENT, generator=gen),
        torch.tensor([0.5]),
        torch.randn(1, 77, CONTEXT, generator=gen),
        torch.randn(1, *LATENT, generator=gen),
    )
    expected = unet_output(flow_model_for(trained, objective), x, sigma, context, c_concat=image)
    untrained = unet_output(flow_model_for(widen_model(base), objective), x, sigma, context, c_concat=image)
    assert not torch.allclose(untrained, expected, atol=1e-3), "the adapters changed nothing"
    got = unet_output(loaded, x, sigma, context, c_concat=image)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())
    # strength scales the file's weights: 0 is the widened base model, 0.5 lies between
    off, _ = load_depth_model(base, path, strength=0.0)
    torch.testing.assert_close(unet_output(off, x, sigma, context, c_concat=image), untrained, rtol=1e-4, atol=1e-5)
    half, _ = load_depth_model(base, path, strength=0.5)
    halfway = unet_output(half, x, sigma, context, c_concat=image)
    assert not torch.allclose(halfway, expected, atol=1e-4) and not torch.allclose(halfway, untrained, atol=1e-4)
    # the full sampling path: the loaded model through ComfyUI's sampler equals the adapters as weight wrappers
    positive = [[context, {"concat_latent_image": image}]]
    noise = torch.randn(1, *LATENT, generator=gen)

    def sample(model):
        with torch.no_grad():
            return comfy.sample.sample(
                model,
                noise,
                2,
                1.0,
                "euler",
                "simple",
                positive,
                positive,
                torch.zeros(1, *LATENT),
                disable_pbar=True,
                seed=0,
            )

    torch.testing.assert_close(sample(loaded), sample(flow_model_for(trained, objective)), rtol=1e-4, atol=1e-4)


def test_depth_files_that_do_not_fit_are_refused_before_loading(comfy_nodes, tmp_path) -> None:
    base = build("v")
    _, adapters = trained_depth_adapters(base)
    # an ordinary LoRA (no metadata), an image LoRA, a depth file without the widened convolution
    plain = write_depth_file(tmp_path / "plain.safetensors", adapters, base, with_metadata=False)
    with pytest.raises(HostError, match="carries no Diff2Flow metadata, so it is not a depth model"):
        load_depth_model(base, plain)
    image_lora = write_depth_file(tmp_path / "image.safetensors", adapters, base, task="image")
    with pytest.raises(HostError, match="is a Diff2Flow image LoRA, not a depth model"):
        load_depth_model(base, image_lora)
    no_conv = write_depth_file(
        tmp_path / "noconv.safetensors", {k: v for k, v in adapters.items() if k != "input_blocks.0.0"}, base
    )
    with pytest.raises(HostError, match="has no widened first convolution"):
        load_depth_model(base, no_conv)
    good = write_depth_file(tmp_path / "good.safetensors", adapters, base)
    with pytest.raises(HostError, match="already takes an image latent"):
        load_depth_model(widen_model(base), good)
    # another family: SD1.5 tiny (32 channels) has another first convolution
    with pytest.raises(
        HostError, match=r"first convolution of shape \(64, 8, 3, 3\), but this MODEL needs \(32, 8, 3, 3\)"
    ):
        load_depth_model(build("eps"), write_depth_file(tmp_path / "eps.safetensors", adapters, base, prediction="eps"))
    # same first convolution, other cross-attention width: the LoRA factors do not fit
    from comfy_harness import randomize_ as fill

    cfg = comfy.supported_models.SD20(
        dict(TINY_UNET, use_linear_in_transformer=True, model_channels=64, context_dim=96)
    )
    cfg.set_inference_dtype(torch.float32, None)
    other = comfy.model_patcher.ModelPatcher(
        fill(comfy.model_base.BaseModel(cfg, model_type=comfy.model_base.ModelType.V_PREDICTION)),
        load_device=torch.device("cpu"),
        offload_device=torch.device("cpu"),
    )
    with pytest.raises(HostError, match="do not fit this MODEL's layers .*attn2.to_k"):
        load_depth_model(other, good)
    # the prediction type of the metadata is checked (a v-trained depth file on an eps model of the same shape)
    eps_same_shape = comfy.model_patcher.ModelPatcher(
        fill(
            comfy.model_base.BaseModel(
                comfy.supported_models.SD20(dict(TINY_UNET, use_linear_in_transformer=True, model_channels=64)),
                model_type=comfy.model_base.ModelType.EPS,
            )
        ),
        load_device=torch.device("cpu"),
        offload_device=torch.device("cpu"),
    )
    with pytest.raises(HostError, match="trained on a v-prediction model"):
        load_depth_model(eps_same_shape, good)
    with pytest.raises(HostError, match="does not exist"):
        load_depth_model(base, tmp_path / "missing.safetensors")
    # a tensor for a layer this model does not have (a deeper UNet of the family): ComfyUI's loader would skip it
    from safetensors import safe_open
    from safetensors.torch import load_file

    extra = load_file(str(good))
    extra["diffusion_model.output_blocks.9.1.proj_in.lora_up.weight"] = torch.zeros(64, 4)
    with safe_open(str(good), framework="pt") as f:
        header = f.metadata()
    save_file(extra, str(tmp_path / "extra.safetensors"), metadata=header)
    with pytest.raises(HostError, match="fit no layer of this MODEL .*output_blocks.9.1.proj_in"):
        load_depth_model(base, tmp_path / "extra.safetensors")


# ---------------------------------------------------------------------------------------------
# 3. the estimate: steps, ensemble, resolution, batch, seed, progress, cancel


@pytest.fixture
def depth_model(comfy_nodes):
    return widen_model(build("v"))


def run_estimate(model, imgs, steps=2, ensemble=1, resolution=0, seed=0, vae=None, **kwargs) -> torch.Tensor:
    return estimate_depth(
        model, vae or StandInVae(), conditioning(), imgs, DepthSettings(steps, ensemble, resolution, seed), **kwargs
    )


def test_estimate_shapes_range_steps_and_batch(depth_model) -> None:
    imgs = images(2, 48, 72)
    model, wrapper = counted(depth_model)
    depth = run_estimate(model, imgs, steps=3, ensemble=2)
    assert depth.shape == (2, 48, 72) and depth.dtype == torch.float32
    for d in depth:  # affine-invariant depth: each image spans [0, 1]
        assert float(d.min()) == pytest.approx(0.0, abs=1e-6) and float(d.max()) == pytest.approx(1.0, abs=1e-6)
    assert wrapper.calls == 3 * 2 * 2  # FM Euler at cfg 1: one evaluation per step, member and image
    # a batch is its images one by one
    for i in range(2):
        torch.testing.assert_close(
            run_estimate(depth_model, imgs[i : i + 1], steps=3, ensemble=2)[0], depth[i], rtol=0, atol=1e-5
        )
    # the image matters, and so does the seed
    assert (depth[0] - depth[1]).abs().max() > 1e-3  # same noise: only the image latent differs
    assert (
        run_estimate(depth_model, imgs[:1], seed=5) - run_estimate(depth_model, imgs[:1], seed=6)
    ).abs().max() > 1e-3


def test_ensemble_is_the_aligned_median_of_its_members(depth_model) -> None:
    """Member m starts from the noise of seed + m: the ensemble of 3 equals ensemble_depth of the three
    single estimates (each normalised: the ensemble is affine-invariant per member)."""
    img = images(1, 64, 64, seed=3)
    members = torch.stack([run_estimate(depth_model, img, seed=s).unsqueeze(1) for s in (7, 8, 9)])
    assert (members[0] - members[1]).abs().max() > 1e-3, "members from different noise should differ"
    expected = ensemble_depth(members)[:, 0]
    got = run_estimate(depth_model, img, ensemble=3, seed=7)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert (got - members[0, :, 0]).abs().max() > 1e-3, "the ensemble equals its first member"


def test_processing_resolution_and_resize_back(depth_model) -> None:
    assert processing_size(480, 640, 0) == (480, 640)
    assert processing_size(483, 637, 0) == (480, 640)
    assert processing_size(480, 640, 128) == (96, 128)
    assert processing_size(640, 480, 128) == (128, 96)
    assert processing_size(1000, 10, 64) == (64, 8)  # never below one latent pixel
    imgs = images(1, 58, 100)
    model, wrapper = counted(depth_model)
    depth = run_estimate(model, imgs, steps=1, resolution=64)
    assert set(wrapper.sizes) == {(40 // 8, 64 // 8)}  # long side 64, short 38.4 -> 40: latent 5 x 8
    assert depth.shape == (1, 58, 100)  # resized back to the image
    model, wrapper = counted(depth_model)
    run_estimate(model, imgs, steps=1, resolution=0)
    assert set(wrapper.sizes) == {(56 // 8, 96 // 8)}  # as is, rounded to multiples of 8


@pytest.mark.parametrize("height, width, resolution", [(58, 100, 64), (16, 24, 128), (37, 61, 256)])
def test_each_image_spans_0_to_1_after_the_resize_back(depth_model, height, width, resolution) -> None:
    """The depth is resized back to the image's size, which moves its extremes (bilinear, averaged when
    shrinking: 16 x 24 processed at 88 x 128 came back spanning 0.09 .. 0.89): each image's map is scaled
    to [0, 1] again after the resize, as the docstrings state."""
    assert processing_size(height, width, resolution) != (height, width)
    depth = run_estimate(depth_model, images(2, height, width, seed=4), steps=2, ensemble=2, resolution=resolution)
    assert depth.shape == (2, height, width) and depth.dtype == torch.float32
    for d in depth:
        assert float(d.min()) == pytest.approx(0.0, abs=1e-6) and float(d.max()) == pytest.approx(1.0, abs=1e-6)


def test_rescale_after_the_resize_keeps_a_flat_map_finite() -> None:
    from d2f_host.depth_estimate import _unit_range

    ramp = torch.linspace(0.2, 0.7, 12).view(1, 3, 4)
    out = _unit_range(torch.cat([ramp, torch.full((1, 3, 4), 0.5)]))
    assert out.dtype == torch.float32
    torch.testing.assert_close(out[0], (ramp[0] - 0.2) / 0.5, rtol=0, atol=1e-6)
    assert torch.equal(out[1], torch.zeros(3, 4))  # no depth order: 0 everywhere, not NaN


def test_progress_and_cancel(depth_model) -> None:
    seen = []
    run_estimate(depth_model, images(2, 32, 32), steps=1, ensemble=3, on_member=lambda d, t: seen.append((d, t)))
    assert seen == [(i, 6) for i in range(1, 7)]
    model, wrapper = counted(depth_model)

    def cancel_after_two_members():
        if wrapper.calls >= 2:
            raise KeyboardInterrupt("cancelled")

    with pytest.raises(KeyboardInterrupt):
        run_estimate(model, images(2, 32, 32), steps=1, ensemble=3, check_cancel=cancel_after_two_members)
    assert wrapper.calls == 2


def test_bad_inputs_are_refused_before_compute(depth_model) -> None:
    vae = StandInVae()
    model, wrapper = counted(depth_model)
    base, base_wrapper = counted(build("v"))
    with pytest.raises(HostError, match="is not image-conditioned.*Diff2Flow Depth Model Loader"):
        run_estimate(base, images(), vae=vae)
    cases = [
        (dict(imgs=torch.rand(1, 32, 32, 1)), "image must be an IMAGE batch"),
        (dict(imgs=torch.rand(1, 4, 32, 3)), "both sides must be at least 8"),
        (dict(imgs=images(), steps=51), "steps must be 0"),
        (dict(imgs=images(), ensemble=0), "ensemble_size must be 1-10"),
        (dict(imgs=images(), ensemble=11), "ensemble_size must be 1-10"),
        (dict(imgs=images(), resolution=32), "processing_resolution must be 0"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            run_estimate(model, vae=vae, **kwargs)

    class WideVae(StandInVae):
        latent_channels = 16

    with pytest.raises(HostError, match="16-channel latents but the MODEL takes 4"):
        run_estimate(model, images(), vae=WideVae())
    with pytest.raises(HostError, match="needs a VAE"):
        estimate_depth(model, None, conditioning(), images(), DepthSettings(1, 1, 0, 0))
    assert wrapper.calls == base_wrapper.calls == vae.calls == 0


# ---------------------------------------------------------------------------------------------
# 4. the nodes


@pytest.fixture
def depth_nodes(comfy_nodes):
    import importlib
    import sys

    package = sys.modules[comfy_nodes["D2F_ModelPatch"].__module__].__package__
    return importlib.import_module(package + ".depth_nodes")


def node_result(output):
    return output.result if hasattr(output, "result") else output


def test_depth_estimate_node_outputs_and_recommended_steps(comfy_nodes, depth_nodes, loras_dir) -> None:
    base = build("v")
    _, adapters = trained_depth_adapters(base)
    write_depth_file(loras_dir / "tiny_depth.safetensors", adapters, base, steps=3)
    loader, estimate = comfy_nodes["D2F_DepthModelLoader"], comfy_nodes["D2F_DepthEstimate"]
    (model,) = node_result(loader.execute(base, "tiny_depth.safetensors", 1.0))
    model, wrapper = counted(model)
    imgs = images(2, 40, 48)
    grey, color, raw = node_result(estimate.execute(model, StandInClip(), StandInVae(), imgs, 0, 1, 0, 0, "spectral"))
    assert wrapper.calls == 3 * 2  # steps 0: the file's recommended 3
    assert raw.shape == (2, 40, 48) and grey.shape == color.shape == (2, 40, 48, 3)
    torch.testing.assert_close(grey, raw.unsqueeze(-1).expand(-1, -1, -1, 3))
    torch.testing.assert_close(color, apply_colormap(raw, "spectral"))
    _, color_turbo, raw_again = node_result(
        estimate.execute(model, StandInClip(), StandInVae(), imgs, 2, 1, 0, 0, "turbo")
    )
    torch.testing.assert_close(color_turbo, apply_colormap(raw_again, "turbo"))
    assert wrapper.calls == 3 * 2 + 2 * 2  # steps 2 given
    # near is red, far is blue in Marigold's spectral map
    assert apply_colormap(torch.tensor(0.0))[0] > 0.5 and apply_colormap(torch.tensor(1.0))[2] > 0.5
    # a new (untrained) widened model: steps 0 -> the default 4
    (new,) = node_result(loader.execute(base, depth_nodes.NEW_DEPTH_MODEL, 1.0))
    assert is_image_conditioned(new) and not is_patched(new)
    new, wrapper = counted(new)
    node_result(estimate.execute(new, StandInClip(), StandInVae(), imgs[:1], 0, 1, 0, 0, "grey"))
    assert wrapper.calls == 4


def test_depth_estimate_node_refuses_a_plain_model_and_reports_progress_and_cancel(comfy_nodes, depth_model) -> None:
    estimate = comfy_nodes["D2F_DepthEstimate"]
    vae = StandInVae()
    with pytest.raises(HostError, match="not image-conditioned"):
        estimate.execute(build("v"), StandInClip(), vae, images(), 1, 1, 0, 0, "spectral")
    with pytest.raises(ValueError, match="ensemble_size must be 1-10"):
        estimate.execute(depth_model, StandInClip(), vae, images(), 1, 12, 0, 0, "spectral")
    with pytest.raises(HostError, match="text encoder"):
        estimate.execute(depth_model, None, vae, images(), 1, 1, 0, 0, "spectral")
    assert vae.calls == 0
    progress = []
    comfy.utils.set_progress_bar_global_hook(
        lambda value, total, preview, node_id=None: progress.append((value, total))
    )
    try:
        node_result(
            estimate.execute(depth_model, StandInClip(), StandInVae(), images(2, 32, 32), 1, 2, 0, 0, "spectral")
        )
        assert progress[-4:] == [(1, 4), (2, 4), (3, 4), (4, 4)]
        model, wrapper = counted(depth_model)
        wrapper.on_call = lambda calls: comfy.model_management.interrupt_current_processing(True)  # Cancel pressed
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            estimate.execute(model, StandInClip(), StandInVae(), images(2, 32, 32), 1, 3, 0, 0, "spectral")
        assert wrapper.calls == 1  # stopped before the second member
    finally:
        comfy.model_management.interrupt_current_processing(False)
        comfy.utils.set_progress_bar_global_hook(None)


# ---------------------------------------------------------------------------------------------
# 5. Marigold-layout checkpoints


MARIGOLD_UNET = {  # ComfyUI's SD20 detection needs 320 channels and a 1024-wide context; the rest is shrunk
    "use_checkpoint": False,
    "image_size": 32,
    "use_spatial_transformer": True,
    "legacy": False,
    "adm_in_channels": None,
    "in_channels": 8,
    "out_channels": 4,
    "model_channels": 320,
    "num_res_blocks": [1],
    "channel_mult": [1],
    "transformer_depth": [1],
    "transformer_depth_output": [1, 1],
    "transformer_depth_middle": 1,
    "context_dim": 1024,
    "use_linear_in_transformer": True,
    "use_temporal_resblock": False,
    "use_temporal_attention": False,
}


@pytest.fixture(scope="module")
def marigold(comfy_nodes, tmp_path_factory):
    """A tiny Marigold-layout UNet with random weights (8 input channels: [image latent, depth latent]) and
    its diffusers-format file (keys renamed with ComfyUI's own unet_to_diffusers map)."""
    cfg = comfy.supported_models.SD20(dict(MARIGOLD_UNET))
    cfg.set_inference_dtype(torch.float32, None)
    reference = comfy.model_base.BaseModel(
        cfg, model_type=comfy.model_base.ModelType.V_PREDICTION, device=torch.device("cpu")
    )
    randomize_(reference.diffusion_model, torch.Generator().manual_seed(0))
    unet = reference.diffusion_model.eval()
    names = {ldm: diffusers for diffusers, ldm in comfy.utils.unet_to_diffusers(dict(MARIGOLD_UNET)).items()}
    sd = {k: v.detach().clone().contiguous() for k, v in unet.state_dict().items()}
    assert set(sd) <= set(names)
    folder = tmp_path_factory.mktemp("marigold")
    diffusers = folder / "diffusion_pytorch_model.safetensors"
    save_file({names[k]: v for k, v in sd.items()}, str(diffusers))
    ldm = folder / "marigold_ldm.safetensors"
    save_file({"model.diffusion_model." + k: v for k, v in sd.items()}, str(ldm))
    return unet, diffusers, ldm, reference.model_sampling


def marigold_reference_sample(unet, sampling, image_latent, context, noise, steps):
    """FM Euler by hand on the reference UNet with Marigold's input order [image latent, noisy depth latent]:
    the Diff2Flow alignment of its v-prediction schedule (d2f_core only, no ComfyUI sampling)."""
    alphas_cumprod, _ = schedule_of(sampling)
    d2f = Diff2Flow.for_model(alphas_cumprod, "v")

    def network(x, t, context):
        with torch.no_grad():
            return unet(torch.cat([image_latent, x], dim=1), t, context=context)

    velocity = get_objective("diff2flow").velocity_fn(lambda x, t, c: network(x, t, **c), d2f)
    sigmas = fm_sigmas(steps, sigma_max=d2f.sigma_max)
    return get_sampler("euler")(lambda x, s: velocity(x, s, {"context": context}), sigmas[0] * noise, sigmas)


def test_marigold_diffusers_file_samples_as_a_flow_model(marigold, comfy_nodes) -> None:
    unet, diffusers, ldm, sampling = marigold
    model = load_marigold_file(diffusers)
    assert is_image_conditioned(model) and is_patched(model)
    assert schedule_of(model.get_model_object("model_sampling"))[1] == "v"  # set, not guessed from one bias
    assert recommended_sampling_of(model).steps == 4
    assert input_conv(model).weight.shape[1] == 8 and type(model.model).__name__ == "BaseModel"
    gen = torch.Generator().manual_seed(1)
    image_raw = torch.randn(1, *LATENT, generator=gen)  # what a VAE encodes (process_latent_in scales it)
    context, noise = torch.randn(1, 77, 1024, generator=gen), torch.randn(1, *LATENT, generator=gen)
    positive = [[context, {"concat_latent_image": image_raw}]]
    for steps in (1, 2, 4):
        sigmas = fm_sigmas(steps, sigma_max=float(model.get_model_object("model_sampling").sigma_max)).float()
        from d2f_host.sampling import fm_sampler

        with torch.no_grad():
            got = comfy.sample.sample_custom(
                model,
                noise,
                1.0,
                fm_sampler("euler"),
                sigmas,
                positive,
                positive,
                torch.zeros(1, *LATENT),
                disable_pbar=True,
                seed=0,
            )
        image_latent = model.model.process_latent_in(image_raw)
        expected = model.model.process_latent_out(
            marigold_reference_sample(unet, sampling, image_latent, context, noise, steps)
        )
        torch.testing.assert_close(got, expected.float(), rtol=1e-4, atol=1e-4)
    # zero terminal SNR starts the grid at sigma 1 (pure noise); off (Marigold's training) at SD2's 0.936
    assert float(model.get_model_object("model_sampling").sigma_max) < 0.94
    assert float(
        load_marigold_file(diffusers, zero_terminal_snr=True).get_model_object("model_sampling").sigma_max
    ) == pytest.approx(1.0)
    # the same UNet with ComfyUI / LDM keys loads to the same model
    other = load_marigold_file(ldm)
    torch.testing.assert_close(input_conv(other).weight, input_conv(model).weight)


def test_marigold_config_reading_matches_comfyuis_detection_at_full_sd2_size(comfy_nodes) -> None:
    """Our reading of a diffusers UNet's configuration equals ComfyUI's own detection for the real
    SD2 / Marigold size (meta tensors: shapes only), once the first convolution is cut to 4 channels."""
    import comfy.model_detection
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    sd21 = {
        "use_checkpoint": False,
        "image_size": 32,
        "out_channels": 4,
        "use_spatial_transformer": True,
        "legacy": False,
        "adm_in_channels": None,
        "in_channels": 8,
        "model_channels": 320,
        "num_res_blocks": [2, 2, 2, 2],
        "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
        "channel_mult": [1, 2, 4, 4],
        "transformer_depth_middle": 1,
        "use_linear_in_transformer": True,
        "context_dim": 1024,
        "num_head_channels": 64,
        "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
        "use_temporal_attention": False,
        "use_temporal_resblock": False,
    }
    unet = UNetModel(**sd21, device="meta", operations=comfy.ops.disable_weight_init)
    names = {ldm: d for d, ldm in comfy.utils.unet_to_diffusers(dict(sd21)).items()}
    sd = {names[k]: v for k, v in unet.state_dict().items()}
    ours = diffusers_unet_config(sd)
    sd["conv_in.weight"] = torch.empty(320, 4, 3, 3, device="meta")
    theirs = comfy.model_detection.unet_config_from_diffusers_unet(sd)
    assert theirs is not None
    for key in (
        "model_channels",
        "num_res_blocks",
        "channel_mult",
        "transformer_depth",
        "transformer_depth_output",
        "transformer_depth_middle",
        "context_dim",
        "use_linear_in_transformer",
        "num_head_channels",
        "out_channels",
    ):
        assert ours[key] == theirs[key], key
    assert ours["in_channels"] == 8


def test_marigold_files_that_do_not_fit_are_refused(marigold, comfy_nodes, tmp_path, caplog) -> None:
    unet, diffusers, _, _ = marigold
    from safetensors.torch import load_file

    sd = load_file(str(diffusers))
    four = dict(sd, **{"conv_in.weight": sd["conv_in.weight"][:, :4].contiguous()})
    with pytest.raises(HostError, match="takes 4 channels, but a Marigold-layout depth model takes 8"):
        load_marigold(four, "four.safetensors")
    with pytest.raises(HostError, match="holds no UNet"):
        load_marigold({"first_stage_model.decoder.conv_in.weight": torch.zeros(1)}, "vae.safetensors")
    with pytest.raises(HostError, match="class / added embeddings"):
        load_marigold(dict(sd, **{"add_embedding.linear_1.weight": torch.zeros(4, 4)}), "sdxl.safetensors")
    incomplete = {
        k: v for k, v in sd.items() if k != "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"
    }
    with pytest.raises(HostError, match="weights of the SD UNet it describes are missing .*attn1.to_q"):
        load_marigold(incomplete, "incomplete.safetensors")
    no_context = {
        k: v for k, v in sd.items() if k != "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"
    }
    with pytest.raises(HostError, match="ComfyUI could not build an SD UNet from it .*KeyError"):
        load_marigold(no_context, "incomplete.safetensors")
    # a tensor that has no place in an SD UNet is skipped with a warning, as ComfyUI's diffusers loading does
    with caplog.at_level(logging.WARNING, logger="diff2flow"):
        model = load_marigold(dict(sd, **{"extra_buffer.weight": torch.zeros(4, 4)}), "extra.safetensors")
    assert "extra_buffer.weight" in caplog.text and is_image_conditioned(model)
    with pytest.raises(HostError, match="does not exist"):
        load_marigold_file(tmp_path / "missing.safetensors")


def test_marigold_loader_node_reads_the_diffusion_models_folder(marigold, comfy_nodes, tmp_path) -> None:
    import shutil

    import folder_paths

    _, diffusers, _, _ = marigold
    folder = tmp_path / "diffusion_models"
    folder.mkdir()
    shutil.copy(diffusers, folder / "marigold_tiny.safetensors")
    saved = folder_paths.folder_names_and_paths["diffusion_models"]
    folder_paths.folder_names_and_paths["diffusion_models"] = ([str(folder)], saved[1])
    folder_paths.filename_list_cache.clear()
    try:
        (model,) = node_result(comfy_nodes["D2F_MarigoldLoader"].execute("marigold_tiny.safetensors", False))
    finally:
        folder_paths.folder_names_and_paths["diffusion_models"] = saved
        folder_paths.filename_list_cache.clear()
    assert is_image_conditioned(model) and is_patched(model) and recommended_sampling_of(model).steps == 4


# ---------------------------------------------------------------------------------------------
# 6. python -m training depth


def test_headless_depth_command_writes_grey_colour_and_raw(
    tiny_sd15_file, fp32_text_encoder_module, tmp_path, capsys
) -> None:
    from PIL import Image

    from d2f_app.cli import main
    from d2f_host.checkpoints import load_checkpoint

    base, _, _ = load_checkpoint(tiny_sd15_file, "skip")
    _, adapters = trained_depth_adapters(base)
    depth_file = write_depth_file(tmp_path / "sd15_depth.safetensors", adapters, base, steps=2)
    folder = tmp_path / "images"
    folder.mkdir()
    arr = (images(1, 48, 64)[0].numpy() * 255).astype(np.uint8)
    Image.fromarray(arr).save(folder / "room.png")
    Image.fromarray(arr[:, ::-1].copy()).save(folder / "street.jpg")
    (folder / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    args = [
        "depth",
        "--checkpoint",
        str(tiny_sd15_file),
        "--depth-model",
        str(depth_file),
        "--images",
        str(folder),
        "--output",
        str(out),
        "--ensemble",
        "2",
        "--resolution",
        "64",
        "--colormap",
        "turbo",
        "--no-progress",
    ]
    assert main(args) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "room_depth.npy",
        "room_depth.png",
        "room_depth_color.png",
        "street_depth.npy",
        "street_depth.png",
        "street_depth_color.png",
    ]
    raw = np.load(out / "room_depth.npy")
    assert raw.shape == (48, 64) and raw.dtype == np.float32 and raw.min() == 0.0 and raw.max() == pytest.approx(1.0)
    grey = Image.open(out / "room_depth.png")
    assert grey.mode in ("I;16", "I") and grey.size == (64, 48)
    np.testing.assert_array_equal(np.asarray(grey).astype(np.int64), np.round(raw * 65535).astype(np.int64))
    color = np.asarray(Image.open(out / "room_depth_color.png").convert("RGB")).astype(np.float32) / 255
    np.testing.assert_allclose(color, apply_colormap(torch.from_numpy(raw), "turbo").numpy(), atol=1 / 255 + 1e-6)
    assert "2 steps" in capsys.readouterr().out  # the file's recommended steps
    # the files hold what the estimate gives with these settings (steps from the file, ensemble 2, long side 64)
    from d2f_app.depth_files import load_image
    from d2f_host.depth_estimate import empty_prompt, load_depth_pipeline

    model, clip, vae, _ = load_depth_pipeline(tiny_sd15_file, depth_model=depth_file)
    image = load_image(folder / "room.png")
    with torch.inference_mode():
        expected = estimate_depth(model, vae, empty_prompt(clip), image, DepthSettings(2, 2, 64, 0))[0].numpy()
        single = estimate_depth(model, vae, empty_prompt(clip), image, DepthSettings(2, 1, 64, 0))[0].numpy()
    np.testing.assert_allclose(raw, expected, atol=1e-5)
    assert np.abs(single - expected).max() > 1e-4  # the ensemble flag matters
    # bad inputs fail before any model is loaded
    assert (
        main(
            [
                "depth",
                "--checkpoint",
                str(tiny_sd15_file),
                "--depth-model",
                str(depth_file),
                "--images",
                str(tmp_path / "nothing"),
                "--output",
                str(out),
            ]
        )
        == 2
    )
    assert "--images" in capsys.readouterr().err
    assert main([*args[:-1], "--ensemble", "0"]) == 2
    assert "ensemble" in capsys.readouterr().err
    assert (
        main(
            [
                "depth",
                "--checkpoint",
                str(tiny_sd15_file),
                "--depth-model",
                str(tmp_path / "missing.safetensors"),
                "--images",
                str(folder),
                "--output",
                str(out),
            ]
        )
        == 2
    )
    assert "missing.safetensors" in capsys.readouterr().err
