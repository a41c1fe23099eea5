"""LoRA metadata round trip and its errors."""

from __future__ import annotations

import pytest

import d2f_core
from d2f_core.lora_metadata import FORMAT_VERSION, LoraMetadata


def test_round_trip_through_string_header() -> None:
    meta = LoraMetadata(
        "diff2flow",
        "v_prediction",
        True,
        rank=8,
        alpha=8.0,
        steps=500,
        base_model_hash="abc",
        optimizer="Prodigy",
        learning_rate=1.0,
    )
    header = meta.to_header()
    assert header["diff2flow.optimizer"] == "Prodigy" and header["diff2flow.learning_rate"] == "1.0"
    assert all(isinstance(v, str) for v in header.values())
    assert header["diff2flow.prediction"] == "v" and header["diff2flow.zero_terminal_snr"] == "true"
    assert header["diff2flow.format_version"] == str(FORMAT_VERSION)
    assert LoraMetadata.from_header({**header, "ss_other_tool": "x"}) == meta


def test_plain_lora_has_no_metadata() -> None:
    assert LoraMetadata.from_header(None) is None
    assert LoraMetadata.from_header({"ss_network_dim": "8"}) is None


@pytest.mark.parametrize(
    "change,match",
    [
        ({"diff2flow.format_version": "99"}, "newer than this toolkit"),
        ({"diff2flow.zero_terminal_snr": "yes"}, "zero_terminal_snr = 'yes'"),
        ({"diff2flow.objective": "x0"}, "objective 'x0' is unknown"),
        ({"diff2flow.prediction": "eps"}, "only valid for v-prediction"),
    ],
)
def test_bad_metadata_raises(change: dict, match: str) -> None:
    header = {**LoraMetadata("diff2flow", "v", True).to_header(), **change}
    with pytest.raises(ValueError, match=match):
        LoraMetadata.from_header(header)


def test_recommended_sampling_is_recorded_and_read_back() -> None:
    meta = LoraMetadata(
        "reflow", "eps", False, rank=16, sampler="euler", sampling_steps=2, sampling_cfg=1.0, teacher_cfg=5.0
    )
    back = LoraMetadata.from_header(meta.to_header())
    assert back == meta and back.sampling_defaults() == ("euler", 2, 1.0) and back.teacher_cfg == 5.0


def test_files_without_the_sampling_fields_parse_and_sample_by_their_objective() -> None:
    """A format-version-1 header with only the required fields and the training record: the sampling
    fields are optional."""
    minimal = {
        "diff2flow.objective": "diff2flow",
        "diff2flow.prediction": "eps",
        "diff2flow.zero_terminal_snr": "false",
        "diff2flow.schedule": "scaled_linear",
        "diff2flow.rank": "8",
        "diff2flow.alpha": "8.0",
        "diff2flow.algorithm": "LoRA",
        "diff2flow.steps": "500",
        "diff2flow.base_model_hash": "abc",
        "diff2flow.format_version": "1",
    }
    meta = LoraMetadata.from_header(minimal)
    assert meta.sampling_steps is None and meta.teacher_cfg is None
    registry = d2f_core.get_objective("diff2flow")
    assert meta.sampling_defaults() == (registry.sampler, registry.steps, registry.cfg)
    reflow = LoraMetadata.from_header({**minimal, "diff2flow.objective": "reflow"})
    assert reflow.sampling_defaults() == ("euler", 2, 1.0)  # the registry's reflow entry
    # keys this version does not know are ignored: a file of the same format version with more fields parses
    assert LoraMetadata.from_header({**minimal, "diff2flow.something_new": "1"}) == meta


@pytest.mark.parametrize(
    "change,match",
    [
        ({"diff2flow.sampling_steps": "two"}, "sampling_steps = 'two'"),
        ({"diff2flow.sampling_steps": "0"}, "sampling_steps must be >= 1"),
        ({"diff2flow.teacher_cfg": "high"}, "teacher_cfg = 'high'"),
    ],
)
def test_bad_sampling_fields_are_named(change: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        LoraMetadata.from_header({**LoraMetadata("reflow", "eps", False).to_header(), **change})


def test_depth_task_round_trips_and_files_without_a_task_are_image_models() -> None:
    from d2f_core.lora_metadata import DEPTH_NORMALIZATION

    meta = LoraMetadata(
        "diff2flow", "v", False, algorithm="Full", task="depth", normalization=DEPTH_NORMALIZATION, sampling_steps=2
    )
    header = meta.to_header()
    assert header["diff2flow.task"] == "depth" and header["diff2flow.normalization"] == DEPTH_NORMALIZATION
    assert LoraMetadata.from_header(header) == meta
    without_task = {k: v for k, v in header.items() if k not in ("diff2flow.task", "diff2flow.normalization")}
    assert LoraMetadata.from_header(without_task).task == "image"
    with pytest.raises(ValueError, match="task 'segmentation' is unknown"):
        LoraMetadata.from_header({**header, "diff2flow.task": "segmentation"})


def test_the_loss_and_its_c_round_trip_and_older_files_parse_without_them() -> None:
    meta = LoraMetadata("reflow", "eps", False, loss="pseudo_huber", huber_c=0.05)
    header = meta.to_header()
    assert header["diff2flow.loss"] == "pseudo_huber" and header["diff2flow.huber_c"] == "0.05"
    back = LoraMetadata.from_header(header)
    assert back == meta and back.huber_c == 0.05
    default_c = LoraMetadata("reflow", "eps", False, loss="pseudo_huber")  # c not set: the default c
    assert "diff2flow.huber_c" not in default_c.to_header()
    assert LoraMetadata.from_header(default_c.to_header()) == default_c
    older = {k: v for k, v in header.items() if k not in ("diff2flow.loss", "diff2flow.huber_c")}
    assert (LoraMetadata.from_header(older).loss, LoraMetadata.from_header(older).huber_c) == (None, None)
    with pytest.raises(ValueError, match="huber_c = 'small'"):
        LoraMetadata.from_header({**header, "diff2flow.huber_c": "small"})


def test_the_grid_share_round_trips_and_older_files_parse_without_it() -> None:
    meta = LoraMetadata("reflow", "eps", False, grid_share=0.5)
    header = meta.to_header()
    assert header["diff2flow.grid_share"] == "0.5"
    back = LoraMetadata.from_header(header)
    assert back == meta and back.grid_share == 0.5
    older = {k: v for k, v in header.items() if k != "diff2flow.grid_share"}
    assert LoraMetadata.from_header(older).grid_share is None
    with pytest.raises(ValueError, match="grid_share = 'half'"):
        LoraMetadata.from_header({**header, "diff2flow.grid_share": "half"})
