"""Depth colour maps (d2f_core.colormap): the table's ends, linear interpolation between its entries, and
agreement with matplotlib's own colour maps where matplotlib is installed (it is not a dependency)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from d2f_core.colormap import COLORMAPS, apply_colormap
from d2f_core.depth_settings import DepthSettings, processing_size


@pytest.mark.parametrize("name", list(COLORMAPS))
def test_ends_middles_and_shape(name) -> None:
    table = torch.tensor(COLORMAPS[name])
    values = torch.tensor([[0.0, 1.0], [-0.5, 2.0]])
    out = apply_colormap(values, name)
    assert out.shape == (2, 2, 3) and out.dtype == torch.float32
    torch.testing.assert_close(out[0, 0], table[0])
    torch.testing.assert_close(out[0, 1], table[-1])
    torch.testing.assert_close(out[1], out[0])  # clipped to [0, 1]
    # halfway between two entries is their mean
    n = len(table) - 1
    mid = apply_colormap(torch.tensor([0.5 / n]), name)[0]
    torch.testing.assert_close(mid, (table[0] + table[1]) / 2)


def test_grey_is_the_value_and_spectral_runs_red_to_blue() -> None:
    values = torch.linspace(0, 1, 11)
    torch.testing.assert_close(apply_colormap(values, "grey"), values.unsqueeze(-1).expand(-1, 3))
    near, far = apply_colormap(torch.tensor([0.0, 1.0]), "spectral")
    assert near[0] > near[2] and far[2] > far[0]  # Marigold's look: near red, far blue


def test_unknown_colormap_is_refused() -> None:
    with pytest.raises(ValueError, match="colormap 'jet' is unknown"):
        apply_colormap(torch.zeros(2), "jet")


@pytest.mark.skipif(
    importlib.util.find_spec("matplotlib") is None, reason="matplotlib not installed (only used to check the tables)"
)
@pytest.mark.parametrize(
    "name,theirs,tolerance", [("spectral", "Spectral", 0.01), ("turbo", "turbo", 0.025), ("viridis", "viridis", 0.025)]
)
def test_tables_match_matplotlib(name, theirs, tolerance) -> None:
    """Spectral is exact up to matplotlib's 256-entry quantisation; the sampled tables within 0.025 (6 / 255)."""
    from matplotlib import colormaps

    values = torch.linspace(0, 1, 501)
    expected = torch.tensor(colormaps[theirs](values.numpy())[:, :3], dtype=torch.float32)
    assert (apply_colormap(values, name) - expected).abs().max() < tolerance


def test_depth_settings_ranges_and_processing_size() -> None:
    DepthSettings(0, 1, 0, 0).validate()
    DepthSettings(50, 10, 64, 3).validate()
    for settings, message in [
        (DepthSettings(steps=51), "steps must be 0"),
        (DepthSettings(steps=-1), "steps must be 0"),
        (DepthSettings(ensemble_size=0), "ensemble_size must be 1-10"),
        (DepthSettings(ensemble_size=11), "ensemble_size must be 1-10"),
        (DepthSettings(resolution=63), "processing_resolution must be 0"),
        (DepthSettings(seed=-1), "seed must be >= 0"),
    ]:
        with pytest.raises(ValueError, match=message):
            settings.validate()
    assert processing_size(768, 1024, 768) == (576, 768)
    assert processing_size(100, 100, 0) == (96, 96)  # 12.5 latent pixels round to 12
    assert processing_size(108, 100, 0) == (112, 96)
    assert processing_size(3, 3, 0) == (8, 8)
