"""Where sampling starts on an SD schedule that ends at sigma_max = 0.936 (docs/MATH.md section 10).

The model is the exactly optimal eps / v network of a Gaussian mixture (docs/MATH.md section 7),
queried at the table's timesteps and converted by ``d2f_core.Diff2Flow``. Start rules compared
(FM convention: sigma = 1 is noise; all rules use the same noise ``z``):

- ``sigma_max``: ``d2f_core.fm_sigmas(steps, sigma_max)``, ``x = sigma_max * z`` (SD practice).
- ``noise``: ``fm_sigmas(steps, sigma_max, start="noise")``: the same grid with its first value
  raised to 1, ``x = z``; the first step uses the network at its table end. Same step count.
- ``noise+step``: ``[1] + fm_sigmas(steps, sigma_max)``, ``x = z``: one extra step 1 -> sigma_max.
- ``flow_grid``: ``fm_sigmas(steps, 1.0)``, ``x = z``: the grid a flow-model scheduler gives.

Metrics, against the exact flow (Heun, ``--reference-steps``, exact FM velocity of the mixture)
from the same ``z`` at sigma = 1, whose end points are exact samples of the data distribution:
``SW`` is the sliced 2-Wasserstein distance of the sampled point cloud to those data samples
(the sampled distribution's distance to the data distribution; sharing ``z`` removes most of the
sampling noise a fresh data sample would add), ``map`` the RMS distance of each sample to its
exact end point relative to the RMS norm of the end points (the noise-to-data map's error).

    python benchmarks/start_rule.py --quick    # seconds: data set A, 4 / 8 / 20 steps, 500 samples
    python benchmarks/start_rule.py            # both data sets, 10000 samples (a few CPU minutes)
"""

from __future__ import annotations

import pathlib
import sys

# runnable from a fresh clone without installing the package: the repository root first
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import argparse
import time
from collections.abc import Callable

import torch

import d2f_core
from d2f_core import Diff2Flow, GaussianMixture

RULES = ("sigma_max", "noise", "noise+step", "flow_grid")
STEPS = (4, 8, 20, 50, 200)
QUICK_STEPS = (4, 8, 20)
PREDICTIONS = ("eps", "v")


def datasets() -> dict[str, GaussianMixture]:
    """A: 6-D, data mean far from 0 (|E x0| = 2.9, like latents of mostly dark or bright images);
    the d2f_core tests' mixture. B: 2-D, data mean near 0 (|E x0| = 0.4), the example's mixture."""
    gen = torch.Generator().manual_seed(0)
    means_a = 2.0 * torch.randn(3, 6, generator=gen, dtype=torch.float64)
    return {
        "A": GaussianMixture(means_a, stds=torch.tensor([0.3, 0.6, 0.9]), weights=torch.tensor([0.5, 0.3, 0.2])),
        "B": GaussianMixture(
            torch.tensor([[-2.0, 0.0], [2.0, 1.0], [0.0, -2.5]]),
            stds=torch.tensor([0.3, 0.4, 0.25]),
            weights=torch.tensor([0.3, 0.5, 0.2]),
        ),
    }


def exact_network(gmm: GaussianMixture, d2f: Diff2Flow) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The optimal diffusion network: eps or v of the VP level of each (fractional) timestep."""

    def network(x_tau: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = t.double().reshape(()) if t.numel() == 1 else t.double()  # one timestep for the batch
        a, s, _ = d2f.vp_coefficients(d2f.sigma(t))
        return gmm.optimal_eps(x_tau, a, s) if d2f.prediction == "eps" else gmm.optimal_v(x_tau, a, s)

    return network


def above_sigma_max(gmm: GaussianMixture, samples: int, seed: int) -> list[tuple]:
    """Relative velocity errors (median, max over noisy data states) above sigma_max: the "old reading"
    (timestep T-1, but its output read with the closed forms in sigma, i.e. without the table-end rule of
    docs/MATH.md section 10) and ``Diff2Flow.velocity`` ("now"), both against the table-end velocity, and
    the table end against the exact FM velocity."""
    rows = []
    gen = torch.Generator().manual_seed(seed)
    for prediction in PREDICTIONS:
        d2f = Diff2Flow(d2f_core.scaled_linear(), prediction)
        network = exact_network(gmm, d2f)
        ac_end = d2f.alphas_cumprod[-1]
        a_t, s_t = ac_end.sqrt(), (1 - ac_end).sqrt()
        for value in (0.95, 0.99, 1.0):
            sigma = torch.tensor(value, dtype=torch.float64)
            x0 = gmm.sample(samples, gen)
            x = d2f_core.interpolant(x0, torch.randn(x0.shape, generator=gen, dtype=torch.float64), sigma)
            x_in, t = d2f.network_inputs(x, sigma)
            out = network(x_in, t)
            n = d2f.noise_norm(sigma)
            table_end = (x - gmm.posterior_mean(x_in, a_t, s_t)) / sigma
            if prediction == "eps":  # (e - x) / (1 - sigma): undefined at sigma = 1 (the table says ValueError)
                closed_form = (out - x) / (1 - sigma) if value < 1 else None
            else:
                closed_form = (2 * sigma - 1) * x / n**2 + out / n
            converted = d2f.velocity(out, x, sigma)

            def err(a: torch.Tensor | None, b: torch.Tensor) -> tuple[float, float] | None:
                if a is None:
                    return None
                r = (a - b).norm(dim=1) / b.norm(dim=1)
                return float(r.median()), float(r.max())

            rows.append(
                (
                    prediction,
                    value,
                    err(closed_form, table_end),
                    err(converted, table_end),
                    err(table_end, gmm.fm_velocity(x, sigma)),
                )
            )
    return rows


def print_above(rows: list[tuple]) -> None:
    print("\nvelocity above sigma_max on data set A: relative error, median / max")
    print("| pred | sigma | old reading vs table end | Diff2Flow now vs table end | table end vs exact FM velocity |")
    print("|---|---|---|---|---|")
    for prediction, value, closed_form, converted, limit in rows:
        cells = ["ValueError" if e is None else f"{e[0]:.2g} / {e[1]:.2g}" for e in (closed_form, converted, limit)]
        print(f"| {prediction} | {value:.2f} | " + " | ".join(cells) + " |")


def start(rule: str, steps: int, sigma_max: float) -> torch.Tensor:
    """The sigma grid of a start rule; the sampler starts at ``sigmas[0] * z``."""
    if rule in d2f_core.START_RULES:
        return d2f_core.fm_sigmas(steps, sigma_max, start=rule)
    if rule == "noise+step":
        return torch.cat([torch.ones(1, dtype=torch.float64), d2f_core.fm_sigmas(steps, sigma_max)])
    if rule == "flow_grid":
        return d2f_core.fm_sigmas(steps, 1.0)
    raise ValueError(f"unknown start rule {rule!r}: use one of {RULES}")


def exact_flow(gmm: GaussianMixture, z: torch.Tensor, steps: int) -> torch.Tensor:
    """The exact noise-to-data map: Heun on the exact FM velocity from sigma = 1 to 0."""
    return d2f_core.sample_heun(gmm.fm_velocity, z, torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64))


def run(
    gmm: GaussianMixture, samples: int, steps_list: tuple[int, ...], reference_steps: int, sampler: str, seed: int
) -> dict:
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(samples, gmm.dim, generator=gen, dtype=torch.float64)
    exact = exact_flow(gmm, z, reference_steps)
    half = exact_flow(gmm, z, reference_steps // 2)
    info = {
        # how far the reference itself is from converged (Heun at half the steps)
        "reference_error": d2f_core.sliced_wasserstein(half, exact),
        # the plain SW of the exact samples to an independent data sample: the noise a fresh
        # data sample would add to every entry (why the table compares to the exact flow instead)
        "data_sample_floor": d2f_core.sliced_wasserstein(exact, gmm.sample(samples, gen)),
    }
    rms = exact.pow(2).sum(1).mean().sqrt()
    table = {}
    for prediction in PREDICTIONS:
        d2f = Diff2Flow(d2f_core.scaled_linear(), prediction)
        converted = d2f.velocity_fn(exact_network(gmm, d2f))

        def velocity(x: torch.Tensor, sigma: torch.Tensor, converted=converted) -> torch.Tensor:
            return converted(x, sigma[:1])  # the samplers' sigma is one value for the batch

        for steps in steps_list:
            for rule in RULES:
                sigmas = start(rule, steps, d2f.sigma_max)
                x = d2f_core.SAMPLERS[sampler](velocity, sigmas[0].item() * z, sigmas)
                table[prediction, steps, rule] = (
                    d2f_core.sliced_wasserstein(x, exact),
                    float((x - exact).pow(2).sum(1).mean().sqrt() / rms),
                )
    return {"info": info, "table": table}


def wins_everywhere(table: dict, rule: str, steps_list: tuple[int, ...]) -> bool:
    """``rule`` has a smaller SW than ``sigma_max`` at every step count, for eps and v."""
    return all(table[p, n, rule][0] < table[p, n, "sigma_max"][0] for p in PREDICTIONS for n in steps_list)


def print_table(name: str, gmm: GaussianMixture, result: dict, steps_list: tuple[int, ...]) -> None:
    info, table = result["info"], result["table"]
    mean = float((gmm.weights @ gmm.means).norm())
    print(
        f"\ndata set {name}: {gmm.dim}-D, {gmm.means.shape[0]} components, |E x0| = {mean:.2f}; "
        f"reference error (SW) {info['reference_error']:.1e}, SW of the reference to a fresh data "
        f"sample {info['data_sample_floor']:.4f}"
    )
    print("SW to the data distribution (map error) per start rule")
    print("| pred | steps | " + " | ".join(RULES) + " |")
    print("|---|---|" + "---|" * len(RULES))
    for prediction in PREDICTIONS:
        for steps in steps_list:
            cells = [
                f"{table[prediction, steps, r][0]:.4f} ({100 * table[prediction, steps, r][1]:.2f} %)" for r in RULES
            ]
            print(f"| {prediction} | {steps} | " + " | ".join(cells) + " |")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="data set A only, 4 / 8 / 20 steps, 500 samples, 100 reference steps (seconds)",
    )
    parser.add_argument("--samples", type=int, help="samples per run (default 10000; 500 with --quick)")
    parser.add_argument(
        "--reference-steps", type=int, help="Heun steps of the exact flow (default 1000; 100 with --quick)"
    )
    parser.add_argument("--sampler", choices=sorted(d2f_core.SAMPLERS), default="euler")
    parser.add_argument("--data", nargs="+", choices=("A", "B"), help="data sets (default A and B; A with --quick)")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    samples = args.samples or (500 if args.quick else 10000)
    reference_steps = args.reference_steps or (100 if args.quick else 1000)
    steps_list = QUICK_STEPS if args.quick else STEPS
    for name, value in (("--samples", samples), ("--reference-steps", reference_steps)):
        if value < 2:
            parser.error(f"{name} must be at least 2, got {value}")
    data = datasets()
    data = {name: data[name] for name in (args.data or (["A"] if args.quick else ["A", "B"]))}
    torch.set_num_threads(1)  # small tensors: threads only add overhead (and share the machine)
    began = time.perf_counter()
    print(
        f"start rules on SD's schedule (sigma_max = {Diff2Flow(d2f_core.scaled_linear()).sigma_max:.5f}), "
        f"FM {args.sampler}, {samples} samples, exact GMM eps / v network"
    )
    print_above(above_sigma_max(datasets()["A"], 500 if args.quick else 4000, args.seed))
    results = {}
    for name, gmm in data.items():
        results[name] = run(gmm, samples, steps_list, reference_steps, args.sampler, args.seed)
        print_table(name, gmm, results[name], steps_list)
    for rule in RULES[1:]:
        verdict = all(wins_everywhere(r["table"], rule, steps_list) for r in results.values())
        print(
            f"{rule!r} beats 'sigma_max' (SW) at every step count, eps and v, every data set: {'yes' if verdict else 'no'}"
        )
    print(f"({time.perf_counter() - began:.1f} s)")
    return results


if __name__ == "__main__":
    main()
