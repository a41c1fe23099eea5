"""Worst relative error of the Diff2Flow velocity against the exact FM velocity.

The diffusion network is the exactly optimal denoiser of a Gaussian mixture (docs/MATH.md section 7);
sigma covers [sigma_min, sigma_max] densely plus every integer timestep. Prints one row per
model type and dtype.

    python benchmarks/exactness.py            # float64 and float32
    python benchmarks/exactness.py --quick    # float64 only
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import torch

sys.path.append(str(pathlib.Path(__file__).resolve().parents[1]))  # a fresh clone: d2f_core without installing
from d2f_core.tests.helpers import CASES, exactness_error


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="float64 only")
    args = parser.parse_args()
    print(f"{'prediction':<10} {'zero SNR':<9} {'dtype':<9} {'max rel. error':>15}")
    for prediction, zsnr in CASES:
        for dtype in (torch.float64,) if args.quick else (torch.float64, torch.float32):
            err = exactness_error(prediction, zsnr, dtype)
            print(f"{prediction:<10} {str(zsnr):<9} {str(dtype).replace('torch.', ''):<9} {err:>15.3e}")


if __name__ == "__main__":
    main()
