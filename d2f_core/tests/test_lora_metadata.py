"""LoRA metadata round trip and its errors."""
from __future__ import annotations

import pytest

from d2f_core.lora_metadata import FORMAT_VERSION, LoraMetadata


def test_round_trip_through_string_header() -> None:
    meta = LoraMetadata("diff2flow", "v_prediction", True, rank=8, alpha=8.0, steps=500, base_model_hash="abc")
    header = meta.to_header()
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
