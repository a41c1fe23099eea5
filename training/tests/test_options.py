"""Every training option has an observable effect (pure PyTorch, no ComfyUI).

Each test fails when its option is ignored: the network records what it is called with
(timesteps, conditioning, autocast state), and the adapters' updates are compared with what the
option prescribes. Time convention (MATH.md section 1): FM sigma in [0, 1], sigma = 1 is noise;
the naive-FM objective hands the network ``timestep = T * sigma``, so the recorded timesteps
give the drawn sigmas exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

import d2f_core
from d2f_core.lora import ALGORITHMS, LoHaAdapter, LoRAAdapter, select_target_modules
from d2f_core.sampling import inverse_time_shift
from training import TrainConfig, Trainer, TrainingData
from training.tests.helpers import CondNet, adapted_net

N_SAMPLES = 4


@dataclass
class Call:
    """One network call as the trainer made it."""

    x: torch.Tensor
    t: torch.Tensor
    context: torch.Tensor
    autocast: bool
    autocast_dtype: torch.dtype
    inner_dtype: torch.dtype | None


class Recorder:
    """Wraps the network: records every call and the dtype of an inner activation."""

    def __init__(self, net: CondNet) -> None:
        self.net = net
        self.calls: list[Call] = []
        self.output_grads: list[torch.Tensor] = []
        self._inner: list[torch.dtype] = []
        net.inner.mid.register_forward_hook(lambda module, args, out: self._inner.append(out.dtype))

    def __call__(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        self._inner.clear()
        out = self.net(x, t, context=context)
        self.calls.append(
            Call(
                x.detach().clone(),
                t.detach().clone(),
                context.detach().clone(),
                torch.is_autocast_enabled("cpu"),
                torch.get_autocast_dtype("cpu"),
                self._inner[0] if self._inner else None,
            )
        )
        if out.requires_grad:
            out.register_hook(lambda g: self.output_grads.append(g.detach().clone()))
        return out

    def sigmas(self, d2f: d2f_core.Diff2Flow) -> torch.Tensor:
        """The FM sigmas of all calls (naive-FM objective only: timestep = T * sigma)."""
        return torch.cat([c.t for c in self.calls]).double() / d2f.num_timesteps


@dataclass
class Run:
    trainer: Trainer
    recorder: Recorder
    net: CondNet
    adapters: dict
    data: TrainingData
    d2f: d2f_core.Diff2Flow


def build(
    config: TrainConfig, prediction: str = "eps", zero_terminal_snr: bool | None = None, uncond: bool = True
) -> Run:
    """A tiny CondNet with ``config``'s adapters on every layer, 4 fixed 8x8 latents with distinct
    captions (the uncond is all zeros, so a dropped caption is recognisable)."""
    net, adapters = adapted_net(config)
    data_gen = torch.Generator().manual_seed(7)
    latents = [torch.randn(4, 8, 8, generator=data_gen) for _ in range(N_SAMPLES)]
    conds = [{"context": torch.randn(1, 3, 4, generator=data_gen) + 3} for _ in range(N_SAMPLES)]
    data = TrainingData(latents, conds, uncond={"context": torch.zeros(1, 3, 4)} if uncond else None)
    ac = d2f_core.scaled_linear()
    if config.zero_terminal_snr if zero_terminal_snr is None else zero_terminal_snr:
        ac = d2f_core.rescale_zero_terminal_snr(ac)
    d2f = d2f_core.Diff2Flow(ac, prediction)
    recorder = Recorder(net)
    return Run(Trainer(recorder, adapters, d2f, config, data, "cpu"), recorder, net, adapters, data, d2f)


def params_of(run: Run) -> list[torch.nn.Parameter]:
    return [p for a in run.adapters.values() for p in a.parameters()]


def snapshot(run: Run) -> list[torch.Tensor]:
    return [p.detach().clone() for p in params_of(run)]


def ks_distance(samples: torch.Tensor, cdf) -> float:
    """Kolmogorov-Smirnov statistic of ``samples`` against the distribution function ``cdf``."""
    x, _ = torch.sort(samples.double())
    n = x.numel()
    f = cdf(x)
    upper = torch.arange(1, n + 1, dtype=torch.float64) / n - f
    lower = f - torch.arange(0, n, dtype=torch.float64) / n
    return float(torch.maximum(upper, lower).max())


# ---------------------------------------------------------------------- learning rate schedule
def expected_factors(schedule: str, steps: int, warmup: int) -> list[float]:
    """The documented schedule written out: linear warmup (k+1)/(W+1), then constant, cosine to 0
    or linear to 0 over the remaining steps (k counts optimizer steps from 0)."""
    out = []
    for k in range(steps):
        if k < warmup:
            out.append((k + 1) / (warmup + 1))
            continue
        progress = (k - warmup) / (steps - warmup)
        out.append(
            {"constant": 1.0, "cosine": 0.5 * (1 + math.cos(math.pi * progress)), "linear": 1 - progress}[schedule]
        )
    return out


@pytest.mark.parametrize("schedule,warmup", [("constant", 0), ("constant", 2), ("cosine", 2), ("linear", 0)])
def test_lr_schedule_sets_the_step_size_of_every_update(schedule: str, warmup: int) -> None:
    """SGD (momentum 0.9, no weight decay): every update is exactly lr_k * momentum buffer, with
    lr_k the schedule's value; the reported LR after k steps is the schedule's value for step k."""
    steps, base = 6, 0.05
    run = build(
        TrainConfig(
            steps=steps,
            lr_schedule=schedule,
            warmup_steps=warmup,
            optimizer="SGD",
            learning_rate=base,
            weight_decay=0.0,
            batch_size=2,
            rank=2,
            alpha=2,
        )
    )
    factors = expected_factors(schedule, steps, warmup)
    reported: list[float] = []
    buffers = None
    for k in range(steps):
        before = snapshot(run)
        run.trainer.train_step()
        grads = [p.grad.detach().clone() for p in params_of(run)]
        buffers = grads if buffers is None else [0.9 * b + g for b, g in zip(buffers, grads)]
        for p0, p, buf in zip(before, params_of(run), buffers):
            torch.testing.assert_close(
                p.detach(),
                p0 - base * factors[k] * buf,
                rtol=0,
                atol=1e-7,
                msg=lambda m, k=k: f"step {k + 1}: the update is not lr * {factors[k]:.4f} * buffer ({m})",
            )
        reported.append(run.trainer.scheduler.get_last_lr()[0])
    assert sum(g.abs().sum() for g in grads) > 0, "no gradient reached the adapters: the check above is empty"
    # after k steps the LR is the schedule's value for the (k+1)-th update
    assert reported[:-1] == pytest.approx([base * f for f in factors[1:]], rel=1e-12)


@pytest.mark.parametrize("warmup", [0, 3])
def test_warmup_scales_the_first_adam_update(warmup: int) -> None:
    """Adam's first update moves every parameter with a clear gradient by exactly the step's LR
    (update = lr * g / |g|): lr / (warmup + 1) with warmup, lr without."""
    lr = 1e-2
    run = build(TrainConfig(steps=10, warmup_steps=warmup, optimizer="Adam", learning_rate=lr, batch_size=2))
    before = snapshot(run)
    run.trainer.train_step()
    moved = []
    for p0, p in zip(before, params_of(run)):
        clear = p.grad.abs() > 1e-4
        moved.append((p.detach() - p0)[clear].abs())
    moved = torch.cat(moved)
    assert moved.numel() > 10
    torch.testing.assert_close(moved, torch.full_like(moved, lr / (warmup + 1)), rtol=2e-3, atol=0)


# ---------------------------------------------------------------------- accumulation and batch
def reference_gradient(run: Run, micro_batches: int, batch: int, seed: int) -> tuple[list[torch.Tensor], float]:
    """The gradient of the mean loss over ``micro_batches`` batches drawn as the engine documents
    (indices, then noise and sigmas as d2f_core.objective_loss draws them, from one generator)."""
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(micro_batches):
        x0, cond = run.data.batch(run.data.draw_indices(batch, gen))
        losses.append(d2f_core.objective_loss("diff2flow", run.net, run.d2f, x0, generator=gen, **cond).loss)
    mean = torch.stack(losses).mean()
    return list(torch.autograd.grad(mean, params_of(run), allow_unused=True)), mean.item()


def test_grad_accumulation_equals_the_big_batch_gradient() -> None:
    """batch 2 x 3 accumulated micro-batches: one update with the gradient of the mean loss over
    the 6 samples of the three draws (not of the first draw, not their sum)."""
    run = build(TrainConfig(steps=1, batch_size=2, grad_accumulation=3, seed=4, learning_rate=1e-9, weight_decay=0.0))
    expected, expected_loss = reference_gradient(run, 3, 2, seed=4)
    loss = run.trainer.train_step()
    assert len(run.recorder.calls) == 3 and all(c.x.shape[0] == 2 for c in run.recorder.calls)
    assert loss == pytest.approx(expected_loss, rel=1e-6)
    for g_ref, p in zip(expected, params_of(run)):
        g_ref = torch.zeros_like(p) if g_ref is None else g_ref
        torch.testing.assert_close(p.grad, g_ref, rtol=1e-5, atol=1e-9)
    assert any(g is not None and g.abs().sum() > 0 for g in expected)


def test_batch_size_and_steps() -> None:
    run = build(TrainConfig(steps=5, batch_size=3))
    result = run.trainer.run()
    assert result.steps == 5 and run.trainer.step == 5 and len(result.losses) == 5
    assert [c.x.shape[0] for c in run.recorder.calls] == [3] * 5


# ---------------------------------------------------------------------- caption dropout
def is_uncond(context: torch.Tensor) -> torch.Tensor:
    return (context == 0).flatten(1).all(1)


def test_caption_dropout_replaces_the_drawn_samples_by_the_uncond() -> None:
    """The samples the dropout draw selects (drawn right after the batch indices) get exactly the
    uncond; all others get exactly their own caption."""
    p, batch, seed = 0.5, 8, 2
    run = build(TrainConfig(steps=1, batch_size=batch, caption_dropout=p, seed=seed))
    gen = torch.Generator().manual_seed(seed)
    indices = run.data.draw_indices(batch, gen)
    dropped = torch.rand(batch, generator=gen) < p
    assert dropped.any() and not dropped.all()  # the seed gives both kinds of sample
    run.trainer.train_step()
    context = run.recorder.calls[0].context
    for j, i in enumerate(indices):
        expected = run.data.uncond["context"][0] if dropped[j] else run.data.conds[i]["context"][0]
        torch.testing.assert_close(context[j], expected, rtol=0, atol=0, msg=f"sample {j} (dropped={bool(dropped[j])})")


@pytest.mark.parametrize("p", [0.0, 0.25, 0.6])
def test_caption_dropout_rate(p: float) -> None:
    run = build(TrainConfig(steps=4, batch_size=64, caption_dropout=p, seed=1, learning_rate=1e-9))
    run.trainer.run()
    context = torch.cat([c.context for c in run.recorder.calls])
    rate = is_uncond(context).double().mean().item()
    assert context.shape[0] == 256
    assert abs(rate - p) < 0.08, f"caption_dropout={p} but {rate:.3f} of the samples were trained on the uncond"


def test_no_dropout_without_an_uncond() -> None:
    run = build(TrainConfig(steps=2, batch_size=16, caption_dropout=0.6), uncond=False)
    run.trainer.run()
    assert not is_uncond(torch.cat([c.context for c in run.recorder.calls])).any()


# ---------------------------------------------------------------------- dtype / autocast
# fp16's first steps overflow under GradScaler's initial scale and are skipped (the scheduler
# still steps, which torch warns about): that is the loss scaling working.
SKIPPED_STEP_WARNING = "ignore:Detected call of `lr_scheduler.step\\(\\)` before `optimizer.step\\(\\)`:UserWarning"


@pytest.mark.filterwarnings(SKIPPED_STEP_WARNING)
@pytest.mark.parametrize("dtype,expected", [("fp32", None), ("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_dtype_runs_the_network_under_autocast(dtype: str, expected: torch.dtype | None) -> None:
    run = build(TrainConfig(steps=2, batch_size=2, dtype=dtype))
    run.trainer.run()
    for call in run.recorder.calls:
        assert call.autocast == (expected is not None), f"dtype={dtype}: autocast enabled={call.autocast}"
        if expected is not None:
            assert call.autocast_dtype == expected
        assert call.inner_dtype == (expected or torch.float32), (
            f"dtype={dtype}: the convolutions ran in {call.inner_dtype}"
        )
    assert all(p.dtype == torch.float32 for p in params_of(run))  # adapter weights stay fp32


@pytest.mark.filterwarnings(SKIPPED_STEP_WARNING)
def test_fp16_scales_the_loss_and_unscales_the_update() -> None:
    """fp16: the backward pass runs on the loss times GradScaler's scale (2**16 at first); a step
    whose scaled gradients overflow changes nothing and halves the scale; the first update made
    is lr * the unscaled gradient, i.e. fp32's gradient for the same parameters and draws."""
    common = dict(steps=6, batch_size=2, optimizer="SGD", weight_decay=0.0, seed=3)
    ref = build(TrainConfig(dtype="fp32", learning_rate=1e-12, **common))  # parameters stay put
    run = build(TrainConfig(dtype="fp16", learning_rate=0.05, **common))
    start = snapshot(run)
    scale = 2.0**16
    for k in range(6):
        ref.trainer.train_step()
        run.trainer.train_step()
        g32, g16 = ref.recorder.output_grads[k], run.recorder.output_grads[k]
        assert (g16.norm() / g32.norm()).item() == pytest.approx(scale, rel=0.02), (
            f"step {k + 1}: the loss is not scaled by {scale}"
        )
        update = [p.detach() - p0 for p, p0 in zip(params_of(run), start)]
        if all(u.abs().max() == 0 for u in update):  # overflow: skipped, scale halved
            scale /= 2
            assert run.trainer.scaler.get_scale() == scale
            continue
        for u, p in zip(update, params_of(ref)):
            torch.testing.assert_close(
                u, -0.05 * p.grad, rtol=0, atol=0.02 * 0.05 * max(p.grad.abs().max().item(), 1e-6)
            )
        break
    else:
        pytest.fail("no fp16 step was applied in 6 steps")


# ---------------------------------------------------------------------- timestep sampling
SIGMA_DRAW = dict(steps=1, batch_size=512, objective="naive_fm", learning_rate=1e-9, seed=6)


@pytest.mark.parametrize(
    "method,extra",
    [
        ("uniform", {}),
        ("logit_normal", {"logit_mean": 0.8, "logit_std": 0.5}),
        ("shift", {"shift": 3.0}),
        ("shift", {"shift": 0.4}),
        ("u_shaped", {}),
    ],
)
def test_timestep_sampling_draws_the_configured_sigmas(method: str, extra: dict) -> None:
    """The sigmas the network sees are the draws d2f_core.sample_training_sigmas makes for the
    method and its parameters (noise first, then sigma, from the seeded generator)."""
    config = TrainConfig(timestep_sampling=method, **extra, **SIGMA_DRAW)
    run = build(config)
    run.trainer.train_step()
    gen = torch.Generator().manual_seed(config.seed)
    x0, _ = run.data.batch(run.data.draw_indices(config.batch_size, gen))
    torch.randn(x0.shape, generator=gen)
    sigma = d2f_core.sample_training_sigmas(
        config.batch_size,
        method,
        run.d2f.sigma_max,
        logit_mean=config.logit_mean,
        logit_std=config.logit_std,
        shift=config.shift,
        generator=gen,
    )
    torch.testing.assert_close(run.recorder.calls[0].t, run.d2f.num_timesteps * sigma, rtol=0, atol=0)


@pytest.mark.parametrize("share", [0.5, 1.0])
def test_grid_share_places_its_share_of_the_sigmas_on_the_sampling_nodes(share: float) -> None:
    """The network sees the timestep sampling's draws with ``grid_share`` of them moved onto the nodes of the
    objective's sampling grid (d2f_core.place_on_sampling_grid, after the sigmas, from the same generator)."""
    config = TrainConfig(timestep_sampling="shift", shift=3.0, grid_share=share, **SIGMA_DRAW)
    run = build(config)
    run.trainer.train_step()
    gen = torch.Generator().manual_seed(config.seed)
    x0, _ = run.data.batch(run.data.draw_indices(config.batch_size, gen))
    torch.randn(x0.shape, generator=gen)
    sigma = d2f_core.sample_training_sigmas(config.batch_size, "shift", run.d2f.sigma_max, shift=3.0, generator=gen)
    nodes = d2f_core.get_objective(config.objective).sampling_nodes(run.d2f)
    expected = d2f_core.place_on_sampling_grid(sigma, nodes, share, gen)
    torch.testing.assert_close(run.recorder.calls[0].t, run.d2f.num_timesteps * expected, rtol=0, atol=0)
    on = ((run.recorder.sigmas(run.d2f)[:, None].double() - nodes[None]).abs() < 1e-5).any(1).double().mean()
    assert on.item() == pytest.approx(share, abs=0.1)


def uniform_cdf(u: torch.Tensor) -> torch.Tensor:
    return u


@pytest.mark.parametrize(
    "method,extra,cdf",
    [
        ("uniform", {}, uniform_cdf),
        (
            "logit_normal",
            {"logit_mean": 0.8, "logit_std": 0.5},
            lambda u: torch.special.ndtr((torch.logit(u) - 0.8) / 0.5),
        ),
        ("shift", {"shift": 3.0}, lambda u: inverse_time_shift(u, 3.0)),
        ("u_shaped", {}, lambda u: 0.5 + torch.sinh(4 * (u - 0.5)) / (2 * math.sinh(2.0))),
    ],
)
def test_timestep_sampling_distribution(method: str, extra: dict, cdf) -> None:
    """The drawn sigmas / sigma_max follow the method's distribution (Kolmogorov-Smirnov at the
    1 % level for 512 draws), and the non-uniform methods are clearly not uniform."""
    run = build(TrainConfig(timestep_sampling=method, **extra, **SIGMA_DRAW))
    run.trainer.train_step()
    u = run.recorder.sigmas(run.d2f) / run.d2f.sigma_max
    critical = 1.63 / math.sqrt(u.numel())
    assert u.numel() == 512 and 0 < u.min() and u.max() <= 1 + 1e-6
    assert ks_distance(u.clamp(max=1.0), cdf) < critical, f"{method}: sigmas do not follow the method"
    if method == "u_shaped":  # its CDF stays within 0.09 of the uniform one: the outer eighths hold 41 %, not 25 %
        assert ((u < 0.125) | (u > 0.875)).double().mean() > 0.35, f"{method}: sigmas look uniform"
    elif method != "uniform":
        assert ks_distance(u.clamp(max=1.0), uniform_cdf) > 2 * critical, f"{method}: sigmas look uniform"


# ---------------------------------------------------------------------- zero terminal SNR
def test_zero_terminal_snr_trains_up_to_pure_noise() -> None:
    """With the rescaled schedule sigma reaches 1 (pure noise); without it the draws stop at the
    schedule's sigma_max (0.936 for SD's schedule)."""
    reach = {}
    for zsnr in (False, True):
        run = build(TrainConfig(zero_terminal_snr=zsnr, **SIGMA_DRAW), prediction="v")
        run.trainer.train_step()
        reach[zsnr] = (run.d2f.sigma_max, run.recorder.sigmas(run.d2f).max().item())
    plain_max, plain_drawn = reach[False]
    zsnr_max, zsnr_drawn = reach[True]
    assert zsnr_max == 1.0 and plain_max == pytest.approx(0.936, abs=1e-3)
    assert plain_drawn <= plain_max + 1e-6
    assert zsnr_drawn > plain_max + 0.04  # 512 uniform draws on (0, 1]: the top one is above 0.99


def test_zero_terminal_snr_config_needs_the_rescaled_alignment() -> None:
    with pytest.raises(
        ValueError, match="zero_terminal_snr is set but the alignment's schedule has no zero terminal SNR"
    ):
        build(TrainConfig(steps=1, zero_terminal_snr=True), prediction="v", zero_terminal_snr=False)


def test_a_schedule_that_already_has_zero_terminal_snr_trains_with_it_whatever_the_flag() -> None:
    """A checkpoint whose own schedule has zero terminal SNR (SDXL ``v_pred`` + ``ztsnr``) trains on it
    with the option off: the option asks for a rescale, which such a schedule does not need
    (docs/MATH.md section 9); the LoRA metadata records the alignment's zero terminal SNR."""
    run = build(TrainConfig(steps=40, batch_size=4, zero_terminal_snr=False), prediction="v", zero_terminal_snr=True)
    run.trainer.run()
    assert run.trainer.d2f.sigma_max == 1.0
    drawn = run.trainer.d2f.sigma(torch.cat([c.t for c in run.recorder.calls]).double())
    assert float(drawn.max()) > 0.95  # above an ordinary schedule's sigma_max (0.936)


# ---------------------------------------------------------------------- rank, alpha, algorithm
@pytest.mark.parametrize("rank,alpha", [(2, 2.0), (4, 1.0), (3, 12.0)])
def test_rank_and_alpha_set_adapter_shapes_and_delta_scale(rank: int, alpha: float) -> None:
    """LoRA factors are [out, rank] and [rank, fan_in]; after training, the network's weight is the
    base weight plus (alpha / rank) * up @ down."""
    run = build(TrainConfig(steps=3, batch_size=2, rank=rank, alpha=alpha, learning_rate=1e-2))
    base = {
        n: m.parametrizations.weight.original.detach().clone() for n, m in select_target_modules(run.net, "all").items()
    }
    run.trainer.run()
    for name, module in select_target_modules(run.net, "all").items():
        adapter = run.adapters[name]
        out, fan_in = module.weight.shape[0], math.prod(module.weight.shape[1:])
        assert isinstance(adapter, LoRAAdapter), f"{name}: algorithm=LoRA gave a {type(adapter).__name__}"
        assert tuple(adapter.up.shape) == (out, rank) and tuple(adapter.down.shape) == (rank, fan_in)
        assert float(adapter.alpha) == alpha
        expected = base[name] + (alpha / rank) * (adapter.up @ adapter.down).reshape(module.weight.shape)
        torch.testing.assert_close(module.weight.detach(), expected.detach(), rtol=1e-6, atol=1e-7)
        assert adapter.up.abs().max() > 0, f"{name}: the adapter did not train"


def test_loha_trains_hadamard_factors() -> None:
    rank, alpha = 3, 6.0
    run = build(TrainConfig(steps=3, batch_size=2, algorithm="LoHa", rank=rank, alpha=alpha, learning_rate=1e-2))
    start = {n: {k: v.detach().clone() for k, v in a.named_parameters()} for n, a in run.adapters.items()}
    base = {
        n: m.parametrizations.weight.original.detach().clone() for n, m in select_target_modules(run.net, "all").items()
    }
    run.trainer.run()
    for name, module in select_target_modules(run.net, "all").items():
        a = run.adapters[name]
        out, fan_in = module.weight.shape[0], math.prod(module.weight.shape[1:])
        assert isinstance(a, LoHaAdapter), f"{name}: algorithm=LoHa gave a {type(a).__name__}"
        assert [tuple(a.w1_a.shape), tuple(a.w1_b.shape), tuple(a.w2_a.shape), tuple(a.w2_b.shape)] == [
            (out, rank),
            (rank, fan_in),
            (out, rank),
            (rank, fan_in),
        ]
        expected = base[name] + (alpha / rank) * ((a.w1_a @ a.w1_b) * (a.w2_a @ a.w2_b)).reshape(module.weight.shape)
        torch.testing.assert_close(module.weight.detach(), expected.detach(), rtol=1e-6, atol=1e-7)
        for k, v in a.named_parameters():  # every factor trains (w2_a starts at 0, the others from step 2)
            assert not torch.equal(v.detach(), start[name][k]), f"{name}.{k} did not change"
        keys = set(a.native_state_dict("k"))
        assert keys == {"k.hada_w1_a", "k.hada_w1_b", "k.hada_w2_a", "k.hada_w2_b", "k.alpha"}


@pytest.mark.parametrize("algorithm", list(ALGORITHMS))
def test_each_algorithm_starts_at_the_base_and_trains_its_own_adapter(algorithm: str) -> None:
    run = build(TrainConfig(steps=3, batch_size=2, algorithm=algorithm, rank=2, alpha=2.0, learning_rate=1e-2))
    modules = select_target_modules(run.net, "all")
    for name, module in modules.items():  # training starts exactly at the base model
        assert type(run.adapters[name]) is ALGORITHMS[algorithm], (
            f"{name}: algorithm={algorithm} gave a {type(run.adapters[name]).__name__}"
        )
        assert torch.equal(module.weight, module.parametrizations.weight.original), f"{name} does not start at the base"
    start = {n: {k: v.detach().clone() for k, v in a.named_parameters()} for n, a in run.adapters.items()}
    run.trainer.run()
    for name, module in modules.items():
        a = run.adapters[name]
        torch.testing.assert_close(module.weight.detach(), a(module.parametrizations.weight.original).detach())
        moved = [k for k, v in a.named_parameters() if not torch.equal(v.detach(), start[name][k])]
        assert moved == list(start[name]), f"{name}: parameters that never trained: {set(start[name]) - set(moved)}"


# ---------------------------------------------------------------------- targets (module selection)
class Block(torch.nn.Module):
    """Names as in an SD UNet's BasicTransformerBlock: attn1/attn2 (to_q, to_k, to_v, to_out.0), ff.net."""

    def __init__(self) -> None:
        super().__init__()
        for attn in ("attn1", "attn2"):
            m = torch.nn.Module()
            m.to_q, m.to_k, m.to_v = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
            m.to_out = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout())
            setattr(self, attn, m)
        self.ff = torch.nn.Module()
        proj = torch.nn.Module()
        proj.proj = torch.nn.Linear(4, 8)
        self.ff.net = torch.nn.Sequential(proj, torch.nn.Dropout(), torch.nn.Linear(8, 4))
        self.proj_in = torch.nn.Conv2d(4, 4, 1)
        self.norm = torch.nn.LayerNorm(4)


@pytest.mark.parametrize(
    "targets,expected",
    [
        ("attention", {f"b.{a}.{p}" for a in ("attn1", "attn2") for p in ("to_q", "to_k", "to_v", "to_out.0")}),
        (
            "attention_ff",
            {f"b.{a}.{p}" for a in ("attn1", "attn2") for p in ("to_q", "to_k", "to_v", "to_out.0")}
            | {"b.ff.net.0.proj", "b.ff.net.2"},
        ),
        (
            "all",
            {f"b.{a}.{p}" for a in ("attn1", "attn2") for p in ("to_q", "to_k", "to_v", "to_out.0")}
            | {"b.ff.net.0.proj", "b.ff.net.2", "b.proj_in"},
        ),
    ],
)
def test_targets_select_the_named_layers(targets: str, expected: set) -> None:
    model = torch.nn.Module()
    model.b = Block()
    assert set(select_target_modules(model, targets)) == expected


# ---------------------------------------------------------------------- save_every
@pytest.mark.parametrize("steps,every,expected", [(7, 3, [3, 6]), (6, 0, []), (4, 1, [1, 2, 3, 4]), (5, 5, [5])])
def test_save_every_saves_at_exactly_the_multiples(steps: int, every: int, expected: list) -> None:
    run = build(TrainConfig(steps=steps, save_every=every, learning_rate=1e-2))
    saved: list[tuple[int, int]] = []
    run.trainer.run(save=lambda t: saved.append((t.step, t.state_dict()["step"])))
    assert saved == [(s, s) for s in expected]


# ---------------------------------------------------------------------- seed
def test_seed_determines_the_run() -> None:
    """Same seed: identical draws, losses and adapters; another seed: other batches, noise and sigmas."""
    runs = {}
    for key, seed in (("a", 5), ("b", 5), ("c", 6)):
        run = build(TrainConfig(steps=3, batch_size=2, seed=seed, caption_dropout=0.3, learning_rate=1e-2))
        run.trainer.run()
        runs[key] = run
    a, b, c = runs["a"], runs["b"], runs["c"]
    assert a.trainer.losses == b.trainer.losses
    for pa, pb in zip(params_of(a), params_of(b)):
        assert torch.equal(pa, pb)
    for ca, cb in zip(a.recorder.calls, b.recorder.calls):
        assert torch.equal(ca.x, cb.x) and torch.equal(ca.t, cb.t) and torch.equal(ca.context, cb.context)
    assert a.trainer.losses != c.trainer.losses
    first_a, first_c = a.recorder.calls[0], c.recorder.calls[0]
    assert not torch.equal(first_a.t, first_c.t) and not torch.equal(first_a.x, first_c.x)
