"""What a pair costs in teacher network calls (training/pairs.py): with cfg, cond and uncond go through the
network as one batch, once per evaluation, and the calls per batch block are the sampler's
``Sampler.evaluations(steps)`` (the count benchmarks/pair_accuracy.py tabulates and the pairs' help states)."""

from __future__ import annotations

import pathlib

import pytest
import torch

import d2f_core
from training.config import PairsConfig
from training.pairs import PairsError, generate_pairs, load_pairs
from training.tests.helpers import CondNet
from training.tests.pairs_teacher import negative, prompts, settings


def counting_teacher(calls: list[int]):
    """The pairs tests' tiny teacher, recording the batch size of every network call."""
    net = CondNet(seed=11).eval().requires_grad_(False)
    d2f = d2f_core.Diff2Flow(d2f_core.scaled_linear(), "v")

    def network(x: torch.Tensor, t: torch.Tensor, **cond: torch.Tensor) -> torch.Tensor:
        calls.append(x.shape[0])
        return net(x, t, **cond)

    return d2f.velocity_fn(lambda x, t, c: network(x, t, **c)), d2f


@pytest.mark.parametrize("sampler", sorted(d2f_core.SAMPLERS))
@pytest.mark.parametrize("cfg", [2.5, 1.0])
def test_cfg_branches_share_one_network_call_per_evaluation(sampler: str, cfg: float, tmp_path: pathlib.Path) -> None:
    """12 pairs in blocks of 4 (3 blocks), 5 steps: every network call holds the whole block, doubled with cfg
    (cond and uncond in one batch; splitting them would double the calls and halve the batches), and the calls
    per block are the sampler's evaluations."""
    calls: list[int] = []
    velocity, d2f = counting_teacher(calls)
    s = settings(d2f, sampler=sampler, steps=5, cfg=cfg, batch_size=4)
    generate_pairs(velocity, prompts(), tmp_path / "pairs", 12, s, negative(), shard_size=4)
    evaluations = d2f_core.SAMPLERS[sampler].evaluations(5)
    assert calls == [4 * (2 if cfg != 1 else 1)] * (3 * evaluations), calls
    assert len(load_pairs(tmp_path / "pairs").index) == 12


def test_a_folder_of_the_earlier_default_appends_with_its_own_settings(tmp_path: pathlib.Path) -> None:
    """The pairs' default sampler and steps changed (32-step Euler before; benchmarks/pair_accuracy.py): a folder
    made with the earlier default is refused under the new one, the message naming both settings with the folder's
    values, and appends when its own settings are given (the CLI's pairs.toml and a saved workflow carry them)."""
    config = PairsConfig()
    assert (config.sampler, config.steps) != ("euler", 32)
    calls: list[int] = []
    velocity, d2f = counting_teacher(calls)
    folder = tmp_path / "pairs"
    old = settings(d2f, sampler="euler", steps=32)
    generate_pairs(velocity, prompts(), folder, 4, old, negative(), shard_size=4)
    first = load_pairs(folder)
    new = settings(d2f, sampler=config.sampler, steps=config.steps)
    with pytest.raises(PairsError) as refused:
        generate_pairs(velocity, prompts(), folder, 8, new, negative(), shard_size=4)
    message = str(refused.value)
    assert f"sampler: folder 'euler', now {config.sampler!r}" in message
    assert f"steps: folder 32, now {config.steps}" in message
    assert generate_pairs(velocity, prompts(), folder, 8, old, negative(), shard_size=4).generated == 4
    grown = load_pairs(folder)
    assert torch.equal(grown.latents[:4], first.latents) and grown.settings["steps"] == 32
