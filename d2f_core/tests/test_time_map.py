"""The time map: timestep(sigma) inverts ComfyUI's log-sigma interpolation exactly."""

from __future__ import annotations

import pytest
import torch

import d2f_core
from d2f_core.tests.helpers import CASES, make_d2f
from d2f_core.tests.reference import comfy_sigma, fm_to_ve


def test_sd_schedule_range_matches_math_md() -> None:
    d2f = d2f_core.Diff2Flow(d2f_core.scaled_linear(), "eps")
    k = fm_to_ve(torch.tensor([d2f.sigma_min, d2f.sigma_max], dtype=torch.float64))
    assert k[1].item() == pytest.approx(14.6146, abs=1e-4)
    assert k[0].item() == pytest.approx(0.0292, abs=1e-4)
    assert d2f.sigma_max == pytest.approx(0.93596, abs=1e-5)
    assert d2f.sigma_min == pytest.approx(0.02835, abs=1e-5)
    assert not d2f.zero_terminal_snr


@pytest.mark.parametrize("prediction,zsnr", CASES)
def test_round_trip_sigma_timestep_sigma(prediction: str, zsnr: bool) -> None:
    d2f = make_d2f(prediction, zsnr)
    s = torch.linspace(d2f.sigma_min, d2f.sigma_max, 10001, dtype=torch.float64)
    torch.testing.assert_close(d2f.sigma(d2f.timestep(s)), s, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("prediction,zsnr", CASES)
def test_round_trip_timestep_sigma_timestep(prediction: str, zsnr: bool) -> None:
    d2f = make_d2f(prediction, zsnr)
    t = torch.linspace(0, d2f.num_timesteps - 1, 7777, dtype=torch.float64)
    torch.testing.assert_close(d2f.timestep(d2f.sigma(t)), t, rtol=0, atol=1e-8)


@pytest.mark.parametrize("prediction,zsnr", CASES)
def test_timestep_is_monotone_and_clamped(prediction: str, zsnr: bool) -> None:
    d2f = make_d2f(prediction, zsnr)
    s = torch.linspace(0, 1, 20001, dtype=torch.float64)
    t = d2f.timestep(s)
    assert (t[1:] >= t[:-1]).all()
    inside = (s > d2f.sigma_min) & (s < d2f.sigma_max)
    assert (t[1:][inside[1:]] > t[:-1][inside[1:]]).all(), "strictly increasing inside the range"
    assert t[0] == 0 and t[-1] == d2f.num_timesteps - 1
    assert (t[s <= d2f.sigma_min] == 0).all()
    assert (t[s >= d2f.sigma_max] == d2f.num_timesteps - 1).all()


@pytest.mark.parametrize("beta_schedule", ["scaled_linear", "linear", "cosine"])
def test_timestep_agrees_with_comfyui_interpolation(beta_schedule: str) -> None:
    """The UNet is fed exactly the timestep ComfyUI would feed at that noise level: ComfyUI's
    sigma(timestep(sigma_fm)) (computed independently, in VE k) equals k(sigma_fm).
    (The clipped cosine schedule ends at alphas_cumprod 2.4e-9, zero terminal SNR: v only.)"""
    ac = d2f_core.schedules.SCHEDULES[beta_schedule]()
    d2f = d2f_core.Diff2Flow(ac, "v")
    s = torch.linspace(d2f.sigma_min, d2f.sigma_max, 5003, dtype=torch.float64)
    t = d2f.timestep(s)
    torch.testing.assert_close(comfy_sigma(ac, t), fm_to_ve(s), rtol=1e-11, atol=0)


def test_integer_timesteps_map_to_table() -> None:
    ac = d2f_core.scaled_linear()
    d2f = d2f_core.Diff2Flow(ac, "eps")
    t = torch.arange(1000, dtype=torch.float64)
    k = ((1 - ac) / ac).sqrt()
    torch.testing.assert_close(d2f.sigma(t), k / (1 + k), rtol=1e-14, atol=0)


def test_from_comfyui_float32_table_matches_its_interpolation() -> None:
    """ComfyUI stores its k table in float32; building from that buffer inverts it exactly."""
    k32 = ((1 - d2f_core.scaled_linear()) / d2f_core.scaled_linear()).sqrt().float()
    d2f = d2f_core.Diff2Flow.from_discrete_sigmas(k32, "v")
    s = torch.linspace(d2f.sigma_min, d2f.sigma_max, 999, dtype=torch.float64)
    log_k = k32.double().log()
    t = d2f.timestep(s)
    lo = t.floor().long().clamp(max=998)
    w = t - lo
    k = ((1 - w) * log_k[lo] + w * log_k[lo + 1]).exp()
    torch.testing.assert_close(k, fm_to_ve(s), rtol=1e-10, atol=0)


def test_comfyui_style_zero_snr_table_is_not_exactly_one() -> None:
    """ComfyUI's zsnr rescale keeps alphas_cumprod[-1] = 4.9e-8: sigma_max < 1 but it counts as
    zero terminal SNR (an eps model is refused)."""
    ac = d2f_core.rescale_zero_terminal_snr(d2f_core.scaled_linear())
    ac[-1] = 4.8973451890853435e-08
    d2f = d2f_core.Diff2Flow(ac, "v")
    assert d2f.zero_terminal_snr and 0.9997 < d2f.sigma_max < 1
    with pytest.raises(ValueError, match="zero-terminal-SNR"):
        d2f_core.Diff2Flow(ac, "eps")


def test_zero_snr_last_segment_is_linear_in_sigma() -> None:
    d2f = make_d2f("v", True)
    assert d2f.sigma_max == 1.0
    lo = d2f.sigma(torch.tensor(998.0, dtype=torch.float64))
    t = torch.tensor([998.25, 998.5, 999.0], dtype=torch.float64)
    expected = lo + torch.tensor([0.25, 0.5, 1.0], dtype=torch.float64) * (1 - lo)
    torch.testing.assert_close(d2f.sigma(t), expected)


def test_time_map_output_dtypes_and_shapes(device: torch.device) -> None:
    d2f = make_d2f("eps", False)
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        s = torch.tensor([0.1, 0.5, 0.9], dtype=dtype, device=device)
        t = d2f.timestep(s)
        assert t.dtype == torch.float32 and t.device.type == device.type and t.shape == (3,)
    t64 = d2f.timestep(torch.tensor(0.5, dtype=torch.float64, device=device))
    assert t64.dtype == torch.float64 and t64.ndim == 0
    assert d2f.timestep(0.5).ndim == 0
    ref = d2f.timestep(torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64))
    torch.testing.assert_close(
        d2f.timestep(torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64, device=device)).cpu(), ref
    )


def test_for_model_does_not_rescale_a_schedule_that_already_has_zero_terminal_snr() -> None:
    """Requesting zero terminal SNR on a schedule that has it (ComfyUI's zsnr table, last entry
    4.9e-8) changes nothing; on an ordinary schedule it rescales; eps with it is refused."""
    comfy_zsnr = d2f_core.rescale_zero_terminal_snr(d2f_core.scaled_linear())
    comfy_zsnr[-1] = 4.8973451890853435e-08
    on, off = d2f_core.Diff2Flow.for_model(comfy_zsnr, "v", True), d2f_core.Diff2Flow.for_model(comfy_zsnr, "v", False)
    assert torch.equal(on.alphas_cumprod, off.alphas_cumprod) and torch.equal(on.alphas_cumprod, comfy_zsnr)
    rescaled = d2f_core.Diff2Flow.for_model(d2f_core.scaled_linear(), "v", True)
    assert rescaled.sigma_max == 1.0 and torch.equal(
        rescaled.alphas_cumprod, d2f_core.rescale_zero_terminal_snr(d2f_core.scaled_linear())
    )
    with pytest.raises(ValueError, match="only valid for v-prediction"):
        d2f_core.Diff2Flow.for_model(d2f_core.scaled_linear(), "eps", True)
