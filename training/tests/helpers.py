"""A tiny pure-PyTorch denoiser with LoRA adapters for the engine tests (no ComfyUI)."""

from __future__ import annotations

import pytest
import torch

import d2f_core
from d2f_core.lora import attach_parametrizations, make_adapter, select_target_modules
from d2f_core.tests.nets import TinyDenoiser
from training import TrainConfig, Trainer, TrainingData
from training.data import hold_out


class CondNet(torch.nn.Module):
    """TinyDenoiser called as net(x, t, context=...) like an SD UNet."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.inner = TinyDenoiser(channels=4, width=16, cond_dim=4)

    def forward(self, x, t, context=None):
        return self.inner(x, t, None if context is None else context.mean(1))


class ConcatNet(CondNet):
    """An image-conditioned CondNet: the clean image latent ``concat`` [B, 4, H, W] is appended after the
    input's channels (as ``d2f_host.unet.unet_network`` does for a widened UNet); the output keeps 4."""

    def __init__(self, seed: int = 0) -> None:
        torch.nn.Module.__init__(self)
        torch.manual_seed(seed)
        self.inner = TinyDenoiser(channels=8, width=16, cond_dim=4)

    def forward(self, x, t, context=None, concat=None):
        if concat is None:
            raise TypeError("an image-conditioned network needs concat")
        return self.inner(torch.cat([x, concat.to(x)], dim=1), t, None if context is None else context.mean(1))[:, :4]


def adapted_net(config: TrainConfig, model_seed: int = 0, concat: bool = False) -> tuple[CondNet, dict]:
    """A frozen tiny CondNet (ConcatNet with ``concat``) with fresh ``config`` adapters on every layer (fixed seeds)."""
    net = ConcatNet(model_seed) if concat else CondNet(model_seed)
    net.requires_grad_(False)
    modules = select_target_modules(net, "all")
    gen = torch.Generator().manual_seed(123)
    adapters = {
        name: make_adapter(config.algorithm, m.weight.shape, config.rank, config.alpha, gen, weight=m.weight)
        for name, m in modules.items()
    }
    attach_parametrizations(modules, adapters)
    return net, adapters


def make_run(config: TrainConfig, prediction: str = "eps", n: int = 4, model_seed: int = 0, concat: bool = False):
    """(trainer, net, adapters) on a fixed handful of 8x8 latents; with ``concat`` an image-conditioned
    ConcatNet on latents that each carry a fixed image latent (the per-sample ``"concat"``); with
    ``config.validation_split`` that fraction held out as the validation samples (as the host does)."""
    net, adapters = adapted_net(config, model_seed, concat)
    data_gen = torch.Generator().manual_seed(7)
    latents = [torch.randn(4, 8, 8, generator=data_gen) for _ in range(n)]
    conds = [{"context": torch.randn(1, 3, 4, generator=data_gen)} for _ in range(n)]
    # objectives that train on (noise, image) pairs get a fixed noise per latent, as a pairs folder holds
    extras = (
        [{"noise": torch.randn(4, 8, 8, generator=data_gen)} for _ in range(n)]
        if d2f_core.get_objective(config.objective).paired_noise
        else None
    )
    if concat:
        images = [torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(100 + i)) for i in range(n)]
        extras = [{**(e or {}), "concat": c} for e, c in zip(extras or [None] * n, images)]
    data = TrainingData(latents, conds, uncond={"context": torch.zeros(1, 3, 4)}, extras=extras)
    ac = d2f_core.scaled_linear()
    if config.zero_terminal_snr:
        ac = d2f_core.rescale_zero_terminal_snr(ac)
    d2f = d2f_core.Diff2Flow(ac, prediction)
    validation = None
    if config.validation_split > 0:
        data, validation = hold_out(data, config.validation_split)
    return Trainer(net, adapters, d2f, config, data, validation=validation), net, adapters


def straight_and_resumed(config: TrainConfig, folder, at: int):
    """(straight, resumed): ``config.steps`` straight steps, and ``at`` steps + a saved and
    reloaded training state + the rest, each a fresh run of the same config."""
    from training.files import load_training_state, save_training_state

    straight, _, _ = make_run(config)
    straight.run()
    half, _, _ = make_run(config)
    half.config = TrainConfig(**{**config.to_dict(), "steps": at})
    half.run()
    save_training_state(folder / "run.d2fstate", half.state_dict())
    resumed, _, _ = make_run(config)
    resumed.load_state_dict(load_training_state(folder / "run.d2fstate"))
    assert resumed.step == at
    resumed.run()
    return straight, resumed


def assert_resume_equals_straight(config: TrainConfig, folder, at: int) -> None:
    """A run of ``config`` resumed from its state at step ``at`` ends as the straight run does: the same
    losses and adapter weights (:func:`straight_and_resumed`)."""
    straight, resumed = straight_and_resumed(config, folder, at)
    assert resumed.losses == pytest.approx(straight.losses, rel=1e-6)
    for name in straight.adapters:
        for pa, pb in zip(straight.adapters[name].parameters(), resumed.adapters[name].parameters()):
            torch.testing.assert_close(pa, pb, rtol=1e-6, atol=1e-7)


def params(adapters: dict) -> dict[str, torch.Tensor]:
    """Copies of every adapter parameter, by ``<module>.<parameter>``."""
    return {f"{n}.{k}": p.detach().clone() for n, a in adapters.items() for k, p in a.named_parameters()}


def assert_equal(a: dict, b: dict) -> None:
    """Bit-identical tensors under the same keys."""
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
