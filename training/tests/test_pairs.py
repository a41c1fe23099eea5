"""Reflow pair generation (training/pairs.py) on a small random-weight teacher: per-index
determinism across shard layouts, batches and processes, append and resume, refusals, and the
pairs as reflow training data."""

from __future__ import annotations

import errno
import json
import pathlib
import subprocess
import sys

import pytest
import torch

import d2f_core
from training import TrainConfig, Trainer
from training.pairs import PairsError, generate_pairs, load_pairs, pair_noise, pair_shards
from training.tests.helpers import CondNet
from training.tests.pairs_teacher import SHAPE, negative, prompts, settings, teacher
from training.tests.torchrun import TORCHRUN, env, needs_gloo

WORKER = pathlib.Path(__file__).with_name("pairs_teacher.py")


def generate(folder: pathlib.Path, count: int, shard_size: int = 8, **kwargs):
    velocity, d2f = teacher()
    return generate_pairs(
        velocity, prompts(), folder, count, settings(d2f), negative(), shard_size=shard_size, **kwargs
    )


def assert_same_pairs(a: pathlib.Path, b: pathlib.Path, count: int) -> None:
    one, two = load_pairs(a), load_pairs(b)
    assert one.index.tolist() == two.index.tolist() == list(range(count))
    for name in ("noise", "latents", "prompt"):
        assert torch.equal(getattr(one, name), getattr(two, name)), name  # bit-identical


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> pathlib.Path:
    """14 pairs in one run, shards of 8 (the last block reaches past the count)."""
    folder = tmp_path_factory.mktemp("pairs") / "reference"
    summary = generate(folder, 14)
    assert (summary.count, summary.generated, summary.reused) == (14, 14, 0)
    return folder


def test_pairs_are_the_teachers_ode_from_per_index_noise(reference) -> None:
    pairs = load_pairs(reference)
    velocity, d2f = teacher()
    s = settings(d2f)
    assert torch.equal(pairs.noise[5], pair_noise(7, 5, SHAPE)) and pairs.prompt.tolist() == [i % 3 for i in range(14)]
    # pair 5 by hand: CFG Euler over the grid from sigma_max * z (one sample at a time, so only round-off may differ)
    cond, neg = prompts()[5 % 3], negative()
    guided = d2f_core.cfg_velocity(velocity, cond, neg, s.cfg)
    x0 = d2f_core.sample_euler(guided, s.sigma_max * pairs.noise[5:6], d2f_core.fm_sigmas(4, sigma_max=d2f.sigma_max))
    torch.testing.assert_close(pairs.latents[5:6], x0, rtol=1e-5, atol=1e-6)
    assert not torch.equal(pairs.latents[0], pairs.latents[3])  # the same prompt, other noise
    manifest = json.loads((reference / "manifest.json").read_text())
    assert manifest["count"] == 14 and manifest["settings"]["steps"] == 4 and manifest["settings"]["cfg"] == 2.5
    assert manifest["settings"]["teacher"] == {"name": "tiny"} and manifest["settings"]["seed"] == 7


@pytest.mark.parametrize("shard_size", [4, 12, 16])
def test_the_same_index_gives_the_same_pair_whatever_the_shard_layout(reference, tmp_path, shard_size: int) -> None:
    generate(tmp_path / "other", 14, shard_size=shard_size)
    assert_same_pairs(reference, tmp_path / "other", 14)
    assert [(a, b) for a, b, _ in pair_shards(tmp_path / "other")][0] == (0, min(shard_size, 14))


def test_append_generates_only_the_missing_indices(reference, tmp_path) -> None:
    folder = tmp_path / "grown"
    assert generate(folder, 6).generated == 6
    summary = generate(folder, 14, shard_size=4)  # another shard size on the second run is fine
    assert (summary.generated, summary.reused, summary.count) == (8, 6, 14)
    assert_same_pairs(reference, folder, 14)
    assert generate(folder, 14).generated == 0  # nothing missing: nothing generated
    assert json.loads((folder / "manifest.json").read_text())["count"] == 14


def test_an_interrupted_run_keeps_its_finished_shards_and_resumes(reference, tmp_path) -> None:
    folder = tmp_path / "cut"
    calls = []

    def cancel_at_fourth_batch() -> None:
        calls.append(1)
        if len(calls) == 4:
            raise InterruptedError("cancelled")

    with pytest.raises(InterruptedError):
        generate(folder, 14, shard_size=4, check_cancel=cancel_at_fourth_batch)
    assert [(a, b) for a, b, _ in pair_shards(folder)] == [(0, 4), (4, 8), (8, 12)]
    assert load_pairs(folder).index.tolist() == list(range(12))  # a partial folder is usable data
    # what a SIGKILL mid-write leaves: atomic_write's temporary files of a process that is gone
    from training.tests.test_files import dead_pid

    gone = dead_pid()
    leftovers = [
        folder / f".{name}.{gone}.tmp"
        for name in ("manifest.json", "conds.safetensors", "pairs-000000012-000000014.safetensors")
    ]
    for path in leftovers:
        path.write_bytes(b"partial")
    assert generate(folder, 14, shard_size=4).generated == 2
    assert_same_pairs(reference, folder, 14)
    assert not any(path.exists() for path in leftovers)


def test_a_full_disk_keeps_the_finished_shards(tmp_path, monkeypatch) -> None:
    import training.pairs as pairs_module

    real, writes = pairs_module.save_file, []

    def fill_up(tensors, path, metadata=None):
        if "pairs-" in str(path):
            writes.append(path)
            if len(writes) == 2:
                pathlib.Path(path).write_bytes(b"partial")
                raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, path, metadata=metadata)

    monkeypatch.setattr(pairs_module, "save_file", fill_up)
    with pytest.raises(
        OSError, match="disk full .*The 8 pairs of the finished shards .* are kept: free space and run the same command"
    ):
        generate(tmp_path / "full", 24)
    assert [(a, b) for a, b, _ in pair_shards(tmp_path / "full")] == [(0, 8)]
    assert not list((tmp_path / "full").glob(".*.tmp"))  # no partial file is left behind
    monkeypatch.setattr(pairs_module, "save_file", real)
    assert generate(tmp_path / "full", 24).generated == 16


@needs_gloo
def test_two_torchrun_processes_write_the_pairs_of_one(reference, tmp_path) -> None:
    result = subprocess.run(
        [sys.executable, *TORCHRUN, str(WORKER), str(tmp_path / "two"), "14", "4"],
        capture_output=True,
        text=True,
        env=env(),
        cwd=tmp_path,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "rank 0: generated 8" in result.stdout and "rank 1: generated 6" in result.stdout  # disjoint shards
    assert_same_pairs(reference, tmp_path / "two", 14)
    assert json.loads((tmp_path / "two" / "manifest.json").read_text())["count"] == 14


def test_refusals_name_the_input_and_the_fix(reference, tmp_path) -> None:
    velocity, d2f = teacher()
    with pytest.raises(PairsError, match="no prompts: give at least one prompt"):
        generate_pairs(velocity, [], tmp_path / "a", 4, settings(d2f), negative())
    with pytest.raises(PairsError, match="cfg 2.5 needs the negative"):
        generate_pairs(velocity, prompts(), tmp_path / "a", 4, settings(d2f))
    with pytest.raises(PairsError, match="shard_size must be a positive multiple of batch_size 4, got 6"):
        generate_pairs(velocity, prompts(), tmp_path / "a", 4, settings(d2f), negative(), shard_size=6)
    with pytest.raises(PairsError, match="count must be a positive integer, got 0"):
        generate_pairs(velocity, prompts(), tmp_path / "a", 0, settings(d2f), negative())
    with pytest.raises(ValueError, match="sampler 'dpm' is unknown"):
        settings(d2f, sampler="dpm")
    # a folder of other pairs: other settings, other prompts
    with pytest.raises(PairsError, match="other settings \\(steps: folder 4, now 8\\)"):
        generate_pairs(velocity, prompts(), reference, 20, settings(d2f, steps=8), negative(), shard_size=8)
    with pytest.raises(PairsError, match="other prompts"):
        generate_pairs(velocity, prompts()[::-1], reference, 20, settings(d2f), negative(), shard_size=8)
    with pytest.raises(PairsError, match="pairs of 2 prompts, this run has 3|other prompts"):
        generate_pairs(velocity, prompts()[:2], reference, 20, settings(d2f), negative(), shard_size=8)
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "manifest.json").write_text('{"format": "something-else"}')
    with pytest.raises(PairsError, match="is not a Diff2Flow pairs folder"):
        generate(tmp_path / "cache", 4)
    with pytest.raises(PairsError, match="it does not exist. Generate pairs first: python -m training pairs"):
        load_pairs(tmp_path / "none")


def test_a_long_prompt_and_a_short_negative_are_guided_together(tmp_path) -> None:
    """Conditionings of other token counts are sampled as their own groups and guided against the
    negative repeated to a common token count (attention over repeated tokens is unchanged)."""
    velocity, d2f = teacher()
    conds = [prompts(1)[0], prompts(1, tokens=6)[0]]
    generate_pairs(velocity, conds, tmp_path / "long", 4, settings(d2f), negative(), shard_size=4)
    pairs = load_pairs(tmp_path / "long")
    guided = d2f_core.cfg_velocity(velocity, conds[1], {"context": negative()["context"].repeat(1, 2, 1)}, 2.5)
    x0 = d2f_core.sample_euler(guided, d2f.sigma_max * pairs.noise[1:2], d2f_core.fm_sigmas(4, sigma_max=d2f.sigma_max))
    torch.testing.assert_close(pairs.latents[1:2], x0, rtol=1e-5, atol=1e-6)


def test_pairs_train_the_reflow_objective(reference) -> None:
    from d2f_core.lora import attach_parametrizations, make_adapter, select_target_modules

    pairs = load_pairs(reference)
    data = pairs.training_data()
    assert len(data) == 14 and torch.equal(data.latents[3], pairs.latents[3])
    # the data carries each pair's z; the reflow objective's line passes through the student's own start
    # sigma_max * z at sigma_max (the teacher's here, and a zero-terminal-SNR student's at 1), and through x0 at 0
    sigma_max = pairs.settings["sigma_max"]
    assert sigma_max < 1
    assert torch.equal(data.extras[3]["noise"], pair_noise(7, 3, SHAPE))
    for start in (sigma_max, 1.0):
        student = (
            d2f_core.Diff2Flow(d2f_core.scaled_linear(), "v")
            if start < 1
            else d2f_core.Diff2Flow(d2f_core.rescale_zero_terminal_snr(d2f_core.scaled_linear()), "v")
        )
        assert student.sigma_max == pytest.approx(start)
        noise, _ = d2f_core.get_objective("reflow").draw(
            pairs.latents[3:4], student, None, data.extras[3]["noise"][None]
        )
        line = d2f_core.interpolant(pairs.latents[3:4], noise, student.sigma_max)
        torch.testing.assert_close(line, student.sigma_max * pair_noise(7, 3, SHAPE)[None])
        torch.testing.assert_close(noise, pairs.line_noise(student.sigma_max)[3:4])
    net = CondNet(0).requires_grad_(False)
    modules = select_target_modules(net, "all")
    adapters = {
        n: make_adapter("LoRA", m.weight.shape, 4, 4.0, torch.Generator().manual_seed(0)) for n, m in modules.items()
    }
    attach_parametrizations(modules, adapters)
    _, d2f = teacher()
    cond = {"context": torch.cat([data.conds[i]["context"] for i in range(14)])}
    sigmas = d2f_core.sample_training_sigmas(14, sigma_max=d2f.sigma_max, generator=torch.Generator().manual_seed(3))

    # MSE, not reflow's recommended pseudo-Huber: its per-sample gradients of fixed size learn this toy more slowly
    config = TrainConfig(objective="reflow", steps=60, batch_size=4, learning_rate=1e-2, rank=4, loss="mse")

    def fixed_loss() -> float:  # the trained loss on all pairs at fixed sigmas, before and after
        with torch.no_grad():
            return (
                d2f_core.get_objective("reflow")
                .loss(net, d2f, pairs.latents, pairs.line_noise(), sigmas, **config.loss_options(), **cond)
                .loss.item()
            )

    before = fixed_loss()
    Trainer(net, adapters, d2f, config, data).run()
    assert fixed_loss() < 0.9 * before  # the same pairs and sigmas: any drop is learning
