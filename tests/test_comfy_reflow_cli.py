"""Reflow headless end to end in a real ComfyUI 0.8.0 (tiny SD1.5-shaped checkpoint): python -m training pairs -> train --pairs --objective reflow -> sample; the node is in test_comfy_reflow.py.
``pairs`` -> ``train --pairs --objective reflow`` -> ``sample`` with the LoRA's recommended settings,
the LoRA in stock ComfyUI with no missing keys, appending pairs, k-times reflow (a reflow LoRA as
the teacher) and a checkpoint that cannot be converted."""

from __future__ import annotations

import json
import logging
import pathlib
import re

import pytest
from comfy_harness import require_comfyui, run_cli_in_one_and_two_processes

require_comfyui()

import torch  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from d2f_app.cli import main  # noqa: E402
from d2f_core.lora_metadata import read_lora_metadata  # noqa: E402
from training.pairs import load_pairs, pair_shards  # noqa: E402

SIZE = ["--width", "64", "--height", "64"]


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> pathlib.Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("a photo of a cat\n\na drawing of a house\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def pairs_folder(tiny_sd15_file, prompts, tmp_path_factory, fp32_text_encoder_module) -> pathlib.Path:
    out = tmp_path_factory.mktemp("reflow") / "pairs"
    assert (
        main(
            [
                "pairs",
                "--checkpoint",
                str(tiny_sd15_file),
                "--prompts",
                str(prompts),
                "--count",
                "4",
                "--steps",
                "3",
                "--cfg",
                "3",
                *SIZE,
                "--batch-size",
                "2",
                "--shard-size",
                "2",
                "--output",
                str(out),
                "--no-progress",
            ]
        )
        == 0
    )
    return out


def test_pairs_command_writes_shards_manifest_and_the_options(pairs_folder, tiny_sd15_file) -> None:
    assert [(a, b) for a, b, _ in pair_shards(pairs_folder)] == [(0, 2), (2, 4)]
    manifest = json.loads((pairs_folder / "manifest.json").read_text())
    settings = manifest["settings"]
    assert (manifest["count"], settings["steps"], settings["cfg"], settings["shape"]) == (4, 3, 3.0, [4, 8, 8])
    assert settings["teacher"]["prediction"] == "eps" and len(settings["teacher"]["checkpoint_hash"]) == 16
    assert settings["sigma_max"] == pytest.approx(0.93596, abs=1e-4)  # an SD eps model starts at its sigma_max
    assert manifest["labels"] == ["a photo of a cat", "a drawing of a house"]
    assert manifest["sources"]["checkpoint"] == str(tiny_sd15_file.resolve())
    pairs = load_pairs(pairs_folder)
    assert pairs.conds[0]["context"].shape == (1, 77, 768) and pairs.uncond["context"].shape == (1, 77, 768)
    assert torch.isfinite(pairs.latents).all() and not torch.equal(pairs.latents[0], pairs.latents[2])
    assert "[pairs]" in (pairs_folder / "pairs.toml").read_text()


def test_a_larger_count_appends_and_keeps_the_finished_pairs(pairs_folder, tiny_sd15_file, prompts, capsys) -> None:
    before = {p.name: load_file(str(p)) for _, _, p in pair_shards(pairs_folder)}
    assert main(["pairs", "--config", str(pairs_folder / "pairs.toml"), "--count", "6", "--no-progress"]) == 0
    assert "6 pairs in" in capsys.readouterr().out
    after = {p.name: load_file(str(p)) for _, _, p in pair_shards(pairs_folder)}
    assert sorted(after) == sorted(before) + ["pairs-000000004-000000006.safetensors"]
    assert all(torch.equal(after[n][k], t) for n, tensors in before.items() for k, t in tensors.items())
    # other settings into the same folder are refused, naming the difference
    assert main(["pairs", "--config", str(pairs_folder / "pairs.toml"), "--cfg", "4", "--no-progress"]) == 2
    assert "other settings (cfg: folder 3.0, now 4.0)" in capsys.readouterr().err


def test_reflow_trains_on_the_pairs_and_samples_with_the_loras_defaults(
    pairs_folder, tiny_sd15_file, tmp_path, caplog, capsys
) -> None:
    run = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--pairs",
                str(pairs_folder),
                "--checkpoint",
                str(tiny_sd15_file),
                "--output",
                str(run),
                "--objective",
                "reflow",
                "--steps",
                "3",
                "--batch-size",
                "2",
                "--rank",
                "4",
                "--learning-rate",
                "1e-3",
                "--targets",
                "attention_ff",
                "--no-progress",
            ]
        )
        == 0
    )
    lora_path = run / "diff2flow_lora.safetensors"
    meta = read_lora_metadata(lora_path)
    assert (meta.objective, meta.steps, meta.sampler, meta.sampling_steps, meta.sampling_cfg, meta.teacher_cfg) == (
        "reflow",
        3,
        "euler",
        2,
        1.0,
        3.0,
    )
    assert 'pairs = "' in (run / "diff2flow_lora.toml").read_text()

    import comfy.sd
    import comfy.utils

    model, _, _ = comfy.sd.load_checkpoint_guess_config(str(tiny_sd15_file))[:3]
    lora = comfy.utils.load_torch_file(str(lora_path), safe_load=True)
    with caplog.at_level(logging.WARNING):
        patched, _ = comfy.sd.load_lora_for_models(model, None, lora, 1.0, 0.0)
    assert not [r for r in caplog.records if "lora key not loaded" in r.getMessage()]
    assert len(patched.patches) == len(lora) // 3

    samples = tmp_path / "samples"
    capsys.readouterr()
    assert (
        main(
            [
                "sample",
                "--checkpoint",
                str(tiny_sd15_file),
                "--lora",
                str(lora_path),
                "--prompt",
                "a photo of a cat",
                *SIZE,
                "--output",
                str(samples),
                "--no-progress",
            ]
        )
        == 0
    )
    assert "sampling with FM euler, 2 steps, cfg 1 (reflow LoRA defaults)" in capsys.readouterr().out
    (png,) = samples.glob("*.png")
    assert "steps 2, cfg 1.0" in Image.open(png).text["parameters"]
    # a flag still wins over the metadata
    assert (
        main(
            [
                "sample",
                "--checkpoint",
                str(tiny_sd15_file),
                "--lora",
                str(lora_path),
                "--prompt",
                "a photo of a cat",
                *SIZE,
                "--steps",
                "3",
                "--output",
                str(tmp_path / "s3"),
                "--no-progress",
            ]
        )
        == 0
    )
    (png,) = (tmp_path / "s3").glob("*.png")
    assert "steps 3, cfg 1.0" in Image.open(png).text["parameters"]

    # k-times reflow: the reflow LoRA is the next teacher; the manifest names it
    again = tmp_path / "pairs2"
    assert (
        main(
            [
                "pairs",
                "--checkpoint",
                str(tiny_sd15_file),
                "--lora",
                str(lora_path),
                "--prompts",
                str(_prompts(tmp_path)),
                "--count",
                "2",
                "--steps",
                "2",
                "--cfg",
                "1",
                *SIZE,
                "--batch-size",
                "2",
                "--shard-size",
                "2",
                "--output",
                str(again),
                "--no-progress",
            ]
        )
        == 0
    )
    teacher = json.loads((again / "manifest.json").read_text())["settings"]["teacher"]
    assert teacher["objective"] == "reflow" and teacher["lora_strength"] == 1.0 and len(teacher["lora_sha256"]) == 16


def _prompts(folder: pathlib.Path) -> pathlib.Path:
    path = folder / "one.txt"
    path.write_text("a photo of a cat\n", encoding="utf-8")
    return path


def test_a_checkpoint_that_is_no_sd_model_is_refused(tmp_path, prompts, capsys) -> None:
    save_file({"foo.weight": torch.zeros(3, 3)}, str(tmp_path / "junk.safetensors"))
    assert (
        main(
            [
                "pairs",
                "--checkpoint",
                str(tmp_path / "junk.safetensors"),
                "--prompts",
                str(prompts),
                "--count",
                "2",
                *SIZE,
                "--output",
                str(tmp_path / "p"),
                "--no-progress",
            ]
        )
        == 2
    )
    assert "could not be loaded as an SD model" in capsys.readouterr().err
    assert not (tmp_path / "p").exists()  # nothing was written


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="torch.distributed with gloo is not available")
def test_torchrun_two_processes_generate_the_same_pairs_as_one(tiny_sd15_file, prompts, tmp_path) -> None:
    """`torchrun ... -m training pairs` splits the shards between the ranks; every pair is bit-identical to
    the one-process run's (per-index noise; each rank runs the same batch shapes)."""
    run_cli_in_one_and_two_processes(
        [
            "pairs",
            "--checkpoint",
            tiny_sd15_file,
            "--prompts",
            prompts,
            "--count",
            "4",
            "--steps",
            "2",
            "--cfg",
            "2",
            *SIZE,
            "--batch-size",
            "2",
            "--shard-size",
            "2",
            "--no-progress",
        ],
        tmp_path,
    )
    shards_one, shards_two = pair_shards(tmp_path / "one"), pair_shards(tmp_path / "two")
    assert [(a, b) for a, b, _ in shards_two] == [(a, b) for a, b, _ in shards_one] == [(0, 2), (2, 4)]
    for (_, _, p1), (_, _, p2) in zip(shards_one, shards_two):
        t1, t2 = load_file(str(p1)), load_file(str(p2))
        assert sorted(t1) == sorted(t2)
        for key in t1:
            assert torch.equal(t1[key], t2[key]), f"{p2.name}: {key} differs between 1 and 2 processes"
    m1 = json.loads((tmp_path / "one" / "manifest.json").read_text())
    m2 = json.loads((tmp_path / "two" / "manifest.json").read_text())
    assert m1["count"] == m2["count"] == 4 and m1["settings"] == m2["settings"]


@pytest.mark.parametrize("command", ["pairs", "sample"])
def test_a_depth_model_as_the_lora_is_refused(command, tiny_sd15_file, prompts, tmp_path, capsys) -> None:
    """An image-to-depth file as --lora (it needs an image latent) is refused with the depth command named."""
    from d2f_core.lora_metadata import DEPTH_NORMALIZATION, LoraMetadata

    metadata = LoraMetadata(
        objective="diff2flow",
        prediction="eps",
        zero_terminal_snr=False,
        rank=4,
        alpha=4.0,
        algorithm="LoRA",
        base_model_hash="0",
        sampler="euler",
        sampling_steps=2,
        sampling_cfg=1.0,
        task="depth",
        normalization=DEPTH_NORMALIZATION,
    )
    depth_file = tmp_path / "depth.safetensors"
    save_file({"x": torch.zeros(1)}, str(depth_file), metadata=metadata.to_header())
    args = ["--prompts", str(prompts), "--count", "2"] if command == "pairs" else ["--prompt", "a cat", "--steps", "1"]
    assert (
        main(
            [
                command,
                "--checkpoint",
                str(tiny_sd15_file),
                "--lora",
                str(depth_file),
                *args,
                *SIZE,
                "--output",
                str(tmp_path / "out"),
                "--no-progress",
            ]
        )
        == 2
    )
    assert "is an image-to-depth model" in capsys.readouterr().err


# ---------------------------------------------------------------------- pairs --invert-cache
def _images(root: pathlib.Path, sizes: list[tuple[int, int]]) -> pathlib.Path:
    """Images of ``sizes`` (width, height) with a caption each."""
    import numpy as np

    root.mkdir()
    gen = np.random.default_rng(1)
    for i, (w, h) in enumerate(sizes):
        Image.fromarray((gen.random((h, w, 3)) * 255).astype("uint8")).save(root / f"img{i}.png")
        (root / f"img{i}.txt").write_text(f"a photo of thing {i}", encoding="utf-8")
    return root


def _prepare(dataset: pathlib.Path, checkpoint: pathlib.Path, cache: pathlib.Path) -> pathlib.Path:
    args = ["prepare", "--dataset", str(dataset), "--checkpoint", str(checkpoint), "--cache", str(cache)]
    assert main([*args, "--resolution", "64", "--no-progress"]) == 0
    return cache


@pytest.fixture(scope="module")
def image_cache(tiny_sd15_file, tmp_path_factory, fp32_text_encoder_module) -> pathlib.Path:
    """Three captioned 64x64 images prepared with the teacher's checkpoint."""
    root = tmp_path_factory.mktemp("own_images")
    return _prepare(_images(root / "images", [(64, 64)] * 3), tiny_sd15_file, root / "cache")


INVERT = ["--steps", "2", "--cfg", "2", *SIZE, "--batch-size", "2", "--shard-size", "2", "--no-progress"]


def test_invert_cache_writes_inverted_pairs_that_train_at_inverted_share(
    image_cache, tiny_sd15_file, prompts, tmp_path, capsys
) -> None:
    """`pairs --invert-cache` alone inverts the cache's images (no --prompts: no generated pairs); a rerun of its
    pairs.toml with --prompts adds generated pairs to the folder; `train --inverted-share` mixes them and the
    LoRA records the share; a share the pairs cannot give is refused naming the flag."""
    from training.cache import load_cache

    out = tmp_path / "pairs"
    assert (
        main(
            [
                "pairs",
                "--checkpoint",
                str(tiny_sd15_file),
                "--invert-cache",
                str(image_cache),
                "--output",
                str(out),
                *INVERT,
            ]
        )
        == 0
    )
    assert "3 inverted pairs in" in capsys.readouterr().out
    pairs = load_pairs(out)
    assert (pairs.generated_count, pairs.inverted_count) == (0, 3)  # 0 inverted if the flag were ignored
    assert [(a, b) for a, b, _ in pair_shards(out, inverted=True)] == [(0, 2), (2, 3)]
    cache = load_cache(image_cache)
    torch.testing.assert_close(pairs.latents, torch.stack(cache.latents) * 0.18215)  # SD1.5's latent scale
    assert pairs.captions[0]["context"].shape == (1, 77, 768) and torch.isfinite(pairs.noise).all()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["inverted_labels"] == cache.sources and manifest["inverted_sources"]["cache"] == str(
        image_cache.resolve()
    )
    toml = (out / "pairs.toml").read_text()
    assert "invert_cache = " in toml and "count = 0" in toml

    # generated pairs join the folder; the inverted ones are kept, not redone
    assert (
        main(["pairs", "--config", str(out / "pairs.toml"), "--prompts", str(prompts), "--count", "2", "--no-progress"])
        == 0
    )
    assert "0 inverted in" in capsys.readouterr().out
    both = load_pairs(out)
    assert (both.generated_count, both.inverted_count) == (2, 3) and torch.equal(both.noise[2:], pairs.noise)

    run = tmp_path / "run"
    train = ["train", "--checkpoint", str(tiny_sd15_file), "--objective", "reflow", "--steps", "2", "--batch-size", "2"]
    assert main([*train, "--pairs", str(out), "--inverted-share", "0.5", "--output", str(run), "--no-progress"]) == 0
    assert read_lora_metadata(run / "diff2flow_lora.safetensors").inverted_share == 0.5
    generated_only = tmp_path / "generated_only"
    assert (
        main(
            [
                "pairs",
                "--checkpoint",
                str(tiny_sd15_file),
                "--prompts",
                str(prompts),
                "--count",
                "2",
                "--output",
                str(generated_only),
                *INVERT,
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert (
        main(
            [
                *train,
                "--pairs",
                str(generated_only),
                "--inverted-share",
                "0.5",
                "--output",
                str(tmp_path / "r2"),
                "--no-progress",
            ]
        )
        == 2
    )
    assert "--inverted-share: 0.5 draws inverted pairs, but the training data holds none" in capsys.readouterr().err


def test_invert_cache_refusals_name_the_flag(image_cache, tiny_sd15_file, prompts, tmp_path, capsys) -> None:
    """Another checkpoint's cache, images of other sizes, and --count without --prompts are refused before any pair."""
    import shutil

    other = tmp_path / "other.safetensors"
    shutil.copy(
        tiny_sd15_file, other
    )  # the same weights under another name: its own encoders as far as the cache knows
    mixed = _prepare(_images(tmp_path / "mixed", [(64, 64), (96, 48)]), tiny_sd15_file, tmp_path / "mixed_cache")
    out = tmp_path / "refused"
    for args, message in (
        (["--checkpoint", str(other), "--invert-cache", str(image_cache)], "was prepared with another checkpoint"),
        (
            ["--checkpoint", str(tiny_sd15_file), "--invert-cache", str(mixed)],
            "holds images of other sizes than --width 64 --height 64 \\(width x height: images: 128x64: 1, 64x64: 1\\)",
        ),
        (
            ["--checkpoint", str(tiny_sd15_file), "--invert-cache", str(image_cache), "--count", "3"],
            "--count 3 generates pairs from prompts, but no --prompts is given",
        ),
        (
            ["--checkpoint", str(tiny_sd15_file), "--prompts", str(prompts), "--count", "0"],
            "--count 0 generates nothing",
        ),
        (
            ["--checkpoint", str(tiny_sd15_file), "--invert-cache", str(tmp_path / "none")],
            "--invert-cache: latent cache",
        ),
    ):
        assert main(["pairs", *args, "--output", str(out), *INVERT]) == 2, args
        err = capsys.readouterr().err
        assert re.search(message, err), err
    assert not out.exists()
