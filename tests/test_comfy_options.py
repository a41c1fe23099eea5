"""Train Diff2Flow LoRA (the node, called as ComfyUI calls it) honours every option.

The options that only exist with ComfyUI (gradient checkpointing of a real UNet, targets of a real
UNet, the node's inputs reaching the trainer) are checked here; what each option does inside the
engine is checked without ComfyUI in training/tests/test_options.py.

The node is V3 with ``is_input_list=True``: every input arrives as a list. :func:`node_kwargs`
builds its inputs from one dict of TrainConfig-named options (the node's inputs are generated
from TrainConfig, so the names are the same).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import pytest
import torch
from comfy_harness import require_comfyui

require_comfyui()


from d2f_core.lora import factorization  # noqa: E402
from d2f_core.lora_metadata import LoraMetadata  # noqa: E402
from d2f_host import training_run  # noqa: E402
from training import TrainConfig  # noqa: E402

LATENT = (4, 8, 8)
NODE = "D2F_TrainLoRA"


# ---------------------------------------------------------------------- calling the node
def schema_ids(comfy_nodes) -> list[str]:
    return [i.id for i in comfy_nodes[NODE].define_schema().inputs]


def node_kwargs(
    comfy_nodes,
    model,
    latents: list,
    positive: list,
    negative: list | None = None,
    options: dict | None = None,
    output_name: str = "options_test",
    resume_from: str = "None",
) -> tuple[dict, list[str]]:
    """The node's keyword arguments (every value a list, as ComfyUI passes input lists) for
    ``options`` named as TrainConfig fields (the rest at TrainConfig's defaults), and the
    options the node has no input for."""
    ids = set(schema_ids(comfy_nodes))
    values = {**TrainConfig().to_dict(), **(options or {})}
    kwargs: dict[str, Any] = {"model": [model], "latents": latents, "positive": positive}
    if negative is not None:
        kwargs["negative"] = negative
    missing = []
    for name, value in values.items():
        if name in ids:
            kwargs[name] = [value]
        elif name in (options or {}):
            missing.append(name)
    kwargs["output_name"] = [output_name]
    kwargs["resume_from"] = [resume_from]
    return kwargs, missing


def run_node(comfy_nodes, model, options: dict, n: int = 4, negative: bool = True, **kw):
    """(model, lora, loss map, steps) from the node on ``n`` random latents with one caption each."""
    latents, positive, neg = batch(n)
    kwargs, missing = node_kwargs(comfy_nodes, model, latents, positive, neg if negative else None, options, **kw)
    assert not missing, f"the node has no input for {missing}"
    return comfy_nodes[NODE].execute(**kwargs).result[:4]  # the fifth output, the previews: test_comfy_previews.py


def batch(n: int = 4, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    latents = [{"samples": torch.randn(n, *LATENT, generator=gen) * 5}]
    positive = [[[torch.randn(1, 77, 64, generator=gen) + 1.0, {}]] for _ in range(n)]
    negative = [[[torch.zeros(1, 77, 64), {}]]]
    return latents, positive, negative


class StopBeforeTraining(Exception):
    pass


class Spy:
    """Records the Trainer the node builds (config, adapters, alignment) and every UNet call;
    with ``stop``, the node stops right after building it (nothing is trained)."""

    def __init__(self, pack, monkeypatch, stop: bool = False) -> None:
        self.trainers: list = []
        self.calls: list[dict] = []
        spy = self
        base_trainer, base_network = training_run.Trainer, training_run.unet_network

        class SpyTrainer(base_trainer):
            def __init__(self, *args, **kwargs) -> None:
                super().__init__(*args, **kwargs)
                spy.trainers.append(self)
                if stop:
                    raise StopBeforeTraining

        def network(unet):
            inner = base_network(unet)

            def call(x, t, context, y=None):
                spy.calls.append(
                    {
                        "t": t.detach().cpu().clone(),
                        "context": context.detach().cpu().clone(),
                        "autocast": torch.is_autocast_enabled(x.device.type),
                        "autocast_dtype": torch.get_autocast_dtype(x.device.type),
                    }
                )
                return inner(x, t, context, y)

            return call

        monkeypatch.setattr(training_run, "Trainer", SpyTrainer)
        monkeypatch.setattr(training_run, "unet_network", network)


def module_names(lora: dict) -> set[str]:
    """The adapted layers (module paths inside the UNet) of a ComfyUI-native LoRA dict."""
    out = set()
    for key in lora:
        m = re.match(
            r"diffusion_model\.(.+)\.(lora_up\.weight|lora_down\.weight|alpha|hada_w[12]_[ab]|lokr_w[12]|oft_blocks|dora_scale)$",
            key,
        )
        assert m, f"unexpected LoRA key {key}"
        out.add(m.group(1))
    return out


# ---------------------------------------------------------------------- every input reaches the trainer
NON_DEFAULT = dict(
    objective="naive_fm",
    steps=2,
    batch_size=2,
    grad_accumulation=2,
    learning_rate=2e-3,
    lr_schedule="cosine",
    warmup_steps=1,
    optimizer="SGD",
    weight_decay=0.05,
    rank=3,
    alpha=1.5,
    algorithm="LoHa",
    targets="attention_ff",
    timestep_sampling="logit_normal",
    logit_mean=0.5,
    logit_std=0.7,
    shift=2.0,
    zero_terminal_snr=True,
    dtype="bf16",
    gradient_checkpointing=True,
    seed=9,
    caption_dropout=0.2,
    save_every=0,
    ema_decay=0.9,
    ema_warmup=False,
    keep_last=2,
    save_raw=True,
    # previews on need the vae and preview_prompts inputs: tests/test_comfy_previews.py runs them
    preview_every=0,
    preview_seed=7,
    preview_steps=3,
    preview_cfg=2.5,
    preview_width=128,
    preview_height=192,
    validation_split=0.25,
    validation_every=3,
    loss="pseudo_huber",
    huber_c=0.05,
    # a share > 0 needs pairs with inverted images (this test trains on captioned latents, which refuse it):
    # tests/test_comfy_reflow.py checks that the share reaches the trainer
    inverted_share=0.0,
    grid_share=0.25,
)


def test_every_option_reaches_the_trainer(pack, comfy_nodes, tiny_model, monkeypatch) -> None:
    """Every TrainConfig field given to the node, each away from its default, is the trainer's
    config; rank, alpha, algorithm and targets shape its adapters; zero_terminal_snr its alignment."""
    assert set(NON_DEFAULT) == {f.name for f in dataclasses.fields(TrainConfig)}, "keep NON_DEFAULT complete"
    assert all(
        NON_DEFAULT[k] != v
        for k, v in TrainConfig().to_dict().items()
        if k not in ("save_every", "preview_every", "inverted_share")
    )
    spy = Spy(pack, monkeypatch, stop=True)
    latents, positive, negative = batch(4)
    model = tiny_model("v")
    kwargs, missing = node_kwargs(comfy_nodes, model, latents, positive, negative, NON_DEFAULT)
    with pytest.raises(StopBeforeTraining):
        comfy_nodes[NODE].execute(**kwargs)
    (trainer,) = spy.trainers
    got = trainer.config.to_dict()
    given = {k: v for k, v in NON_DEFAULT.items() if k not in missing}
    assert {k: got[k] for k in given} == given
    assert {type(a).__name__ for a in trainer.adapters.values()} == {"LoHaAdapter"}, "algorithm"
    assert {a.rank for a in trainer.adapters.values()} == {3}, "rank"
    assert {float(a.alpha) for a in trainer.adapters.values()} == {1.5}, "alpha"
    assert set(trainer.adapters) == expected_targets(model.model.diffusion_model, "attention_ff"), "targets"
    assert trainer.d2f.zero_terminal_snr and trainer.d2f.sigma_max == 1.0
    if missing:
        pytest.xfail(
            f"the node has no input for the training options {missing}: they always take TrainConfig's defaults"
        )


# ---------------------------------------------------------------------- targets, rank, alpha, algorithm
def expected_targets(unet: torch.nn.Module, targets: str) -> set[str]:
    names = set()
    for name, module in unet.named_modules():
        attention = re.search(r"(^|\.)attn[12]\.(to_q|to_k|to_v|to_out\.0)$", name) is not None
        ff = name.endswith(("ff.net.0.proj", "ff.net.2"))
        layer = isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) and getattr(module, "weight", None) is not None
        if (
            targets == "attention"
            and attention
            or targets == "attention_ff"
            and (attention or ff)
            or targets == "all"
            and layer
        ):
            names.add(name)
    return names


@pytest.mark.parametrize(
    "targets,algorithm,rank,alpha",
    [
        ("attention", "LoRA", 3, 1.5),
        ("attention_ff", "LoHa", 2, 4.0),
        ("all", "LoRA", 5, 5.0),
        ("all", "LoKr", 4, 1.0),
        ("attention_ff", "OFT", 4, 2.0),
        ("all", "DoRA", 3, 3.0),
    ],
)
def test_targets_rank_alpha_algorithm_shape_the_lora(comfy_nodes, tiny_model, targets, algorithm, rank, alpha) -> None:
    model = tiny_model("eps")
    unet = model.model.diffusion_model
    _, lora, _, steps = run_node(
        comfy_nodes,
        model,
        dict(steps=2, batch_size=2, targets=targets, algorithm=algorithm, rank=rank, alpha=alpha, learning_rate=1e-2),
    )
    assert steps == 2
    names = module_names(lora)
    assert names == expected_targets(unet, targets)
    if targets != "all":
        assert not any(isinstance(m, torch.nn.Conv2d) for n, m in unet.named_modules() if n in names)
    for name in names:
        weight = unet.get_submodule(name).weight
        out, fan_in = weight.shape[0], weight[0].numel()
        key = f"diffusion_model.{name}"
        if algorithm == "LoKr":  # full Kronecker factors split around rank; ComfyUI applies no alpha to them
            (o1, o2), (i1, i2) = factorization(out, rank), factorization(fan_in, rank)
            assert lora[f"{key}.lokr_w1"].shape == (o1, i1) and lora[f"{key}.lokr_w2"].shape == (o2, i2)
            assert f"{key}.alpha" not in lora
            continue
        assert float(lora[f"{key}.alpha"]) == alpha
        if algorithm in ("LoRA", "DoRA"):
            assert lora[f"{key}.lora_up.weight"].shape[:2] == (out, rank)
            assert lora[f"{key}.lora_down.weight"].reshape(rank, -1).shape == (rank, fan_in)
            assert f"{key}.hada_w1_a" not in lora
            assert (f"{key}.dora_scale" in lora) == (algorithm == "DoRA")
            if algorithm == "DoRA":
                assert lora[f"{key}.dora_scale"].shape == (1, weight.shape[1], *([1] * (weight.dim() - 2)))
        elif algorithm == "OFT":
            block, blocks = factorization(out, rank)
            assert lora[f"{key}.oft_blocks"].shape == (blocks, block, block)
        else:
            shapes = [tuple(lora[f"{key}.hada_{w}"].shape) for w in ("w1_a", "w1_b", "w2_a", "w2_b")]
            assert shapes == [(out, rank), (rank, fan_in), (out, rank), (rank, fan_in)]
            assert f"{key}.lora_up.weight" not in lora
    assert lora.metadata.rank == rank and lora.metadata.alpha == alpha and lora.metadata.algorithm == algorithm


# ---------------------------------------------------------------------- gradient checkpointing
def test_gradient_checkpointing_recomputes_every_block_layer(pack, comfy_nodes, tiny_model, monkeypatch) -> None:
    """With gradient_checkpointing every layer of the UNet's blocks runs under
    torch.utils.checkpoint in every step, the forward keeps far fewer activations for backward,
    and the trained LoRA is the same."""
    options = dict(steps=2, batch_size=1, learning_rate=1e-2, targets="all", seed=2)
    state = {"checkpoints": 0, "saved": 0}
    checkpoint = torch.utils.checkpoint.checkpoint
    base_network = training_run.unet_network

    def counting_checkpoint(*args, **kwargs):
        state["checkpoints"] += 1
        return checkpoint(*args, **kwargs)

    def measured_network(unet):  # bytes the forward keeps for the backward pass, outside checkpointed regions
        inner = base_network(unet)

        def pack_hook(t):
            state["saved"] += t.numel() * t.element_size()
            return t

        def call(*args, **kwargs):
            with torch.autograd.graph.saved_tensors_hooks(pack_hook, lambda t: t):
                return inner(*args, **kwargs)

        return call

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counting_checkpoint)
    monkeypatch.setattr(training_run, "unet_network", measured_network)
    results = {}
    for enabled in (False, True):
        state.update(checkpoints=0, saved=0)
        model = tiny_model("eps")
        _, lora, _, _ = run_node(comfy_nodes, model, {**options, "gradient_checkpointing": enabled}, n=2)
        results[enabled] = (lora, dict(state))
    unet = model.model.diffusion_model
    layers = sum(len(list(b.children())) for b in [*unet.input_blocks, unet.middle_block, *unet.output_blocks])
    (plain, off), (ckpt, on) = results[False], results[True]
    assert off["checkpoints"] == 0
    assert on["checkpoints"] >= 2 * layers, f"{on['checkpoints']} checkpointed calls for {layers} layers x 2 steps"
    assert on["saved"] < 0.5 * off["saved"], (
        f"saved activations {on['saved']} B with checkpointing vs {off['saved']} B without"
    )
    for key in plain:
        torch.testing.assert_close(ckpt[key], plain[key], rtol=1e-5, atol=1e-6)
    assert all("forward" not in layer.__dict__ for b in unet.output_blocks for layer in b.children())  # unwrapped after


# ---------------------------------------------------------------------- dtype, caption dropout
@pytest.mark.parametrize("dtype,expected", [("fp32", None), ("bf16", torch.bfloat16)])
def test_dtype_runs_the_unet_under_autocast(pack, comfy_nodes, tiny_model, monkeypatch, dtype, expected) -> None:
    spy = Spy(pack, monkeypatch)
    _, lora, losses, _ = run_node(comfy_nodes, tiny_model("eps"), dict(steps=2, batch_size=2, dtype=dtype))
    assert len(spy.calls) == 2
    for call in spy.calls:
        assert call["autocast"] == (expected is not None), (
            f"dtype={dtype}: the UNet ran with autocast enabled={call['autocast']}"
        )
        if expected is not None:
            assert call["autocast_dtype"] == expected
    assert all(v.dtype == torch.float32 for v in lora.values())  # the LoRA is saved in fp32


@pytest.mark.parametrize("p,negative", [(0.5, True), (0.0, True), (0.9, False)])
def test_caption_dropout_feeds_the_negative(pack, comfy_nodes, tiny_model, monkeypatch, p, negative) -> None:
    """The samples the dropout draw selects (drawn from the seeded generator right after the
    batch indices) get exactly the negative conditioning, all others exactly their caption;
    without a negative input nothing is dropped."""
    spy = Spy(pack, monkeypatch)
    model = tiny_model("eps")
    seed, size = 3, 8
    run_node(
        comfy_nodes,
        model,
        dict(steps=1, batch_size=size, caption_dropout=p, seed=seed, learning_rate=1e-6),
        n=size,
        negative=negative,
    )
    latents, positive, neg = batch(size)
    data = pack.train_inputs.build_training_data(model, latents, positive, neg if negative else None)
    gen = torch.Generator().manual_seed(seed)
    indices = data.draw_indices(size, gen)
    dropped = (torch.rand(size, generator=gen) < p) & negative
    if p == 0.5:
        assert dropped.any() and not dropped.all()  # the seed gives both kinds of sample
    (call,) = spy.calls
    for j, i in enumerate(indices):
        expected = torch.zeros(77, 64) if dropped[j] else positive[i][0][0][0]
        torch.testing.assert_close(
            call["context"][j], expected, rtol=0, atol=0, msg=f"sample {j} (dropped={bool(dropped[j])})"
        )


# ---------------------------------------------------------------------- zero terminal SNR, save_every, seed
@pytest.mark.parametrize("zsnr", [False, True])
def test_zero_terminal_snr_sets_the_training_alignment_and_output(
    pack, comfy_nodes, tiny_model, monkeypatch, zsnr
) -> None:
    spy = Spy(pack, monkeypatch)
    out_model, lora, _, _ = run_node(comfy_nodes, tiny_model("v"), dict(steps=1, batch_size=2, zero_terminal_snr=zsnr))
    (trainer,) = spy.trainers
    assert trainer.d2f.zero_terminal_snr == zsnr
    assert (trainer.d2f.sigma_max == 1.0) == zsnr and trainer.d2f.sigma_max > 0.93
    assert lora.metadata.zero_terminal_snr == zsnr
    assert out_model.get_model_object("model_sampling").d2f.zero_terminal_snr == zsnr


def test_zero_terminal_snr_is_refused_for_eps_models(comfy_nodes, tiny_model) -> None:
    with pytest.raises(ValueError, match="only valid for v-prediction"):
        run_node(comfy_nodes, tiny_model("eps"), dict(steps=1, zero_terminal_snr=True))


@pytest.mark.parametrize("steps,every,expected", [(5, 2, [2, 4]), (3, 0, [])])
def test_save_every_writes_at_exactly_the_multiples(comfy_nodes, tiny_model, loras_dir, steps, every, expected) -> None:
    from safetensors import safe_open

    from training.files import load_training_state

    run_node(comfy_nodes, tiny_model("eps"), dict(steps=steps, save_every=every), n=2, output_name="periodic")
    files = {p.name for p in loras_dir.iterdir()}
    assert files == {f"periodic_{s:06d}.safetensors" for s in expected} | ({"periodic.d2fstate"} if expected else set())
    for s in expected:
        with safe_open(str(loras_dir / f"periodic_{s:06d}.safetensors"), framework="pt") as f:
            assert LoraMetadata.from_header(f.metadata()).steps == s
    if expected:
        assert load_training_state(loras_dir / "periodic.d2fstate")["step"] == expected[-1]


def test_seed_determines_the_lora(comfy_nodes, tiny_model) -> None:
    options = dict(steps=1, batch_size=2, learning_rate=1e-2, caption_dropout=0.3)
    a = run_node(comfy_nodes, tiny_model("eps"), {**options, "seed": 1})[1]
    b = run_node(comfy_nodes, tiny_model("eps"), {**options, "seed": 1})[1]
    c = run_node(comfy_nodes, tiny_model("eps"), {**options, "seed": 2})[1]
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "the same seed gave different LoRAs"
    downs = [k for k in a if k.endswith("lora_down.weight")]
    same = [k for k in downs if torch.equal(a[k], c[k])]
    assert not same, f"seeds 1 and 2 initialised {len(same)} of {len(downs)} lora_down tensors identically"
