"""Reflow pairs of inverted real images (training/pairs.py ``invert_pairs``) and mixing them with
generated pairs in training (``TrainConfig.inverted_share``, ``TrainingData.draw_indices``).

The exactness test runs the exact Gaussian-mixture teacher through ``invert_pairs``: sampling from a
stored pair's noise returns to its image within the sampler's error, which shrinks at its order. The
rest uses the small random-weight teacher of the pair tests: the format, determinism whatever the
shards, batches, appends and processes, the refusals, and the mix ratio."""

from __future__ import annotations

import json
import logging
import math
import pathlib
import subprocess
import sys

import pytest
import torch

import d2f_core
from d2f_core.lora_metadata import LoraMetadata
from training import TrainConfig, Trainer, TrainingData
from training.data import hold_out
from training.pairs import (
    FORMAT,
    INVERTED_FORMAT,
    PairsError,
    PairSettings,
    generate_pairs,
    invert_pairs,
    load_pairs,
    pair_shards,
)
from training.tests.helpers import adapted_net
from training.tests.pairs_teacher import captions, images, negative, prompts, settings, teacher
from training.tests.torchrun import TORCHRUN, env, needs_gloo

WORKER = pathlib.Path(__file__).with_name("pairs_teacher.py")


def invert(folder: pathlib.Path, count: int, shard_size: int = 8, **kwargs):
    velocity, d2f = teacher()
    return invert_pairs(
        velocity, images(count), captions(count), folder, settings(d2f), negative(), shard_size=shard_size, **kwargs
    )


def assert_same_inverted(a: pathlib.Path, b: pathlib.Path, count: int) -> None:
    one, two = load_pairs(a), load_pairs(b)
    for pairs in (one, two):
        assert pairs.index[pairs.inverted].tolist() == list(range(count))
    for name in ("noise", "latents"):
        assert torch.equal(getattr(one, name)[one.inverted], getattr(two, name)[two.inverted]), name  # bit-identical
    assert all(torch.equal(x["context"], y["context"]) for x, y in zip(one.captions, two.captions))


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> pathlib.Path:
    """10 images inverted in one run, shards of 8."""
    folder = tmp_path_factory.mktemp("inverted") / "reference"
    summary = invert(folder, 10)
    assert (summary.count, summary.generated, summary.reused, summary.inverted) == (10, 10, 0, True)
    assert "10 inverted pairs in" in summary.report()
    return folder


# ---------------------------------------------------------------------- the exact Gaussian case
MIXTURE = d2f_core.GaussianMixture(
    torch.tensor([[1.0, -0.5, 0.3, 2.0], [-1.0, 0.8, -0.2, -1.0], [0.2, 0.2, 1.5, 0.0]]),
    torch.tensor([0.4, 0.5, 0.3]),
)


def exact_teacher(x: torch.Tensor, sigma: torch.Tensor, cond: dict) -> torch.Tensor:
    """The exact FM velocity of the mixture (latents [B, 4, 1, 1]); the caption changes nothing."""
    return MIXTURE.fm_velocity(x.flatten(1).double(), sigma.double()).reshape(x.shape).to(x.dtype)


@pytest.mark.parametrize(
    "sampler, order, grid", [("euler", 1, "uniform"), ("heun", 2, "uniform"), ("euler", 1, "sigma_min")]
)
def test_an_inverted_pair_samples_back_to_its_image_at_the_samplers_order(
    tmp_path, sampler: str, order: int, grid: str
) -> None:
    """The stored pair (z, x0) of an image x0: the teacher's sampling from sigma_max * z (as a generated pair's
    noise is used) returns to x0 within the sampler's error, shrinking as steps^-order. Measured (median over 64
    images of each one's RMS error, SD's sigma_max 0.936, uniform grid): Euler 0.098 / 0.050 / 0.025 at 16 / 32 /
    64 steps, Heun 4.6e-3 / 1.1e-3 / 2.6e-4 (d2f_core/tests/test_inversion.py says why the median). The sigma_min
    grid (SD's 0.0283) keeps one step below sigma_min up to 49 steps, which Heun takes as an Euler step (its last):
    second order from 64 steps on there, as d2f_core/tests/test_sigma_grids.py checks."""
    x0 = [x.float().reshape(4, 1, 1) for x in MIXTURE.sample(64, torch.Generator().manual_seed(4))]
    caption = [{"context": torch.zeros(1, 1, 4)}]
    errors = []
    for steps in (16, 32, 64):
        s = PairSettings(
            (4, 1, 1),
            sigma_max=0.935958,
            sampler=sampler,
            steps=steps,
            cfg=1.0,
            batch_size=16,
            grid=grid,
            sigma_floor=d2f_core.grid_floor(grid, 0.0283),
        )
        invert_pairs(exact_teacher, x0, caption, tmp_path / f"{sampler}{steps}", s, shard_size=32)
        pairs = load_pairs(tmp_path / f"{sampler}{steps}")
        assert torch.equal(pairs.latents, torch.stack(x0))  # the image itself, not a regenerated one
        velocity = d2f_core.cfg_velocity(exact_teacher, caption[0], None, 1.0)
        back = d2f_core.get_sampler(sampler)(velocity, s.sigma_max * pairs.noise.double(), s.sigmas())
        errors.append((back - pairs.latents.double()).pow(2).flatten(1).mean(1).sqrt().median().item())
    assert errors[0] < {"euler": 0.15, "heun": 0.008}[sampler], errors
    ratios = [a / b for a, b in zip(errors, errors[1:])]
    assert all(math.log2(r) == pytest.approx(order, abs=0.3) for r in ratios), (errors, ratios)


# ---------------------------------------------------------------------- format
def test_inverted_pairs_are_the_teachers_ode_run_backwards(reference) -> None:
    pairs = load_pairs(reference)
    velocity, d2f = teacher()
    s = settings(d2f)
    assert pairs.inverted.all() and pairs.generated_count == 0 and pairs.inverted_count == 10
    assert pairs.prompt.tolist() == [-1] * 10 and torch.equal(pairs.latents, torch.stack(images(10)))
    # image 4 by hand: CFG with its own caption, Euler along the grid reversed, divided by sigma_max
    guided = d2f_core.cfg_velocity(velocity, captions(10)[4], negative(), s.cfg)
    top = d2f_core.invert("euler", guided, images(5)[4][None], s.sigmas())
    torch.testing.assert_close(pairs.noise[4:5], top / d2f.sigma_max, rtol=1e-5, atol=1e-6)
    assert torch.equal(pairs.captions[4]["context"], captions(10)[4]["context"])
    # one copy of each distinct caption per shard
    shard = pair_shards(reference, inverted=True)[0][2]
    from safetensors.torch import load_file

    stored = load_file(str(shard))
    assert (
        stored["caption"].tolist() == [0, 1, 2, 0, 1, 2, 0, 1]
        and len([k for k in stored if k.startswith("cond/")]) == 3
    )
    manifest = json.loads((reference / "manifest.json").read_text())
    assert (manifest["format"], manifest["inverted"], manifest["count"], manifest["prompts"]) == (
        INVERTED_FORMAT,
        10,
        0,
        0,
    )
    data = pairs.training_data()
    assert data.inverted == [True] * 10 and torch.equal(data.extras[4]["noise"], pairs.noise[4])
    assert torch.equal(data.conds[4]["context"], captions(10)[4]["context"])


def test_generated_and_inverted_pairs_share_a_folder(reference, tmp_path) -> None:
    """Inverting into a folder of generated pairs (and generating into a folder of inverted images alone):
    both kept, generated rows first; a folder without inverted images keeps the format every reader reads."""
    velocity, d2f = teacher()
    mixed = tmp_path / "mixed"
    generate_pairs(velocity, prompts(), mixed, 6, settings(d2f), negative(), shard_size=8)
    assert json.loads((mixed / "manifest.json").read_text())["format"] == FORMAT
    plain = load_pairs(mixed)
    assert plain.inverted is None and plain.training_data().inverted is None  # loads as before
    invert(mixed, 10)
    pairs = load_pairs(mixed)
    assert (pairs.generated_count, pairs.inverted_count) == (6, 10)
    assert pairs.inverted.tolist() == [False] * 6 + [True] * 10 and pairs.index.tolist() == [*range(6), *range(10)]
    assert torch.equal(pairs.latents[:6], plain.latents) and pairs.prompt.tolist()[:6] == [0, 1, 2, 0, 1, 2]
    manifest = json.loads((mixed / "manifest.json").read_text())
    assert (manifest["format"], manifest["count"], manifest["inverted"], manifest["prompts"]) == (
        INVERTED_FORMAT,
        6,
        10,
        3,
    )
    # appending generated pairs keeps the inverted record and the format
    generate_pairs(velocity, prompts(), mixed, 8, settings(d2f), negative(), shard_size=8)
    manifest = json.loads((mixed / "manifest.json").read_text())
    assert (manifest["format"], manifest["count"], manifest["inverted"]) == (INVERTED_FORMAT, 8, 10)
    data = load_pairs(mixed).training_data()
    assert data.inverted == [False] * 8 + [True] * 10
    assert torch.equal(data.conds[9]["context"], captions(10)[1]["context"])  # inverted image 1's own caption
    assert_same_inverted(reference, mixed, 10)

    # a folder of inverted images alone takes prompts later (they join the negative it was inverted with)
    only = tmp_path / "only"
    invert(only, 4)
    generate_pairs(velocity, prompts(), only, 4, settings(d2f), negative(), shard_size=8)
    both = load_pairs(only)
    assert (both.generated_count, both.inverted_count) == (4, 4) and len(both.conds) == 3
    with pytest.raises(PairsError, match="other prompts \\(or another negative prompt"):
        invert_pairs(velocity, images(4), captions(4), only, settings(d2f), {"context": torch.ones(1, 3, 4)})


def test_an_old_reader_refuses_a_folder_with_inverted_pairs(reference, monkeypatch) -> None:
    """A toolkit that reads only the generated pairs' format refuses the folder instead of training on half."""
    import training.pairs as pairs_module

    monkeypatch.setattr(pairs_module, "READABLE_FORMATS", (FORMAT,))
    with pytest.raises(PairsError, match="is not a Diff2Flow pairs folder this toolkit reads"):
        load_pairs(reference)


# ---------------------------------------------------------------------- determinism
@pytest.mark.parametrize("shard_size", [4, 12])
def test_an_image_gives_the_same_pair_whatever_the_shards_and_its_batch(reference, tmp_path, shard_size) -> None:
    invert(tmp_path / "other", 10, shard_size=shard_size)
    assert_same_inverted(reference, tmp_path / "other", 10)
    # image 5 alone (its batch padded with copies of itself): the bits of the 10-image run
    velocity, d2f = teacher()
    invert_pairs(velocity, images(6)[5:], captions(6)[5:], tmp_path / "alone", settings(d2f), negative(), shard_size=4)
    assert torch.equal(load_pairs(tmp_path / "alone").noise[0], load_pairs(reference).noise[5])


def test_appending_images_inverts_only_the_new_ones(reference, tmp_path) -> None:
    folder = tmp_path / "grown"
    assert invert(folder, 5).generated == 5
    summary = invert(folder, 10, shard_size=4)
    assert (summary.generated, summary.reused, summary.count) == (5, 5, 10)
    assert [(a, b) for a, b, _ in pair_shards(folder, inverted=True)] == [(0, 5), (5, 8), (8, 10)]
    assert_same_inverted(reference, folder, 10)
    assert invert(folder, 10).generated == 0
    # other images (or captions) at the places the folder holds: refused, naming the place
    velocity, d2f = teacher()
    shuffled = images(10)[::-1]
    with pytest.raises(PairsError, match="another image or caption as inverted pair 0 than this run's image 0 \\(b\\)"):
        invert_pairs(
            velocity, shuffled, captions(10), folder, settings(d2f), negative(), labels=["b"] * 10, shard_size=8
        )
    recaptioned = [captions(10)[0]] * 10
    with pytest.raises(PairsError, match="another image or caption as inverted pair 1"):
        invert_pairs(velocity, images(10), recaptioned, folder, settings(d2f), negative(), shard_size=8)


def test_an_interrupted_inversion_keeps_its_finished_shards_and_resumes(reference, tmp_path) -> None:
    folder = tmp_path / "cut"
    calls = []

    def cancel_at_third_batch() -> None:
        calls.append(1)
        if len(calls) == 3:
            raise InterruptedError("cancelled")

    with pytest.raises(InterruptedError):
        invert(folder, 10, shard_size=4, check_cancel=cancel_at_third_batch)
    assert [(a, b) for a, b, _ in pair_shards(folder, inverted=True)] == [(0, 4), (4, 8)]
    assert load_pairs(folder).inverted_count == 8  # a partial folder is usable data
    assert invert(folder, 10, shard_size=4).generated == 2
    assert_same_inverted(reference, folder, 10)


@pytest.mark.slow  # 7.8 s on 2 cores (starting two processes)
@needs_gloo
def test_two_torchrun_processes_invert_the_pairs_of_one(reference, tmp_path) -> None:
    result = subprocess.run(
        [sys.executable, *TORCHRUN, str(WORKER), str(tmp_path / "two"), "10", "4", "invert"],
        capture_output=True,
        text=True,
        env=env(),
        cwd=tmp_path,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "rank 0: generated 6" in result.stdout and "rank 1: generated 4" in result.stdout  # disjoint shards
    assert_same_inverted(reference, tmp_path / "two", 10)
    assert json.loads((tmp_path / "two" / "manifest.json").read_text())["inverted"] == 10


# ---------------------------------------------------------------------- refusals
def test_refusals_name_the_input_and_the_fix(reference, tmp_path, monkeypatch) -> None:
    velocity, d2f = teacher()
    s = settings(d2f)
    with pytest.raises(PairsError, match="no images: give at least one latent"):
        invert_pairs(velocity, [], captions(1), tmp_path / "a", s, negative())
    with pytest.raises(PairsError, match="3 images but 2 captions"):
        invert_pairs(velocity, images(3), captions(2), tmp_path / "a", s, negative())
    with pytest.raises(
        PairsError, match="image 1 has the latent shape \\[4, 8, 16\\] but the pairs have \\[4, 8, 8\\]"
    ):
        invert_pairs(velocity, [images(1)[0], torch.zeros(4, 8, 16)], captions(1), tmp_path / "a", s, negative())
    with pytest.raises(PairsError, match="cfg 2.5 needs the negative"):
        invert_pairs(velocity, images(2), captions(2), tmp_path / "a", s)
    with pytest.raises(PairsError, match="other settings \\(steps: folder 4, now 8\\)"):
        invert_pairs(velocity, images(2), captions(2), reference, settings(d2f, steps=8), negative(), shard_size=8)
    # a sampler that cannot run backwards (every registered one can today: a stand-in)
    fake = d2f_core.Sampler("one_way", d2f_core.sample_euler, 1, "a sampler that reads sigma as a noise level")
    monkeypatch.setitem(d2f_core.SAMPLERS, "one_way", fake)
    with pytest.raises(PairsError, match="sampler 'one_way' cannot run the ODE backwards.*use one of euler, heun"):
        invert_pairs(velocity, images(2), captions(2), tmp_path / "b", settings(d2f, sampler="one_way"), negative())
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# ---------------------------------------------------------------------- mixing in training
def mixed_data(generated: int = 12, inverted: int = 4) -> TrainingData:
    gen = torch.Generator().manual_seed(0)
    n = generated + inverted
    return TrainingData(
        [torch.randn(4, 8, 8, generator=gen) for _ in range(n)],
        [{"context": torch.randn(1, 3, 4, generator=gen)} for _ in range(n)],
        uncond={"context": torch.zeros(1, 3, 4)},
        extras=[{"noise": torch.randn(4, 8, 8, generator=gen)} for _ in range(n)],
        inverted=[False] * generated + [True] * inverted,
    )


@pytest.mark.parametrize("share", [0.0, 0.3, 0.75, 1.0])
def test_every_batch_draws_the_chosen_share_of_inverted_pairs(share: float) -> None:
    """inverted_share 0.3 of 4-sample batches: 1 or 2 inverted per batch, 30 % of all drawn (a quarter of the data
    is inverted, so a uniform draw would give 25 %)."""
    data = mixed_data()
    gen = torch.Generator().manual_seed(1)
    counts = [sum(data.inverted[i] for i in data.draw_indices(4, gen, share)) for _ in range(4000)]
    assert sum(counts) / (4 * len(counts)) == pytest.approx(share, abs=0.01)
    assert set(counts) <= {math.floor(4 * share), math.ceil(4 * share)}  # stratified, not binomial
    assert data.draw_indices(4, torch.Generator().manual_seed(2), share) == data.draw_indices(
        4, torch.Generator().manual_seed(2), share
    )  # deterministic from the generator
    # data without inverted samples draws as it always did
    plain = TrainingData(data.latents, data.conds, data.uncond, data.extras)
    old, new = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    torch.multinomial(torch.ones(1, dtype=torch.float64), 1, generator=old)  # the bucket
    assert plain.draw_indices(4, new) == [plain.buckets[0][int(i)] for i in torch.randperm(16, generator=old)[:4]]


def test_the_trainer_draws_its_batches_at_inverted_share(monkeypatch) -> None:
    """The engine hands the option to the draw: with inverted_share 0.5 half the trained samples are inverted
    pairs (a quarter of the data); ignoring the option would give none (share 0) or a quarter (uniform)."""
    data = mixed_data()
    drawn = []
    batch = TrainingData.batch

    def record(self, indices, dropout=None):
        drawn.extend(indices)
        return batch(self, indices, dropout)

    monkeypatch.setattr(TrainingData, "batch", record)
    config = TrainConfig(objective="reflow", steps=40, batch_size=4, rank=2, inverted_share=0.5)
    net, adapters = adapted_net(config)
    d2f = d2f_core.Diff2Flow(d2f_core.scaled_linear(), "eps")
    Trainer(net, adapters, d2f, config, data).run()
    assert sum(data.inverted[i] for i in drawn) / len(drawn) == pytest.approx(0.5, abs=0.02)


def test_inverted_share_refusals_warning_and_hold_out(caplog) -> None:
    config = TrainConfig(objective="reflow", steps=1, batch_size=2, rank=2, inverted_share=0.5)
    net, adapters = adapted_net(config)
    d2f = d2f_core.Diff2Flow(d2f_core.scaled_linear(), "eps")
    generated_only = mixed_data(8, 0)
    generated_only.inverted = None
    generated_only = TrainingData(generated_only.latents, generated_only.conds, extras=generated_only.extras)
    with pytest.raises(
        ValueError,
        match="inverted_share 0.5 draws inverted pairs, but the training data holds none: "
        "invert images .*pairs --invert-cache CACHE.*or set inverted_share 0",
    ):
        Trainer(net, adapters, d2f, config, generated_only)
    with pytest.raises(
        ValueError,
        match="inverted_share 0.5 draws 50% of every batch from generated pairs, but the "
        "pairs hold inverted images only: set inverted_share 1",
    ):
        Trainer(net, adapters, d2f, config, mixed_data(0, 4))
    Trainer(net, adapters, d2f, TrainConfig(**{**config.to_dict(), "inverted_share": 1.0}), mixed_data(0, 4))
    with caplog.at_level(logging.WARNING, logger="diff2flow"):
        Trainer(net, adapters, d2f, TrainConfig(**{**config.to_dict(), "inverted_share": 0.0}), mixed_data())
    assert "holds 4 pairs of inverted images, which inverted_share 0 leaves out" in caplog.text
    with pytest.raises(ValueError, match="inverted_share must lie in \\[0, 1\\]"):
        TrainConfig(inverted_share=1.5)
    # a resume must keep the share; the held-out samples keep their marks
    assert "inverted_share: saved 0.0, now 0.5" in config.resume_mismatch(
        TrainConfig(**{**config.to_dict(), "inverted_share": 0.0})
    )
    kept, held = hold_out(mixed_data(), 0.25)
    assert kept.inverted_count + held.inverted_count == 4 and len(held.inverted) == 4


def test_the_lora_records_the_share() -> None:
    meta = LoraMetadata("reflow", "eps", False, inverted_share=0.3)
    header = meta.to_header()
    assert header["diff2flow.inverted_share"] == "0.3" and LoraMetadata.from_header(header) == meta
    assert "diff2flow.inverted_share" not in LoraMetadata("reflow", "eps", False).to_header()
