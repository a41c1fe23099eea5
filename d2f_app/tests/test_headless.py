"""The files of a headless run (``run_headless``) on the tiny pure-PyTorch model: the EMA and raw
LoRAs, periodic saves and their pruning, preview PNGs listed in metrics.jsonl, and the final files
a resumed run writes."""

from __future__ import annotations

import json
import pathlib

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

import training.files as files
from d2f_app.headless import run_headless
from d2f_core.lora import adapters_state_dict
from d2f_core.lora_metadata import LoraMetadata
from training import TrainConfig
from training.files import RunFiles
from training.tests.helpers import assert_equal, make_run
from training.tests.test_ema import BASE as EMA_BASE
from training.tests.test_previews import BASE as PREVIEW_BASE
from training.tests.test_previews import previewer


def headless(tmp_path: pathlib.Path, **options) -> tuple:
    trainer, _, adapters = make_run(TrainConfig(**{**EMA_BASE, **options}))
    files = RunFiles(tmp_path, "tiny")
    code = run_headless(
        trainer, files, lambda step: LoraMetadata("diff2flow", "eps", False, steps=step), progress=False
    )
    assert code == 0
    return trainer, files, adapters


@pytest.mark.parametrize("save_raw", [True, False])
def test_saved_lora_is_the_ema_one(tmp_path, save_raw: bool) -> None:
    trainer, files, adapters = headless(tmp_path, steps=4, save_every=2, ema_decay=0.9, save_raw=save_raw)
    ema, raw = adapters_state_dict(trainer.ema.adapters), adapters_state_dict(adapters)
    assert any(not torch.equal(ema[k], raw[k]) for k in ema)
    assert_equal(load_file(files.lora), ema)  # the final LoRA
    assert_equal(load_file(files.lora_at(4)), ema)  # the last periodic save
    with safe_open(str(files.lora), framework="pt") as f:
        assert f.metadata()["diff2flow.weights"] == "ema" and f.metadata()["diff2flow.ema_decay"] == "0.9"
    raw_files = [files.raw_lora, files.raw_lora_at(2), files.raw_lora_at(4)]
    assert [p.is_file() for p in raw_files] == [save_raw] * 3
    if save_raw:
        assert_equal(load_file(files.raw_lora), raw)
        with safe_open(str(files.raw_lora), framework="pt") as f:
            assert f.metadata()["diff2flow.weights"] == "raw"
    # each periodic save holds the EMA of its own step
    assert not torch.equal(load_file(files.lora_at(2))[next(iter(ema))], ema[next(iter(ema))])


def test_without_ema_the_loras_hold_the_trained_weights_with_no_ema_keys_or_raw_files(tmp_path) -> None:
    trainer, files, adapters = headless(tmp_path, steps=2, save_every=1, save_raw=True)
    assert_equal(load_file(files.lora), adapters_state_dict(adapters))
    with safe_open(str(files.lora), framework="pt") as f:
        assert not any(k.startswith("diff2flow.weights") or k.startswith("diff2flow.ema") for k in f.metadata())
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == [
        "tiny.safetensors",
        "tiny_000001.safetensors",
        "tiny_000002.safetensors",
    ]


@pytest.mark.parametrize("steps, every, expected", [(5, 2, [0, 2, 4]), (4, 4, [0, 4]), (3, 0, [])])
def test_preview_every_is_honoured_in_files_and_metrics(tmp_path, steps: int, every: int, expected: list) -> None:
    config = TrainConfig(steps=steps, preview_every=every, **PREVIEW_BASE)
    trainer, _, _ = make_run(config)
    files = RunFiles(tmp_path, "tiny")
    code = run_headless(
        trainer,
        files,
        lambda step: LoraMetadata("diff2flow", "eps", False, steps=step),
        progress=False,
        previewer=previewer(config),
    )
    assert code == 0
    written = sorted(p.name for p in files.samples.glob("*.png")) if files.samples.is_dir() else []
    assert written == [files.sample_at(s).name for s in expected]
    records = [json.loads(line) for line in files.metrics.read_text().splitlines()]
    assert [r["step"] for r in records if "sample" in r] == expected
    assert [r["sample"] for r in records if "sample" in r] == [f"samples/step_{s:06d}.png" for s in expected]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, steps + 1))
    for s in expected:
        image = Image.open(files.sample_at(s))
        assert image.size == (8 * 2, 8 * 2)  # 3 prompts: a 2 x 2 grid of (stand-in decoded) 8 x 8 previews
        assert f"step {s}" in image.text["parameters"]


@pytest.mark.parametrize("keep_last,kept", [(2, [4, 5]), (0, [1, 2, 3, 4, 5])])
def test_headless_run_keeps_the_last_periodic_saves(tmp_path, keep_last: int, kept: list[int]) -> None:
    trainer, _, _ = make_run(TrainConfig(steps=5, save_every=1, keep_last=keep_last, ema_decay=0.9, save_raw=True))
    run = files.RunFiles(tmp_path, "tiny")
    (tmp_path / "tiny_2_000001.safetensors").write_bytes(b"x")  # another run's save
    assert (
        run_headless(trainer, run, lambda step: LoraMetadata("diff2flow", "eps", False, steps=step), progress=False)
        == 0
    )
    saves = run.periodic_saves()
    assert sorted(saves) == kept
    assert all(sorted(p.name for p in saves[s]) == [run.lora_at(s).name, run.raw_lora_at(s).name] for s in kept)
    assert run.lora.is_file() and run.raw_lora.is_file() and (tmp_path / "tiny_2_000001.safetensors").is_file()
    assert run.state_step() == 5


def test_a_state_at_the_last_step_resumes_to_the_missing_final_files(tmp_path) -> None:
    """A run killed after its last periodic save (the state at the final step) but before its final files
    and its pruning: resuming trains nothing, writes the final LoRA equal to a straight run's and prunes."""
    config = TrainConfig(steps=3, save_every=1, keep_last=1)
    meta = lambda step: LoraMetadata("diff2flow", "eps", False, steps=step)  # noqa: E731
    straight, _, _ = make_run(config)
    assert run_headless(straight, files.RunFiles(tmp_path / "straight", "tiny"), meta, progress=False) == 0
    run = files.RunFiles(tmp_path / "killed", "tiny")
    trainer, _, _ = make_run(config)
    assert run_headless(trainer, run, meta, progress=False) == 0
    run.lora.unlink()  # as if killed before the final files: the LoRA missing, the older save not pruned yet
    run.lora_at(3).replace(run.lora_at(2))
    files.save_lora(run.lora_at(3), trainer.lora_state_dict(), meta(3))
    resumed, _, _ = make_run(config)
    resumed.load_state_dict(files.load_training_state(run.state))
    assert resumed.step == 3
    assert run_headless(resumed, run, meta, progress=False) == 0
    assert sorted(run.periodic_saves()) == [3]
    with safe_open(str(run.lora), "pt") as a, safe_open(str(tmp_path / "straight" / "tiny.safetensors"), "pt") as b:
        assert set(a.keys()) == set(b.keys()) and all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())


def test_validation_lines_and_an_interrupt_during_a_validation_resume_exactly(tmp_path) -> None:
    """Each validation is a metrics line of its own; a second Ctrl-C during the validation after step 2 stops
    with the state of step 2 (its draws kept), and the resumed run ends where a straight one does."""
    config = TrainConfig(**{**EMA_BASE, "steps": 4, "validation_split": 0.25, "validation_every": 2})
    meta = lambda step: LoraMetadata("diff2flow", "eps", False, steps=step)  # noqa: E731
    straight, _, _ = make_run(config, n=8)
    assert run_headless(straight, RunFiles(tmp_path / "straight", "tiny"), meta, progress=False) == 0
    records = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["validation_loss"]) for r in records if "validation_loss" in r] == [
        (s, pytest.approx(v)) for s, v in straight.validation_losses
    ]
    assert [s for s, _ in straight.validation_losses] == [0, 2, 4]

    stopped, _, _ = make_run(config, n=8)
    evaluate = stopped.validation_loss

    def interrupted() -> float:
        if stopped.step == 2:
            raise KeyboardInterrupt
        return evaluate()

    stopped.validation_loss = interrupted
    folder = RunFiles(tmp_path / "stopped", "tiny")
    assert run_headless(stopped, folder, meta, progress=False) == 130
    resumed, _, _ = make_run(config, n=8)
    resumed.load_state_dict(files.load_training_state(folder.state))
    assert resumed.step == 2
    assert run_headless(resumed, folder, meta, progress=False) == 0
    assert resumed.losses == straight.losses
    assert_equal(load_file(folder.lora), load_file(RunFiles(tmp_path / "straight", "tiny").lora))
