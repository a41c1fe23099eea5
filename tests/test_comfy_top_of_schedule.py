"""The top of the schedule through the ComfyUI patch (docs/MATH.md section 10), in a real ComfyUI.

For FM sigma in (sigma_max, 1] the patched model must evaluate the UNet as at its last table
entry and read its output consistently: the data estimate equals the *unpatched* model's
prediction at its noisiest level k_max on the same UNet input, and the velocity is
``(x - x0_hat) / sigma``. Checked through ``model_sampling``'s separate calls, through
``apply_model`` and through ``comfy.sample.sample_custom`` with SIGMAS that start at 1.
"""

from __future__ import annotations

import pytest
import torch
from comfy_harness import require_comfyui

require_comfyui()

import comfy.model_management  # noqa: E402
import comfy.sample  # noqa: E402
import comfy.samplers  # noqa: E402

import d2f_core  # noqa: E402

KINDS = ["eps", "v"]
LATENT = (1, 4, 8, 8)
ABOVE = [0.95, 0.99, 1.0]


def patched_of(comfy_nodes, model):
    return comfy_nodes["D2F_ModelPatch"].execute(model=model, zero_terminal_snr=False)[0]


def cond_for(model, seed: int = 0):
    context_dim = model.model.model_config.unet_config["context_dim"]
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, 77, context_dim, generator=gen), {}]]


def table_end(model) -> tuple[float, float, float]:
    """``(k_max, a_T, s_T)`` of the unpatched model's own table (ComfyUI's VE sigmas)."""
    k = float(model.get_model_object("model_sampling").sigmas[-1].double())
    return k, 1 / (1 + k**2) ** 0.5, k / (1 + k**2) ** 0.5


def unpatched_table_end_denoised(model, x_in: torch.Tensor, cond) -> torch.Tensor:
    """The unpatched model's data estimate at its noisiest level k_max for the UNet input x_in
    (its VE state is x_in * sqrt(k^2 + 1), which its calculate_input maps back to x_in)."""
    k, _, _ = table_end(model)
    comfy.model_management.load_models_gpu([model])
    with torch.no_grad():
        return model.model.apply_model(x_in * (k**2 + 1) ** 0.5, torch.tensor([k]), c_crossattn=cond[0][0]).float()


def noise_norm(sigma: torch.Tensor) -> torch.Tensor:
    return torch.sqrt(sigma**2 + (1 - sigma) ** 2)


@pytest.mark.parametrize("kind", KINDS)
def test_model_sampling_calls_above_sigma_max(comfy_nodes, tiny_model, kind) -> None:
    """calculate_input, timestep and calculate_denoised each follow the table end on their own."""
    model = tiny_model(kind)
    ms = patched_of(comfy_nodes, model).get_model_object("model_sampling")
    _, a_t, s_t = table_end(model)
    gen = torch.Generator().manual_seed(0)
    for value in [float(ms.sigma_max) + 1e-4, *ABOVE]:
        sigma = torch.tensor([value])
        x, out = torch.randn(2, *LATENT, generator=gen)
        x_in = x.double() / noise_norm(sigma.double())
        assert ms.timestep(sigma).item() == ms.num_timesteps - 1
        torch.testing.assert_close(ms.calculate_input(sigma, x).double(), x_in, rtol=1e-6, atol=1e-6)
        expected = (x_in - s_t * out.double()) / a_t if kind == "eps" else a_t * x_in - s_t * out.double()
        denoised = ms.calculate_denoised(sigma, out, x).double()
        assert torch.isfinite(denoised).all()
        torch.testing.assert_close(denoised, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


@pytest.mark.parametrize("kind", KINDS)
def test_patched_model_above_sigma_max_is_the_unpatched_table_end(comfy_nodes, tiny_model, kind) -> None:
    model = tiny_model(kind)
    patched = patched_of(comfy_nodes, model)
    cond = cond_for(model)
    gen = torch.Generator().manual_seed(1)
    for value in ABOVE:
        sigma = torch.tensor([value])
        x = torch.randn(LATENT, generator=gen)
        # the patch and the original share one BaseModel: load the one to run each time
        comfy.model_management.load_models_gpu([patched])
        with torch.no_grad():
            ours = patched.model.apply_model(x, sigma, c_crossattn=cond[0][0]).float()
        theirs = unpatched_table_end_denoised(model, x / noise_norm(sigma), cond)
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4 * theirs.abs().max().item())
        # the velocity stock euler uses, (x - denoised) / sigma, is finite up to sigma = 1
        assert torch.isfinite((x - ours) / value).all()


def run(model, sigmas: torch.Tensor, noise: torch.Tensor, cond) -> tuple[torch.Tensor, list[dict]]:
    seen: list[dict] = []

    def callback(step, denoised, x, total):
        seen.append({"step": step, "denoised": denoised.clone(), "x": x.clone()})

    out = comfy.sample.sample_custom(
        model,
        noise,
        1.0,
        comfy.samplers.sampler_object("euler"),
        sigmas.float(),
        cond,
        cond,
        torch.zeros(LATENT),
        callback=callback,
        disable_pbar=True,
        seed=0,
    )
    return out, seen


@pytest.mark.parametrize("kind", KINDS)
def test_sampling_from_sigma_one_through_the_patch(comfy_nodes, tiny_model, kind) -> None:
    """Manual SIGMAS from 1.0 (a flow-model grid, and fm_sigmas(start="noise")): pure noise z, a
    first step to sigmas[1] that uses the table end, and nothing else changed."""
    model = tiny_model(kind)
    patched = patched_of(comfy_nodes, model)
    cond = cond_for(model)
    z = comfy.sample.prepare_noise(torch.zeros(LATENT), 0)
    sigma_max = float(patched.get_model_object("model_sampling").sigma_max)
    flow_grid = torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0])
    start_noise = d2f_core.fm_sigmas(4, sigma_max, start="noise")
    for sigmas in (flow_grid, start_noise):
        out, seen = run(patched, sigmas, z, cond)
        assert torch.isfinite(out).all() and len(seen) == 4
        # step 0 at sigma = 1: x is pure noise, denoised the unpatched table-end prediction
        x0_hat = unpatched_table_end_denoised(model, z, cond)
        torch.testing.assert_close(seen[0]["x"], z, rtol=0, atol=0)
        torch.testing.assert_close(seen[0]["denoised"], x0_hat, rtol=1e-4, atol=1e-4 * x0_hat.abs().max().item())
        # after the first Euler step: sigma_1 z + (1 - sigma_1) x0_hat (a DDIM step from noise)
        s1 = sigmas[1].float().item()
        expected = s1 * z + (1 - s1) * x0_hat
        torch.testing.assert_close(seen[1]["x"], expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())
        # from there on it is the ordinary run on sigmas[1:] (noise scaled so its start is x_1)
        rest, _ = run(patched, sigmas[1:], seen[1]["x"] / s1, cond)
        torch.testing.assert_close(out, rest, rtol=1e-5, atol=1e-5 * rest.abs().max().item())
    # the start option moved only the first sigma of the default grid
    default = d2f_core.fm_sigmas(4, sigma_max)
    assert torch.equal(default[1:], start_noise[1:]) and start_noise[0] == 1.0 and default[0] < 1.0
