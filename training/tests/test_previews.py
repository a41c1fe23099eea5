"""Sample previews while training (``preview_*`` options, training/previews.py) on the tiny pure-PyTorch model."""

from __future__ import annotations

import pytest
import torch

import d2f_core
from training import TrainConfig
from training.files import load_training_state, save_training_state
from training.previews import Preview, Previewer, PreviewSettings, image_grid
from training.tests.helpers import CondNet, assert_equal, make_run, params

BASE = dict(
    batch_size=2,
    learning_rate=1e-2,
    seed=3,
    preview_width=64,
    preview_height=64,
    preview_steps=4,
    preview_cfg=2.0,
    preview_seed=11,
)
PROMPTS = [{"context": torch.randn(1, 3, 4, generator=torch.Generator().manual_seed(s))} for s in (1, 2, 3)]
UNCOND = {"context": torch.zeros(1, 3, 4)}


def decode(latents: torch.Tensor) -> torch.Tensor:
    """A stand-in VAE: the first three latent channels squashed into [0, 1], as [B, H, W, 3]."""
    return torch.sigmoid(latents[:, :3]).permute(0, 2, 3, 1)


def previewer(config: TrainConfig, **kw) -> Previewer:
    return Previewer(PreviewSettings.from_config(config), PROMPTS, UNCOND, decode, 4, **kw)


def reference_sample(net, d2f: d2f_core.Diff2Flow, prompt: dict, seed: int, steps: int, cfg: float) -> torch.Tensor:
    """An ordinary FM Euler sample of ``net`` (d2f_core alone, as `python -m training sample` does)."""
    sigmas = d2f_core.fm_sigmas(steps, sigma_max=d2f.sigma_max)
    noise = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(seed))
    velocity = d2f.velocity_fn(lambda x, t, c: net(x, t, **c))
    return d2f_core.sample_euler(d2f_core.cfg_velocity(velocity, prompt, UNCOND, cfg), float(sigmas[0]) * noise, sigmas)


def test_preview_at_step_0_is_an_ordinary_sample_of_the_base_model() -> None:
    config = TrainConfig(steps=2, preview_every=5, **BASE)
    trainer, _, _ = make_run(config)
    made = previewer(config)(trainer)
    assert made.step == 0
    # LoRA starts as the identity (its up matrix is 0): the step-0 network is the base model without adapters
    base = CondNet(0)
    expected = torch.cat([reference_sample(base, trainer.d2f, p, 11 + i, 4, 2.0) for i, p in enumerate(PROMPTS)])
    torch.testing.assert_close(made.grid, image_grid(decode(expected)), rtol=1e-5, atol=1e-6)
    # and the seed is honoured: another seed, another image
    other = Previewer(
        PreviewSettings.from_config(TrainConfig(**{**config.to_dict(), "preview_seed": 12})), PROMPTS, UNCOND, decode, 4
    )(trainer)
    assert not torch.equal(other.grid, made.grid)


def test_steps_and_cfg_default_to_the_objectives_recommendation() -> None:
    settings = PreviewSettings.from_config(TrainConfig(preview_every=1))
    assert (settings.steps, settings.cfg) == (
        d2f_core.OBJECTIVES["diff2flow"].steps,
        d2f_core.OBJECTIVES["diff2flow"].cfg,
    )
    reflow = PreviewSettings.from_config(TrainConfig(objective="reflow", preview_every=1))
    assert (reflow.steps, reflow.cfg) == (2, 1.0)
    assert PreviewSettings.from_config(TrainConfig(preview_steps=3, preview_cfg=7.0)).steps == 3


@pytest.mark.parametrize("ema_decay", [0.0, 0.9])
def test_previews_never_change_the_training(ema_decay: float) -> None:
    config = TrainConfig(steps=6, preview_every=2, ema_decay=ema_decay, **BASE)
    plain, _, plain_adapters = make_run(config)
    plain.run()
    with_previews, _, adapters = make_run(config)
    seen = previewer(config)
    rng = torch.get_rng_state()
    with_previews.run(preview=seen)
    assert [p.step for p in seen.previews] == [0, 2, 4, 6]
    assert torch.equal(torch.get_rng_state(), rng), "a preview used the global RNG"
    assert with_previews.losses == plain.losses
    assert_equal(params(adapters), params(plain_adapters))
    if ema_decay:
        assert_equal(params(with_previews.ema.adapters), params(plain.ema.adapters))
    assert torch.equal(with_previews.generator.get_state(), plain.generator.get_state())


def test_resume_with_previews_equals_a_straight_run(tmp_path) -> None:
    config = TrainConfig(steps=6, preview_every=2, ema_decay=0.9, **BASE)
    straight, _, straight_adapters = make_run(config)
    straight_previews = previewer(config)
    straight.run(preview=straight_previews)
    half, _, _ = make_run(config)
    half.config = TrainConfig(**{**config.to_dict(), "steps": 3})
    half.run(preview=previewer(config))
    save_training_state(tmp_path / "run.d2fstate", half.state_dict())
    resumed, _, resumed_adapters = make_run(config)
    resumed.load_state_dict(load_training_state(tmp_path / "run.d2fstate"))
    resumed_previews = previewer(config)
    resumed.run(preview=resumed_previews)
    assert_equal(params(resumed_adapters), params(straight_adapters))
    assert [p.step for p in resumed_previews.previews] == [4, 6]  # not again at the resume step
    for made in resumed_previews.previews:
        (same,) = [p for p in straight_previews.previews if p.step == made.step]
        assert torch.equal(made.grid, same.grid)


def test_ema_previews_use_the_ema_weights_and_restore_the_raw_ones() -> None:
    shown: dict[float, Preview] = {}
    for decay in (0.0, 0.9):
        config = TrainConfig(steps=5, ema_decay=decay, preview_every=5, **BASE)
        trainer, net, adapters = make_run(config)
        trainer.run()
        raw = params(adapters)
        shown[decay] = previewer(config)(trainer)
        assert_equal(params(adapters), raw)  # bit-exact restore
        if decay:
            # the preview is the network with the EMA weights: copy them in by hand and sample
            with torch.no_grad():
                for a, e in zip(adapters.values(), trainer.ema.adapters.values()):
                    for p, q in zip(a.parameters(), e.parameters()):
                        p.copy_(q)
            expected = torch.cat([reference_sample(net, trainer.d2f, p, 11 + i, 4, 2.0) for i, p in enumerate(PROMPTS)])
            torch.testing.assert_close(shown[decay].grid, image_grid(decode(expected)), rtol=1e-5, atol=1e-6)
    # same raw trajectory (EMA never changes training), different previews
    assert not torch.equal(shown[0.0].grid, shown[0.9].grid)


def test_sampling_weights_restores_the_raw_weights_after_an_error() -> None:
    trainer, _, adapters = make_run(TrainConfig(steps=3, ema_decay=0.9, **BASE))
    trainer.run()
    raw = params(adapters)
    with pytest.raises(RuntimeError, match="boom"):
        with trainer.sampling_weights():
            assert not all(torch.equal(a, b) for a, b in zip(params(adapters).values(), raw.values()))
            raise RuntimeError("boom")
    assert_equal(params(adapters), raw)


def test_bad_preview_options_are_named() -> None:
    with pytest.raises(ValueError, match="preview_width must be a multiple of 8"):
        TrainConfig(preview_width=100)
    with pytest.raises(ValueError, match="preview_every must be an integer >= 0"):
        TrainConfig(preview_every=-1)
    with pytest.raises(ValueError, match="negative .*preview_cfg 1"):
        Previewer(PreviewSettings.from_config(TrainConfig(preview_every=1, preview_cfg=3.0)), PROMPTS, None, decode, 4)
    with pytest.raises(ValueError, match="at least one prompt"):
        Previewer(PreviewSettings.from_config(TrainConfig(preview_every=1)), [], UNCOND, decode, 4)


def test_image_grid_layout() -> None:
    images = torch.rand(5, 2, 3, 3)
    grid = image_grid(images)
    assert grid.shape == (2 * 2, 3 * 3, 3)  # 3 columns, 2 rows
    assert torch.equal(grid[2:4, 3:6], images[4]) and torch.equal(grid[2:4, 6:9], torch.zeros(2, 3, 3))
