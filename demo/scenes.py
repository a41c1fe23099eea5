"""Procedural scenes with their exact depth: the image-to-depth benchmark's data, made by code.

Each scene is a tilted background plane with spheres and tilted boxes in front of it, seen by an
orthographic camera looking along +z. Per pixel the nearest surface wins (a z-buffer), so the depth
map is exact. The image is that surface's Lambertian shading under one directional light times a
procedural texture (stripes or checks at a random frequency and angle), so brightness alone does
not give depth away: the model has to read shapes, occlusions and shading.

Scenes are rendered at ``supersample`` times the output size and averaged down (anti-aliased image,
mean depth), deterministic per ``(seed, index)``: a fixed train/test split is two index ranges.
Images come as [N, 1, size, size] in [-1, 1] (the demo prior's range), depth as [N, 1, size, size]
positive distances.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["render_scene", "make_scenes", "scene_split"]


def _texture(u: torch.Tensor, v: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """A stripe or check pattern in [0.45, 1] on surface coordinates ``u, v``."""
    freq = 2 + 6 * torch.rand((), generator=gen).item()
    angle = math.pi * torch.rand((), generator=gen).item()
    a = u * math.cos(angle) + v * math.sin(angle)
    if torch.rand((), generator=gen).item() < 0.5:
        pattern = torch.sin(2 * math.pi * freq * a)
    else:
        b = -u * math.sin(angle) + v * math.cos(angle)
        pattern = torch.sin(2 * math.pi * freq * a) * torch.sin(2 * math.pi * freq * b)
    return 0.725 + 0.275 * torch.sign(pattern)


def render_scene(seed: int, size: int = 16, supersample: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """``(image [1, size, size] in [-1, 1], depth [1, size, size] > 0)`` of scene ``seed``."""
    if size < 4 or supersample < 1:
        raise ValueError(f"size must be >= 4 and supersample >= 1, got {size}, {supersample}")
    gen = torch.Generator().manual_seed(int(seed))
    rand = lambda lo, hi: lo + (hi - lo) * torch.rand((), generator=gen, dtype=torch.float64).item()  # noqa: E731
    res = size * supersample
    coords = (torch.arange(res, dtype=torch.float64) + 0.5) / res * 2 - 1  # pixel centres in [-1, 1]
    y, x = torch.meshgrid(coords, coords, indexing="ij")
    light = torch.tensor([rand(-0.6, 0.6), rand(-0.8, -0.2), -1.0], dtype=torch.float64)
    light = light / light.norm()

    # the background plane z = c + gx x + gy y (a floor receding upwards, or a wall)
    c, gx, gy = rand(5.0, 7.0), rand(-0.8, 0.8), rand(-1.5, 0.5)
    depth = c + gx * x + gy * y
    normal = torch.tensor([-gx, -gy, -1.0], dtype=torch.float64)
    shade = torch.full_like(x, float((normal / normal.norm()) @ light))
    albedo = _texture(x, y, gen)

    for _ in range(int(torch.randint(2, 5, (), generator=gen))):
        if torch.rand((), generator=gen).item() < 0.5:  # a sphere
            cx, cy, r, cz = rand(-0.7, 0.7), rand(-0.7, 0.7), rand(0.2, 0.5), rand(2.0, 4.5)
            d2 = (x - cx) ** 2 + (y - cy) ** 2
            inside = d2 < r * r
            h = torch.sqrt((r * r - d2).clamp_min(0))
            z = cz - h
            n = torch.stack([x - cx, y - cy, -h], dim=-1) / r
            s = (n @ light).clamp_min(0)
            tex = _texture((x - cx) / r, (y - cy) / r, gen)
        else:  # a tilted rectangle facing the camera
            cx, cy, w, hgt, cz = rand(-0.6, 0.6), rand(-0.6, 0.6), rand(0.2, 0.5), rand(0.2, 0.5), rand(2.0, 4.5)
            tx, ty = rand(-0.7, 0.7), rand(-0.7, 0.7)
            inside = ((x - cx).abs() < w) & ((y - cy).abs() < hgt)
            z = cz + tx * (x - cx) + ty * (y - cy)
            n = torch.tensor([-tx, -ty, -1.0], dtype=torch.float64)
            s = torch.full_like(x, float(((n / n.norm()) @ light).clamp_min(0)))
            tex = _texture((x - cx) / w, (y - cy) / hgt, gen)
        nearer = inside & (z < depth)
        depth = torch.where(nearer, z, depth)
        shade = torch.where(nearer, s, shade)
        albedo = torch.where(nearer, tex, albedo)

    radiance = albedo * (0.25 + 0.75 * shade.clamp_min(0))  # ambient + diffuse, in [0, 1]
    pool = lambda t: F.avg_pool2d(t[None, None], supersample)[0]  # noqa: E731
    image = (pool(radiance) * 2 - 1).clamp(-1, 1)
    return image.float(), pool(depth).float()


def make_scenes(
    start: int, count: int, size: int = 16, supersample: int = 4, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scenes ``start .. start + count - 1`` of the set ``seed``: ``(images [N, 1, size, size],
    depths [N, 1, size, size])``; scene ``i`` is the same whatever ``start`` and ``count``."""
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    pairs = [render_scene(seed * 1_000_003 + i, size, supersample) for i in range(start, start + count)]
    return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])


def scene_split(train: int, test: int, size: int = 16, seed: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The fixed split: scenes ``0 .. train - 1`` train, the next ``test`` scenes test."""
    return {"train": make_scenes(0, train, size, seed=seed), "test": make_scenes(train, test, size, seed=seed)}
