"""Train Diff2Flow LoRA / Save Diff2Flow LoRA in a real ComfyUI 0.8.0, on tiny random models."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from comfy_harness import require_comfyui

require_comfyui()

import comfy.model_management  # noqa: E402
import comfy.sample  # noqa: E402
import comfy.samplers  # noqa: E402
from safetensors import safe_open  # noqa: E402

import d2f_core  # noqa: E402
from d2f_core.lora_metadata import LoraMetadata  # noqa: E402
from training import TrainConfig  # noqa: E402

LATENT = (4, 8, 8)


def batch(n: int = 4, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    latents = [{"samples": torch.randn(n, *LATENT, generator=gen) * 5}]
    positive = [[[torch.randn(1, 77, 64, generator=gen), {}]] for _ in range(n)]
    negative = [[[torch.zeros(1, 77, 64), {}]]]
    return latents, positive, negative


def train(pack, model, config: TrainConfig, n: int = 4, **kw):
    latents, positive, negative = batch(n)
    inputs = pack.train_inputs.TrainingInputs(latents, positive, negative)
    return pack.train_nodes.train_lora(model, config, inputs, **kw)


def sample_unpatched(model, cond) -> torch.Tensor:
    """Three stock euler steps of the model as it is (CFG 2, fixed noise)."""
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", 3)
    latent = torch.zeros(1, *LATENT)
    noise = comfy.sample.prepare_noise(latent, 0)
    euler = comfy.samplers.sampler_object("euler")
    return comfy.sample.sample_custom(model, noise, 2.0, euler, sigmas, cond, cond, latent, disable_pbar=True, seed=0)


def unet_output(model, x, sigma_ve, cond):
    comfy.model_management.load_models_gpu([model])
    with torch.no_grad():
        return model.model.apply_model(x, sigma_ve, c_crossattn=cond).float()


# objectives that train on pairs need a pairs folder (tests/test_comfy_reflow.py)
@pytest.mark.parametrize("objective", [name for name, o in d2f_core.OBJECTIVES.items() if not o.paired_noise])
@pytest.mark.parametrize("kind", ["eps", "v"])
def test_each_objective_trains_with_finite_decreasing_loss(pack, tiny_model, objective, kind) -> None:
    base = tiny_model(kind)
    config = TrainConfig(
        objective=objective, steps=60, batch_size=4, learning_rate=1e-2, rank=4, alpha=4, targets="all", seed=1
    )
    latents, positive, _ = batch(4)
    data = pack.train_inputs.build_training_data(base, latents, positive, None)
    d2f = pack.model_sampling.patch_model(base).get_model_object("model_sampling").d2f

    def fixed_loss(model) -> float:  # the objective on the same noise and times, before and after
        comfy.model_management.load_models_gpu([model])
        unet = model.model.diffusion_model
        x0, cond = data.batch(list(range(4)))
        gen = torch.Generator().manual_seed(99)
        with torch.no_grad():
            return (
                sum(
                    d2f_core.objective_loss(
                        objective, lambda x, t, context: unet(x, t, context=context), d2f, x0, generator=gen, **cond
                    ).loss.item()
                    for _ in range(8)
                )
                / 8
            )

    before = fixed_loss(base)
    trained, lora, losses, steps, _ = train(pack, base, config)
    loss = losses["loss"]
    assert steps == 60 and len(loss) == 60 and all(math.isfinite(v) for v in loss)
    after = fixed_loss(trained)
    assert after < 0.97 * before, (before, after)  # same draws: any drop is learning
    assert lora.metadata.objective == objective and lora.metadata.prediction == kind


@pytest.mark.parametrize("algorithm,targets", [("LoRA", "all"), ("LoHa", "attention_ff")])
def test_saved_lora_carries_metadata_loads_whole_and_is_never_overwritten(
    pack, tiny_model, comfy_nodes, loras_dir, caplog, algorithm, targets
) -> None:
    base = tiny_model("eps")
    config = TrainConfig(
        objective="diff2flow", steps=5, batch_size=2, learning_rate=1e-2, targets=targets, algorithm=algorithm
    )
    _, lora, _, _, _ = train(pack, base, config)
    (name,) = comfy_nodes["D2F_SaveLoRA"].execute(lora, "my/../lora test", False).result
    assert name == "lora_test.safetensors" and (loras_dir / name).is_file()
    with safe_open(str(loras_dir / name), framework="pt") as f:
        meta = LoraMetadata.from_header(f.metadata())
        assert meta.steps == 5 and meta.rank == 8 and meta.objective == "diff2flow" and meta.schedule == "scaled_linear"
        assert (meta.optimizer, meta.learning_rate) == ("AdamW", 1e-2)
    caplog.set_level("WARNING")
    (loaded,) = comfy_nodes["LoraLoaderModelOnly"]().load_lora_model_only(base, name, 1.0)
    assert "lora key not loaded" not in caplog.text
    per_adapter = 3 if algorithm == "LoRA" else 5  # (up, down, alpha) or (4 hada factors, alpha)
    assert len(loaded.patches) == len(lora) // per_adapter  # every adapter became one patch
    # the node's MODEL output is this same file loaded the stock way, so comparing the two would test
    # the loader against itself: tests/test_comfy_adapters.py compares the stock-loaded file with the
    # adapters as they trained (weight wrappers), for every algorithm. Here: the LoRA does something.
    flow = pack.model_sampling.patch_model(loaded)
    x = torch.randn(1, *LATENT)
    cond = torch.randn(1, 77, 64)
    sigma = torch.tensor([0.5])
    a = unet_output(flow, x, sigma, cond)
    unchanged = unet_output(pack.model_sampling.patch_model(base), x, sigma, cond)
    assert not torch.allclose(unchanged, a), "the LoRA changed nothing"
    # a second save never overwrites
    (second,) = comfy_nodes["D2F_SaveLoRA"].execute(lora, "lora test", False).result
    assert second == "lora_test_001.safetensors"


def test_input_model_unchanged_after_training(pack, tiny_model, conditioning) -> None:
    model = tiny_model("v")
    cond = conditioning(1)
    before = sample_unpatched(model, cond)
    train(pack, model, TrainConfig(steps=3, batch_size=2, learning_rate=1e-2, targets="all"))
    assert torch.equal(before, sample_unpatched(model, cond))


def test_resume_equals_straight_run(pack, tiny_model, loras_dir) -> None:
    cfg = dict(steps=6, batch_size=2, learning_rate=1e-3, save_every=3, seed=4)
    _, straight, _, _, _ = train(pack, tiny_model("eps"), TrainConfig(**cfg), output_name="straight")
    _, _, _, _, _ = train(pack, tiny_model("eps"), TrainConfig(**{**cfg, "steps": 3}), output_name="half")
    _, resumed, losses, steps, _ = train(
        pack, tiny_model("eps"), TrainConfig(**cfg), output_name="half", resume_from="half.d2fstate"
    )
    assert steps == 6 and len(losses["loss"]) == 6
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], rtol=1e-6, atol=1e-7)
    assert (loras_dir / "half_000003.safetensors").is_file() and (loras_dir / "half_000006.safetensors").is_file()


def test_node_outputs_and_saves_the_ema_weights_and_keeps_the_last_saves(
    pack, tiny_model, loras_dir, comfy_nodes
) -> None:
    from safetensors.torch import load_file

    cfg = dict(steps=4, batch_size=2, learning_rate=1e-2, targets="all", save_every=1, seed=4)
    _, raw, _, _, _ = train(pack, tiny_model("eps"), TrainConfig(**cfg), output_name="plain")
    trained, ema, _, _, _ = train(
        pack, tiny_model("eps"), TrainConfig(**cfg, ema_decay=0.9, save_raw=True, keep_last=2), output_name="ema"
    )
    raw_file, last_save = load_file(loras_dir / "ema_raw.safetensors"), load_file(loras_dir / "ema_000004.safetensors")
    assert raw.keys() == ema.keys() == raw_file.keys() == last_save.keys()
    assert all(torch.equal(raw_file[k], raw[k]) for k in raw)  # EMA never changes the training; the raw file is raw
    assert any(not torch.equal(ema[k], raw[k]) for k in raw), "the LORA_MODEL output is the raw weights"
    assert all(torch.equal(last_save[k], ema[k]) for k in ema)  # the periodic save is the EMA too
    assert sorted(p.name for p in loras_dir.iterdir()) == [
        "ema.d2fstate",
        "ema_000003.safetensors",
        "ema_000003_raw.safetensors",
        "ema_000004.safetensors",
        "ema_000004_raw.safetensors",
        "ema_raw.safetensors",  # keep_last 2
        "plain.d2fstate",
        *[f"plain_{s:06d}.safetensors" for s in (1, 2, 3, 4)],  # keep_last 0: all
    ]
    # the MODEL output holds the EMA weights: the same network as the EMA file loaded by stock LoraLoaderModelOnly
    (stock,) = comfy_nodes["LoraLoaderModelOnly"]().load_lora_model_only(
        tiny_model("eps"), "ema_000004.safetensors", 1.0
    )
    x, cond, sigma = torch.randn(1, *LATENT), torch.randn(1, 77, 64), torch.tensor([0.5])
    expected = unet_output(pack.model_sampling.patch_model(stock), x, sigma, cond)
    torch.testing.assert_close(
        unet_output(trained, x, sigma, cond), expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item()
    )


def test_cancel_keeps_last_periodic_save_loadable(pack, tiny_model, loras_dir, comfy_nodes, monkeypatch) -> None:
    report = pack.train_nodes.report_progress

    def press_cancel_at_step_five(pbar, steps, step, loss, lr):  # what ComfyUI's Cancel button does
        report(pbar, steps, step, loss, lr)
        if step == 5:
            comfy.model_management.interrupt_current_processing(True)

    monkeypatch.setattr(pack.train_nodes, "report_progress", press_cancel_at_step_five)
    try:
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            train(pack, tiny_model("eps"), TrainConfig(steps=20, batch_size=1, save_every=2), output_name="cancelled")
    finally:
        comfy.model_management.interrupt_current_processing(False)
    saves = sorted(p.name for p in loras_dir.iterdir())
    assert saves == ["cancelled.d2fstate", "cancelled_000002.safetensors", "cancelled_000004.safetensors"]
    (loaded,) = comfy_nodes["LoraLoaderModelOnly"]().load_lora_model_only(
        tiny_model("eps"), "cancelled_000004.safetensors", 1.0
    )
    assert loaded.patches


def test_nan_loss_stops_with_step_and_cause(pack, tiny_model) -> None:
    with pytest.raises(Exception, match=r"loss became (nan|inf) at step \d+ .*learning rate"):
        train(
            pack,
            tiny_model("eps"),
            TrainConfig(steps=50, batch_size=2, learning_rate=1e3, optimizer="SGD", targets="all"),
        )


def test_clear_errors_before_training(pack, tiny_model) -> None:
    model = tiny_model("eps")
    cfg = TrainConfig(steps=1)
    with pytest.raises(ValueError, match="4 latents but 2 positive conditionings"):
        latents, positive, _ = batch(4)
        pack.train_nodes.train_lora(model, cfg, pack.train_inputs.TrainingInputs(latents, positive[:2]))
    with pytest.raises(ValueError, match="needs 4 latent channels"):
        pack.train_nodes.train_lora(
            model, cfg, pack.train_inputs.TrainingInputs([{"samples": torch.zeros(1, 16, 8, 8)}], batch(1)[1])
        )
    with pytest.raises(ValueError, match="latents is empty"):
        pack.train_nodes.train_lora(model, cfg, pack.train_inputs.TrainingInputs([], batch(1)[1]))
    with pytest.raises(ValueError, match="only valid for v-prediction"):
        train(pack, model, TrainConfig(steps=1, zero_terminal_snr=True))


def test_node_loss_equals_d2f_core_loss(pack, tiny_model) -> None:
    """One step of the node's engine computes exactly d2f_core's diff2flow loss on the same draws."""
    model = tiny_model("v")
    latents, positive, negative = batch(2)
    config = TrainConfig(steps=1, batch_size=2, seed=11, learning_rate=1e-9)
    losses = pack.train_nodes.train_lora(model, config, pack.train_inputs.TrainingInputs(latents, positive)).loss_map
    data = pack.train_inputs.build_training_data(model, latents, positive, None)
    d2f = pack.model_sampling.patch_model(model).get_model_object("model_sampling").d2f
    gen = torch.Generator().manual_seed(11)
    x0, cond = data.batch(data.draw_indices(2, gen))
    comfy.model_management.load_models_gpu([model])
    unet = model.model.diffusion_model
    expected = d2f_core.objective_loss(
        "diff2flow", lambda x, t, context: unet(x, t, context=context), d2f, x0, generator=gen, **cond
    ).loss.item()
    assert losses["loss"][0] == pytest.approx(expected, rel=1e-5)


def test_gradient_checkpointing_gives_the_same_training(pack, tiny_model, monkeypatch) -> None:
    cfg = dict(steps=3, batch_size=2, learning_rate=1e-2, targets="all", seed=2)
    _, plain, _, _, _ = train(pack, tiny_model("v"), TrainConfig(**cfg))
    model = tiny_model("v")
    calls = {"n": 0}
    checkpoint = torch.utils.checkpoint.checkpoint

    def counting_checkpoint(*args, **kwargs):
        calls["n"] += 1
        return checkpoint(*args, **kwargs)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counting_checkpoint)
    _, ckpt, _, _, _ = train(pack, model, TrainConfig(**cfg, gradient_checkpointing=True))
    layers = sum(
        len(list(b.children()))
        for b in [
            *model.model.diffusion_model.input_blocks,
            model.model.diffusion_model.middle_block,
            *model.model.diffusion_model.output_blocks,
        ]
    )
    assert calls["n"] >= 3 * layers  # every block layer ran under checkpoint in every step
    for key in plain:
        torch.testing.assert_close(ckpt[key], plain[key], rtol=1e-5, atol=1e-6)
    assert all(
        "forward" not in layer.__dict__
        for block in model.model.diffusion_model.output_blocks
        for layer in block.children()
    )  # restored


def test_trains_a_model_loaded_under_inference_mode(pack, tiny_model, conditioning) -> None:
    """ComfyUI executes nodes under torch.inference_mode(): a checkpoint loaded in a graph holds
    inference tensors. Training must still work, and must not change the model's outputs."""
    with torch.inference_mode():
        model = tiny_model("eps")
    cond = conditioning(1)
    before = sample_unpatched(model, cond)
    with torch.inference_mode():
        _, lora, losses, steps, _ = train(pack, model, TrainConfig(steps=2, batch_size=2, targets="all"))
    assert steps == 2 and all(math.isfinite(v) for v in losses["loss"])
    assert torch.equal(before, sample_unpatched(model, cond))


def test_schedule_free_node_outputs_and_saves_its_evaluation_weights(
    pack, tiny_model, loras_dir, recorded_trainers
) -> None:
    """With AdamWScheduleFree the LORA_MODEL output and the periodic save hold the optimizer's evaluation
    weights (its eval() sequence), not the weights it trains on."""
    from safetensors.torch import load_file

    from d2f_core.lora import adapters_state_dict

    config = TrainConfig(steps=4, batch_size=2, learning_rate=1e-2, save_every=4, seed=4, optimizer="AdamWScheduleFree")
    _, lora, _, _, _ = train(pack, tiny_model("eps"), config, output_name="schedule_free")
    (trainer,) = recorded_trainers
    training = adapters_state_dict(trainer.adapters)
    trainer.optimizer.eval()  # the trainer is done: read its evaluation weights directly
    evaluation = adapters_state_dict(trainer.adapters)
    saved = load_file(loras_dir / "schedule_free_000004.safetensors")
    assert lora.keys() == evaluation.keys() == saved.keys()
    assert all(torch.equal(lora[k], evaluation[k]) and torch.equal(saved[k], evaluation[k]) for k in lora)
    assert any(not torch.equal(training[k], evaluation[k]) for k in lora)


def test_validation_loss_through_the_node_inputs(pack, tiny_model) -> None:
    """validation_split holds out latents, validation_latents + validation_positive are the alternative;
    the LOSS_MAP carries the (step, loss) pairs either way; inputs that cannot go together are refused before
    any compute, naming the input."""
    base = tiny_model("v")
    latents, positive, negative = batch(6)
    config = TrainConfig(steps=4, batch_size=2, learning_rate=1e-2, seed=2, validation_every=2)
    inputs = pack.train_inputs.TrainingInputs
    held = [{"samples": latents[0]["samples"][:2]}]
    separate = pack.train_nodes.train_lora(
        base, config, inputs(latents, positive, negative, validation_latents=held, validation_positive=positive[:2])
    )
    steps = [s for s, _ in separate.loss_map["validation_loss"]]
    assert steps == [0, 2, 4] and all(math.isfinite(v) for _, v in separate.loss_map["validation_loss"])
    split = dataclasses.replace(config, validation_split=0.34)
    held_out = pack.train_nodes.train_lora(base, split, inputs(latents, positive, negative))
    assert [s for s, _ in held_out.loss_map["validation_loss"]] == steps
    refused = {
        "validation_split: 0.34 holds out training samples, but separate validation data is given too": (
            split,
            inputs(latents, positive, negative, validation_latents=held, validation_positive=positive[:2]),
        ),
        "validation_latents is connected but validation_positive is not": (
            config,
            inputs(latents, positive, negative, validation_latents=held),
        ),
        "validation_every: 2 needs validation samples": (config, inputs(latents, positive, negative)),
        "validation_every: 0, but validation data is given": (
            TrainConfig(steps=4),
            inputs(latents, positive, negative, validation_latents=held, validation_positive=positive[:2]),
        ),
    }
    for message, (cfg, given) in refused.items():
        with pytest.raises(ValueError, match=message):
            pack.train_nodes.train_lora(base, cfg, given)
