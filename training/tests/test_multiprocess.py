"""torchrun with 2 CPU processes (gloo) trains the same LoRA as 1 process (same global batch)."""
from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

ROOT = pathlib.Path(__file__).resolve().parents[2]
WORKER = ROOT / "training" / "tests" / "ddp_worker.py"


def run(args: list[str], tmp_path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(), reason="torch.distributed with gloo is not available")
def test_two_processes_equal_one(tmp_path) -> None:
    run([str(WORKER), str(tmp_path / "one.safetensors")], tmp_path)
    run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(WORKER), str(tmp_path / "two.safetensors")], tmp_path)
    one, two = load_file(str(tmp_path / "one.safetensors")), load_file(str(tmp_path / "two.safetensors"))
    assert one.keys() == two.keys() and len(one) > 0
    changed = 0
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-5, atol=1e-6)
        changed += int(key.endswith("lora_up.weight") and one[key].abs().max() > 0)
    assert changed > 0, "training did not move the LoRA"
