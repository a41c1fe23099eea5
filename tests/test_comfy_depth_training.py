"""Training an image-to-depth model in a real ComfyUI 0.8.0 (docs/MATH.md section 13), on the SD1.5-shaped
random-weight checkpoint (tests/sd15_checkpoint.py): the training node on image + depth batches, the CLI's
prepare + train on a folder of pairs (resume, torchrun), the depth file loaded back onto the base model
(d2f_host.depth.widen_model + stock load_lora_for_models) with the trained outputs, and the refusals.
Convention: FM sigma in [0, 1], sigma = 1 is noise."""

from __future__ import annotations

import pathlib

import pytest
from comfy_harness import require_comfyui, run_cli_in_one_and_two_processes

require_comfyui()

import comfy.model_management  # noqa: E402
import comfy.sd  # noqa: E402
import comfy.utils  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from d2f_app.cli import main  # noqa: E402
from d2f_core.lora_metadata import DEPTH_NORMALIZATION, LoraMetadata, read_lora_metadata  # noqa: E402
from d2f_host import training_run  # noqa: E402
from training import TrainConfig  # noqa: E402

NODE = "D2F_TrainLoRA"
CONV = "diffusion_model.input_blocks.0.0"
# what ComfyUI logs when a LoRA file does not load completely or a patch fails to apply
LOAD_PROBLEMS = (
    "lora key not loaded",
    "NOT LOADED",
    "ERROR",
    "Calculate Weight Failed",
    "SHAPE MISMATCH",
    "patch type not recognized",
)
CLI_TRAIN = [
    "--steps",
    "4",
    "--batch-size",
    "2",
    "--rank",
    "4",
    "--learning-rate",
    "1e-3",
    "--seed",
    "3",
    "--no-progress",
]


@pytest.fixture(scope="module")
def sd15(tiny_sd15_file):
    """(MODEL, VAE) of the SD1.5-shaped test checkpoint."""
    model, _, vae = comfy.sd.load_checkpoint_guess_config(str(tiny_sd15_file), output_vae=True, output_clip=False)[:3]
    return model, vae


def pair_batch(n: int = 4, size: tuple[int, int] = (64, 64), seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """IMAGE batches: ``n`` smooth random images and their depth maps (grayscale ramps in random directions)."""
    gen = torch.Generator().manual_seed(seed)
    h, w = size
    low = torch.rand(n, 3, 4, 4, generator=gen)
    images = torch.nn.functional.interpolate(low, size=(h, w), mode="bilinear").permute(0, 2, 3, 1).contiguous()
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    angles = torch.rand(n, generator=gen) * 6.28
    ramps = torch.stack([(a.cos() * xx + a.sin() * yy) for a in angles])
    ramps = (ramps - ramps.amin((1, 2), keepdim=True)) / (
        ramps.amax((1, 2), keepdim=True) - ramps.amin((1, 2), keepdim=True)
    )
    return images, ramps[..., None].expand(-1, -1, -1, 3).contiguous()


EMPTY = [[torch.zeros(1, 77, 768), {}]]  # the empty prompt's conditioning (its values do not matter here)


def node_kwargs(model, options: dict, images: list | None, depths: list | None, vae, positive=EMPTY, **extra) -> dict:
    """The training node's inputs as ComfyUI passes them (every value a list: is_input_list)."""
    kwargs = {k: [v] for k, v in {**TrainConfig().to_dict(), **options}.items()}
    kwargs.update(model=[model], output_name=[extra.pop("output_name", "depth_run")], resume_from=["None"])
    if positive is not None:
        kwargs["positive"] = [positive]
    if images is not None:
        kwargs["depth_images"] = images
    if depths is not None:
        kwargs["depth_maps"] = depths
    if vae is not None:
        kwargs["vae"] = [vae]
    kwargs.update({k: v for k, v in extra.items()})
    return kwargs


def unet_raw(model, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, concat: torch.Tensor) -> torch.Tensor:
    """``model``'s raw UNet, as ComfyUI loads it (object patches and weight patches applied), on ``x`` with
    ``concat`` appended (as ``BaseModel._apply_model`` appends ``c_concat``) at integer timesteps ``t``: the
    model sampling (Diff2Flow patch or not) plays no part."""
    comfy.model_management.load_models_gpu([model])
    with torch.no_grad():
        return model.model.diffusion_model(torch.cat([x, concat], dim=1), t, context=context).float()


@pytest.mark.parametrize("algorithm,objective", [("LoRA", "diff2flow"), ("LoHa", "diffusion"), ("Full", "naive_fm")])
def test_node_trains_a_depth_model_whose_file_loads_back_with_the_trained_outputs(
    pack, comfy_nodes, sd15, loras_dir, recorded_trainers, caplog, tiny_sd15_file, algorithm, objective
) -> None:
    from d2f_host.checkpoints import base_model_hash
    from d2f_host.depth import is_image_conditioned, widen_model

    base, vae = sd15
    images, depths = pair_batch(4)
    options = dict(
        steps=3,
        batch_size=2,
        learning_rate=1e-2,
        rank=4,
        alpha=4.0,
        algorithm=algorithm,
        objective=objective,
        targets="attention",
        seed=1,
        save_every=3,
    )
    # the images as two list items (a list of batches, as ComfyUI's dataset nodes give), the depth maps as one batch
    result = comfy_nodes[NODE].execute(**node_kwargs(base, options, [images[:1], images[1:]], [depths], vae)).result
    out_model, lora, losses, steps = result[:4]
    assert steps == 3 and len(losses["loss"]) == 3 and all(np.isfinite(losses["loss"]))
    assert is_image_conditioned(out_model) and not is_image_conditioned(base)  # the input MODEL is never changed
    # the saved file: the widened convolution's whole delta (8 input channels) beside the algorithm's adapters
    path = loras_dir / "depth_run_000003.safetensors"  # the periodic save (Save Diff2Flow LoRA writes the same)
    tensors = load_file(path)
    assert tuple(tensors[f"{CONV}.diff"].shape) == (320, 8, 3, 3)
    assert tensors[f"{CONV}.diff"][:, 4:].abs().max() > 0, "the image half of the first convolution did not train"
    assert any(
        k.endswith({"LoRA": "lora_up.weight", "LoHa": "hada_w1_a", "Full": "diff"}[algorithm])
        and not k.startswith(CONV)
        for k in tensors
    )
    meta = read_lora_metadata(path)
    assert (meta.task, meta.normalization, meta.objective, meta.algorithm) == (
        "depth",
        DEPTH_NORMALIZATION,
        objective,
        algorithm,
    )
    expected_steps = {"diff2flow": 4}.get(objective, 20)  # the registry's depth steps, else the objective's
    assert (meta.sampling_steps, meta.sampling_cfg) == (expected_steps, 1.0)
    assert lora.metadata == meta
    # the fingerprint of the base model the file loads onto (not of the widened one)
    fresh = comfy.sd.load_checkpoint_guess_config(str(tiny_sd15_file), output_vae=False, output_clip=False)[0]
    assert meta.base_model_hash == base_model_hash(fresh)
    # the network as trained: the adapters as weight wrappers on the widened clone (what the engine trained)
    (trainer,) = recorded_trainers
    widened = widen_model(base)
    trained = widened.clone()
    for n, adapter in trainer.saved_adapters().items():
        trained.add_weight_wrapper(f"diffusion_model.{n}.weight", adapter)
    gen = torch.Generator().manual_seed(5)
    x, concat = torch.randn(2, 2, 4, 8, 8, generator=gen)
    context, t = torch.randn(2, 77, 768, generator=gen) * 0.1, torch.tensor([300.0, 800.0])
    expected = unet_raw(trained, x, t, context, concat)
    untrained = unet_raw(widened, x, t, context, concat)
    assert not torch.allclose(expected, untrained, rtol=1e-3, atol=1e-3), "training changed nothing"
    # the file loaded back: the base widened, then ComfyUI's stock LoRA loader (every key used, no shape mismatch)
    caplog.set_level("INFO")
    loaded, _ = comfy.sd.load_lora_for_models(
        widen_model(base), None, comfy.utils.load_torch_file(str(path), safe_load=True), 1.0, 0.0
    )
    got = unet_raw(loaded, x, t, context, concat)
    problems = [line for line in caplog.text.splitlines() if any(p in line for p in LOAD_PROBLEMS)]
    assert not problems, problems[:3]
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())
    # the node's MODEL output is that model (as the flow model of its objective): the same UNet outputs
    torch.testing.assert_close(
        unet_raw(out_model, x, t, context, concat), expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item()
    )


def test_node_trains_on_the_image_latent(pack, comfy_nodes, sd15, loras_dir) -> None:
    """The same depth maps with other images give another model: the images reach the network."""
    base, vae = sd15
    images, depths = pair_batch(2)
    options = dict(steps=2, batch_size=2, learning_rate=1e-2, rank=4, seed=1)
    first = comfy_nodes[NODE].execute(**node_kwargs(base, options, [images], [depths], vae, output_name="a")).result[1]
    second = (
        comfy_nodes[NODE]
        .execute(**node_kwargs(base, options, [images.flip(0)], [depths], vae, output_name="b"))
        .result[1]
    )
    assert first.keys() == second.keys()
    assert not torch.allclose(first[f"{CONV}.diff"], second[f"{CONV}.diff"])


def test_node_trains_an_sdxl_depth_model_with_its_size_embedding(
    pack, comfy_nodes, sd15, loras_dir, tmp_path, monkeypatch
) -> None:
    """SDXL: the widened first convolution and, per pair, the ADM vector ``y`` of the empty prompt's pooled
    embedding at the pair's own size (one pair is 64x64, the other 96x64: two buckets)."""
    from family_checkpoints import synthetic_conditioning, write_family_checkpoint

    path = write_family_checkpoint("sdxl_eps", tmp_path)
    model = comfy.sd.load_checkpoint_guess_config(path, output_vae=False, output_clip=False)[0]
    _, vae = sd15  # any VAE of 4-channel, 8x latents encodes the pairs
    square, wide = pair_batch(1, (64, 64)), pair_batch(1, (64, 96), seed=1)
    calls = []
    real_cond_kwargs = pack.train_inputs.cond_kwargs

    def recording(model, entry, latent):
        out = real_cond_kwargs(model, entry, latent)
        calls.append((tuple(latent.shape), out.get("y")))
        return out

    monkeypatch.setattr(pack.train_inputs, "cond_kwargs", recording)
    options = dict(steps=2, batch_size=1, learning_rate=1e-3, rank=4, seed=1, save_every=2)
    result = (
        comfy_nodes[NODE]
        .execute(
            **node_kwargs(
                model,
                options,
                [square[0], wide[0]],
                [square[1], wide[1]],
                vae,
                positive=synthetic_conditioning("sdxl_eps"),
                output_name="xl",
            )
        )
        .result
    )
    assert result[3] == 2
    assert [shape for shape, _ in calls] == [(4, 8, 8), (4, 8, 12)]
    assert all(y is not None and y.shape == (1, 2816) for _, y in calls) and not torch.equal(calls[0][1], calls[1][1])
    with safe_open(str(loras_dir / "xl_000002.safetensors"), "pt") as f:
        assert tuple(f.get_tensor(f"{CONV}.diff").shape) == (320, 8, 3, 3)
        assert LoraMetadata.from_header(f.metadata()).task == "depth"


def test_node_resumes_a_depth_run_exactly(pack, sd15, loras_dir) -> None:
    base, vae = sd15
    images, depths = pair_batch(3)
    cfg = dict(steps=4, batch_size=2, learning_rate=1e-3, rank=4, seed=4, save_every=2, algorithm="LoHa")

    def train(steps: int, name: str, resume: str = "None"):
        inputs = pack.train_inputs.TrainingInputs(positive=[EMPTY], vae=vae, depth_images=[images], depth_maps=[depths])
        return pack.train_nodes.train_lora(base, TrainConfig(**{**cfg, "steps": steps}), inputs, name, resume)

    straight = train(4, "straight")[1]
    train(2, "half")
    _, resumed, losses, steps, _ = train(4, "half", "half.d2fstate")
    assert steps == 4 and len(losses["loss"]) == 4 and f"{CONV}.diff" in resumed
    assert resumed.keys() == straight.keys()
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], rtol=1e-6, atol=1e-7)


class NoEncode:
    """A VAE that must not be used: the checks run before anything is encoded."""

    def encode(self, pixels):
        raise AssertionError("encoded before the inputs were checked")


@pytest.mark.parametrize(
    "case,match",
    [
        ("counts", "3 depth_images but 2 depth_maps"),
        ("sizes", "pair 1: the image is 64x64 but its depth map is 64x48"),
        ("flat", "depth map 2 \\(depth_maps\\) is constant"),
        ("no_vae", "connect the vae input"),
        ("no_maps", "depth_images is connected but depth_maps is not"),
        ("latents_too", "not both: latents is connected too"),
        ("previews", "preview_every 2: previews sample text prompts"),
        ("no_positive", "depth training needs positive"),
        ("positives", "3 image \\+ depth pairs but 2 positive conditionings"),
        (
            "grid_share",
            "grid_share: 0.5 places training sigmas on the 20-step image sampling grid .* depth model samples",
        ),
    ],
)
def test_node_refuses_bad_depth_inputs_before_compute(pack, comfy_nodes, sd15, monkeypatch, case, match) -> None:
    base, _ = sd15
    images, depths = pair_batch(3)
    vae = NoEncode()
    kwargs = dict(images=[images], depths=[depths], vae=vae)
    options = {"steps": 1}
    extra = {}
    if case == "counts":
        kwargs["depths"] = [depths[:2]]
    elif case == "sizes":
        kwargs["depths"] = [depths[:1], depths[1:, :48]]
    elif case == "flat":
        flat = depths.clone()
        flat[2] = 0.5
        kwargs["depths"] = [flat]
    elif case == "no_vae":
        kwargs["vae"] = None
    elif case == "no_maps":
        kwargs["depths"] = None
    elif case == "latents_too":
        extra["latents"] = [{"samples": torch.zeros(1, 4, 8, 8)}]
    elif case == "previews":
        options["preview_every"] = 2
    elif case == "no_positive":
        kwargs["positive"] = None
    elif case == "positives":
        extra["positive"] = [EMPTY, EMPTY]
    elif case == "grid_share":
        options["grid_share"] = 0.5
    monkeypatch.setattr(training_run, "attach_adapters", lambda *a, **k: pytest.fail("training started"))
    all_kwargs = node_kwargs(
        base, options, kwargs["images"], kwargs["depths"], kwargs["vae"], positive=kwargs.get("positive", EMPTY)
    )
    all_kwargs.update(extra)
    if case == "no_positive":
        all_kwargs.pop("positive", None)
    with pytest.raises(ValueError, match=match):
        comfy_nodes[NODE].execute(**all_kwargs)


def test_a_depth_model_refuses_plain_latents(pack, sd15) -> None:
    from d2f_host.depth import widen_model

    base, _ = sd15
    with pytest.raises(ValueError, match="this MODEL takes an image latent .* connect depth_images and depth_maps"):
        inputs = pack.train_inputs.TrainingInputs([{"samples": torch.zeros(1, 4, 8, 8)}], [EMPTY])
        pack.train_nodes.train_lora(widen_model(base), TrainConfig(steps=1), inputs)


# ---------------------------------------------------------------------- the CLI
@pytest.fixture(scope="module")
def pair_folder(tmp_path_factory) -> pathlib.Path:
    """Five image + depth pairs: 16-bit PNG depth, float .npy depth (with unknown pixels), two sizes."""
    root = tmp_path_factory.mktemp("depth_pairs")
    images, depths = pair_batch(5, (64, 64), seed=3)
    wide_images, wide_depths = pair_batch(1, (48, 96), seed=4)
    for i in range(5):
        Image.fromarray((images[i].numpy() * 255).round().astype(np.uint8)).save(root / f"p{i}.png")
        depth = depths[i, ..., 0].numpy()
        if i % 2:
            Image.fromarray((depth * 65535).round().astype(np.uint16)).save(root / f"p{i}.depth.png")
        else:
            depth = (1.0 + 9.0 * depth).astype(np.float32)
            depth[:4, :4] = np.nan
            np.save(root / f"p{i}.depth.npy", depth)
    (root / "sub").mkdir()
    Image.fromarray((wide_images[0].numpy() * 255).round().astype(np.uint8)).save(root / "sub" / "wide.png")
    Image.fromarray((wide_depths[0, ..., 0].numpy() * 65535).round().astype(np.uint16)).save(
        root / "sub" / "wide.depth.png"
    )
    return root


@pytest.fixture(scope="module")
def depth_cache(tiny_sd15_file, pair_folder, tmp_path_factory, fp32_text_encoder_module) -> pathlib.Path:
    cache = tmp_path_factory.mktemp("depth_cache")
    assert (
        main(
            [
                "prepare",
                "--dataset",
                str(pair_folder),
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


def test_cli_prepares_pairs_and_trains_a_depth_model_that_resumes_exactly(
    depth_cache, tiny_sd15_file, tmp_path, capsys, caplog
) -> None:
    from d2f_host.depth import widen_model
    from training.cache import load_cache

    cached = load_cache(depth_cache)
    assert cached.task == "depth" and len(cached.latents) == 6 and cached.sources[-1] == "sub/wide.png"
    assert all(c.shape == lat.shape for c, lat in zip(cached.concats, cached.latents))
    out = tmp_path / "run"
    base = [
        "train",
        "--cache",
        str(depth_cache),
        "--checkpoint",
        str(tiny_sd15_file),
        "--output",
        str(out),
        "--name",
        "depth",
    ]
    assert main([*base, *CLI_TRAIN, "--save-every", "2"]) == 0
    meta = read_lora_metadata(out / "depth.safetensors")
    assert (meta.task, meta.normalization, meta.sampling_steps, meta.sampling_cfg, meta.steps) == (
        "depth",
        DEPTH_NORMALIZATION,
        4,
        1.0,
        4,
    )
    with safe_open(str(out / "depth.safetensors"), "pt") as f:
        assert tuple(f.get_tensor(f"{CONV}.diff").shape) == (320, 8, 3, 3)
    # resumed to 6 steps == 6 steps straight
    assert (
        main(
            [
                "train",
                "--config",
                str(out / "depth.toml"),
                "--resume",
                str(out / "depth.d2fstate"),
                "--steps",
                "6",
                "--no-progress",
            ]
        )
        == 0
    )
    straight = tmp_path / "straight"
    assert (
        main(["train", "--config", str(out / "depth.toml"), "--output", str(straight), "--steps", "6", "--no-progress"])
        == 0
    )
    resumed_file, straight_file = load_file(out / "depth.safetensors"), load_file(straight / "depth.safetensors")
    assert resumed_file.keys() == straight_file.keys()
    for key in resumed_file:
        torch.testing.assert_close(resumed_file[key], straight_file[key], rtol=1e-5, atol=1e-6)
    # the file loads onto the widened base with every key used
    model, _, _ = comfy.sd.load_checkpoint_guess_config(str(tiny_sd15_file), output_vae=False, output_clip=False)[:3]
    caplog.set_level("INFO")
    loaded, _ = comfy.sd.load_lora_for_models(widen_model(model), None, resumed_file, 1.0, 0.0)
    assert not [line for line in caplog.text.splitlines() if any(p in line for p in LOAD_PROBLEMS)]
    assert f"{CONV}.weight" in loaded.patches


def test_cli_refuses_bad_pairs_before_loading_anything(
    pair_folder, depth_cache, tiny_sd15_file, tmp_path, capsys, monkeypatch
) -> None:
    import d2f_host.bootstrap

    monkeypatch.setattr(
        d2f_host.bootstrap, "bootstrap_comfyui", lambda **kw: pytest.fail("ComfyUI was loaded before the refusal")
    )
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("p0.png", "p0.depth.npy", "p1.png"):
        (broken / name).write_bytes((pair_folder / name).read_bytes())
    prepare = ["prepare", "--dataset", str(broken), "--checkpoint", str(tiny_sd15_file), "--cache", str(tmp_path / "c")]
    assert main(prepare) == 2
    assert "1 images have no depth map: p1.png" in capsys.readouterr().err
    Image.fromarray(np.zeros((32, 64), np.uint16)).save(broken / "p1.depth.png")
    assert main(prepare) == 2
    assert "p1.png is 64x64 but p1.depth.png is 64x32" in capsys.readouterr().err
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo\n", encoding="utf-8")
    assert (
        main(
            [
                "train",
                "--cache",
                str(depth_cache),
                "--checkpoint",
                str(tiny_sd15_file),
                "--output",
                str(tmp_path / "o"),
                "--preview-every",
                "2",
                "--sample-prompts",
                str(prompts),
            ]
        )
        == 2
    )
    assert "the cache holds image + depth pairs, and previews sample text prompts" in capsys.readouterr().err
    train = ["train", "--cache", str(depth_cache), "--checkpoint", str(tiny_sd15_file), "--output", str(tmp_path / "o")]
    assert main([*train, "--grid-share", "0.5"]) == 2
    assert "--grid-share: 0.5 places training sigmas on the 20-step image sampling grid" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="torch.distributed with gloo is not available")
def test_cli_torchrun_two_processes_train_the_depth_model_of_one(depth_cache, tiny_sd15_file, tmp_path) -> None:
    run_cli_in_one_and_two_processes(
        ["train", "--cache", depth_cache, "--checkpoint", tiny_sd15_file, *CLI_TRAIN], tmp_path
    )
    a, b = (
        load_file(tmp_path / "one" / "diff2flow_lora.safetensors"),
        load_file(tmp_path / "two" / "diff2flow_lora.safetensors"),
    )
    assert a.keys() == b.keys() and f"{CONV}.diff" in a
    for key in a:
        # as tests/test_comfy_cli.py's torchrun test: per tensor relative to its norm (float32 shard sums in
        # another order, carried by Adam's normalised updates); a wrong shard or a missing average moves O(1)
        ta, tb = a[key].double(), b[key].double()
        assert (ta - tb).norm() <= 5e-3 * ta.norm() + 1e-8, key
    assert a[f"{CONV}.diff"].abs().max() > 0
