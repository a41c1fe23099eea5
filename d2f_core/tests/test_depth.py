"""Image-to-depth maths (docs/MATH.md section 13): normalisation, the widened first convolution,
affine fits, the ensemble and the metrics, each against a case with a known answer."""

from __future__ import annotations

import pytest
import torch

import d2f_core
from d2f_core import depth as D
from d2f_core.tests.helpers import make_d2f
from d2f_core.tests.nets import TinyDenoiser
from d2f_core.tests.test_objectives import oracle_timestep


def scene(batch: int = 2, size: int = 16, seed: int = 0) -> torch.Tensor:
    """Positive depth maps with a slope, a box in front and some noise: [B, 1, H, W]."""
    gen = torch.Generator().manual_seed(seed)
    ramp = torch.linspace(2.0, 6.0, size).view(1, 1, size, 1).expand(batch, 1, size, size).clone()
    ramp[:, :, 4:9, 5:11] = 1.5
    return ramp + 0.05 * torch.rand(batch, 1, size, size, generator=gen)


def test_normalize_depth_maps_the_quantiles_to_minus_one_and_one_and_is_affine_invariant() -> None:
    depth = torch.arange(1.0, 101.0).view(1, 10, 10)  # values 1..100: quantiles by linear interpolation
    out = D.normalize_depth(depth)
    low, high = torch.quantile(depth.flatten(), torch.tensor([0.02, 0.98]))
    expected = ((depth - low) / (high - low) * 2 - 1).clamp(-1, 1).unsqueeze(1)
    torch.testing.assert_close(out, expected)
    assert out.min() == -1 and out.max() == 1 and (out == 1).sum() == 2  # the top 2 % clipped to 1
    # scale and offset of the scene do not matter, per image
    maps = scene()
    torch.testing.assert_close(
        D.normalize_depth(maps * torch.tensor([3.0, 0.2]).view(2, 1, 1, 1) + 7),
        D.normalize_depth(maps),
        atol=1e-5,
        rtol=0,
    )


def test_normalize_depth_ignores_invalid_pixels_and_rejects_flat_maps() -> None:
    maps = scene(batch=1)
    mask = torch.ones_like(maps, dtype=torch.bool)
    mask[..., 0, :] = False
    corrupted = maps.clone()
    corrupted[..., 0, :] = 1e6  # outside the mask: must not move the quantiles
    corrupted[..., 1, 0] = float("nan")
    mask_nan = mask.clone()
    mask_nan[..., 1, 0] = False
    torch.testing.assert_close(
        D.normalize_depth(corrupted, mask)[mask_nan], D.normalize_depth(maps, mask_nan)[mask_nan]
    )
    assert D.normalize_depth(corrupted, mask)[~mask].eq(0).all()
    flat = torch.ones(2, 8, 8)
    flat[0] = torch.rand(8, 8)
    with pytest.raises(ValueError, match="depth map 1 is constant"):
        D.normalize_depth(flat)
    with pytest.raises(ValueError, match="quantiles must satisfy"):
        D.normalize_depth(maps, quantiles=(0.9, 0.1))


def test_depth_image_round_trip() -> None:
    depth = D.normalize_depth(scene())
    image = D.depth_as_image(depth)
    assert image.shape == (2, 3, 16, 16)
    torch.testing.assert_close(D.image_as_depth(image), depth)


def test_widened_first_conv_equals_the_base_on_duplicated_input() -> None:
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(4, 8, 3, padding=1)
    x = torch.randn(2, 4, 8, 8)
    widened = D.widen_input_conv(conv.weight.detach())
    assert widened.shape == (8, 8, 3, 3)
    out = torch.nn.functional.conv2d(torch.cat([x, x], dim=1), widened, conv.bias, padding=1)
    torch.testing.assert_close(out, conv(x).detach(), atol=1e-6, rtol=1e-5)
    # and it is not a no-op: the image half changes the output when it differs from the noisy half
    other = torch.nn.functional.conv2d(torch.cat([x, torch.zeros_like(x)], dim=1), widened, conv.bias, padding=1)
    assert (other - out).abs().max() > 1e-2


def test_fit_affine_recovers_a_known_scale_and_shift_over_the_valid_pixels() -> None:
    maps = scene().double()
    target = maps * torch.tensor([2.5, -0.4], dtype=torch.float64).view(2, 1, 1, 1) + torch.tensor(
        [1.0, 3.0], dtype=torch.float64
    ).view(2, 1, 1, 1)
    mask = torch.ones_like(maps, dtype=torch.bool)
    mask[:, :, :2] = False
    target[:, :, :2] = 1e3  # outside the mask
    scale, shift = D.fit_affine(maps, target, mask)
    torch.testing.assert_close(scale, torch.tensor([2.5, -0.4], dtype=torch.float64), atol=1e-10, rtol=0)
    torch.testing.assert_close(shift, torch.tensor([1.0, 3.0], dtype=torch.float64), atol=1e-10, rtol=0)


def test_ensemble_recovers_the_map_from_members_that_are_affine_images_of_it() -> None:
    maps = scene(batch=2).double()
    transforms = [(1.0, 0.0), (3.0, -2.0), (0.5, 4.0), (-1.5, 1.0), (7.0, 0.3)]
    members = torch.stack([a * maps + b for a, b in transforms])
    out = D.ensemble_depth(members)
    flat = maps.flatten(1)
    expected = (maps - flat.min(1).values.view(-1, 1, 1, 1)) / (flat.max(1).values - flat.min(1).values).view(
        -1, 1, 1, 1
    )
    torch.testing.assert_close(out.double(), expected, atol=1e-6, rtol=0)


def test_ensemble_median_outvotes_a_wrong_member() -> None:
    maps = scene(batch=1).double()
    wrong = torch.rand(maps.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 5
    members = torch.stack([maps, 2 * maps + 1, wrong, 0.5 * maps - 1, 3 * maps])
    out = D.ensemble_depth(members)
    assert D.abs_rel(out, maps).item() < 1e-6
    assert D.abs_rel(members.mean(0), maps).item() > 1e-3  # a plain average is pulled off by the wrong member


def test_metrics_on_a_hand_computed_case() -> None:
    gt = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 1, 2, 2)
    pred = torch.tensor([1.5, 1.5, 2.5, 4.5]).view(1, 1, 2, 2)
    # least squares of gt on pred: pred - mean = [-1, -1, 0, 2], gt - mean = [-1.5, -0.5, 0.5, 1.5]:
    # scale = 5 / 6, shift = 2.5 - 5/6 * 2.5 = 5/12; aligned = [5/3, 5/3, 2.5, 25/6]
    scale, shift = D.fit_affine(pred, gt)
    assert scale.item() == pytest.approx(5 / 6) and shift.item() == pytest.approx(5 / 12)
    aligned = [5 / 3, 5 / 3, 2.5, 25 / 6]
    expected_abs_rel = sum(abs(a - g) / g for a, g in zip(aligned, [1, 2, 3, 4])) / 4
    assert D.abs_rel(pred, gt).item() == pytest.approx(expected_abs_rel)
    assert D.delta1(pred, gt).item() == pytest.approx(0.75)  # ratios 1.67, 1.2, 1.2, 1.04
    # affine images of the ground truth are perfect
    metrics = D.depth_metrics(3 * gt + 2, gt)
    assert metrics["abs_rel"] == pytest.approx(0, abs=1e-12) and metrics["delta1"] == 1.0


@pytest.mark.parametrize("objective", ["diff2flow", "diffusion", "naive_fm"])
def test_image_conditioned_objectives_pass_the_clean_image_latent_beside_the_noisy_input(objective: str) -> None:
    """The image latent reaches the network as ``concat`` unscaled, beside the (scaled) noisy depth
    latent; the loss equals the hand-written one of each objective on that network."""
    torch.manual_seed(0)
    d2f = make_d2f("v", False)
    inner = TinyDenoiser(channels=4).double()

    def network(x: torch.Tensor, t: torch.Tensor, concat: torch.Tensor) -> torch.Tensor:
        return inner(torch.cat([x, concat], dim=1), t)[:, :2]

    gen = torch.Generator().manual_seed(2)
    depth, noise, image = torch.randn(3, 3, 2, 4, 4, generator=gen, dtype=torch.float64)
    record = d2f_core.get_objective(objective)
    if record.times == "tau":
        t = torch.tensor([10, 500, 990])
        out = record.loss(network, d2f, depth, noise, t, concat=image)
        ac = d2f.alphas_cumprod[t].view(-1, 1, 1, 1)
        x = ac.sqrt() * depth + (1 - ac).sqrt() * noise
        raw = network(x, t.double(), image)
        target = ac.sqrt() * noise - (1 - ac).sqrt() * depth
        torch.testing.assert_close(out.per_sample, (raw - target).pow(2).flatten(1).mean(1))
        return
    sigma = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    out = record.loss(network, d2f, depth, noise, sigma, concat=image)
    s4 = sigma.view(-1, 1, 1, 1)
    x = (1 - s4) * depth + s4 * noise
    if objective == "naive_fm":
        v = network(x, 1000 * sigma, image)
    else:
        n = torch.sqrt(s4**2 + (1 - s4) ** 2)
        v = (2 * s4 - 1) * x / n**2 + network(x / n, oracle_timestep(d2f, sigma), image) / n
    torch.testing.assert_close(out.per_sample, (v - (noise - depth)).pow(2).flatten(1).mean(1))
