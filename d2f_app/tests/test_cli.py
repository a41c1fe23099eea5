"""The CLI's options and refusals that need no ComfyUI (the end-to-end runs are in tests/test_comfy_cli.py)."""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import subprocess
import sys

import pytest

from d2f_app import train as train_command
from d2f_app.cli import build_parser, main
from d2f_app.options import make_config, read_toml, write_toml
from training import TrainConfig
from training.files import save_training_state
from training.tests.helpers import make_run

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_every_training_option_is_a_flag_and_a_toml_key(tmp_path) -> None:
    parser = build_parser()
    flags = {f"--{f.name.replace('_', '-')}": f for f in dataclasses.fields(TrainConfig)}
    train = next(a for a in parser._subparsers._group_actions[0].choices.items() if a[0] == "train")[1]
    known = {s for action in train._actions for s in action.option_strings}
    assert set(flags) <= known
    args = parser.parse_args(
        ["train", "--steps", "7", "--no-zero-terminal-snr", "--dtype", "bf16", "--learning-rate", "2e-4"]
    )
    given = {k: v for k, v in vars(args).items() if k in {f.name for f in dataclasses.fields(TrainConfig)}}
    assert given == {
        "steps": 7,
        "zero_terminal_snr": False,
        "dtype": "bf16",
        "learning_rate": 2e-4,
    }  # defaults are not "given"
    # TOML < flags, and the file the CLI writes reads back to the same options
    write_toml(
        tmp_path / "run.toml",
        {
            "cache": "/c",
            "checkpoint": "/m.safetensors",
            "output": "/o",
            "name": "x",
            **TrainConfig(steps=9, objective="naive_fm", caption_dropout=0.1).to_dict(),
        },
        "train",
    )
    values = read_toml(tmp_path / "run.toml", TrainConfig, train_command.RUN_KEYS, "train")
    config = make_config(values, given, TrainConfig, "training")
    assert (config.steps, config.objective, config.dtype, config.caption_dropout, config.learning_rate) == (
        7,
        "naive_fm",
        "bf16",
        0.1,
        2e-4,
    )


def test_bad_options_and_files_are_named(tmp_path, capsys) -> None:
    (tmp_path / "bad.toml").write_text("[train]\nlearning_rat = 1e-4\n")
    assert main(["train", "--config", str(tmp_path / "bad.toml")]) == 2
    assert "unknown keys learning_rat" in capsys.readouterr().err
    (tmp_path / "broken.toml").write_text("steps = = 3")
    assert main(["train", "--config", str(tmp_path / "broken.toml")]) == 2
    assert "is not valid TOML" in capsys.readouterr().err
    assert main(["train", "--cache", str(tmp_path)]) == 2
    assert "train needs --checkpoint, --output" in capsys.readouterr().err
    assert (
        main(
            [
                "train",
                "--cache",
                str(tmp_path / "none"),
                "--checkpoint",
                "m.safetensors",
                "--output",
                str(tmp_path / "o"),
                "--caption-dropout",
                "1.5",
            ]
        )
        == 2
    )
    assert "caption_dropout must lie in [0, 1)" in capsys.readouterr().err
    # a missing cache is reported before the checkpoint is ever loaded
    assert (
        main(
            [
                "train",
                "--cache",
                str(tmp_path / "none"),
                "--checkpoint",
                "m.safetensors",
                "--output",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    assert "Run `python -m training prepare" in capsys.readouterr().err
    assert (
        main(["prepare", "--dataset", str(tmp_path / "missing"), "--checkpoint", "m", "--cache", str(tmp_path / "c")])
        == 2
    )
    assert "dataset folder" in capsys.readouterr().err
    assert main(["sample", "--checkpoint", "m", "--output", str(tmp_path / "s")]) == 2
    assert "at least one --prompt" in capsys.readouterr().err


def test_resume_from_other_options_is_refused_before_any_compute(tmp_path, capsys) -> None:
    trainer, _, _ = make_run(TrainConfig(steps=4, learning_rate=1e-3))
    trainer.run()
    save_training_state(tmp_path / "run.d2fstate", trainer.state_dict())
    base = ["train", "--resume", str(tmp_path / "run.d2fstate"), "--cache", str(tmp_path / "none"), "--checkpoint", "m"]
    assert main([*base, "--learning-rate", "5e-4", "--steps", "8"]) == 2
    assert "different configuration (learning_rate: saved 0.001, now 0.0005)" in capsys.readouterr().err
    assert main([*base, "--steps", "3"]) == 2
    assert "already at step 4, past --steps 3: raise --steps" in capsys.readouterr().err
    # with matching options the run gets as far as the (missing) cache; the output folder defaults to the state's
    assert main([*base, "--steps", "8"]) == 2
    assert "latent cache" in capsys.readouterr().err
    assert main(["train", "--resume", str(tmp_path / "nope.d2fstate"), "--cache", "c", "--checkpoint", "m"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_a_state_from_before_an_option_resumes_with_the_value_it_trained_with(tmp_path, capsys) -> None:
    """A reflow state saved before loss and grid_share existed trained with MSE and no share on the grid
    (TrainConfig.from_dict): resumed without flags it continues, not refused for today's defaults."""
    trainer, _, _ = make_run(TrainConfig(objective="reflow", steps=2, loss="mse", grid_share=0.0))
    trainer.run()
    state = trainer.state_dict()
    for option in ("loss", "grid_share"):
        del state["config"][option]
    save_training_state(tmp_path / "old.d2fstate", state)
    base = ["train", "--resume", str(tmp_path / "old.d2fstate"), "--pairs", str(tmp_path / "none"), "--checkpoint", "m"]
    assert main([*base, "--steps", "4"]) == 2
    err = capsys.readouterr().err
    assert "different configuration" not in err and "pairs" in err, err
    assert main([*base, "--steps", "4", "--grid-share", "0.5"]) == 2
    assert "different configuration (grid_share: saved 0.0, now 0.5)" in capsys.readouterr().err


def subcommand_parsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    return {"": parser, **parser._subparsers._group_actions[0].choices}


@pytest.mark.parametrize("command", list(subcommand_parsers()))
def test_help_of_every_subcommand_shows_every_flag_help(command: str) -> None:
    """``--help`` of the top level and of every subcommand exits 0 and prints each flag's help text
    as written (generated ones included: a literal % in a config field's help must survive argparse's
    %-formatting, and no argparse internals may leak into the text)."""
    result = subprocess.run(
        [sys.executable, "-m", "training", *([command] if command else []), "--help"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    printed = "".join(result.stdout.split())  # argparse re-wraps the text
    assert "option_strings" not in printed
    actions = subcommand_parsers()[command]._actions
    actions = [
        a
        for a in actions + [c for a in actions for c in getattr(a, "_choices_actions", [])]  # subcommands' help
        if a.help and a.help != argparse.SUPPRESS
    ]
    assert len(actions) > 1
    for action in actions:
        expected = action.help.replace("%%", "%")
        assert "".join(expected.split()) in printed, f"{action.option_strings}: help not printed as written"


def test_module_entry_point_runs() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "training", "--help"], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert result.returncode == 0 and "prepare" in result.stdout and "sample" in result.stdout


@pytest.mark.parametrize("name", ["steps", "rank"])
def test_non_positive_counts_are_refused(name, capsys) -> None:
    assert main(["train", "--cache", "c", "--checkpoint", "m", "--output", "o", f"--{name}", "0"]) == 2
    assert f"{name} must be a positive integer" in capsys.readouterr().err


def test_every_pairs_option_is_a_flag_and_a_toml_key(tmp_path) -> None:
    from d2f_app.pairs import RUN_KEYS, pairs_values
    from training.config import PairsConfig

    parser = build_parser()
    pairs = parser._subparsers._group_actions[0].choices["pairs"]
    known = {s for action in pairs._actions for s in action.option_strings}
    assert {f"--{f.name.replace('_', '-')}" for f in dataclasses.fields(PairsConfig)} | {
        "--checkpoint",
        "--prompts",
        "--output",
    } <= known
    write_toml(
        tmp_path / "pairs.toml",
        {
            "checkpoint": "/m.safetensors",
            "prompts": "/p.txt",
            "output": "/o",
            **PairsConfig(count=64, steps=16, cfg=3.0, batch_size=4, shard_size=16).to_dict(),
        },
        "pairs",
    )
    args = parser.parse_args(["pairs", "--config", str(tmp_path / "pairs.toml"), "--steps", "8", "--zero-terminal-snr"])
    run, config = pairs_values(args)  # TOML < flags
    expected = {"checkpoint": "/m.safetensors", "lora": None, "prompts": "/p.txt", "output": "/o", "invert_cache": None}
    assert run == expected and set(run) == set(RUN_KEYS)
    assert (config.count, config.steps, config.cfg, config.batch_size, config.shard_size, config.zero_terminal_snr) == (
        64,
        8,
        3.0,
        4,
        16,
        True,
    )


def test_a_pairs_toml_from_before_the_grid_option_keeps_its_uniform_grid(tmp_path) -> None:
    """A pairs.toml names its solver (sampler, steps) but no grid when it was written before the grid option:
    its folder's pairs ran the uniform grid, so appending with it must too; a file naming a grid, or a --grid
    flag, wins; a file naming no solver gets the default grid."""
    from d2f_app.pairs import pairs_values
    from training.config import PairsConfig

    parser = build_parser()
    run_keys = {"checkpoint": "/m.safetensors", "prompts": "/p.txt", "output": "/o"}
    older = {k: v for k, v in PairsConfig(sampler="euler", steps=32).to_dict().items() if k != "grid"}
    cases = [
        ({**run_keys, **older}, [], "uniform"),
        ({**run_keys, **older}, ["--grid", "sigma_min"], "sigma_min"),
        ({**run_keys, **older, "grid": "sigma_min"}, [], "sigma_min"),
        ({**run_keys, "count": 8}, [], PairsConfig().grid),
    ]
    for values, flags, grid in cases:
        write_toml(tmp_path / "pairs.toml", values, "pairs")
        _, config = pairs_values(parser.parse_args(["pairs", "--config", str(tmp_path / "pairs.toml"), *flags]))
        assert config.grid == grid, (values, flags)


def test_pairs_and_reflow_refusals_come_before_any_model_is_loaded(tmp_path, capsys) -> None:
    (tmp_path / "empty.txt").write_text("\n  \n")
    (tmp_path / "prompts.txt").write_text("a cat\n\na dog\n")
    base = ["pairs", "--checkpoint", str(tmp_path / "m.safetensors"), "--output", str(tmp_path / "out")]
    cases = [
        (["pairs", "--output", "o"], "pairs needs --checkpoint, --prompts (as flags or keys of --config)"),
        (
            [*base, "--prompts", str(tmp_path / "none.txt")],
            "--prompts " + str(tmp_path / "none.txt") + " does not exist",
        ),
        ([*base, "--prompts", str(tmp_path / "empty.txt")], "holds no prompt (only empty lines)"),
        ([*base, "--invert-cache", str(tmp_path / "no_cache")], "--invert-cache: latent cache"),
        ([*base, "--invert-cache", "c", "--count", "5"], "--count 5 generates pairs from prompts, but no --prompts"),
        (
            [*base, "--invert-cache", "c", "--prompts", str(tmp_path / "prompts.txt"), "--count", "0"],
            "--prompts is unused with --count 0",
        ),
        (
            [*base, "--prompts", str(tmp_path / "prompts.txt")],
            "--checkpoint " + str(tmp_path / "m.safetensors") + " does not exist",
        ),
        (
            [*base, "--prompts", str(tmp_path / "prompts.txt"), "--count", "0"],
            "--count 0 generates nothing: give --count N, or --invert-cache CACHE to invert a latent cache",
        ),
        (
            [*base, "--prompts", str(tmp_path / "prompts.txt"), "--width", "100"],
            "width must be a multiple of 8, got 100",
        ),
        (
            [*base, "--prompts", str(tmp_path / "prompts.txt"), "--shard-size", "12"],
            "shard_size 12 must be a multiple of batch_size 8",
        ),
        (
            ["train", "--cache", "c", "--checkpoint", "m", "--output", "o", "--objective", "reflow"],
            "objective reflow trains on (noise, image) pairs: pass --pairs DIR",
        ),
        (
            ["train", "--cache", "c", "--pairs", "p", "--checkpoint", "m", "--output", "o"],
            "--cache (a latent cache) or --pairs",
        ),
        (
            ["train", "--cache", "c", "--checkpoint", "m", "--output", "o", "--inverted-share", "0.5"],
            "--inverted-share 0.5 mixes reflow pairs of inverted images into every batch: pass --pairs DIR",
        ),
        (
            ["train", "--pairs", str(tmp_path / "nope"), "--checkpoint", "m", "--output", "o", "--objective", "reflow"],
            "it does not exist. Generate pairs first: python -m training pairs",
        ),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        assert message in capsys.readouterr().err, argv
    (tmp_path / "bad.toml").write_text("[pairs]\ncounts = 3\n")
    assert main(["pairs", "--config", str(tmp_path / "bad.toml")]) == 2
    assert "unknown keys counts" in capsys.readouterr().err


def test_the_cli_refuses_a_missing_optimizer_before_any_compute(monkeypatch, capsys) -> None:
    from training import optimizers

    monkeypatch.setitem(
        optimizers.OPTIMIZERS,
        "Lion",
        optimizers.Optimizer("Lion", "absent", lambda p, lr, wd: None, "no_such_module_d2f", "lion-pytorch"),
    )
    assert main(["train", "--cache", "c", "--checkpoint", "m", "--output", "o", "--optimizer", "Lion"]) == 2
    assert "--optimizer Lion: optimizer Lion needs lion-pytorch: pip install 'lion-pytorch'" in capsys.readouterr().err
