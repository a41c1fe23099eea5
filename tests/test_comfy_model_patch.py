"""The Diff2Flow model patch on tiny SD1.x-eps and SD2.x-v models in a real ComfyUI 0.8.0."""

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


def raw_output(model, x_in: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
    """The UNet's raw eps / v output, called directly (no model sampling involved)."""
    with torch.no_grad():
        return model.model.diffusion_model(x_in, t, context=cond[0][0]).float()


def denoised_of(model, x: torch.Tensor, sigma: torch.Tensor, cond) -> torch.Tensor:
    """ComfyUI's own apply_model path (calculate_input, timestep, calculate_denoised) of `model`."""
    comfy.model_management.load_models_gpu([model])
    with torch.no_grad():
        return model.model.apply_model(x, sigma, c_crossattn=cond[0][0]).float()


def sample(model, sampler, sigmas, cond, uncond, seed: int = 0, cfg: float = 1.0) -> torch.Tensor:
    latent = torch.zeros(LATENT)
    noise = comfy.sample.prepare_noise(latent, seed)
    return comfy.sample.sample_custom(
        model, noise, cfg, sampler, sigmas, cond, uncond, latent, disable_pbar=True, seed=seed
    )


@pytest.mark.parametrize("kind", KINDS)
def test_patched_denoised_equals_unpatched_and_velocity_equals_d2f_core(pack, tiny_model, conditioning, kind) -> None:
    model = tiny_model(kind)
    patched = pack.model_sampling.patch_model(model)
    cond = conditioning(1)
    d2f = patched.get_model_object("model_sampling").d2f
    gen = torch.Generator().manual_seed(0)
    # at the noise levels of integer timesteps: there ComfyUI's unpatched model (which rounds
    # its timestep to the nearest integer) and the patched one feed the UNet the same timestep
    for t_int in (0, 10, 250, 500, 750, 999):
        sigma_fm = float(d2f.sigma(torch.tensor(float(t_int), dtype=torch.float64)))
        x = torch.randn(LATENT, generator=gen)
        sigma = torch.tensor([sigma_fm], dtype=torch.float32)
        ours = denoised_of(patched, x, sigma, cond)
        # the unpatched model at the same noise level: VE sigma k and the VE-scaled sample
        k = sigma.double() / (1 - sigma.double())
        theirs = denoised_of(model, (x.double() / (1 - sigma.double())).float(), k.float(), cond)
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5 * theirs.abs().max().item())
        # velocity of the patched model = d2f_core's conversion of the same raw output
        x_in, t = d2f.network_inputs(x, sigma)
        v_core = d2f.velocity(raw_output(patched, x_in, t, cond), x, sigma)
        v_patch = (x - ours) / sigma_fm
        torch.testing.assert_close(v_patch, v_core, rtol=1e-4, atol=1e-4 * v_core.abs().max().item())


@pytest.mark.parametrize("kind", KINDS)
def test_stock_euler_is_d2f_core_fm_euler(pack, tiny_model, conditioning, kind) -> None:
    model = pack.model_sampling.patch_model(tiny_model(kind))
    cond = conditioning(1)
    d2f = model.get_model_object("model_sampling").d2f
    sigmas = d2f_core.fm_sigmas(6, d2f.sigma_max, shift=2.0).float()
    stock = sample(model, comfy.samplers.sampler_object("euler"), sigmas, cond, cond)
    ours = sample(model, pack.sampling_nodes.fm_sampler(), sigmas, cond, cond)

    def velocity(x, s):
        x_in, t = d2f.network_inputs(x, s)
        return d2f.velocity(raw_output(model, x_in, t, cond), x, s)

    noise = comfy.sample.prepare_noise(torch.zeros(LATENT), 0)
    core = d2f_core.sample_euler(velocity, sigmas[0].item() * noise, sigmas)
    core = model.model.process_latent_out(core)
    scale = core.abs().max().item()
    torch.testing.assert_close(stock, core, rtol=1e-5, atol=1e-5 * scale)
    torch.testing.assert_close(ours, core, rtol=1e-5, atol=1e-5 * scale)


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_every_stock_sampler_and_scheduler_runs(pack, tiny_model, conditioning, kind) -> None:
    model = pack.model_sampling.patch_model(tiny_model(kind))
    cond, uncond = conditioning(1), conditioning(2)
    ms = model.get_model_object("model_sampling")
    failures = {}
    runs = [(name, "simple") for name in comfy.samplers.SAMPLER_NAMES]
    runs += [(sampler, sched) for sched in comfy.samplers.SCHEDULER_NAMES for sampler in ("euler", "dpmpp_2m")]
    for sampler_name, scheduler in runs:
        sigmas = comfy.samplers.calculate_sigmas(ms, scheduler, 4).float()
        if sampler_name in comfy.samplers.KSampler.DISCARD_PENULTIMATE_SIGMA_SAMPLERS:
            sigmas = torch.cat([sigmas[:-2], sigmas[-1:]])
        try:
            out = sample(model, comfy.samplers.sampler_object(sampler_name), sigmas, cond, uncond, cfg=3.0)
        except Exception as exc:  # collect every failure, report all at once
            failures[(sampler_name, scheduler)] = repr(exc)[:200]
            continue
        if out.shape != LATENT or not torch.isfinite(out).all():
            failures[(sampler_name, scheduler)] = "non-finite or wrong shape"
    assert not failures, failures
    assert len(runs) > 50


@pytest.mark.parametrize("kind", KINDS)
def test_schedulers_see_the_fm_range(pack, tiny_model, kind) -> None:
    ms = pack.model_sampling.patch_model(tiny_model(kind)).get_model_object("model_sampling")
    assert float(ms.sigma_max) == pytest.approx(0.93596, abs=1e-5)
    assert float(ms.sigma_min) == pytest.approx(0.02835, abs=1e-5)
    for scheduler in comfy.samplers.SCHEDULER_NAMES:
        sigmas = comfy.samplers.calculate_sigmas(ms, scheduler, 10)
        assert sigmas[0] <= 0.93596 + 1e-5 and sigmas[-1] == 0 and (sigmas[:-1] > 0).all(), scheduler
    # timestep() and sigma() are inverses, as the normal / sgm_uniform schedulers assume
    s = torch.linspace(0.03, 0.93, 50)
    torch.testing.assert_close(ms.sigma(ms.timestep(s)), s, rtol=1e-5, atol=1e-6)
    assert 0.0 < ms.percent_to_sigma(0.5) < 1.0 and ms.percent_to_sigma(0.0) == 1.0 and ms.percent_to_sigma(1.0) == 0.0


@pytest.mark.parametrize("kind", KINDS)
def test_input_model_is_unchanged(pack, tiny_model, conditioning, kind) -> None:
    model = tiny_model(kind)
    cond = conditioning(1)
    ms = model.get_model_object("model_sampling")
    sigmas = comfy.samplers.calculate_sigmas(ms, "normal", 4)
    euler = comfy.samplers.sampler_object("euler")
    before = sample(model, euler, sigmas, cond, cond)
    patched = pack.model_sampling.patch_model(model)
    sample(patched, euler, d2f_core.fm_sigmas(4, 0.9).float(), cond, cond)
    after = sample(model, euler, sigmas, cond, cond)
    assert model.get_model_object("model_sampling") is ms
    assert torch.equal(before, after)


def test_patching_twice_equals_patching_once(pack, tiny_model, conditioning) -> None:
    model = tiny_model("v")
    once = pack.model_sampling.patch_model(model)
    twice = pack.model_sampling.patch_model(once)
    a, b = once.get_model_object("model_sampling"), twice.get_model_object("model_sampling")
    assert torch.equal(a.sigmas, b.sigmas) and a.prediction == b.prediction == "v"
    cond = conditioning(1)
    sigmas = d2f_core.fm_sigmas(3, a.d2f.sigma_max).float()
    euler = comfy.samplers.sampler_object("euler")
    assert torch.equal(sample(once, euler, sigmas, cond, cond), sample(twice, euler, sigmas, cond, cond))
    # a later patch with new options is rebuilt from the original schedule, not stacked
    zsnr = pack.model_sampling.patch_model(once, zero_terminal_snr=True).get_model_object("model_sampling")
    assert zsnr.d2f.sigma_max == 1.0 and torch.equal(zsnr.source_alphas_cumprod, a.source_alphas_cumprod)


def test_zero_terminal_snr_option(pack, tiny_model, conditioning, comfy_nodes) -> None:
    with pytest.raises(ValueError, match="only valid for v-prediction"):
        pack.model_sampling.patch_model(tiny_model("eps"), zero_terminal_snr=True)
    patched = pack.model_sampling.patch_model(tiny_model("v"), zero_terminal_snr=True)
    assert pack.model_sampling.flow_sigma_max(patched) == 1.0
    sigmas = comfy_nodes["D2F_FMScheduler"].execute(patched, 4, 1.0, 1.0)[0]
    assert sigmas[0].item() == 1.0
    out = sample(patched, comfy.samplers.sampler_object("euler"), sigmas, conditioning(1), conditioning(1))
    assert torch.isfinite(out).all()


def test_earlier_comfyui_zsnr_patch_is_respected(pack, tiny_model, comfy_nodes) -> None:
    """ComfyUI's ModelSamplingDiscrete(v_prediction, zsnr) leaves alphas_cumprod[-1] = 4.9e-8."""
    model = tiny_model("v")
    (zsnr_model,) = comfy_nodes["ModelSamplingDiscrete"]().patch(model, "v_prediction", True)
    ms = pack.model_sampling.patch_model(zsnr_model).get_model_object("model_sampling")
    assert ms.d2f.zero_terminal_snr and 0.9997 < ms.d2f.sigma_max < 1.0


@pytest.mark.parametrize(
    "patch,match",
    [
        (lambda nodes, m: nodes["ModelSamplingSD3"]().patch(m, 3.0)[0], "already a flow model"),
        (
            lambda nodes, m: nodes["ModelSamplingContinuousEDM"]().patch(m, "eps", 0.002, 120.0)[0],
            "EDM / continuous-time models",
        ),
        (lambda nodes, m: nodes["ModelSamplingDiscrete"]().patch(m, "x0", False)[0], "x0 / LCM"),
        (lambda nodes, m: nodes["ModelSamplingDiscrete"]().patch(m, "lcm", False)[0], "x0 / LCM"),
    ],
)
def test_refusals(pack, tiny_model, comfy_nodes, patch, match) -> None:
    model = patch(comfy_nodes, tiny_model("eps"))
    with pytest.raises(ValueError, match=match):
        pack.model_sampling.patch_model(model)


def test_unknown_model_sampling_is_refused(pack, tiny_model) -> None:
    model = tiny_model("eps").clone()
    model.add_object_patch("model_sampling", torch.nn.Module())
    with pytest.raises(ValueError, match="cannot convert a model with Module model sampling"):
        pack.model_sampling.patch_model(model)


def test_fm_scheduler_refuses_unconverted_model(comfy_nodes, tiny_model) -> None:
    with pytest.raises(ValueError, match="connect it through 'Diff2Flow Model Patch'"):
        comfy_nodes["D2F_FMScheduler"].execute(tiny_model("eps"), 4, 1.0, 1.0)


def test_model_patch_node_and_ksampler_node(comfy_nodes, tiny_model, conditioning) -> None:
    model = tiny_model("eps")
    patched = comfy_nodes["D2F_ModelPatch"].execute(model, False)[0]
    assert patched is not model
    latent = {"samples": torch.zeros(LATENT)}
    args = dict(
        seed=3,
        steps=4,
        cfg=4.0,
        sampler="euler",
        shift=2.0,
        positive=conditioning(1),
        negative=conditioning(2),
        latent_image=latent,
        denoise=1.0,
    )
    out_unpatched_input = comfy_nodes["D2F_KSampler"].execute(model=model, **args)[0]["samples"]
    out_patched_input = comfy_nodes["D2F_KSampler"].execute(model=patched, **args)[0]["samples"]
    assert torch.isfinite(out_unpatched_input).all() and out_unpatched_input.shape == LATENT
    assert torch.equal(out_unpatched_input, out_patched_input)  # patches only when needed
    heun = comfy_nodes["D2F_KSampler"].execute(model=model, **{**args, "sampler": "heun"})[0]["samples"]
    assert torch.isfinite(heun).all() and not torch.equal(heun, out_patched_input)
    img2img = comfy_nodes["D2F_KSampler"].execute(
        model=model, **{**args, "latent_image": {"samples": out_patched_input}, "denoise": 0.5}
    )[0]["samples"]
    assert torch.isfinite(img2img).all()


def test_fm_sampler_node_runs_the_chosen_sampler(pack, tiny_model, conditioning, comfy_nodes) -> None:
    """The FM Sampler node's `sampler` choice is the integrator that runs (Heun differs from Euler)."""
    model = pack.model_sampling.patch_model(tiny_model("eps"))
    cond = conditioning(1)
    sigmas = d2f_core.fm_sigmas(3, model.get_model_object("model_sampling").d2f.sigma_max).float()
    node = comfy_nodes["D2F_FMEulerSampler"]
    by_node = {name: sample(model, node.execute(sampler=name)[0], sigmas, cond, cond) for name in d2f_core.SAMPLERS}
    direct = {
        name: sample(model, pack.sampling_nodes.fm_sampler(name), sigmas, cond, cond) for name in d2f_core.SAMPLERS
    }
    for name in d2f_core.SAMPLERS:
        torch.testing.assert_close(by_node[name], direct[name], rtol=0, atol=0)
    assert not torch.allclose(by_node["heun"], by_node["euler"])
