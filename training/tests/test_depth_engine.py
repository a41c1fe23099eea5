"""The engine on image-conditioned data (a depth model's): each sample's ``concat`` latent reaches the
network beside the noisy input, the loss is the registry's with it, caption dropout never drops it,
resume is exact and two torchrun processes train what one does (tiny pure-PyTorch model, no ComfyUI).
Convention (docs/MATH.md section 1): FM sigma in [0, 1], sigma = 1 is noise."""

from __future__ import annotations

import pytest
import torch

import d2f_core
from training import TrainConfig, Trainer, TrainingData
from training.tests.helpers import make_run, straight_and_resumed


@pytest.mark.parametrize("objective", [n for n, o in d2f_core.OBJECTIVES.items() if not o.paired_noise])
def test_loss_is_the_objectives_with_the_image_latent(objective: str) -> None:
    """The engine's first loss is ``d2f_core``'s for the same draws with the batch's image latents as
    ``concat`` (its hand-written references: d2f_core/tests/test_depth.py); other image latents give
    another loss, so the engine passes the data's own."""
    config = TrainConfig(objective=objective, steps=1, batch_size=2, seed=5)
    trainer, net, _ = make_run(config, "v", concat=True)
    gen = torch.Generator().manual_seed(5)
    indices = trainer.data.draw_indices(2, gen)
    x0, cond = trainer.data.batch(indices)
    concat = trainer.data.batch_extras(indices)["concat"]
    reference = d2f_core.objective_loss(
        objective, net, trainer.d2f, x0, generator=_copy(gen), concat=concat, **cond
    ).loss.item()
    other = d2f_core.objective_loss(
        objective, net, trainer.d2f, x0, generator=_copy(gen), concat=torch.zeros_like(concat), **cond
    ).loss.item()
    assert trainer.train_step() == pytest.approx(reference, rel=1e-6)
    assert abs(other - reference) > 1e-4 * abs(reference)


def _copy(gen: torch.Generator) -> torch.Generator:
    copy = torch.Generator()
    copy.set_state(gen.get_state())
    return copy


def test_caption_dropout_never_drops_the_image_latent() -> None:
    config = TrainConfig(steps=6, batch_size=2, caption_dropout=0.9, seed=2)
    trainer, net, _ = make_run(config, "eps", concat=True)
    calls = []
    inner = trainer.network

    def recording(x, t, context=None, concat=None):
        calls.append((context.detach().clone(), concat.detach().clone()))
        return inner(x, t, context=context, concat=concat)

    trainer.network = recording
    trainer.run()
    images = torch.stack([e["concat"] for e in trainer.data.extras])
    dropped = 0
    for context, concat in calls:
        for row in concat:  # every sample's image latent is one of the data's, never the empty one
            assert min(float((row - image).abs().max()) for image in images) == 0.0
        dropped += int((context == 0).all(dim=(1, 2)).sum())
    assert dropped > 0, "caption dropout never fired: the test checks nothing"


def test_resume_equals_straight_run_with_image_latents(tmp_path, monkeypatch) -> None:
    import training.tests.helpers as helpers

    config = TrainConfig(steps=6, batch_size=2, learning_rate=1e-3, algorithm="Full", seed=3, grad_accumulation=2)
    plain = helpers.make_run
    monkeypatch.setattr(helpers, "make_run", lambda cfg, *a, **k: plain(cfg, *a, concat=True, **k))
    straight, resumed = straight_and_resumed(config, tmp_path, at=3)
    assert "concat" in straight.data.extras[0]
    assert resumed.losses == pytest.approx(straight.losses, rel=1e-6)
    for name in straight.adapters:
        for a, b in zip(straight.adapters[name].parameters(), resumed.adapters[name].parameters()):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_image_latents_of_another_size_are_refused() -> None:
    latents = [torch.zeros(4, 8, 8)]
    with pytest.raises(
        ValueError, match="sample 0: its image latent \\(concat\\) of shape \\(4, 8, 6\\) does not match"
    ):
        TrainingData(latents, [{"context": torch.zeros(1, 3, 4)}], extras=[{"concat": torch.zeros(4, 8, 6)}])


def test_a_network_without_concat_fails_on_image_conditioned_data() -> None:
    """The image latent is an argument, not a silent extra: a plain network refuses it (TypeError)."""
    trainer, _, adapters = make_run(TrainConfig(steps=1, batch_size=2), concat=True)
    plain, _, _ = make_run(TrainConfig(steps=1, batch_size=2))
    with pytest.raises(TypeError, match="concat"):
        Trainer(plain.network, plain.adapters, trainer.d2f, trainer.config, trainer.data).train_step()
