"""Headless runs in real processes: torchrun with 2 CPU processes (gloo) trains the same LoRA as 1
process (same global batch); SIGTERM saves a resumable state, and the resumed run ends where an
uninterrupted one does; every process of a torchrun job stops at the same step."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from training.tests.torchrun import TORCHRUN, env, needs_gloo

pytestmark = pytest.mark.slow  # 4 multi-process runs: 37 s on 2 cores (test_pairs.py keeps one fast)
WORKER = pathlib.Path(__file__).with_name("headless_worker.py")


def run(args: list[str], cwd: pathlib.Path, expect: int = 0) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env(), cwd=cwd, timeout=300)
    assert result.returncode == expect, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def assert_same_lora(a: pathlib.Path, b: pathlib.Path, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    one, two = load_file(str(a)), load_file(str(b))
    assert one.keys() == two.keys() and len(one) > 0
    moved = 0
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=rtol, atol=atol)
        moved += int(key.endswith("lora_up.weight") and one[key].abs().max() > 0)
    assert moved > 0, "training did not move the LoRA"


def metric_steps(folder: pathlib.Path) -> list[int]:
    path = folder / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()]


def interrupt_when(
    proc: subprocess.Popen, folder: pathlib.Path, steps: int, sig: int = signal.SIGTERM
) -> tuple[str, str]:
    deadline = time.time() + 120
    while len(metric_steps(folder)) < steps:
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "the run made no progress"
        time.sleep(0.05)
    proc.send_signal(sig)
    return proc.communicate(timeout=120)


@needs_gloo
def test_two_processes_equal_one(tmp_path) -> None:
    run([str(WORKER), "one"], tmp_path)
    run([*TORCHRUN, str(WORKER), "two"], tmp_path)
    assert_same_lora(tmp_path / "one" / "tiny.safetensors", tmp_path / "two" / "tiny.safetensors")
    # only rank 0 wrote files, and every step was logged once
    assert metric_steps(tmp_path / "two") == list(range(1, 11))
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == [
        "loss.png",
        "metrics.jsonl",
        "tiny.d2fstate",
        "tiny.safetensors",
    ]


def test_sigterm_saves_a_state_that_resumes_exactly(tmp_path) -> None:
    run([str(WORKER), "straight", "--steps", "30"], tmp_path)
    proc = subprocess.Popen(
        [sys.executable, str(WORKER), "cut", "--steps", "30", "--sleep", "0.03"],
        cwd=tmp_path,
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    _, err = interrupt_when(proc, tmp_path / "cut", 4)
    assert proc.returncode == 143, err
    assert "interrupted at step" in err and "resume with: headless_worker.py cut --resume" in err
    stopped = torch.load(tmp_path / "cut" / "tiny.d2fstate", weights_only=True)["step"]
    assert 4 <= stopped < 30
    assert (tmp_path / "cut" / f"tiny_{stopped:06d}.safetensors").is_file()
    assert metric_steps(tmp_path / "cut") == list(range(1, stopped + 1))
    run([str(WORKER), "cut", "--steps", "30", "--resume"], tmp_path)
    assert metric_steps(tmp_path / "cut") == list(range(1, 31))
    assert_same_lora(
        tmp_path / "straight" / "tiny.safetensors", tmp_path / "cut" / "tiny.safetensors", rtol=1e-6, atol=1e-7
    )


@needs_gloo
def test_torchrun_processes_stop_together_on_sigterm(tmp_path) -> None:
    proc = subprocess.Popen(
        [sys.executable, *TORCHRUN, str(WORKER), "ddp", "--steps", "200", "--sleep", "0.03"],
        cwd=tmp_path,
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    # SIGTERM to the whole job, as a cluster scheduler does
    deadline = time.time() + 120
    while len(metric_steps(tmp_path / "ddp")) < 3:
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    state = torch.load(tmp_path / "ddp" / "tiny.d2fstate", weights_only=True)
    assert 3 <= state["step"] < 200, err
    assert "interrupted at step" in err
    assert metric_steps(tmp_path / "ddp") == list(range(1, state["step"] + 1))


@needs_gloo
def test_two_processes_equal_one_with_image_latents(tmp_path) -> None:
    run([str(WORKER), "one", "--concat"], tmp_path)
    run([*TORCHRUN, str(WORKER), "two", "--concat"], tmp_path)
    assert_same_lora(tmp_path / "one" / "tiny.safetensors", tmp_path / "two" / "tiny.safetensors")
    assert metric_steps(tmp_path / "two") == list(range(1, 11))


@needs_gloo
def test_two_processes_equal_one_with_a_validation_loss(tmp_path) -> None:
    """The validation batches are shared between the processes: the same values as one process evaluating
    them all (to float rounding), logged once, at steps 0, 5 and 10."""
    run([str(WORKER), "one", "--validation"], tmp_path)
    run([*TORCHRUN, str(WORKER), "two", "--validation"], tmp_path)
    assert_same_lora(tmp_path / "one" / "tiny.safetensors", tmp_path / "two" / "tiny.safetensors")

    def validation(folder: pathlib.Path) -> list[tuple[int, float]]:
        lines = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        return [(m["step"], m["validation_loss"]) for m in lines if "validation_loss" in m]

    one, two = validation(tmp_path / "one"), validation(tmp_path / "two")
    assert [s for s, _ in one] == [s for s, _ in two] == [0, 5, 10]
    assert [v for _, v in two] == pytest.approx([v for _, v in one], rel=1e-5)
