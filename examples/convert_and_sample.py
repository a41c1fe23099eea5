"""Headless example: convert a diffusion model with Diff2Flow and sample it with FM Euler.

No Stable Diffusion weights are needed: the "pretrained diffusion model" is the exactly optimal
eps- (or v-) network of a 2-D Gaussian mixture on SD's scaled-linear 1000-step schedule, so the
converted flow-matching model must reproduce the data. The script prints, per number of Euler
steps, the sliced Wasserstein distance of the samples to the data (next to the data-vs-data
floor) and writes the samples to ``--out`` as safetensors.

    python examples/convert_and_sample.py --prediction v --out output/example
"""

from __future__ import annotations

import argparse
import pathlib
import time

import torch
from safetensors.torch import save_file

import d2f_core
from d2f_core import Diff2Flow, GaussianMixture


def diffusion_network(gmm: GaussianMixture, d2f: Diff2Flow):
    """A diffusion model ``net(x_tau, timestep) -> eps | v``: optimal at every timestep."""

    def network(x_tau: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a, s, _ = d2f.vp_coefficients(d2f.sigma(t.double()))
        return (gmm.optimal_eps if d2f.prediction == "eps" else gmm.optimal_v)(x_tau, a, s)

    return network


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prediction", choices=["eps", "v"], default="eps", help="diffusion model's prediction type")
    parser.add_argument("--zero-terminal-snr", action="store_true", help="rescale the schedule (v only)")
    parser.add_argument("--samples", type=int, default=2000, help="number of samples")
    parser.add_argument("--shift", type=float, default=1.0, help="SD3-style shift of the FM sigma grid")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("output/example"), help="output folder")
    args = parser.parse_args()

    schedule = d2f_core.scaled_linear()
    if args.zero_terminal_snr:
        schedule = d2f_core.rescale_zero_terminal_snr(schedule)
    d2f = Diff2Flow(schedule, args.prediction)
    print(d2f)
    gmm = GaussianMixture(
        torch.tensor([[-2.0, 0.0], [2.0, 1.0], [0.0, -2.5]]),
        stds=torch.tensor([0.3, 0.4, 0.25]),
        weights=torch.tensor([0.3, 0.5, 0.2]),
    )
    gen = torch.Generator().manual_seed(args.seed)
    data, data2 = gmm.sample(args.samples, gen), gmm.sample(args.samples, gen)
    velocity = d2f.velocity_fn(diffusion_network(gmm, d2f))  # the zero-shot FM model
    floor = d2f_core.sliced_wasserstein(data, data2)
    print(f"data-vs-data sliced W2 floor: {floor:.4f}")
    print(f"{'steps':>6} {'sliced W2':>10} {'seconds':>8}")
    results = {}
    for steps in (1, 2, 4, 8, 32, 128):
        # text-to-image start, as ComfyUI does for flow models: x = sigma_max * noise (the
        # interpolant with an all-zero latent). sigma_max = 1 with zero terminal SNR.
        sigmas = d2f_core.fm_sigmas(steps, sigma_max=d2f.sigma_max, shift=args.shift)
        noise = torch.randn(
            args.samples, 2, generator=torch.Generator().manual_seed(args.seed + 1), dtype=torch.float64
        )
        x = sigmas[0].item() * noise
        start = time.perf_counter()
        samples = d2f_core.sample_euler(velocity, x, sigmas)
        elapsed = time.perf_counter() - start
        results[f"euler_{steps}"] = samples.float()
        print(f"{steps:>6} {d2f_core.sliced_wasserstein(samples, data):>10.4f} {elapsed:>8.2f}")
    args.out.mkdir(parents=True, exist_ok=True)
    if not d2f.zero_terminal_snr:
        print(
            f"note: without zero terminal SNR the schedule ends at sigma_max = {d2f.sigma_max:.4f}; starting "
            "there from sigma_max * noise drops the (1 - sigma_max) * x0 part of the true marginal, "
            "the terminal-SNR flaw of SD that many steps expose (try --prediction v --zero-terminal-snr)"
        )
    path = args.out / "samples.safetensors"
    save_file({"data": data.float(), **results}, str(path))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
