"""The dataset folder -> latent cache path of `prepare`, with counting stand-in encoders (no ComfyUI)."""

from __future__ import annotations

import os
import pathlib

import numpy as np
import pytest
import torch
from PIL import Image

from training.cache import load_cache, prepare_cache, read_index
from training.dataset import DatasetError, bucket_resolutions, load_image, nearest_bucket, scan_folder


class CountingEncoder:
    """A deterministic 'VAE' (8x8 mean pooling to 4 channels) and 'text encoder' (caption bytes)."""

    def __init__(self, version: str = "1") -> None:
        self.version = version
        self.images_encoded = 0
        self.captions_encoded = 0

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        self.images_encoded += pixels.shape[0]
        x = pixels.permute(0, 3, 1, 2)
        pooled = torch.nn.functional.avg_pool2d(x, 8)
        return torch.cat([pooled, pooled.mean(1, keepdim=True)], 1)

    def encode_text(self, captions: list[str]) -> list[dict[str, torch.Tensor]]:
        self.captions_encoded += len(captions)
        out = []
        for c in captions:
            codes = torch.tensor(list(c.encode()[:8]) + [0] * (8 - len(c.encode()[:8])), dtype=torch.float32)
            out.append({"context": codes.view(1, 1, 8)})
        return out

    def image_fingerprint(self) -> str:
        return "vae-" + self.version

    def text_fingerprint(self) -> str:
        return "clip-1"


def write_image(path: pathlib.Path, size: tuple[int, int], value: int, caption: str | None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.full((size[1], size[0], 3), value, dtype=np.uint8)
    arr[: size[1] // 2, :, 0] = 255 - value
    Image.fromarray(arr).save(path)
    if caption is not None:
        path.with_suffix(".txt").write_text(caption, encoding="utf-8")


@pytest.fixture
def dataset(tmp_path: pathlib.Path) -> pathlib.Path:
    root = tmp_path / "images"
    write_image(root / "a.png", (64, 64), 10, "a red square")
    write_image(root / "b.jpg", (128, 64), 200, "a wide one")
    write_image(root / "nested" / "c.png", (64, 64), 90, None)  # no caption
    write_image(root / "nested" / "d.png", (64, 128), 150, "a tall one")
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (root / "notes.md").write_text("not an image")
    return root


def test_prepare_caches_buckets_and_counts_corrupt_and_uncaptioned_images(dataset, tmp_path) -> None:
    records = scan_folder(dataset)
    assert [r.relative for r in records] == ["a.png", "b.jpg", "broken.png", "nested/c.png", "nested/d.png"]
    enc = CountingEncoder()
    summary = prepare_cache(records, tmp_path / "cache", enc, resolution=64, max_aspect=2.0, batch_size=2, shard_size=2)
    assert summary.images == 5 and summary.cached == 4
    assert [s[0] for s in summary.skipped] == ["broken.png"]
    assert summary.missing_captions == ["nested/c.png"]
    assert enc.images_encoded == 4 and enc.captions_encoded == 5  # 4 captions + the empty one (uncond)
    assert "1 unreadable images skipped" in summary.report() and "broken.png" in summary.report()
    data = load_cache(tmp_path / "cache")
    assert data.sources == ["a.png", "b.jpg", "nested/c.png", "nested/d.png"]
    shapes = {s: tuple(lat.shape) for s, lat in zip(data.sources, data.latents)}
    # 64x64 -> 8x8 latent; the 2:1 image goes to a wide bucket, the 1:2 one to a tall bucket
    assert shapes["a.png"] == (4, 8, 8)
    assert shapes["b.jpg"][2] > shapes["b.jpg"][1] and shapes["nested/d.png"][1] > shapes["nested/d.png"][2]
    assert data.captions[2] == "" and data.conds[0]["context"].shape == (1, 1, 8)
    torch.testing.assert_close(data.uncond["context"], torch.zeros(1, 1, 8))
    # the latent is the encoder's output for the bucket-cropped image
    pixels, _ = load_image(dataset / "a.png", buckets=bucket_resolutions(64, 2.0))
    torch.testing.assert_close(data.latents[0], CountingEncoder().encode_images(pixels[None])[0])
    assert len(list((tmp_path / "cache").glob("shard-*.safetensors"))) == 2


def test_prepare_reuses_unchanged_entries(dataset, tmp_path) -> None:
    cache = tmp_path / "cache"
    prepare_cache(scan_folder(dataset), cache, CountingEncoder(), resolution=64)
    before = load_cache(cache)
    # change one caption, touch one image's content, add one image
    (dataset / "a.txt").write_text("a new caption", encoding="utf-8")
    write_image(dataset / "nested" / "d.png", (64, 128), 40, "a tall one")
    os.utime(dataset / "nested" / "d.png", ns=(1, 1))
    write_image(dataset / "e.png", (64, 64), 70, "new")
    enc = CountingEncoder()
    summary = prepare_cache(scan_folder(dataset), cache, enc, resolution=64)
    assert enc.images_encoded == 2 and summary.reused_latents == 3  # d.png (changed) and e.png (new)
    assert enc.captions_encoded == 2 and summary.reused_captions == 3  # a.png (new caption) and e.png
    after = load_cache(cache)
    assert after.sources == ["a.png", "b.jpg", "e.png", "nested/c.png", "nested/d.png"]
    torch.testing.assert_close(after.latents[1], before.latents[1])
    assert after.captions[0] == "a new caption"
    # only the live shards remain, and a second run with nothing changed encodes nothing
    enc2 = CountingEncoder()
    again = prepare_cache(scan_folder(dataset), cache, enc2, resolution=64)
    assert enc2.images_encoded == 0 and enc2.captions_encoded == 0 and again.reused_latents == 5
    index = read_index(cache)
    assert {e["shard"] for e in index["entries"].values()} == {p.name for p in cache.glob("shard-*.safetensors")}
    # a different VAE invalidates every latent
    enc3 = CountingEncoder(version="2")
    prepare_cache(scan_folder(dataset), cache, enc3, resolution=64)
    assert enc3.images_encoded == 5 and enc3.captions_encoded == 0


def test_bad_dataset_folders_are_named_in_the_error(tmp_path) -> None:
    with pytest.raises(DatasetError, match="does not exist"):
        scan_folder(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="holds no images"):
        scan_folder(tmp_path / "empty")
    with pytest.raises(DatasetError, match="Run `python -m training prepare"):
        load_cache(tmp_path / "empty")
    only_broken = tmp_path / "broken"
    only_broken.mkdir()
    (only_broken / "x.png").write_bytes(b"junk")
    with pytest.raises(DatasetError, match="none of the 1 images could be read"):
        prepare_cache(scan_folder(only_broken), tmp_path / "cache", CountingEncoder(), resolution=64)
    assert read_index(tmp_path / "cache") is None


def test_buckets_keep_area_and_aspect() -> None:
    buckets = bucket_resolutions(512, 2.0)
    assert (512, 512) in buckets
    for w, h in buckets:
        assert w % 64 == 0 and h % 64 == 0 and 0.5 <= w / h <= 2.0 and w * h <= 512 * 512 * 1.07
    assert nearest_bucket(1920, 1080, buckets) in {(640, 384), (704, 384), (768, 384), (640, 320)}
    assert nearest_bucket(1000, 1000, buckets) == (512, 512)
    with pytest.raises(ValueError, match="multiple of 64"):
        bucket_resolutions(500)
