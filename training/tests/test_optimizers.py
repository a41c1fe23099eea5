"""The optimizer registry (training/optimizers.py): every choice trains, changes the trajectory, resumes
exactly, and a choice whose package is missing is hidden and refused with the install command."""
from __future__ import annotations

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
    return TrainConfig(steps=6, batch_size=2, optimizer=name, learning_rate=LEARNING_RATES.get(name, 1e-3), seed=3,
                       **extra)


@pytest.mark.parametrize("name", [n for n in optimizers.OPTIMIZERS if n != "AdamW8bit"])
def test_every_optimizer_but_the_gpu_one_is_runnable_here(name: str) -> None:
    """The test environment installs every optimizer package (the `test` extra), so none is skipped
    silently; AdamW8bit (bitsandbytes, a GPU library) is optional."""
    assert optimizers.OPTIMIZERS[name].missing() is None


@pytest.mark.parametrize("name", runnable())
def test_each_optimizer_is_the_one_that_trains(name: str) -> None:
    trainer, _, _ = make_run(config_for(name))
    assert type(trainer.optimizer).__name__ == ("Adam" if name == "Adam" else name if name != "AdamW8bit" else "AdamW8bit")
    before = params(trainer.adapters)
    trainer.run()
    after = params(trainer.adapters)
    assert any(not torch.equal(before[k], after[k]) for k in before) and all(torch.isfinite(v).all() for v in after.values())


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


def test_the_cli_refuses_a_missing_optimizer_before_any_compute(monkeypatch, capsys) -> None:
    from training.cli import main

    monkeypatch.setitem(optimizers.OPTIMIZERS, "Lion", optimizers.Optimizer("Lion", "absent", lambda p, lr, wd: None,
                                                                            "no_such_module_d2f", "lion-pytorch"))
    assert main(["train", "--cache", "c", "--checkpoint", "m", "--output", "o", "--optimizer", "Lion"]) == 2
    assert "--optimizer Lion: optimizer Lion needs lion-pytorch: pip install 'lion-pytorch'" in capsys.readouterr().err
