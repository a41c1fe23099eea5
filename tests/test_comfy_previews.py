"""Train Diff2Flow LoRA's previews (``preview_*`` options, ``vae`` / ``preview_prompts`` inputs, the
``previews`` IMAGE output and the progress preview on the node) in a real ComfyUI 0.8.0, on the
SD1.5-shaped random-weight checkpoint (its TAESD decodes)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from comfy_harness import require_comfyui

require_comfyui()

import comfy.utils  # noqa: E402

import d2f_core  # noqa: E402
from training import TrainConfig  # noqa: E402

NODE = "D2F_TrainLoRA"
PREVIEWS = dict(preview_width=64, preview_height=64, preview_steps=3, preview_cfg=2.0, preview_seed=5)
BASE = dict(steps=4, batch_size=2, rank=4, learning_rate=1e-2, targets="attention", seed=3)


@pytest.fixture(scope="module")
def sd15(tiny_sd15_file):
    import comfy.sd

    model, _, vae = comfy.sd.load_checkpoint_guess_config(str(tiny_sd15_file), output_clip=False)[:3]
    return model, vae


def conditioning(seed: int) -> list:
    return [[torch.randn(1, 77, 768, generator=torch.Generator().manual_seed(seed)), {}]]


def node_inputs(
    comfy_nodes, model, vae, options: dict, prompts: int = 2, negative: bool = True, output_name: str = "previews"
) -> dict:
    """The node's keyword arguments (input lists, as ComfyUI passes them) for TrainConfig-named options."""
    gen = torch.Generator().manual_seed(0)
    kwargs = {
        "model": [model],
        "latents": [{"samples": torch.randn(2, 4, 8, 8, generator=gen) * 3}],
        "positive": [conditioning(1), conditioning(2)],
        "output_name": [output_name],
        "resume_from": ["None"],
    }
    if negative:
        kwargs["negative"] = [[[torch.zeros(1, 77, 768), {}]]]
    if vae is not None:
        kwargs["vae"] = [vae]
    if prompts:
        kwargs["preview_prompts"] = [conditioning(100 + i) for i in range(prompts)]
    kwargs.update({k: [v] for k, v in TrainConfig(**options).to_dict().items()})
    return kwargs


def run(comfy_nodes, *args, **kw):
    return comfy_nodes[NODE].execute(**node_inputs(comfy_nodes, *args, **kw)).args


def reference_image(model, vae, cond: torch.Tensor, uncond: torch.Tensor, seed: int) -> torch.Tensor:
    """An ordinary FM Euler sample of the base model (d2f_core's sampler, the `sample` CLI's path), decoded."""
    from d2f_host.model_sampling import alignment_of
    from d2f_host.unet import inference_network

    network, device = inference_network(model)
    d2f = alignment_of(model, False)
    sigmas = d2f_core.fm_sigmas(3, sigma_max=d2f.sigma_max)
    noise = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(seed))
    velocity = d2f.velocity_fn(lambda x, t, c: network(x, t, **c))
    guided = d2f_core.cfg_velocity(velocity, {"context": cond}, {"context": uncond}, 2.0)
    latent = d2f_core.sample_euler(guided, float(sigmas[0]) * noise.to(device), sigmas)
    return vae.decode(model.model.process_latent_out(latent.cpu().float()))[0].float().clamp(0, 1)


def test_previews_are_samples_shown_on_the_node_and_output_without_changing_training(
    comfy_nodes, sd15, loras_dir, monkeypatch
) -> None:
    model, vae = sd15
    shown = []

    def hook(value, total, preview, node_id=None):  # ComfyUI's progress hook (main.py); it sends `preview`
        if preview is not None:
            shown.append((value, total, preview))

    monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_HOOK", hook)
    _, plain, _, steps, off = run(comfy_nodes, model, vae, BASE, output_name="plain")
    assert steps == 4 and off.shape == (1, 1, 1, 3) and not shown  # previews off: the 1x1 placeholder, nothing shown
    _, lora, _, _, grids = run(comfy_nodes, model, vae, {**BASE, **PREVIEWS, "preview_every": 2})
    assert grids.shape == (3, 64, 128, 3)  # steps 0, 2, 4; two prompts side by side
    assert [(v, t) for v, t, _ in shown] == [(0, 4), (2, 4), (4, 4)]
    for (_, _, (kind, image, size)), grid in zip(shown, grids):
        assert kind == "JPEG" and image.size == (128, 64) and isinstance(size, int)
        assert abs(float(np.asarray(image, dtype=np.float32).mean()) / 255 - grid.mean()) < 0.02
    assert plain.keys() == lora.keys() and all(torch.equal(plain[k], lora[k]) for k in plain), (
        "previews changed training"
    )
    # step 0 is an ordinary sample of the base model with the same seed (prompt i: seed + i)
    for i in range(2):
        expected = reference_image(model, vae, conditioning(100 + i)[0][0], torch.zeros(1, 77, 768), 5 + i)
        torch.testing.assert_close(grids[0, :, 64 * i : 64 * (i + 1)], expected, rtol=0, atol=2e-4)
    assert not torch.equal(grids[0], grids[2]), "the previews do not follow the training"


def test_ema_previews_show_the_ema_weights_and_keep_the_raw_ones(comfy_nodes, sd15, loras_dir) -> None:
    from safetensors.torch import load_file

    model, vae = sd15
    options = {**BASE, **PREVIEWS, "preview_every": 4}
    _, raw, _, _, plain = run(comfy_nodes, model, vae, options, output_name="plain")
    _, ema, _, _, averaged = run(
        comfy_nodes, model, vae, {**options, "ema_decay": 0.9, "save_raw": True}, output_name="ema"
    )
    assert torch.equal(plain[0], averaged[0])  # step 0: the EMA is the initial weights
    assert not torch.equal(plain[1], averaged[1]), "the step-4 preview ignores the EMA weights"
    raw_file = load_file(loras_dir / "ema_raw.safetensors")  # written after the last preview: the restored weights
    assert all(torch.equal(raw_file[k], raw[k]) for k in raw)


def test_previews_refuse_missing_inputs_before_training(comfy_nodes, sd15, loras_dir) -> None:
    model, vae = sd15
    on = {**BASE, **PREVIEWS, "preview_every": 2}
    with pytest.raises(ValueError, match="connect the vae input"):
        run(comfy_nodes, model, None, on)
    with pytest.raises(ValueError, match="connect preview_prompts"):
        run(comfy_nodes, model, vae, on, prompts=0)
    with pytest.raises(ValueError, match="connect negative .* or set preview_cfg 1"):
        run(comfy_nodes, model, vae, on, negative=False)
    assert not list(loras_dir.iterdir())  # nothing was trained or saved


def test_preview_inputs_with_previews_off_are_named_in_a_warning(comfy_nodes, sd15, loras_dir, caplog) -> None:
    """vae and preview_prompts connected with preview_every 0 serve nothing: the run says so (it still trains)."""
    import logging

    model, vae = sd15
    with caplog.at_level(logging.WARNING, logger="diff2flow"):
        assert run(comfy_nodes, model, vae, {**BASE, "steps": 1})[3] == 1
    assert "preview_prompts and vae are connected but preview_every is 0" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="diff2flow"):
        run(comfy_nodes, model, None, {**BASE, "steps": 1}, prompts=0, output_name="plain")
    assert "preview_every is 0" not in caplog.text
