"""End-to-end and unit tests of the embedded demo (CPU, well under 2 minutes in all)."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch
from PIL import Image

import d2f_core
from demo import data as ddata
from demo import pipeline
from demo.classifier import predict
from demo.fid import frechet_distance, frechet_distance_gaussians, sqrtm_psd
from demo.grid import grid_size
from demo.model import NULL_CLASS
from demo.pretrain import main as pretrain_main
from demo.run import main as demo_main
from demo.store import load_classifier, load_unet

REDUCED = ["--steps", "12", "--batch", "8", "--samples", "60", "--grid", "2", "--sample-steps", "4", "--no-progress"]


def test_demo_end_to_end_reduced(tmp_path) -> None:
    out = tmp_path / "demo out"
    assert demo_main(["--out", str(out), *REDUCED]) == 0
    # the grid: readable, one row per class, before | after with 2 samples each
    with Image.open(out / "samples.png") as im:
        assert im.format == "PNG" and im.size == grid_size(2)
        pixels = np.asarray(im)
        assert pixels.std() > 10  # samples, not a blank canvas
    with Image.open(out / "loss_curve.png") as im:
        assert im.format == "PNG" and im.size[0] > 100 and im.size[1] > 100
    result = json.loads((out / "metrics.json").read_text())
    markdown = (out / "metrics.md").read_text()
    for stage in ("before", "after"):
        for key in ("fd", "accuracy", "fm_val_loss"):
            value = result[stage][key]
            assert math.isfinite(value) and value >= 0
    assert math.isfinite(result["floor_fd"]) and len(result) > 5
    # the markdown carries the measured numbers, as printed in the table
    assert (
        f"| Fréchet distance | {result['before']['fd']:.3f} | {result['after']['fd']:.3f} | {result['floor_fd']:.3f} |"
        in markdown
    )
    assert f"{result['after']['fm_val_loss']:.4f}" in markdown
    assert len(re.findall(r"\d+\.\d+", markdown)) >= 8


def test_demo_rejects_bad_inputs(tmp_path, capsys) -> None:
    blocker = tmp_path / "a file"
    blocker.write_text("not a folder")
    with pytest.raises(SystemExit) as exc:
        demo_main(["--out", str(blocker / "sub"), *REDUCED])
    assert "--out" in str(exc.value) and "cannot be written" in str(exc.value)
    for flag, value in (("--steps", "0"), ("--cfg", "-1"), ("--samples", "abc")):
        with pytest.raises(SystemExit):
            demo_main(["--out", str(tmp_path / "o"), flag, value])
        assert flag in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        demo_main(["--out", str(tmp_path / "o"), "--weights", str(tmp_path / "none"), *REDUCED])
    assert "--weights" in str(exc.value) and "demo.pretrain" in str(exc.value)


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_shipped_weights_sample_the_right_digits(prediction: str) -> None:
    """Zero-shot FM Euler samples of the converted shipped model, for the pretrained digits 0-6,
    are read as the requested digit by the shipped classifier far above chance (10 %)."""
    torch.manual_seed(0)
    unet, encoder, meta = load_unet(prediction)
    assert meta["prediction"] == prediction and meta["classes"] == "0,1,2,3,4,5,6"
    classifier = load_classifier()
    d2f = d2f_core.Diff2Flow(d2f_core.scaled_linear(), prediction)
    labels = torch.arange(7).repeat_interleave(6)
    samples = pipeline.sample(
        d2f.velocity_fn(unet),
        pipeline.contexts(encoder, labels),
        pipeline.contexts(encoder, [NULL_CLASS]),
        pipeline.fixed_noise(len(labels), seed=3),
        d2f_core.fm_sigmas(8, sigma_max=d2f.sigma_max),
        cfg_scale=2.0,
    )
    assert torch.isfinite(samples).all()
    predicted, _ = predict(classifier, samples)
    accuracy = (predicted == labels).float().mean().item()
    assert accuracy > 0.7, f"{prediction}: only {accuracy:.2f} of zero-shot samples show the requested digit"
    # and the classifier itself reads the real digits correctly
    images, real_labels = ddata.load_digits_tensor()
    assert (predict(classifier, images)[0] == real_labels).float().mean() > 0.95


def test_frechet_distance_closed_form() -> None:
    # commuting (diagonal) covariances: FD = |mu1 - mu2|^2 + sum (sqrt(a) - sqrt(b))^2
    mu1, mu2 = np.array([0.0, 1.0, -2.0]), np.array([1.0, 1.0, 0.0])
    a, b = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    expected = 1 + 4 + (1 - 3) ** 2 + (2 - 1) ** 2 + 0
    assert frechet_distance_gaussians(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, abs=1e-10)
    # non-commuting covariances: tr((C1 C2)^1/2) = sum sqrt(eigenvalues of C1 C2) (real, >= 0)
    rng = np.random.default_rng(0)
    m1, m2 = rng.normal(size=(4, 4)), rng.normal(size=(4, 4))
    c1, c2 = m1 @ m1.T + 0.1 * np.eye(4), m2 @ m2.T + 0.1 * np.eye(4)
    cross = np.sqrt(np.linalg.eigvals(c1 @ c2).real).sum()
    expected = np.trace(c1) + np.trace(c2) - 2 * cross
    assert frechet_distance_gaussians(np.zeros(4), c1, np.zeros(4), c2) == pytest.approx(expected, rel=1e-9)
    root = sqrtm_psd(c1)
    np.testing.assert_allclose(root @ root, c1, atol=1e-10)
    # from samples: the Gaussians fitted to large samples give the closed form approximately
    n = 200_000
    x = rng.normal(size=(n, 3)) * np.sqrt(a) + mu1
    y = rng.normal(size=(n, 3)) * np.sqrt(b) + mu2
    assert frechet_distance(x, y) == pytest.approx(10.0, rel=0.02)
    assert frechet_distance(torch.as_tensor(x), torch.as_tensor(x)) == pytest.approx(0.0, abs=1e-8)
    with pytest.raises(ValueError, match="same D"):
        frechet_distance(x, y[:, :2])


def test_ddim_trailing_grid_maps_to_trailing_timesteps() -> None:
    d2f = d2f_core.Diff2Flow(d2f_core.scaled_linear(), "v")
    sigmas = d2f_core.ddim_trailing_sigmas(d2f, 4)
    assert sigmas[-1] == 0 and sigmas[0] == pytest.approx(d2f.sigma_max)
    torch.testing.assert_close(
        d2f.timestep(sigmas[:-1]).double(),
        torch.tensor([999.0, 749.0, 499.0, 249.0], dtype=torch.float64),
        atol=1e-6,
        rtol=0,
    )


def test_pretraining_is_deterministic(tmp_path) -> None:
    args = ["--only", "eps", "--steps", "3", "--batch", "8"]
    assert pretrain_main([*args, "--out", str(tmp_path / "a")]) == 0
    assert pretrain_main([*args, "--out", str(tmp_path / "b")]) == 0
    first, second = (tmp_path / d / "unet_eps.safetensors" for d in "ab")
    assert first.read_bytes() == second.read_bytes()
