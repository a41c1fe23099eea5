"""Colour maps for depth images: a small table of colours and linear interpolation between them
(no plotting library at run time).

Depth in [0, 1] follows Marigold's convention (0 = near, 1 = far); ``spectral`` is Marigold's own
visualisation (near is red, far is blue). The tables are samples of the colour maps as matplotlib
draws them: ``spectral`` is ColorBrewer's 11-class Spectral, which matplotlib interpolates linearly
between exactly these 11 colours; ``turbo`` (Google, Apache-2.0) and ``viridis`` (CC0) are sampled
at 33 and 17 evenly spaced points (within 0.025, about 6 / 255, of matplotlib's 256-entry tables,
checked by ``d2f_core/tests/test_colormap.py`` when matplotlib is installed).
"""

from __future__ import annotations

import torch

__all__ = ["COLORMAPS", "apply_colormap"]

_SPECTRAL_255 = (
    (158, 1, 66),
    (213, 62, 79),
    (244, 109, 67),
    (253, 174, 97),
    (254, 224, 139),
    (255, 255, 191),
    (230, 245, 152),
    (171, 221, 164),
    (102, 194, 165),
    (50, 136, 189),
    (94, 79, 162),
)
_TURBO = (
    (0.19, 0.0718, 0.2322),
    (0.225, 0.1635, 0.451),
    (0.2511, 0.2524, 0.6337),
    (0.2682, 0.3382, 0.7805),
    (0.2763, 0.4212, 0.8912),
    (0.2754, 0.5011, 0.9659),
    (0.2586, 0.5796, 0.9988),
    (0.2138, 0.6589, 0.9796),
    (0.1584, 0.7355, 0.9231),
    (0.1117, 0.8057, 0.8452),
    (0.0927, 0.8655, 0.7623),
    (0.1201, 0.9119, 0.6866),
    (0.1966, 0.949, 0.5947),
    (0.3051, 0.977, 0.4899),
    (0.4278, 0.9942, 0.3857),
    (0.5466, 0.9991, 0.2958),
    (0.6436, 0.99, 0.2336),
    (0.726, 0.9647, 0.2064),
    (0.8047, 0.9245, 0.2046),
    (0.8753, 0.8727, 0.2155),
    (0.933, 0.8124, 0.2267),
    (0.9732, 0.7468, 0.2254),
    (0.9931, 0.6741, 0.2035),
    (0.9959, 0.587, 0.169),
    (0.9836, 0.4929, 0.1285),
    (0.958, 0.3996, 0.0883),
    (0.9211, 0.3149, 0.0548),
    (0.8742, 0.2453, 0.033),
    (0.8161, 0.1846, 0.0181),
    (0.7462, 0.131, 0.0085),
    (0.6645, 0.0844, 0.0042),
    (0.571, 0.0447, 0.0053),
    (0.4796, 0.0158, 0.0106),
)
_VIRIDIS = (
    (0.267, 0.0049, 0.3294),
    (0.2823, 0.095, 0.4173),
    (0.2788, 0.1755, 0.4834),
    (0.259, 0.2515, 0.5247),
    (0.2297, 0.3224, 0.5457),
    (0.1994, 0.3876, 0.5546),
    (0.1727, 0.4488, 0.5579),
    (0.149, 0.5081, 0.5573),
    (0.1276, 0.5669, 0.5506),
    (0.1206, 0.6258, 0.5335),
    (0.1579, 0.6838, 0.5017),
    (0.2461, 0.7389, 0.452),
    (0.3692, 0.7889, 0.3829),
    (0.516, 0.8312, 0.2943),
    (0.6785, 0.8637, 0.1895),
    (0.8456, 0.8873, 0.0997),
    (0.9932, 0.9062, 0.1439),
)

# name -> colours at evenly spaced positions from 0 to 1 ("grey": black to white)
COLORMAPS: dict[str, tuple[tuple[float, float, float], ...]] = {
    "spectral": tuple(tuple(c / 255 for c in rgb) for rgb in _SPECTRAL_255),
    "turbo": _TURBO,
    "viridis": _VIRIDIS,
    "grey": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
}


def apply_colormap(values: torch.Tensor, name: str = "spectral") -> torch.Tensor:
    """``values`` (any shape, in [0, 1]; clipped) as colours ``[..., 3]`` in [0, 1] (float32): linear
    interpolation between the table's neighbouring colours."""
    if name not in COLORMAPS:
        raise ValueError(f"colormap {name!r} is unknown: choose one of {', '.join(COLORMAPS)}")
    table = torch.tensor(COLORMAPS[name], dtype=torch.float32, device=values.device)
    position = values.float().clamp(0, 1) * (len(table) - 1)
    low = position.floor().long().clamp(max=len(table) - 2)
    frac = (position - low).unsqueeze(-1)
    return table[low] * (1 - frac) + table[low + 1] * frac
