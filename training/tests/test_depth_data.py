"""Image + depth pairs -> depth cache (training/depth_dataset.py, training/cache.py), with counting stand-in
encoders (no ComfyUI): which files pair, what a depth file holds, how a depth map follows its image to its
bucket, what is refused (before anything is encoded) and what the cache stores."""

from __future__ import annotations

import json
import os
import pathlib

import numpy as np
import pytest
import torch
from PIL import Image

from training.cache import DEPTH_FORMAT, FORMAT, load_cache, prepare_cache, read_index
from training.dataset import DatasetError, bucket_resolutions, load_image, scan_folder
from training.depth_dataset import depth_pixels, load_depth, pair_depth_maps, read_depth
from training.tests.test_cache import CountingEncoder, write_image


def smooth_image(path: pathlib.Path, size: tuple[int, int]) -> np.ndarray:
    """A smooth RGB image (red: a horizontal ramp, green: a vertical one); returns its pixels."""
    w, h = size
    x, y = np.meshgrid(np.linspace(0, 1, w), np.linspace(0, 1, h))
    arr = (np.stack([x, y, 0.5 * (x + y)], -1) * 250 + 2).round().astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return arr


def depth16(path: pathlib.Path, array: np.ndarray) -> None:
    Image.fromarray(array.astype(np.uint16)).save(path)


@pytest.fixture
def pairs(tmp_path: pathlib.Path) -> pathlib.Path:
    """a.png + a 16-bit depth PNG, b.jpg + a float .npy with unknown (NaN) pixels, nested/c.png + an 8-bit PNG."""
    root = tmp_path / "pairs"
    smooth_image(root / "a.png", (64, 64))
    yy, xx = np.mgrid[0:64, 0:64]
    depth16(root / "a.depth.png", 1000 + 800 * xx + 3 * yy)  # up to 51589: beyond 8 bits
    smooth_image(root / "b.jpg", (96, 64))
    far = np.linspace(2.0, 9.0, 96, dtype=np.float32)[None].repeat(64, 0)
    far[:8, :8] = np.nan
    np.save(root / "b.depth.npy", far)
    smooth_image(root / "nested" / "c.png", (64, 64))
    Image.fromarray((np.arange(64)[None].repeat(64, 0) * 3).astype(np.uint8)).save(root / "nested" / "c.depth.png")
    (root / "a.txt").write_text("a caption a depth model never sees", encoding="utf-8")
    return root


def test_pairs_are_found_and_depth_files_read_as_stored(pairs) -> None:
    records = pair_depth_maps(pairs, scan_folder(pairs))
    # depth maps are not images of their own; every image has its depth map; captions are not used
    assert [(r.relative, r.depth.name) for r in records] == [
        ("a.png", "a.depth.png"),
        ("b.jpg", "b.depth.npy"),
        ("nested/c.png", "c.depth.png"),
    ]
    assert all(r.caption == "" for r in records)
    yy, xx = np.mgrid[0:64, 0:64]
    sixteen = read_depth(pairs / "a.depth.png")
    assert sixteen.dtype == torch.float32 and torch.equal(
        sixteen, torch.from_numpy((1000 + 800 * xx + 3 * yy).astype(np.float32))
    )
    npy = read_depth(pairs / "b.depth.npy")
    assert npy.shape == (64, 96) and torch.isnan(npy[:8, :8]).all() and npy[8:, 8:].isfinite().all()
    assert read_depth(pairs / "nested" / "c.depth.png")[5, 10] == 30.0
    # a plain image folder stays one
    (pairs / "a.depth.png").unlink(), (pairs / "b.depth.npy").unlink(), (pairs / "nested" / "c.depth.png").unlink()
    assert all(r.depth is None for r in pair_depth_maps(pairs, scan_folder(pairs)))


@pytest.mark.parametrize("channel", [0, 1])
def test_depth_follows_its_image_to_the_bucket(tmp_path, channel: int) -> None:
    """A 96x64 image goes to the 128x64 bucket (resized by 4/3, then 10 rows cropped off the top and the
    bottom); its depth map, here one of the image's channels (0: a horizontal ramp, 1: a vertical one),
    goes through the same steps: the loaded depth matches that channel of the loaded image (a map that
    was not resized, or cropped elsewhere, would be off by many levels)."""
    image = smooth_image(tmp_path / "x.png", (96, 64))
    np.save(tmp_path / "x.depth.npy", image[..., channel].astype(np.float32))
    pixels, bucket = load_image(tmp_path / "x.png", buckets=bucket_resolutions(64, 2.0))
    assert bucket == (128, 64)
    depth = load_depth(tmp_path / "x.depth.npy", bucket)
    assert depth.shape == (64, 128)
    # Lanczos (the image) and bilinear (the depth) differ by a level or two on a ramp, nothing like a shift
    assert (depth - pixels[..., channel] * 255).abs()[2:-2, 2:-2].max() < 3
    uncropped = torch.from_numpy(image[..., channel].astype(np.float32))[:, :64]
    assert (uncropped - torch.nn.functional.interpolate(depth[None, None], size=(64, 64))[0, 0]).abs().max() > 10


def test_unknown_pixels_do_not_bleed_into_known_ones(tmp_path) -> None:
    depth = np.full((32, 48), 5.0, dtype=np.float32)
    depth[:, :16] = np.nan
    np.save(tmp_path / "d.depth.npy", depth)
    out = load_depth(tmp_path / "d.depth.npy", (96, 64))  # resized x2
    known = out.isfinite()
    assert known[:, 40:].all() and not known[:, :28].any()
    assert torch.equal(out[known], torch.full_like(out[known], 5.0))  # no unknown (0) mixed in


def test_depth_pixels_are_affine_invariant_and_flat_maps_are_named() -> None:
    gen = torch.Generator().manual_seed(0)
    depth = torch.rand(16, 24, generator=gen) * 10 + 1
    pixels = depth_pixels(depth)
    assert pixels.shape == (16, 24, 3) and pixels.min() == 0 and pixels.max() == 1
    assert torch.equal(pixels[..., 0], pixels[..., 1]) and torch.equal(pixels[..., 0], pixels[..., 2])
    torch.testing.assert_close(depth_pixels(1000 * depth + 7), pixels, atol=1e-5, rtol=0)
    low, high = torch.quantile(depth.flatten(), torch.tensor([0.02, 0.98]))
    expected = ((depth - low) / (high - low)).clamp(0, 1)  # 2 (d - q2) / (q98 - q2) - 1, mapped to [0, 1]
    torch.testing.assert_close(pixels[..., 0], expected, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="depth map sky.depth.png is constant"):
        depth_pixels(torch.full((8, 8), 3.0), "depth map sky.depth.png")


def test_bad_pairs_are_refused_before_anything_is_encoded(tmp_path) -> None:
    root = tmp_path / "d"
    smooth_image(root / "a.png", (64, 64))
    depth16(root / "a.depth.png", np.arange(64 * 64).reshape(64, 64))
    smooth_image(root / "b.png", (64, 64))
    smooth_image(root / "sub" / "c.png", (64, 64))
    with pytest.raises(
        DatasetError, match=r"read as image \+ depth pairs, but 2 images have no depth map: b.png, sub/c.png"
    ):
        pair_depth_maps(root, scan_folder(root))
    depth16(root / "b.depth.png", np.arange(32 * 64).reshape(32, 64))
    np.save(root / "sub" / "c.depth.npy", np.ones((64, 64), np.float32))
    with pytest.raises(DatasetError, match="b.png is 64x64 but b.depth.png is 64x32"):
        pair_depth_maps(root, scan_folder(root))
    depth16(root / "b.depth.png", np.arange(64 * 64).reshape(64, 64))
    depth16(root / "sub" / "c.depth.png", np.arange(64 * 64).reshape(64, 64))
    with pytest.raises(DatasetError, match="c.png has two depth maps"):
        pair_depth_maps(root, scan_folder(root))
    (root / "sub" / "c.depth.png").unlink()
    np.save(root / "sub" / "c.depth.npy", np.ones((3, 64, 64), np.float32))
    with pytest.raises(DatasetError, match=r"c.depth.npy has shape \(3, 64, 64\): save one channel"):
        pair_depth_maps(root, scan_folder(root))
    np.save(root / "sub" / "c.depth.npy", np.ones((64, 64), np.float32))
    np.save(root / "lost.depth.npy", np.ones((64, 64), np.float32))
    with pytest.raises(DatasetError, match="1 depth maps have no image beside them: lost.depth.npy"):
        pair_depth_maps(root, scan_folder(root))
    (root / "lost.depth.npy").unlink()
    assert len(pair_depth_maps(root, scan_folder(root))) == 3
    # a colour visualisation is not depth
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(root / "b.depth.png")
    with pytest.raises(DatasetError, match="b.depth.png is in colour"):
        read_depth(root / "b.depth.png")


def test_depth_cache_round_trip(pairs, tmp_path) -> None:
    records = pair_depth_maps(pairs, scan_folder(pairs))
    enc = CountingEncoder()
    cache = tmp_path / "cache"
    summary = prepare_cache(records, cache, enc, resolution=64, max_aspect=2.0, batch_size=2)
    assert summary.cached == 3 and enc.images_encoded == 6  # each pair: its depth map and its image
    assert enc.captions_encoded == 1  # only the empty prompt: a depth model never sees captions
    assert "3 of 3 image + depth pairs cached" in summary.report()
    index = read_index(cache)
    assert index["format"] == DEPTH_FORMAT and index["settings"]["task"] == "depth"
    data = load_cache(cache)
    assert data.task == "depth" and data.sources == ["a.png", "b.jpg", "nested/c.png"]
    for source, latent, concat, cond in zip(data.sources, data.latents, data.concats, data.conds):
        pixels, bucket = load_image(pairs / source, buckets=bucket_resolutions(64, 2.0))
        depth_file = next((pairs / source).parent.glob(pathlib.Path(source).stem + ".depth.*"))
        target = depth_pixels(load_depth(depth_file, bucket))
        torch.testing.assert_close(latent, CountingEncoder().encode_images(target[None])[0])
        torch.testing.assert_close(concat, CountingEncoder().encode_images(pixels[None])[0])
        assert cond is data.uncond
    # nothing changed: nothing is encoded; a new depth map re-encodes its pair only
    enc2 = CountingEncoder()
    prepare_cache(records, cache, enc2, resolution=64)
    assert enc2.images_encoded == 0
    yy, xx = np.mgrid[0:64, 0:64]
    depth16(pairs / "a.depth.png", 60000 - 700 * yy - xx)
    os.utime(pairs / "a.depth.png", ns=(1, 1))
    enc3 = CountingEncoder()
    summary = prepare_cache(pair_depth_maps(pairs, scan_folder(pairs)), cache, enc3, resolution=64)
    assert enc3.images_encoded == 2 and summary.reused_latents == 2
    assert not torch.equal(load_cache(cache).latents[0], data.latents[0])


def test_flat_depth_maps_are_skipped_and_named(pairs, tmp_path) -> None:
    depth16(pairs / "a.depth.png", np.full((64, 64), 1234))
    summary = prepare_cache(
        pair_depth_maps(pairs, scan_folder(pairs)), tmp_path / "cache", CountingEncoder(), resolution=64
    )
    assert summary.cached == 2 and [s[0] for s in summary.skipped] == ["a.png"]
    assert "depth map a.depth.png is constant" in summary.report() and "1 unreadable pairs skipped" in summary.report()


def test_image_caches_keep_format_1_and_kinds_do_not_mix(pairs, tmp_path) -> None:
    images = tmp_path / "images"
    write_image(images / "a.png", (64, 64), 10, "a caption")
    cache = tmp_path / "cache"
    prepare_cache(scan_folder(images), cache, CountingEncoder(), resolution=64)
    index = read_index(cache)
    assert index["format"] == FORMAT and "task" not in index["settings"]
    data = load_cache(cache)
    assert data.task == "image" and data.concats is None
    # depth pairs prepared into the same folder re-encode everything (another kind of data)
    enc = CountingEncoder()
    prepare_cache(pair_depth_maps(pairs, scan_folder(pairs)), cache, enc, resolution=64)
    assert enc.images_encoded == 6 and load_cache(cache).task == "depth"
    # and back: the same images without their depth maps are images again, never their cached depth latents
    for depth_file in [*pairs.rglob("*.depth.png"), *pairs.rglob("*.depth.npy")]:
        depth_file.unlink()
    enc = CountingEncoder()
    prepare_cache(pair_depth_maps(pairs, scan_folder(pairs)), cache, enc, resolution=64)
    data = load_cache(cache)
    assert enc.images_encoded == 3 and data.task == "image" and data.concats is None
    assert enc.captions_encoded == 4 and all(c["context"].shape == (1, 1, 8) for c in data.conds)  # 3 + the empty one
    pixels, _ = load_image(pairs / "a.png", buckets=bucket_resolutions(64, 2.0))
    torch.testing.assert_close(data.latents[0], CountingEncoder().encode_images(pixels[None])[0])
    # a format this toolkit does not know is refused, named
    index = json.loads((cache / "index.json").read_text())
    (cache / "index.json").write_text(json.dumps({**index, "format": "diff2flow-latent-cache/9"}))
    with pytest.raises(DatasetError, match="format 'diff2flow-latent-cache/9'.*update the toolkit"):
        load_cache(cache)
