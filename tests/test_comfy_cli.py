"""The headless CLI end to end on an SD1.5-shaped random-weight checkpoint: prepare -> train -> sample,
resume, refusals before compute, torchrun with 2 processes, and the LoRA in stock ComfyUI."""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib

import pytest
from comfy_harness import require_comfyui, run_cli_in_one_and_two_processes

require_comfyui()

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from d2f_app.cli import main  # noqa: E402
from d2f_core.lora_metadata import read_lora_metadata  # noqa: E402

TRAIN = ["--steps", "4", "--batch-size", "2", "--rank", "4", "--learning-rate", "1e-3", "--seed", "3", "--no-progress"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> pathlib.Path:
    """Six small images (two aspect ratios) with captions, one without caption, one corrupt file."""
    root = tmp_path_factory.mktemp("dataset")
    gen = np.random.default_rng(0)
    for i in range(6):
        size = (64, 64) if i < 4 else (96, 48)
        arr = (gen.random((size[1], size[0], 3)) * 255).astype(np.uint8)
        sub = root / ("nested" if i % 2 else "")
        sub.mkdir(exist_ok=True)
        Image.fromarray(arr).save(sub / f"img{i}.png")
        if i != 5:
            (sub / f"img{i}.txt").write_text(f"a photo of thing {i}", encoding="utf-8")
    (root / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    return root


@pytest.fixture(scope="module")
def prepared(tiny_sd15_file, dataset, tmp_path_factory, fp32_text_encoder_module) -> pathlib.Path:
    cache = tmp_path_factory.mktemp("cache")
    assert (
        main(
            [
                "prepare",
                "--dataset",
                str(dataset),
                "--checkpoint",
                str(tiny_sd15_file),
                "--cache",
                str(cache),
                "--resolution",
                "64",
                "--no-progress",
            ]
        )
        == 0
    )
    return cache


def test_prepare_caches_buckets_and_reports(prepared, dataset, tiny_sd15_file, capsys) -> None:
    index = json.loads((prepared / "index.json").read_text())
    assert sorted(index["entries"]) == [
        "img0.png",
        "img2.png",
        "img4.png",
        "nested/img1.png",
        "nested/img3.png",
        "nested/img5.png",
    ]
    buckets = {tuple(e["bucket"]) for e in index["entries"].values()}
    assert (64, 64) in buckets and any(w > h for w, h in buckets)
    # a second prepare reuses every entry and reports the corrupt file and the missing caption again
    assert (
        main(
            [
                "prepare",
                "--dataset",
                str(dataset),
                "--checkpoint",
                str(tiny_sd15_file),
                "--cache",
                str(prepared),
                "--resolution",
                "64",
                "--no-progress",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert (
        "6 of 7 images cached" in out and "0 latents encoded, 6 reused" in out and "0 captions encoded, 6 reused" in out
    )
    assert "1 unreadable images skipped" in out and "corrupt.jpg" in out
    assert "1 images have no .txt caption" in out


def test_train_writes_lora_state_metrics_and_plot_and_resumes(prepared, tiny_sd15_file, tmp_path, capsys) -> None:
    out = tmp_path / "run"
    base = [
        "train",
        "--cache",
        str(prepared),
        "--checkpoint",
        str(tiny_sd15_file),
        "--output",
        str(out),
        "--name",
        "cli",
    ]
    assert main([*base, *TRAIN, "--save-every", "2", "--caption-dropout", "0.2"]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == [
        "cli.d2fstate",
        "cli.safetensors",
        "cli.toml",
        "cli_000002.safetensors",
        "cli_000004.safetensors",
        "loss.png",
        "metrics.jsonl",
    ]
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 3, 4] and all(np.isfinite(m["loss"]) and m["it_s"] > 0 for m in lines)
    assert Image.open(out / "loss.png").size[0] > 100
    meta = read_lora_metadata(out / "cli.safetensors")
    assert (meta.objective, meta.prediction, meta.steps, meta.rank) == ("diff2flow", "eps", 4, 4)
    # the same run name again is refused (nothing is overwritten); --resume continues it to 6 steps
    assert main([*base, *TRAIN]) == 2
    assert "already holds a run named 'cli'" in capsys.readouterr().err
    assert (
        main(
            [
                "train",
                "--config",
                str(out / "cli.toml"),
                "--resume",
                str(out / "cli.d2fstate"),
                "--steps",
                "6",
                "--no-progress",
            ]
        )
        == 0
    )
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4, 5, 6]
    # straight 6 steps equal 4 + resume 2
    straight = tmp_path / "straight"
    assert (
        main(["train", "--config", str(out / "cli.toml"), "--output", str(straight), "--steps", "6", "--no-progress"])
        == 0
    )
    with safe_open(str(out / "cli.safetensors"), "pt") as a, safe_open(str(straight / "cli.safetensors"), "pt") as b:
        assert set(a.keys()) == set(b.keys())
        for key in a.keys():
            torch.testing.assert_close(a.get_tensor(key), b.get_tensor(key), rtol=1e-5, atol=1e-6)
    # a resume with a different trajectory option is refused before any compute
    assert (
        main(
            [
                "train",
                "--config",
                str(out / "cli.toml"),
                "--resume",
                str(out / "cli.d2fstate"),
                "--steps",
                "8",
                "--learning-rate",
                "5e-4",
                "--no-progress",
            ]
        )
        == 2
    )
    assert "different configuration (learning_rate: saved 0.001, now 0.0005)" in capsys.readouterr().err


def test_trained_lora_loads_in_stock_comfyui_and_samples(prepared, tiny_sd15_file, tmp_path, pack, caplog) -> None:
    out = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--cache",
                str(prepared),
                "--checkpoint",
                str(tiny_sd15_file),
                "--output",
                str(out),
                *TRAIN,
                "--targets",
                "attention_ff",
            ]
        )
        == 0
    )
    import comfy.sd
    import comfy.utils

    model, clip, _ = comfy.sd.load_checkpoint_guess_config(str(tiny_sd15_file))[:3]
    lora = comfy.utils.load_torch_file(str(out / "diff2flow_lora.safetensors"), safe_load=True)
    with caplog.at_level(logging.WARNING):
        patched, _ = comfy.sd.load_lora_for_models(model, None, lora, 1.0, 0.0)
    assert not [r for r in caplog.records if "lora key not loaded" in r.getMessage()]
    patched_keys = set(patched.patches)
    assert len(patched_keys) == len(lora) // 3 and all(k.startswith("diffusion_model.") for k in patched_keys)
    # the node's format: the same tensors (names, shapes) and the same metadata for the same options
    from training import TrainConfig

    node_config = TrainConfig(steps=1, batch_size=1, rank=4, seed=3, targets="attention_ff", learning_rate=1e-3)
    inputs = pack.train_inputs.TrainingInputs([{"samples": torch.zeros(1, 4, 8, 8)}], [[[torch.zeros(1, 77, 768), {}]]])
    node_lora = pack.train_nodes.train_lora(model, node_config, inputs).lora
    assert {k: tuple(v.shape) for k, v in node_lora.items()} == {k: tuple(v.shape) for k, v in lora.items()}
    cli_meta = read_lora_metadata(out / "diff2flow_lora.safetensors")
    assert node_lora.metadata == dataclasses.replace(cli_meta, steps=1)
    samples = tmp_path / "samples"
    assert (
        main(
            [
                "sample",
                "--checkpoint",
                str(tiny_sd15_file),
                "--lora",
                str(out / "diff2flow_lora.safetensors"),
                "--prompt",
                "a photo of thing 1",
                "--prompt",
                "thing 2",
                "--steps",
                "3",
                "--cfg",
                "3",
                "--width",
                "64",
                "--height",
                "64",
                "--output",
                str(samples),
                "--no-progress",
            ]
        )
        == 0
    )
    pngs = sorted(samples.glob("*.png"))
    assert len(pngs) == 2
    a, b = (np.asarray(Image.open(p)) for p in pngs)
    assert a.shape == (64, 64, 3) and not np.array_equal(a, b)
    assert "a photo of thing 1" in Image.open(pngs[0]).text["parameters"]


def test_bad_inputs_fail_before_compute(tiny_sd15_file, prepared, tmp_path, capsys) -> None:
    assert (
        main(
            [
                "prepare",
                "--dataset",
                str(tmp_path / "nope"),
                "--checkpoint",
                str(tiny_sd15_file),
                "--cache",
                str(tmp_path / "c"),
            ]
        )
        == 2
    )
    assert "dataset folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert (
        main(
            [
                "prepare",
                "--dataset",
                str(tmp_path / "empty"),
                "--checkpoint",
                str(tiny_sd15_file),
                "--cache",
                str(tmp_path / "c"),
            ]
        )
        == 2
    )
    assert "holds no images" in capsys.readouterr().err
    assert (
        main(
            [
                "train",
                "--cache",
                str(tmp_path / "nocache"),
                "--checkpoint",
                str(tiny_sd15_file),
                "--output",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    assert "Run `python -m training prepare" in capsys.readouterr().err
    # a checkpoint ComfyUI cannot identify as an SD model
    from safetensors.torch import save_file

    save_file({"foo.weight": torch.zeros(3, 3)}, str(tmp_path / "junk.safetensors"))
    assert (
        main(
            [
                "train",
                "--cache",
                str(prepared),
                "--checkpoint",
                str(tmp_path / "junk.safetensors"),
                "--output",
                str(tmp_path / "o2"),
            ]
        )
        == 2
    )
    assert "could not be loaded as an SD model" in capsys.readouterr().err
    assert (
        main(
            [
                "train",
                "--cache",
                str(prepared),
                "--checkpoint",
                str(tiny_sd15_file),
                "--output",
                str(tmp_path / "o3"),
                "--rank",
                "0",
            ]
        )
        == 2
    )
    assert "rank must be a positive integer" in capsys.readouterr().err
    (tmp_path / "bad.toml").write_text("[train]\nlearning_rat = 1e-4\n")
    assert main(["train", "--config", str(tmp_path / "bad.toml")]) == 2
    assert "unknown keys learning_rat" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="torch.distributed with gloo is not available")
def test_torchrun_two_processes_train_through_the_cli(prepared, tiny_sd15_file, tmp_path) -> None:
    run_cli_in_one_and_two_processes(["train", "--cache", prepared, "--checkpoint", tiny_sd15_file, *TRAIN], tmp_path)
    with (
        safe_open(str(tmp_path / "one" / "diff2flow_lora.safetensors"), "pt") as a,
        safe_open(str(tmp_path / "two" / "diff2flow_lora.safetensors"), "pt") as b,
    ):
        assert set(a.keys()) == set(b.keys())
        moved = 0
        for key in a.keys():
            # per tensor, relative to its norm: the 2 shards of a batch sum in another order in float32, and
            # Adam's normalised updates carry those 1e-7 differences into the weights (measured at most: 2e-4
            # with torch's CPU wheel, 1.1e-3 with its CUDA wheel running on a CPU, whose convolution kernels
            # depend on the batch size; the pure-torch test in training/tests holds 1e-5 elementwise; a wrong
            # shard or a missing gradient average moves the weights by O(1)). lora_up starts at 0, so its
            # norm is all that training moved.
            ta, tb = a.get_tensor(key).double(), b.get_tensor(key).double()
            assert (ta - tb).norm() <= 5e-3 * ta.norm() + 1e-8, key
            moved += int(key.endswith("lora_up.weight") and ta.abs().max() > 0)
        assert moved > 0
    assert len((tmp_path / "two" / "metrics.jsonl").read_text().splitlines()) == 4


@pytest.mark.slow
def test_train_previews_sample_the_model_and_never_change_the_training(
    prepared, tiny_sd15_file, tmp_path, capsys
) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of thing 1\n\nthing 2\n", encoding="utf-8")
    previews = [
        "--preview-every",
        "2",
        "--preview-steps",
        "3",
        "--preview-cfg",
        "2",
        "--preview-seed",
        "5",
        "--preview-width",
        "64",
        "--preview-height",
        "64",
    ]
    base = ["train", "--cache", str(prepared), "--checkpoint", str(tiny_sd15_file), *TRAIN]
    assert main([*base, "--output", str(tmp_path / "plain")]) == 0
    out = tmp_path / "previews"
    assert main([*base, "--output", str(out), *previews, "--sample-prompts", str(prompts)]) == 0
    expected = ["step_000000.png", "step_000002.png", "step_000004.png"]
    assert sorted(p.name for p in (out / "samples").iterdir()) == expected
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["sample"] for r in records if "sample" in r] == [f"samples/{n}" for n in expected]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]

    def lora(folder: pathlib.Path) -> dict:
        with safe_open(str(folder / "diff2flow_lora.safetensors"), "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}

    plain, with_previews = lora(tmp_path / "plain"), lora(out)
    assert plain.keys() == with_previews.keys()
    assert all(torch.equal(plain[k], with_previews[k]) for k in plain), "previews changed the training"
    # the step-0 grid is what `sample` makes of the base checkpoint with the same seed, steps, cfg and size
    samples = tmp_path / "samples"
    assert (
        main(
            [
                "sample",
                "--checkpoint",
                str(tiny_sd15_file),
                "--prompt",
                "a photo of thing 1",
                "--prompt",
                "thing 2",
                "--steps",
                "3",
                "--cfg",
                "2",
                "--seed",
                "5",
                "--width",
                "64",
                "--height",
                "64",
                "--output",
                str(samples),
                "--no-progress",
            ]
        )
        == 0
    )
    first, second = (np.asarray(Image.open(p)).astype(int) for p in sorted(samples.glob("*.png")))
    grid = np.asarray(Image.open(out / "samples" / "step_000000.png")).astype(int)
    assert grid.shape == (64, 128, 3)  # two prompts: one row of two
    assert np.abs(grid[:, :64] - first).max() <= 1 and np.abs(grid[:, 64:] - second).max() <= 1
    assert not np.array_equal(first, second)
    # resumed through the run's TOML (it carries sample_prompts and the preview options) = the straight run
    half = tmp_path / "half"
    assert main([*base, "--output", str(half), *previews, "--sample-prompts", str(prompts), "--steps", "3"]) == 0
    assert "sample_prompts = " in (half / "diff2flow_lora.toml").read_text()
    assert (
        main(
            [
                "train",
                "--config",
                str(half / "diff2flow_lora.toml"),
                "--resume",
                str(half / "diff2flow_lora.d2fstate"),
                "--steps",
                "4",
                "--no-progress",
            ]
        )
        == 0
    )
    assert sorted(p.name for p in (half / "samples").iterdir()) == expected
    resumed = lora(half)
    assert all(torch.equal(resumed[k], with_previews[k]) for k in resumed)
    for name in expected:
        assert np.array_equal(
            np.asarray(Image.open(half / "samples" / name)), np.asarray(Image.open(out / "samples" / name))
        )
    # previews on without prompts: refused before any compute, naming the flag
    assert main([*base, "--output", str(tmp_path / "noprompts"), "--preview-every", "2"]) == 2
    assert "--preview-every 2 needs --sample-prompts FILE" in capsys.readouterr().err


@pytest.mark.slow
def test_a_resume_at_the_last_step_writes_the_missing_final_files(prepared, tiny_sd15_file, tmp_path, capsys) -> None:
    """A run killed between its last periodic save and its final files: the state is at the last step,
    NAME.safetensors is missing, an older save was not pruned yet and temporary files are left. --resume
    writes the final LoRA (equal to the run's), prunes to --keep-last, removes the leftovers and exits 0."""
    import subprocess
    import sys

    out = tmp_path / "run"
    base = [
        "train",
        "--cache",
        str(prepared),
        "--checkpoint",
        str(tiny_sd15_file),
        "--output",
        str(out),
        "--name",
        "cut",
    ]
    assert main([*base, *TRAIN, "--save-every", "2", "--keep-last", "1"]) == 0
    final = {k: v.clone() for k, v in load_file(out / "cut.safetensors").items()}
    (out / "cut.safetensors").unlink()
    (out / "cut_000004.safetensors").replace(out / "cut_000002.safetensors")  # not pruned yet
    (out / "cut_000004.safetensors").write_bytes((out / "cut_000002.safetensors").read_bytes())
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    leftovers = [out / f".{name}.{gone.pid}.tmp" for name in ("cut.d2fstate", "loss.png", "cut_000004.safetensors")]
    for path in leftovers:
        path.write_bytes(b"partial")
    capsys.readouterr()
    assert (
        main(["train", "--config", str(out / "cut.toml"), "--resume", str(out / "cut.d2fstate"), "--no-progress"]) == 0
    )
    assert "resuming cut at step 4 of 4: writing the final files" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == [
        "cut.d2fstate",
        "cut.safetensors",
        "cut.toml",
        "cut_000004.safetensors",
        "loss.png",
        "metrics.jsonl",
    ]
    resumed = load_file(out / "cut.safetensors")
    assert resumed.keys() == final.keys() and all(torch.equal(resumed[k], final[k]) for k in final)
    # past the saved step is still refused, with the fix
    assert (
        main(
            [
                "train",
                "--config",
                str(out / "cut.toml"),
                "--resume",
                str(out / "cut.d2fstate"),
                "--steps",
                "3",
                "--no-progress",
            ]
        )
        == 2
    )
    assert "already at step 4, past --steps 3" in capsys.readouterr().err


def test_train_validation_loss_in_metrics_plot_and_state(prepared, tiny_sd15_file, tmp_path, capsys) -> None:
    """--validation-split holds samples out and --validation-every evaluates them at 0, every N and the last
    step: lines of their own in metrics.jsonl, in the state; a second cache validates instead with
    --validation-cache; options that cannot go together are refused before training."""
    base = ["train", "--cache", str(prepared), "--checkpoint", str(tiny_sd15_file), *TRAIN[:-1]]
    out = tmp_path / "split"
    assert main([*base, "--output", str(out), "--validation-split", "0.3", "--validation-every", "3"]) == 0
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    validation = [(m["step"], m["validation_loss"]) for m in lines if "validation_loss" in m]
    assert [s for s, _ in validation] == [0, 3, 4] and all(np.isfinite(v) for _, v in validation)
    assert [m["step"] for m in lines if "loss" in m] == [1, 2, 3, 4]
    state = torch.load(out / "diff2flow_lora.d2fstate", weights_only=False)
    assert [tuple(v) for v in state["validation_losses"]] == validation
    # the same numbers with --validation-cache pointing at the same cache: it validates on every sample
    other = tmp_path / "cache"
    assert main([*base, "--output", str(other), "--validation-cache", str(prepared), "--validation-every", "4"]) == 0
    other_lines = [json.loads(line) for line in (other / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in other_lines if "validation_loss" in m] == [0, 4]
    capsys.readouterr()
    refusals = {
        ("--validation-every", "2"): "--validation-every: 2 needs validation samples",
        ("--validation-split", "0.2"): "validation_every is 0",
        ("--validation-cache", str(prepared)): "--validation-every: 0, but validation data is given",
        ("--validation-cache", str(prepared), "--validation-split", "0.2", "--validation-every", "1"): (
            "--validation-split: 0.2 holds out training samples, but separate validation data is given too"
        ),
        (
            "--validation-cache",
            str(tmp_path / "missing"),
            "--validation-every",
            "1",
        ): "--validation-cache: latent cache",
    }
    for extra, message in refusals.items():
        assert main([*base, "--output", str(tmp_path / "refused"), *extra]) == 2, extra
        assert message in capsys.readouterr().err, extra
    assert not (tmp_path / "refused").exists() or not any((tmp_path / "refused").iterdir())
