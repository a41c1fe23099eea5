"""Image-to-depth with a diffusion prior at toy scale: Marigold-style fine-tuning of the
demo's tiny v-model under ``diffusion``, ``naive_fm`` and ``diff2flow``, against a one-step regression.

    python benchmarks/depth.py --jobs 2     # full run (see the README for the measured time)
    python benchmarks/depth.py --train-steps 6000 --eval-at 500,1500,3000 --jobs 2   # the training-budget curve
    python benchmarks/depth.py --quick      # a shrunken run that checks the script (seconds)

The curve run evaluates every run also at the ``--eval-at`` checkpoints and writes ``depth_curve.*``: each
target per checkpoint, since which method leads depends on how long the prior is fine-tuned.

Data (``demo/scenes.py``): procedural 16x16 scenes (a tilted plane, spheres and tilted boxes; Lambertian
shading times stripe / check textures) with their exact z-buffer depth; a fixed split, scenes
``0 .. train - 1`` train and the next ``test`` scenes test. The target is ``normalize_depth(depth)``
(per image, the 2 % / 98 % quantiles to -1 / 1): pixel space, 1 channel; there is no VAE at this scale,
so the "latent" is the map itself. The condition is the image, in [-1, 1] like the prior's digits.

Model: the shipped v-prediction UNet (``demo/weights/unet_v.safetensors``, SD's scaled-linear schedule,
like the paper's SD2.1-v), its first convolution widened to take ``[noisy depth, image]`` side by side
(:class:`DepthUNet`; ``d2f_core.depth.widen_input_conv``, Marigold's init: the weights copied and halved),
conditioned on the null class (the "empty prompt"). Fine-tuned by ``training.Trainer`` with LoRA r16 on
every Linear and Conv weight (the widened ``conv_in`` gets a full dense delta: its new input channels
have no low-rank structure to exploit) or a full dense delta everywhere. The image reaches the network
as the per-sample tensor ``concat`` (``TrainingData.extras``: the trainer passes it to the network as a
keyword argument, never dropped by caption dropout; ``DepthUNet`` appends it after the noisy input, as
ComfyUI's ``c_concat``). 1500 steps, batch 16, cosine
learning rate 1e-2 (LoRA) / 3e-3 (full), AdamW without weight decay; FM sigma drawn with shift 6 for
``diff2flow`` and ``naive_fm``, integer tau uniform for ``diffusion`` (the runs that chose them:
``benchmarks/results/depth_ablations.md``).

Baseline: one-step regression, the same widened UNet (full dense delta) fed a zero depth channel at
timestep 999 and trained with MSE on the target directly, with the same steps, batch, learning rate
schedule, optimizer and batch draws as the others (:func:`train_regression`).

Sampling: each objective's own sampler at 1 / 2 / 4 / 10 steps (``Objective.sampler_sigmas``; FM Euler
for ``diff2flow`` / ``naive_fm``, DDIM trailing for ``diffusion``: FM Euler of the converted model on the
DDIM grid), from ``sigma_max * noise``; 5 members from different noise per test image, scored one by one
("single": the mean of the members' metrics) and combined by ``d2f_core.depth.ensemble_depth``
("ensemble"). Metrics (``d2f_core.depth.depth_metrics``, docs/MATH.md section 13): AbsRel and delta1
after the per-image least-squares scale and shift, against the exact test depth.

Targets, on the means over seeds, per adapter: Diff2Flow's 2-step AbsRel <= diffusion's
10-step AbsRel; Diff2Flow <= naive FM at every step budget; Diff2Flow at 1 step within 1.1x of the
regression baseline. The report states each as met or not, with the numbers.

Time convention (docs/MATH.md section 1): FM sigma in [0, 1], sigma = 1 is noise,
``x_sigma = (1 - sigma) x0 + sigma noise``, velocity ``noise - x0``.
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere: the demo package lives at the root
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402

import d2f_core  # noqa: E402
from d2f_core.depth import depth_metrics, ensemble_depth, normalize_depth, widen_input_conv  # noqa: E402
from d2f_core.lora import WeightAdapter, attach_parametrizations, make_adapter, select_target_modules  # noqa: E402
from demo import pipeline  # noqa: E402
from demo.model import NULL_CLASS, TinyUNet  # noqa: E402
from demo.progress import Progress  # noqa: E402
from demo.scenes import scene_split  # noqa: E402
from demo.store import load_unet  # noqa: E402
from training import TrainConfig, Trainer, TrainingData  # noqa: E402
from training.engine import lr_lambda  # noqa: E402
from training.files import atomic_write  # noqa: E402
from training.optimizers import build_optimizer  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))  # the benchmarks' shared flags
from paper_comparison import add_finetune_flags, check_finetune_flags, write_report  # noqa: E402

OBJECTIVES = ("diffusion", "naive_fm", "diff2flow")  # report order
ADAPTERS = ("lora16", "full")
STEPS = (1, 2, 4, 10)
MEMBERS = 5
DENOISE_SIGMAS = (0.1, 0.3, 0.5, 0.7, 0.9)  # FM sigmas of the test denoising error (all below SD's sigma_max 0.936)
DENOISE_DRAWS = 2
TOP_TIMESTEP = 999.0  # the regression baseline's timestep: the prior's pure-noise end
TRAIN_STEPS = 1500  # half the cost of 3000 steps; longer budgets: --train-steps (benchmarks/results/depth_ablations.md)
LR_LORA, LR_FULL = 1e-2, 3e-3  # the best 1500-step rates of a seed-0 sweep (benchmarks/results/depth_ablations.md)
# the FM objectives' sigma draws: for diff2flow shift 6 beat uniform, 3 and 12 (benchmarks/results/depth_ablations.md)
TIMESTEPS: dict[str, Any] = {"timestep_sampling": "shift", "shift": 6.0}


# ------------------------------------------------------------------------------------ the depth network
class DepthUNet(nn.Module):
    """``net(x, timestep, context, concat) -> raw output``: the tiny UNet on ``cat([x, concat])`` (the
    noisy depth and the clean image side by side, as ComfyUI's ``c_concat``), its ``conv_in`` widened
    from 4 to 8 input channels (after the 2x2 pixel unshuffle, channels 0-3 come from ``x`` and 4-7 from
    ``concat``). Initialised by :func:`widen_input_conv`: on ``concat = x`` it equals the prior."""

    def __init__(self, unet: TinyUNet) -> None:
        super().__init__()
        old = unet.conv_in
        wide = nn.Conv2d(2 * old.in_channels, old.out_channels, old.kernel_size, padding=old.padding)
        with torch.no_grad():
            wide.weight.copy_(widen_input_conv(old.weight, 2))
            wide.bias.copy_(old.bias)
        unet.conv_in = wide
        self.unet = unet

    def forward(
        self,
        x: torch.Tensor,
        timestep: torch.Tensor,
        context: torch.Tensor | None = None,
        concat: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if concat is None:
            raise ValueError("DepthUNet needs the image as concat= (shape [B, 1, 16, 16], in [-1, 1])")
        if concat.shape[0] != x.shape[0] or concat.shape[2:] != x.shape[2:]:
            raise ValueError(f"concat {tuple(concat.shape)} does not match the depth input {tuple(x.shape)}")
        return self.unet(torch.cat([x, concat.to(x.dtype)], dim=1), timestep, context=context)


def attach_depth_adapters(net: DepthUNet, adapter: str, seed: int) -> dict[str, WeightAdapter]:
    """Adapters on every Linear and Conv weight of ``net`` (in place; the base weights frozen): LoRA of
    the rank in ``adapter`` ("lora16": alpha = rank) or a full dense delta ("full"); ``conv_in`` always
    gets a full dense delta (its image half starts as a copy of the prior's weights and must move freely)."""
    kind, rank = ("full", 1) if adapter == "full" else ("lora", int(adapter[4:]))
    net.requires_grad_(False)
    modules = select_target_modules(net, "all")
    gen = torch.Generator().manual_seed(seed)
    adapters: dict[str, WeightAdapter] = {}
    for name, module in modules.items():
        if kind == "full" or name == "unet.conv_in":
            adapters[name] = make_adapter("Full", module.weight.shape, 1, 1.0)
        else:
            adapters[name] = make_adapter("LoRA", module.weight.shape, rank, float(rank), gen)
    if "unet.conv_in" not in adapters:
        raise RuntimeError("the widened conv_in was not found among the adapter targets")
    attach_parametrizations(modules, adapters)
    return adapters


# ------------------------------------------------------------------------------------ setup
class Setup:
    """The prior, its alignment, the scene split as training data and test tensors."""

    def __init__(self, weights: pathlib.Path, train: int, test: int) -> None:
        self.unet, encoder, _ = load_unet("v", weights)
        self.d2f = d2f_core.Diff2Flow(d2f_core.scaled_linear(), "v")
        self.null_ctx = pipeline.contexts(encoder, [NULL_CLASS])  # [1, tokens, dim]: the "empty prompt"
        split = scene_split(train, test)
        images, depth = split["train"]
        target = normalize_depth(depth)
        self.train_data = TrainingData(
            latents=[t for t in target],
            conds=[{"context": self.null_ctx}] * len(images),
            extras=[{"concat": img} for img in images],
        )
        self.test_images, self.test_depth = split["test"]
        self.test_target = normalize_depth(self.test_depth)  # what the models are trained to produce

    def network(self) -> DepthUNet:
        """A fresh widened copy of the prior."""
        return DepthUNet(pipeline.fresh_copy(self.unet))

    def cond(self) -> dict[str, torch.Tensor]:
        n = self.test_images.shape[0]
        return {"context": self.null_ctx.expand(n, -1, -1), "concat": self.test_images}

    def noise(self, seed: int) -> torch.Tensor:
        """[MEMBERS, N, 1, 16, 16]: the evaluation noise of ``seed``."""
        gen = torch.Generator().manual_seed(20_000 + seed)
        return torch.randn(MEMBERS, *self.test_images.shape, generator=gen)


# ------------------------------------------------------------------------------------ evaluation
@torch.no_grad()
def predict_members(setup: Setup, objective: str, net: nn.Module, steps: int, noise: torch.Tensor) -> torch.Tensor:
    """[MEMBERS, N, 1, 16, 16]: the objective's own sampler at ``steps`` from each member's noise."""
    record = d2f_core.get_objective(objective)
    velocity, sigmas, cond = record.velocity_fn(net, setup.d2f), record.sampler_sigmas(setup.d2f, steps), setup.cond()
    return torch.stack(
        [d2f_core.sample_euler(lambda x, s: velocity(x, s, **cond), float(sigmas[0]) * n, sigmas) for n in noise]
    )


@torch.no_grad()
def evaluate(setup: Setup, objective: str, net: nn.Module, seed: int, steps_list: tuple[int, ...]) -> dict[str, Any]:
    """``{"single": {steps: metrics}, "ensemble": {steps: metrics}, "denoise": {sigma: MSE}}``: "single" is the
    mean of each member's own metrics (AbsRel, delta1 and "mse", the member's MSE against the normalised target
    without alignment), "ensemble" the metrics of ``ensemble_depth`` of the members, "denoise"
    :func:`denoising_mse` of the model on the test targets at :data:`DENOISE_SIGMAS`."""
    noise = setup.noise(seed)
    single, ensemble = {}, {}
    for steps in steps_list:
        members = predict_members(setup, objective, net, steps, noise)
        if not torch.isfinite(members).all():
            raise FloatingPointError(f"{objective}: non-finite depth predictions at {steps} steps")
        # "mse": the sample against the normalised target itself, no alignment (what the objectives' losses see)
        scores = [
            {**depth_metrics(m, setup.test_depth), "mse": (m - setup.test_target).pow(2).mean().item()} for m in members
        ]
        single[str(steps)] = {k: statistics.fmean(s[k] for s in scores) for k in scores[0]}
        ensemble[str(steps)] = depth_metrics(ensemble_depth(members), setup.test_depth)
    velocity, cond = d2f_core.get_objective(objective).velocity_fn(net, setup.d2f), setup.cond()
    denoise = denoising_mse(
        lambda x, s: velocity(x, s, **cond),
        setup.test_target,
        DENOISE_SIGMAS,
        torch.Generator().manual_seed(30_000 + seed),
    )
    return {"single": single, "ensemble": ensemble, "denoise": denoise}


@torch.no_grad()
def denoising_mse(
    velocity: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x0: torch.Tensor,
    sigmas: tuple[float, ...],
    generator: torch.Generator,
    draws: int = DENOISE_DRAWS,
) -> dict[str, float]:
    """``{str(sigma): MSE}``: the mean squared error of the data estimate ``x0_hat = x - sigma * velocity(x, sigma)``
    against ``x0`` at ``x = (1 - sigma) x0 + sigma noise``, averaged over ``draws`` noise draws per sigma (FM sigma,
    docs/MATH.md section 1). This is the quantity the FM objectives train (the velocity error times sigma), measured
    on held-out data at fixed noise levels, so it compares the models themselves rather than one sample of each."""
    out = {}
    for sigma in sigmas:
        errors = []
        for _ in range(draws):
            x = (1 - sigma) * x0 + sigma * torch.randn(x0.shape, generator=generator)
            errors.append((x - sigma * velocity(x, torch.full((x0.shape[0],), sigma)) - x0).pow(2).mean().item())
        out[str(sigma)] = statistics.fmean(errors)
    return out


@torch.no_grad()
def regression_predict(net: nn.Module, cond: dict[str, torch.Tensor]) -> torch.Tensor:
    """The regression baseline's output: one pass on a zero depth channel at the top timestep."""
    x = torch.zeros_like(cond["concat"])
    return net(x, torch.full((x.shape[0],), TOP_TIMESTEP), **cond)


# ------------------------------------------------------------------------------------ training
def train_config(objective: str, adapter: str, seed: int, steps: int, batch: int, lr: float) -> TrainConfig:
    rank = 1 if adapter == "full" else int(adapter[4:])
    return TrainConfig(
        objective=objective,
        steps=steps,
        batch_size=batch,
        learning_rate=lr,
        lr_schedule="cosine",
        rank=rank,
        alpha=float(rank),
        targets="all",
        weight_decay=0.0,
        seed=seed,
        **TIMESTEPS,
    )


def train_regression(
    net: DepthUNet, adapters: dict[str, WeightAdapter], data: TrainingData, config: TrainConfig, on_step=None
) -> list[float]:
    """The regression baseline's loop: ``Trainer``'s optimizer, learning rate schedule and batch draws
    (``TrainingData.draw_indices`` from a generator seeded like the trainer's), the loss the MSE of
    :func:`regression_predict`'s output on the target. Returns the losses."""
    params = [p for a in adapters.values() for p in a.parameters() if p.requires_grad]
    optimizer = build_optimizer(config.optimizer, params, config.learning_rate, config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config))
    gen = torch.Generator().manual_seed(config.seed)
    losses = []
    for step in range(config.steps):
        indices = data.draw_indices(config.batch_size, gen)
        x0, cond = data.batch(indices)
        cond.update(data.batch_extras(indices))
        optimizer.zero_grad(set_to_none=True)
        loss = (net(torch.zeros_like(x0), torch.full((x0.shape[0],), TOP_TIMESTEP), **cond) - x0).pow(2).mean()
        loss.backward()
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        if on_step is not None:
            on_step(step + 1, losses[-1], scheduler.get_last_lr()[0])
    return losses


def run_one(
    setup: Setup,
    method: str,
    adapter: str,
    seed: int,
    steps: int,
    batch: int,
    lr: float,
    sampler_steps: tuple[int, ...] = STEPS,
    eval_at: tuple[int, ...] = (),
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Fine-tune one widened copy of the prior under ``method`` (an objective, or "regression") and
    evaluate it on the test scenes: ``metrics`` after the last step, ``curve[step]`` also after each
    step of ``eval_at`` (checkpoints of this one run; the learning rate keeps its cosine over ``steps``).
    ``train_seconds`` leaves the evaluations out."""
    net = setup.network()
    adapters = attach_depth_adapters(net, adapter, seed)

    def measure() -> dict[str, Any]:
        if method == "regression":
            prediction = regression_predict(net, setup.cond())
            return {
                "single": {"1": depth_metrics(prediction, setup.test_depth)},
                "mse": (prediction - setup.test_target).pow(2).mean().item(),
            }
        return evaluate(setup, method, net, seed, sampler_steps)

    curve: dict[str, Any] = {}
    eval_seconds = [0.0]

    def on_step(step: int, *_: Any) -> None:
        if progress is not None:
            progress.update(1, f"{method} {adapter} seed {seed}")
        if step in eval_at and step != steps:
            start_eval = time.perf_counter()
            curve[str(step)] = measure()
            eval_seconds[0] += time.perf_counter() - start_eval

    start = time.perf_counter()
    if method == "regression":
        losses = train_regression(
            net, adapters, setup.train_data, train_config("diff2flow", adapter, seed, steps, batch, lr), on_step
        )
    else:
        trainer = Trainer(
            net, adapters, setup.d2f, train_config(method, adapter, seed, steps, batch, lr), setup.train_data
        )
        trainer.run(on_step=on_step)
        losses = trainer.losses
    seconds = time.perf_counter() - start - eval_seconds[0]
    start = time.perf_counter()
    metrics = measure()
    curve[str(steps)] = metrics
    return {
        "method": method,
        "adapter": adapter,
        "seed": seed,
        "metrics": metrics,
        "curve": curve,
        "train_seconds": seconds,
        "seconds_per_step": seconds / steps,
        "eval_seconds": time.perf_counter() - start,
        "final_loss": statistics.fmean(losses[-100:]),
    }


_WORKER: dict[str, Any] = {}


def _worker_init(weights: str, train: int, test: int) -> None:
    torch.set_num_threads(1)
    _WORKER["setup"] = Setup(pathlib.Path(weights), train, test)


def _worker_run(job: tuple) -> dict[str, Any]:
    return run_one(_WORKER["setup"], *job)


# ------------------------------------------------------------------------------------ report
def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _cell(values: list[float], digits: int = 4) -> str:
    mean, std = _mean_std(values)
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def _pick(report: dict[str, Any], method: str, adapter: str) -> list[dict[str, Any]]:
    return [r for r in report["runs"] if r["method"] == method and r["adapter"] == adapter]


def _metrics(run: dict[str, Any], at: int | None) -> dict[str, Any]:
    """A run's metrics after its last step (``at`` None) or at its checkpoint ``at``."""
    return run["metrics"] if at is None else run["curve"][str(at)]


def _mean(
    report: dict[str, Any],
    method: str,
    adapter: str,
    mode: str,
    steps: int,
    metric: str = "abs_rel",
    at: int | None = None,
) -> float:
    return statistics.fmean(_metrics(r, at)[mode][str(steps)][metric] for r in _pick(report, method, adapter))


def targets(report: dict[str, Any], at: int | None = None) -> list[dict[str, Any]]:
    """Each target per adapter and mode (single member, ensemble of 5): the numbers compared and
    whether it is met (on the means over seeds; AbsRel, lower is better), after the last training step
    or at the checkpoint ``at``."""
    regression = _mean(report, "regression", "full", "single", 1, at=at)
    steps = report["config"]["sampler_steps"]
    out = []
    for adapter in report["config"]["adapters"]:
        for mode in ("single", "ensemble"):
            d2f = {s: _mean(report, "diff2flow", adapter, mode, s, at=at) for s in steps}
            naive = {s: _mean(report, "naive_fm", adapter, mode, s, at=at) for s in steps}
            if 2 in steps and 10 in steps:
                diffusion = _mean(report, "diffusion", adapter, mode, 10, at=at)
                out.append(
                    {
                        "adapter": adapter,
                        "mode": mode,
                        "target": "Diff2Flow 2-step AbsRel <= diffusion 10-step AbsRel",
                        "ours": f"{d2f[2]:.4f}",
                        "bound": f"{diffusion:.4f}",
                        "met": d2f[2] <= diffusion,
                    }
                )
            out.append(
                {
                    "adapter": adapter,
                    "mode": mode,
                    "target": "Diff2Flow AbsRel <= naive FM at every step budget",
                    "ours": " / ".join(f"{d2f[s]:.4f}" for s in steps),
                    "bound": " / ".join(f"{naive[s]:.4f}" for s in steps),
                    "met": all(d2f[s] <= naive[s] for s in steps),
                }
            )
            out.append(
                {
                    "adapter": adapter,
                    "mode": mode,
                    "target": "Diff2Flow 1-step AbsRel <= 1.1x regression AbsRel",
                    "ours": f"{d2f[1]:.4f}",
                    "bound": f"{1.1 * regression:.4f}",
                    "met": d2f[1] <= 1.1 * regression,
                }
            )
    return out


def sample_mse_lead(report: dict[str, Any], adapter: str) -> list[int]:
    """The sampler step budgets at which Diff2Flow's samples have a lower mean MSE against the normalised test
    depth (one member, no alignment) than naive FM's, for ``adapter``."""
    return [
        s
        for s in report["config"]["sampler_steps"]
        if _mean(report, "diff2flow", adapter, "single", s, "mse")
        < _mean(report, "naive_fm", adapter, "single", s, "mse")
    ]


def denoising_lead(report: dict[str, Any], adapter: str) -> list[str]:
    """The noise levels (FM sigma, as in the json) at which Diff2Flow's mean test denoising error is below naive
    FM's, for ``adapter``: where the aligned model is the better denoiser, whatever one sample scores."""
    sigmas = report["config"]["denoise_sigmas"]

    def mean(method: str, sigma: str) -> float:
        return statistics.fmean(r["metrics"]["denoise"][sigma] for r in _pick(report, method, adapter))

    return [str(s) for s in sigmas if mean("diff2flow", str(s)) < mean("naive_fm", str(s))]


def denoise_section(report: dict[str, Any]) -> list[str]:
    """The report's table of test denoising errors (:func:`denoising_mse`) by noise level, and where Diff2Flow
    is below naive FM."""
    cfg = report["config"]
    sigmas = [str(s) for s in cfg["denoise_sigmas"]]
    lines = [
        "",
        "## Test denoising error by noise level",
        "",
        "MSE of the data estimate `x - sigma v` against the normalised test depth, at fixed FM sigma (the objectives' "
        "own quantity, on held-out scenes; lower is better), mean ± std over seeds. Unlike AbsRel of a sample, it "
        "does not reward a sampler for staying near the mean of a wide posterior.",
        "",
        "| method | adapter | " + " | ".join(f"sigma {s}" for s in sigmas) + " |",
        "|---|---|" + "---|" * len(sigmas),
    ]
    for method in OBJECTIVES:
        for adapter in cfg["adapters"]:
            rs = _pick(report, method, adapter)
            lines.append(
                f"| {method} | {adapter} | "
                + " | ".join(_cell([r["metrics"]["denoise"][s] for r in rs]) for s in sigmas)
                + " |"
            )
    regression = _cell([r["metrics"]["mse"] for r in _pick(report, "regression", "full")])
    lines += ["", f"The regression's one pass (no noisy input): MSE {regression}."]
    for adapter in cfg["adapters"]:
        lead = denoising_lead(report, adapter)
        lines.append(
            f"- {adapter}: Diff2Flow's denoising error is below naive FM's at {len(lead)} of {len(sigmas)} noise "
            f"levels{' (sigma ' + ', '.join(lead) + ')' if 0 < len(lead) < len(sigmas) else ''}."
        )
    steps = cfg["sampler_steps"]
    lines += [
        "",
        "The samples' MSE against the normalised test depth (one member, no alignment; mean ± std over seeds), "
        "beside their AbsRel above:",
        "",
        "| method | adapter | " + " | ".join(f"{s} step{'s' if s > 1 else ''}" for s in steps) + " |",
        "|---|---|" + "---|" * len(steps),
    ]
    for method in OBJECTIVES:
        for adapter in cfg["adapters"]:
            rs = _pick(report, method, adapter)
            lines.append(
                f"| {method} | {adapter} | "
                + " | ".join(_cell([r["metrics"]["single"][str(s)]["mse"] for r in rs]) for s in steps)
                + " |"
            )
    lines.append("")
    for adapter in cfg["adapters"]:
        lead = sample_mse_lead(report, adapter)
        lines.append(
            f"- {adapter}: Diff2Flow's samples have the lower MSE at {len(lead)} of {len(steps)} step budgets"
            f"{' (' + ', '.join(map(str, lead)) + ')' if 0 < len(lead) < len(steps) else ''}."
        )
    return lines


def _timesteps(cfg: dict[str, Any]) -> str:
    ts = cfg["timesteps"]
    return (
        f"shift-{ts['shift']:g} sampling"
        if ts["timestep_sampling"] == "shift"
        else f"{ts['timestep_sampling']} sampling"
    )


def summarise(report: dict[str, Any]) -> str:
    cfg = report["config"]
    steps = cfg["sampler_steps"]
    rows = [(m, a) for m in OBJECTIVES for a in cfg["adapters"]]

    def table(metric: str, digits: int) -> list[str]:
        head = [f"{s}" for s in steps] + [f"{s} ×{MEMBERS}" for s in steps]
        lines = ["| method (sampler) | adapter | " + " | ".join(head) + " |", "|---|---|" + "---|" * len(head)]
        for method, adapter in rows:
            rs = _pick(report, method, adapter)
            cells = [
                _cell([r["metrics"][mode][str(s)][metric] for r in rs], digits)
                for mode in ("single", "ensemble")
                for s in steps
            ]
            label = f"{method} ({d2f_core.get_objective(method).sampling_label})"
            lines.append(f"| {label} | {adapter} | " + " | ".join(cells) + " |")
        reg = [r["metrics"]["single"]["1"][metric] for r in _pick(report, "regression", "full")]
        lines.append("| regression (1 pass) | full | " + _cell(reg, digits) + " |" + " |" * (len(head) - 1))
        return lines

    lines = [
        f"# Image-to-depth at toy scale (the demo's v-model, procedural scenes{', quick run' if cfg['quick'] else ''})",
        "",
        f"{cfg['train']} training / {cfg['test']} test scenes (16x16, `demo/scenes.py`, fixed split); the prior's conv_in "
        f"widened to [noisy depth, image] (Marigold init), null-class context. {cfg['train_steps']} training steps, batch "
        f"{cfg['batch']}, cosine learning rate {cfg['lrs']['lora']:g} (LoRA r16, alpha 16; conv_in a full delta) / "
        f"{cfg['lrs']['full']:g} (full and regression), AdamW without weight decay; FM sigma drawn with "
        f"{_timesteps(cfg)} (`diff2flow`, `naive_fm`), integer tau uniform (`diffusion`, Marigold's). Each objective's own sampler from "
        f"`sigma_max * noise`; single = the mean of {MEMBERS} members' metrics, ×{MEMBERS} = their `ensemble_depth`. "
        f"Affine-invariant metrics against the exact depth; mean ± std over {len(cfg['seeds'])} seed(s). Total "
        f"{report['seconds'] / 60:.1f} min, {cfg['jobs']} process(es) x 1 thread.",
        "",
        "## AbsRel (lower is better) by sampler steps",
        "",
        *table("abs_rel", 4),
        "",
        "## delta1 (higher is better) by sampler steps",
        "",
        *table("delta1", 3),
        "",
        "## Targets (means over seeds)",
        "",
        "| adapter | mode | target | Diff2Flow | bound | met |",
        "|---|---|---|---|---|---|",
    ]
    for t in report["targets"]:
        mode = "single" if t["mode"] == "single" else f"ensemble ×{MEMBERS}"
        lines.append(
            f"| {t['adapter']} | {mode} | {t['target']} | {t['ours']} | {t['bound']} | {'yes' if t['met'] else 'no'} |"
        )
    lines += [""]
    for name in dict.fromkeys(t["target"] for t in report["targets"]):
        cases = [t for t in report["targets"] if t["target"] == name]
        met = [f"{t['adapter']} {t['mode']}" for t in cases if t["met"]]
        verdict = (
            "**met**"
            if len(met) == len(cases)
            else "**not met**"
            if not met
            else f"**met in {len(met)} of {len(cases)} cases** ({', '.join(met)})"
        )
        lines.append(f"- {name}: {verdict}.")
    lines += denoise_section(report)
    lines += curve_section(report)
    lines += [
        "",
        "## Training cost",
        "",
        "| method | adapter | s / step | s / run | final loss, own objective (last 100) | eval s |",
        "|---|---|---|---|---|---|",
    ]
    for method, adapter in rows + [("regression", "full")]:
        rs = _pick(report, method, adapter)
        lines.append(
            f"| {method} | {adapter} | {_cell([r['seconds_per_step'] for r in rs], 4)} | "
            f"{statistics.fmean(r['train_seconds'] for r in rs):.0f} | {_cell([r['final_loss'] for r in rs], 4)} | "
            f"{statistics.fmean(r['eval_seconds'] for r in rs):.0f} |"
        )
    lines.append("")
    return "\n".join(lines)


def checkpoints(report: dict[str, Any]) -> list[int]:
    """The training steps every run was evaluated at (its checkpoints and its last step), ascending."""
    return sorted({int(k) for r in report["runs"] for k in r["curve"]})


def unstable_runs(report: dict[str, Any]) -> list[str]:
    """``"method adapter seed N"`` of each generative run whose 1-step AbsRel after its last step is worse
    than at its first checkpoint: training went unstable (a learning rate too high for the run's length)."""
    out = []
    for r in report["runs"]:
        ats = sorted(int(k) for k in r["curve"])
        if r["method"] != "regression" and len(ats) > 1:
            first, last = (r["curve"][str(a)]["single"]["1"]["abs_rel"] for a in (ats[0], ats[-1]))
            if last > first:
                out.append(f"{r['method']} {r['adapter']} seed {r['seed']}")
    return out


def curve_section(report: dict[str, Any]) -> list[str]:
    """The report's "by training steps" part (only where the runs were evaluated at checkpoints): AbsRel at
    1 / 2 sampler steps and each target at every checkpoint (means over seeds, single member and ensemble)."""
    cfg, ats = report["config"], checkpoints(report)
    if len(ats) < 2:
        return []
    lines = [
        "",
        f"## By training steps (checkpoints of each {cfg['train_steps']}-step run, cosine learning rate over the run)",
        "",
        "AbsRel of one member at 1 / 2 sampler steps (regression: its one pass), mean over seeds.",
        "",
        "| method | adapter | " + " | ".join(str(a) for a in ats) + " |",
        "|---|---|" + "---|" * len(ats),
    ]
    for method in OBJECTIVES:
        for adapter in cfg["adapters"]:
            cells = [
                " / ".join(f"{_mean(report, method, adapter, 'single', s, at=a):.4f}" for s in (1, 2)) for a in ats
            ]
            lines.append(f"| {method} | {adapter} | " + " | ".join(cells) + " |")
    lines.append(
        "| regression | full | "
        + " | ".join(f"{_mean(report, 'regression', 'full', 'single', 1, at=a):.4f}" for a in ats)
        + " |"
    )
    unstable = unstable_runs(report)
    if unstable:
        lines += [
            "",
            "Unstable runs (their last AbsRel at 1 step is worse than at their first checkpoint): "
            + ", ".join(unstable)
            + ". Means that include them compare a diverged baseline, not a method.",
        ]
    names = list(dict.fromkeys(t["target"] for t in targets(report, ats[-1])))
    lines += [
        "",
        "Targets met at each checkpoint (per adapter and mode; the numbers compared are in the json).",
        "",
        "| training steps | adapter | mode | " + " | ".join(names) + " |",
        "|---|---|---|" + "---|" * len(names),
    ]
    for a in ats:
        found = targets(report, a)
        for adapter in cfg["adapters"]:
            for mode in ("single", "ensemble"):
                verdicts = {t["target"]: t["met"] for t in found if t["adapter"] == adapter and t["mode"] == mode}
                label = "single" if mode == "single" else f"ensemble ×{MEMBERS}"
                lines.append(
                    f"| {a} | {adapter} | {label} | " + " | ".join("yes" if verdicts[n] else "no" for n in names) + " |"
                )
    return lines


COLORS = {"diffusion": "tab:blue", "naive_fm": "tab:red", "diff2flow": "tab:green", "regression": "k"}


def _figure(adapters: list[str]) -> tuple[Any, Any]:
    """A figure with one panel per adapter, sharing the AbsRel axis."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.2 * len(adapters), 3.8), dpi=100)
    return fig, fig.subplots(1, len(adapters), sharey=True, squeeze=False)[0]


def _save_figure(fig: Any, axes: Any, ylabel: str, path: pathlib.Path) -> pathlib.Path:
    for ax in axes:
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel(ylabel)
    axes[-1].legend(fontsize=7)
    fig.tight_layout()
    return atomic_write(path, lambda p: fig.savefig(p, format="png"))


def save_curve_plot(report: dict[str, Any], path: pathlib.Path) -> pathlib.Path:
    """AbsRel of one member at 1 sampler step (regression: its one pass) against training steps, per adapter:
    each seed a thin line (so an unstable run shows as one), the mean over seeds a thick one."""
    cfg, ats = report["config"], checkpoints(report)
    fig, axes = _figure(cfg["adapters"])
    for ax, adapter in zip(axes, cfg["adapters"]):
        for method, runs_of in [(m, adapter) for m in OBJECTIVES] + [("regression", "full")]:
            runs = _pick(report, method, runs_of)
            for r in runs:
                ax.plot(
                    ats,
                    [r["curve"][str(a)]["single"]["1"]["abs_rel"] for a in ats],
                    color=COLORS[method],
                    linewidth=0.7,
                    alpha=0.5,
                )
            label = "regression (full), 1 pass" if method == "regression" else f"{method}, 1 step"
            ax.plot(
                ats,
                [_mean(report, method, runs_of, "single", 1, at=a) for a in ats],
                marker="o",
                linewidth=2,
                color=COLORS[method],
                label=f"{label} (mean; thin: seeds)",
            )
        ax.set_title(adapter)
        ax.set_xlabel("training steps")
    return _save_figure(fig, axes, "AbsRel of one member, 1 step", path)


def save_plot(report: dict[str, Any], path: pathlib.Path) -> pathlib.Path:
    """AbsRel against sampler steps after the last training step, per adapter (single and ensemble)."""
    cfg = report["config"]
    fig, axes = _figure(cfg["adapters"])
    regression = _mean_std([r["metrics"]["single"]["1"]["abs_rel"] for r in _pick(report, "regression", "full")])
    xs = cfg["sampler_steps"]
    for ax, adapter in zip(axes, cfg["adapters"]):
        for method in OBJECTIVES:
            rs = _pick(report, method, adapter)
            for mode, style in (("single", "-"), ("ensemble", "--")):
                stats = [_mean_std([r["metrics"][mode][str(s)]["abs_rel"] for r in rs]) for s in xs]
                ax.errorbar(
                    xs,
                    [m for m, _ in stats],
                    yerr=[s for _, s in stats],
                    marker="o",
                    capsize=3,
                    linestyle=style,
                    color=COLORS[method],
                    label=f"{method}{'' if mode == 'single' else f' ×{MEMBERS}'}",
                )
        ax.axhline(regression[0], color="k", linestyle=":", label="regression (1 pass)")
        ax.set_title(adapter)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sampler steps")
    return _save_figure(fig, axes, "AbsRel (affine-invariant)", path)


# ------------------------------------------------------------------------------------ main
def parse_eval_at(p: argparse.ArgumentParser, text: str, train_steps: int) -> tuple[int, ...]:
    """``--eval-at`` as ascending training steps, each in ``1 .. --train-steps`` (through ``p.error`` otherwise)."""
    try:
        steps = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        p.error(f"--eval-at must be comma-separated whole numbers of training steps, like 500,1500,3000; got {text!r}")
    if not steps or steps[0] < 1 or steps[-1] > train_steps:
        p.error(f"--eval-at steps must lie in 1 .. --train-steps ({train_steps}); got {text!r}")
    return tuple(steps)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--quick", action="store_true", help="seconds: 1 seed, 64 / 32 scenes, 20 training steps, 1 / 2 sampler steps"
    )
    p.add_argument("--seeds", type=int, default=None, help="seeds (default 3)")
    p.add_argument("--train", type=int, default=None, help="training scenes (default 2048)")
    p.add_argument("--test", type=int, default=None, help="test scenes (default 256)")
    p.add_argument("--train-steps", type=int, default=None, help=f"training steps per run (default {TRAIN_STEPS})")
    p.add_argument(
        "--eval-at",
        default=None,
        help="comma-separated training steps at which every run is also evaluated, for a training-budget "
        "curve (checkpoints of one run; the report is then named depth_curve)",
    )
    add_finetune_flags(p, batch=16, lr_lora=LR_LORA, lr_full=LR_FULL)
    args = p.parse_args(argv)
    quick = args.quick
    seeds = list(range(args.seeds if args.seeds is not None else (1 if quick else 3)))
    train = args.train or (64 if quick else 2048)
    test = args.test or (32 if quick else 256)
    train_steps = args.train_steps or (20 if quick else TRAIN_STEPS)
    sampler_steps = (1, 2) if quick else STEPS
    check_finetune_flags(
        p, args, ("seeds", len(seeds), 1), ("train", train, 1), ("test", test, 1), ("train-steps", train_steps, 1)
    )
    eval_at = parse_eval_at(p, args.eval_at, train_steps) if args.eval_at is not None else ((10,) if quick else ())
    torch.set_num_threads(1)
    start = time.perf_counter()
    lrs = {"lora": args.lr_lora, "full": args.lr_full}
    methods = [(m, a) for m in OBJECTIVES for a in ADAPTERS] + [("regression", "full")]
    jobs = [
        (m, a, s, train_steps, args.batch, lrs["full" if a == "full" else "lora"], sampler_steps, eval_at)
        for s in seeds
        for m, a in methods
    ]
    runs = []
    if args.jobs == 1:
        setup = Setup(args.weights, train, test)
        with Progress(len(jobs) * train_steps, "depth runs", unit="step") as bar:
            runs = [run_one(setup, *job, progress=bar) for job in jobs]
    else:
        import multiprocessing as mp

        with (
            Progress(len(jobs), f"depth runs ({args.jobs} processes)", unit="run") as bar,
            mp.get_context("spawn").Pool(
                args.jobs, initializer=_worker_init, initargs=(str(args.weights), train, test)
            ) as pool,
        ):
            for result in pool.imap_unordered(_worker_run, jobs):
                runs.append(result)
                bar.update(1, f"{result['method']} {result['adapter']} seed {result['seed']}")
    order = [f"{m} {a}" for m, a in methods]
    runs.sort(key=lambda r: (order.index(f"{r['method']} {r['adapter']}"), r["seed"]))
    report = {
        "config": {
            "seeds": seeds,
            "adapters": list(ADAPTERS),
            "train": train,
            "test": test,
            "train_steps": train_steps,
            "batch": args.batch,
            "lrs": lrs,
            "timesteps": dict(TIMESTEPS),
            "sampler_steps": list(sampler_steps),
            "members": MEMBERS,
            "denoise_sigmas": list(DENOISE_SIGMAS),
            "eval_at": list(eval_at),
            "jobs": args.jobs,
            "quick": quick,
            "torch": torch.__version__,
        },
        "runs": runs,
        "seconds": time.perf_counter() - start,
    }
    report["targets"] = targets(report)
    report["targets_by_training_steps"] = {str(a): targets(report, a) for a in checkpoints(report)}
    stem = "depth_quick" if quick else "depth_curve" if eval_at else "depth"
    plots = [save_plot(report, args.out / f"{stem}_abs_rel_vs_steps.png")]
    if len(checkpoints(report)) > 1:
        plots.append(save_curve_plot(report, args.out / f"{stem}_abs_rel_vs_training_steps.png"))
    write_report(args.out, stem, report, summarise(report), plots)
    return 0


if __name__ == "__main__":
    sys.exit(main())
