"""EMA of the adapter weights (``ema_decay``, ``ema_warmup``, ``save_raw``) on the tiny pure-PyTorch model."""

from __future__ import annotations

import pytest
import torch

from d2f_core.lora import ALGORITHMS, adapters_state_dict
from training import TrainConfig, TrainingError
from training.tests.helpers import assert_equal, make_run, params, straight_and_resumed

BASE = dict(batch_size=2, learning_rate=1e-2, seed=3)


@pytest.mark.parametrize("warmup", [True, False])
def test_ema_update_rule_equals_hand_computation_over_3_steps(warmup: bool) -> None:
    decay = 0.9
    trainer, _, adapters = make_run(TrainConfig(steps=3, ema_decay=decay, ema_warmup=warmup, **BASE))
    thetas = [params(adapters)]  # theta_0: the initial weights
    for _ in range(3):
        trainer.train_step()
        thetas.append(params(adapters))
    # the documented rule, in float64: EMA_0 = theta_0, EMA_t = d_t EMA_{t-1} + (1 - d_t) theta_t
    expected = {k: v.double() for k, v in thetas[0].items()}
    for t in (1, 2, 3):
        d = min(decay, (1 + t) / (10 + t)) if warmup else decay
        expected = {k: d * expected[k] + (1 - d) * thetas[t][k].double() for k in expected}
    got = params(trainer.ema.adapters)
    assert got.keys() == expected.keys()
    for k in expected:
        torch.testing.assert_close(got[k].double(), expected[k], rtol=1e-6, atol=1e-7)
    assert any(not torch.equal(got[k], thetas[3][k]) for k in got), "the EMA is just the raw weights"
    assert trainer.saved_adapters() is trainer.ema.adapters
    assert trainer.ema.decay_at(1) == (pytest.approx(2 / 11) if warmup else decay)


def test_ema_off_makes_the_ema_options_inert_and_ema_on_never_changes_the_trained_weights() -> None:
    """With ema_decay 0 (the default) ema_warmup and save_raw change nothing: the losses, the weights, the
    training state and the LoRA are the default config's. EMA on trains the same raw weights bit for bit."""
    plain, _, raw_plain = make_run(TrainConfig(steps=5, **BASE))
    off, _, raw_off = make_run(TrainConfig(steps=5, ema_decay=0.0, ema_warmup=False, save_raw=True, **BASE))
    on, _, raw_on = make_run(TrainConfig(steps=5, ema_decay=0.95, **BASE))
    runs = [t.run().losses for t in (plain, off, on)]
    assert runs[0] == runs[1] == runs[2]  # bit-identical losses
    assert_equal(params(raw_plain), params(raw_off))
    assert_equal(params(raw_plain), params(raw_on))
    assert off.ema is None and off.saved_adapters() is off.adapters and not off.saves_raw
    assert "ema" not in off.state_dict() and set(off.state_dict()) == set(plain.state_dict())
    assert_equal(off.lora_state_dict(), adapters_state_dict(raw_plain))
    assert_equal(off.lora_state_dict(raw=True), off.lora_state_dict())


@pytest.mark.parametrize("algorithm", list(ALGORITHMS))
def test_resume_with_ema_equals_straight_run(tmp_path, algorithm: str) -> None:
    """AdapterEMA averages whatever parameters an adapter has (DoRA's magnitude, OFT's blocks, ...)."""
    config = TrainConfig(steps=8, ema_decay=0.8, grad_accumulation=2, caption_dropout=0.3, algorithm=algorithm, **BASE)
    straight, resumed = straight_and_resumed(config, tmp_path, at=4)
    assert resumed.losses == straight.losses
    assert_equal(params(resumed.adapters), params(straight.adapters))
    assert_equal(params(resumed.ema.adapters), params(straight.ema.adapters))  # bit for bit on the CPU
    assert_equal(resumed.ema.state_dict(), straight.ema.state_dict())
    ema, raw = params(straight.ema.adapters), params(straight.adapters)
    averaged = {k for k in raw if not torch.equal(ema[k], raw[k])}
    assert averaged == set(raw), f"parameters the EMA does not average: {sorted(set(raw) - averaged)[:3]}"


def test_resume_refuses_another_ema_setting() -> None:
    with_ema, _, _ = make_run(TrainConfig(steps=2, ema_decay=0.9, **BASE))
    with_ema.run()
    plain, _, _ = make_run(TrainConfig(steps=4, **BASE))
    with pytest.raises(TrainingError, match="ema_decay: saved 0.9, now 0.0"):
        plain.load_state_dict(with_ema.state_dict())
    other_warmup, _, _ = make_run(TrainConfig(steps=4, ema_decay=0.9, ema_warmup=False, **BASE))
    with pytest.raises(TrainingError, match="ema_warmup: saved True, now False"):
        other_warmup.load_state_dict(with_ema.state_dict())
    no_ema, _, _ = make_run(TrainConfig(steps=2, **BASE))
    no_ema.run()
    warmup_off, _, _ = make_run(TrainConfig(steps=4, ema_warmup=False, **BASE))
    warmup_off.load_state_dict(no_ema.state_dict())  # without EMA its warmup changes nothing: accepted
    state = with_ema.state_dict()
    del state["ema"]
    again, _, _ = make_run(TrainConfig(steps=4, ema_decay=0.9, **BASE))
    with pytest.raises(TrainingError, match="no EMA weights"):
        again.load_state_dict(state)


@pytest.mark.parametrize("value,match", [(1.0, r"ema_decay must lie in \[0, 1\)"), (-0.1, "ema_decay must lie")])
def test_bad_ema_decay_is_named(value: float, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        TrainConfig(ema_decay=value)
