"""The procedural depth scenes: deterministic per index, exact z-buffer depth, images in range."""

from __future__ import annotations

import pytest
import torch

from demo.scenes import make_scenes, render_scene, scene_split


def test_scenes_are_the_same_per_index_whatever_the_range() -> None:
    images, depths = make_scenes(0, 4, size=8, supersample=2)
    tail_images, tail_depths = make_scenes(2, 2, size=8, supersample=2)
    assert torch.equal(images[2:], tail_images) and torch.equal(depths[2:], tail_depths)
    other_images, _ = make_scenes(0, 4, size=8, supersample=2, seed=1)
    assert not torch.equal(images, other_images)


def test_scene_images_and_depths_are_in_range_and_the_depth_is_not_the_brightness() -> None:
    split = scene_split(6, 2, size=8)
    images, depths = split["train"]
    assert images.shape == depths.shape == (6, 1, 8, 8) and split["test"][0].shape == (2, 1, 8, 8)
    assert images.min() >= -1 and images.max() <= 1 and depths.min() > 0
    # objects stand in front of the background: every scene spans a real depth range
    spans = depths.flatten(1).amax(1) - depths.flatten(1).amin(1)
    assert (spans > 0.5).all()
    assert not torch.allclose(images, (depths - depths.mean()) / depths.std())


def test_supersampled_scene_is_the_mean_of_its_sub_pixels() -> None:
    """size 16 at 2x supersampling renders the same 32x32 samples as size 32 at 1x: the image and
    depth are their 2x2 means."""
    image, depth = render_scene(3, size=16, supersample=2)
    fine_image, fine_depth = render_scene(3, size=32, supersample=1)
    pool = torch.nn.functional.avg_pool2d
    torch.testing.assert_close(depth, pool(fine_depth[None], 2)[0])
    torch.testing.assert_close(image, pool(fine_image[None], 2)[0].clamp(-1, 1))


def test_bad_sizes_raise() -> None:
    with pytest.raises(ValueError, match="size must be >= 4"):
        render_scene(0, size=2)
    with pytest.raises(ValueError, match="count must be >= 1"):
        make_scenes(0, 0)
