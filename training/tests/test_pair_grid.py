"""The pairs' sigma grid (PairsConfig ``grid``, PairSettings ``grid`` / ``sigma_floor``): a pair is the
teacher's sampler on ``fm_sigmas(..., sigma_floor=...)``, the config's grid becomes the teacher's sigma_min
through :func:`training.pairs.pair_settings`, the settings refuse a floor that does not fit the grid, and a
folder from before the option (no grid in its manifest) keeps appending with the uniform grid it ran."""

from __future__ import annotations

import json
import pathlib

import pytest
import torch

import d2f_core
from training.config import PairsConfig
from training.pairs import MANIFEST, PairsError, generate_pairs, load_pairs, pair_noise, pair_settings
from training.tests.pairs_teacher import SHAPE, negative, prompts, settings, teacher


def test_pairs_config_grid_becomes_the_teachers_sigma_min() -> None:
    _, d2f = teacher()
    assert PairsConfig().grid == "sigma_min" and PairsConfig().sampler == "ab2" and PairsConfig().steps == 10
    made = pair_settings(PairsConfig(), SHAPE, d2f.sigma_max, d2f.sigma_min, {"name": "tiny"})
    assert (made.grid, made.sigma_floor) == ("sigma_min", d2f.sigma_min)
    assert d2f.sigma_min in made.sigmas().tolist()
    uniform = pair_settings(PairsConfig(grid="uniform"), SHAPE, d2f.sigma_max, d2f.sigma_min, {"name": "tiny"})
    assert (uniform.grid, uniform.sigma_floor) == ("uniform", 0.0)
    assert torch.equal(uniform.sigmas(), d2f_core.fm_sigmas(10, d2f.sigma_max))
    with pytest.raises(ValueError, match="grid='fine' is not supported: choose one of uniform, sigma_min"):
        PairsConfig(grid="fine")


def test_the_settings_refuse_a_floor_that_does_not_fit_the_grid() -> None:
    _, d2f = teacher()
    with pytest.raises(PairsError, match="grid 'fine' is unknown"):
        settings(d2f, grid="fine")
    for grid, floor in (("uniform", 0.03), ("sigma_min", 0.0), ("sigma_min", d2f.sigma_max)):
        with pytest.raises(PairsError, match=f"sigma_floor {floor} does not fit grid {grid}"):
            settings(d2f, grid=grid, sigma_floor=floor)


@pytest.mark.parametrize("grid", sorted(d2f_core.FM_GRIDS))
def test_a_pair_is_the_teachers_sampler_on_its_grid(grid: str, tmp_path: pathlib.Path) -> None:
    """Pair 2 by hand at cfg 1: ab2 from sigma_max * z along fm_sigmas with the grid's floor; the two grids give
    different pairs (a generator that ignored the grid would make the same)."""
    velocity, d2f = teacher()
    s = settings(d2f, sampler="ab2", cfg=1.0, grid=grid, sigma_floor=d2f_core.grid_floor(grid, d2f.sigma_min))
    generate_pairs(velocity, prompts(), tmp_path / grid, 4, s, shard_size=4)
    pairs = load_pairs(tmp_path / grid)
    z = pair_noise(s.seed, 2, SHAPE)[None]
    sigmas = d2f_core.fm_sigmas(s.steps, d2f.sigma_max, sigma_floor=d2f_core.grid_floor(grid, d2f.sigma_min))
    cond = d2f_core.cfg_velocity(velocity, prompts()[2], None, 1.0)
    image = d2f_core.get_sampler("ab2")(cond, d2f.sigma_max * z, sigmas)
    torch.testing.assert_close(pairs.latents[2:3], image, rtol=1e-4, atol=1e-5)
    assert pairs.settings["grid"] == grid
    other = "uniform" if grid == "sigma_min" else "sigma_min"
    far = d2f_core.get_sampler("ab2")(
        cond,
        d2f.sigma_max * z,
        d2f_core.fm_sigmas(s.steps, d2f.sigma_max, sigma_floor=d2f_core.grid_floor(other, d2f.sigma_min)),
    )
    assert not torch.allclose(far, image, rtol=1e-3, atol=1e-4)


def test_a_folder_from_before_the_grid_appends_with_the_uniform_grid(tmp_path: pathlib.Path) -> None:
    velocity, d2f = teacher()
    folder = tmp_path / "pairs"
    uniform = settings(d2f, sampler="ab2")
    generate_pairs(velocity, prompts(), folder, 4, uniform, negative(), shard_size=4)
    manifest = json.loads((folder / MANIFEST).read_text())
    for key in ("grid", "sigma_floor"):  # as written before the option existed
        del manifest["settings"][key]
    (folder / MANIFEST).write_text(json.dumps(manifest))
    first = load_pairs(folder)
    assert (first.settings["grid"], first.settings["sigma_floor"]) == ("uniform", 0.0)
    floor = settings(d2f, sampler="ab2", grid="sigma_min", sigma_floor=d2f.sigma_min)
    with pytest.raises(PairsError, match="grid: folder 'uniform', now 'sigma_min'"):
        generate_pairs(velocity, prompts(), folder, 8, floor, negative(), shard_size=4)
    assert generate_pairs(velocity, prompts(), folder, 8, uniform, negative(), shard_size=4).generated == 4
    assert torch.equal(load_pairs(folder).latents[:4], first.latents)
