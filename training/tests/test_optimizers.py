"""The optimizer registry (training/optimizers.py): every choice trains, changes the trajectory, resumes
exactly, and a choice whose package is missing is hidden and refused with the install command."""

from __future__ import annotations

import inspect

import pytest
import torch

import training.optimizers as optimizers
from training import TrainConfig
from training.config import available_choices, option_specs
from training.tests.helpers import make_run, params, straight_and_resumed

LEARNING_RATES = {"Prodigy": 1.0, "Lion": 3e-4}  # their documented scales; the others at the AdamW one


def runnable() -> list[str]:
    return list(optimizers.available_optimizers())


def config_for(name: str, **extra) -> TrainConfig:
    if optimizers.OPTIMIZERS[name].schedule_free:
        extra["lr_schedule"] = "constant"  # it replaces the schedule (warmup_steps still apply)
    options = dict(steps=6, batch_size=2, optimizer=name, learning_rate=LEARNING_RATES.get(name, 1e-3), seed=3)
    return TrainConfig(**{**options, **extra})


@pytest.mark.parametrize("name", [n for n in optimizers.OPTIMIZERS if n != "AdamW8bit"])
def test_every_optimizer_but_the_gpu_one_is_runnable_here(name: str) -> None:
    """The test environment installs every optimizer package (the `test` extra), so none is skipped
    silently; AdamW8bit (bitsandbytes, a GPU library) is optional."""
    assert optimizers.OPTIMIZERS[name].missing() is None


@pytest.mark.parametrize("name", runnable())
def test_default_learning_rate_is_the_installed_packages_default(name: str) -> None:
    """``default_learning_rate`` is the ``lr`` default of the class the record builds, read from the installed
    package's own signature (AdamW8bit, not installed here, cites bitsandbytes' documentation instead)."""
    built = optimizers.OPTIMIZERS[name].build([torch.nn.Parameter(torch.zeros(2, 2))], 0.5, 0.0)
    documented = inspect.signature(type(built)).parameters["lr"].default
    assert isinstance(documented, float), f"{type(built).__qualname__} has no float default lr: {documented!r}"
    assert optimizers.OPTIMIZERS[name].default_learning_rate == documented


def test_every_optimizer_names_a_positive_default_learning_rate() -> None:
    missing = [n for n, o in optimizers.OPTIMIZERS.items() if not (o.default_learning_rate or 0) > 0]
    assert not missing, f"no default_learning_rate for {missing}"


@pytest.mark.parametrize("name", runnable())
def test_each_optimizer_is_the_one_that_trains(name: str) -> None:
    trainer, _, _ = make_run(config_for(name))
    assert type(trainer.optimizer).__name__ == name
    before = params(trainer.adapters)
    trainer.run()
    after = params(trainer.adapters)
    assert any(not torch.equal(before[k], after[k]) for k in before) and all(
        torch.isfinite(v).all() for v in after.values()
    )


@pytest.mark.parametrize("name", runnable())
def test_resume_equals_straight_run_for_every_optimizer(tmp_path, name: str) -> None:
    """The optimizer's own state (moments, Prodigy's step-size estimate, ...) is part of the training state."""
    straight, resumed = straight_and_resumed(config_for(name, lr_schedule="cosine", warmup_steps=1), tmp_path, at=3)
    assert resumed.losses == pytest.approx(straight.losses, rel=1e-6)
    a, b = params(straight.adapters), params(resumed.adapters)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-6, atol=1e-7)


def test_a_missing_package_is_hidden_and_refused_with_the_install_command(monkeypatch) -> None:
    import builtins

    real_import = builtins.__import__

    def no_prodigy(name, *args, **kwargs):
        if name == "prodigyopt":
            raise ImportError("No module named 'prodigyopt'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_prodigy)
    monkeypatch.setattr(optimizers.importlib, "import_module", lambda name: no_prodigy(name))
    spec = next(s for s in option_specs() if s.name == "optimizer")
    assert "Prodigy" not in available_choices(spec) and "AdamW" in available_choices(spec)
    with pytest.raises(ValueError, match=r"optimizer Prodigy needs prodigyopt: pip install 'prodigyopt'"):
        make_run(config_for("Prodigy"))


# ---------------------------------------------------------------------- schedule-free: its evaluation weights
def evaluation_params(trainer) -> dict[str, torch.Tensor]:
    """The adapters' weights in the optimizer's eval() mode, read by switching the trainer's own optimizer
    (the trainer is not used afterwards)."""
    trainer.optimizer.eval()
    return params(trainer.adapters)


def test_schedule_free_saves_its_evaluation_weights_and_trains_on_the_others() -> None:
    from d2f_core.lora import adapters_state_dict

    trainer, _, _ = make_run(config_for("AdamWScheduleFree"))
    trainer.run()
    training = params(trainer.adapters)
    saved = trainer.lora_state_dict()
    assert all(torch.equal(training[k], v) for k, v in params(trainer.adapters).items())  # restored after the save
    evaluation = evaluation_params(trainer)
    assert any(not torch.equal(training[k], evaluation[k]) for k in training)  # two different weight sequences
    expected = adapters_state_dict(trainer.adapters)
    assert saved.keys() == expected.keys() and all(torch.equal(saved[k], expected[k]) for k in saved)


def test_schedule_free_saves_previews_and_ema_never_change_the_training() -> None:
    """Saving, previewing and averaging switch to the evaluation weights and back bit-exactly: a run that
    does all of them every step trains the same weights as one that does none."""
    plain, _, _ = make_run(config_for("AdamWScheduleFree", steps=4))
    plain.run()
    busy, _, _ = make_run(config_for("AdamWScheduleFree", steps=4, save_every=1, preview_every=1))

    def preview(trainer) -> None:
        with trainer.sampling_weights():
            pass

    busy.run(save=lambda t: t.lora_state_dict(), preview=preview)
    a, b = params(plain.adapters), params(busy.adapters)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_schedule_free_ema_averages_the_evaluation_weights() -> None:
    """EMA_t = d EMA_{t-1} + (1 - d) x_t with x_t the evaluation weights, read here from the optimizer's own
    state (schedulefree's eval() sets p to lerp(y, z, 1 - 1 / beta1)); from step 2 on x_t != y_t."""
    trainer, _, _ = make_run(config_for("AdamWScheduleFree", steps=3, ema_decay=0.9, ema_warmup=False))
    expected = params(trainer.adapters)
    beta1 = trainer.optimizer.param_groups[0]["betas"][0]
    names = [f"{n}.{k}" for n, a in trainer.adapters.items() for k, _ in a.named_parameters()]
    for _ in range(3):
        trainer.train_step()
        live = dict(zip(names, (p for a in trainer.adapters.values() for p in a.parameters())))
        for key, p in live.items():
            x = p.detach().lerp(trainer.optimizer.state[p]["z"], 1 - 1 / beta1)
            expected[key] = 0.9 * expected[key] + 0.1 * x
    ema = {f"{n}.{k}": p for n, a in trainer.ema.adapters.items() for k, p in a.named_parameters()}
    for key in expected:
        torch.testing.assert_close(ema[key], expected[key], rtol=1e-5, atol=1e-7)


def test_schedule_free_refuses_a_decay_schedule() -> None:
    with pytest.raises(
        ValueError, match="optimizer AdamWScheduleFree replaces the learning-rate schedule: set lr_schedule constant"
    ):
        TrainConfig(optimizer="AdamWScheduleFree", lr_schedule="cosine")
