"""Weight adapters: the delta formulas ComfyUI's loader uses, native keys, attach and round trip."""

from __future__ import annotations

import pytest
import torch

from d2f_core.lora import (
    ALGORITHMS,
    adapters_state_dict,
    attach_parametrizations,
    factorization,
    load_adapters_state_dict,
    make_adapter,
    select_target_modules,
)
from d2f_core.tests.helpers import NATIVE_KEYS


def comfy_lora_delta(tensors: dict, key: str, shape) -> torch.Tensor:
    """ComfyUI's LoRA rule, written from its documented behaviour: alpha / rank * up @ down."""
    up, down = tensors[f"{key}.lora_up.weight"], tensors[f"{key}.lora_down.weight"]
    alpha = tensors[f"{key}.alpha"] / down.shape[0]
    return (alpha * (up.flatten(1) @ down.flatten(1))).reshape(shape)


def comfy_loha_delta(tensors: dict, key: str, shape) -> torch.Tensor:
    w1a, w1b, w2a, w2b = (tensors[f"{key}.hada_{n}"] for n in ("w1_a", "w1_b", "w2_a", "w2_b"))
    alpha = tensors[f"{key}.alpha"] / w1b.shape[0]
    return (alpha * (w1a @ w1b) * (w2a @ w2b)).reshape(shape)


def comfy_lokr_delta(tensors: dict, key: str, shape) -> torch.Tensor:
    """Full LoKr factors: kron(w1, w2), no alpha scaling (ComfyUI applies alpha to low-rank factors only)."""
    return torch.kron(tensors[f"{key}.lokr_w1"], tensors[f"{key}.lokr_w2"]).reshape(shape)


def comfy_oft_weight(tensors: dict, key: str, weight: torch.Tensor) -> torch.Tensor:
    """OFT as documented: Q = B - B^T scaled to norm alpha when larger, R = (I + Q)(I - Q)^-1, each
    block of output rows replaced by R^T times it (written block by block, as plain matrix products)."""
    blocks, alpha = tensors[f"{key}.oft_blocks"], float(tensors[f"{key}.alpha"])
    q = blocks - blocks.transpose(1, 2)
    if alpha > 0 and q.norm() + 1e-8 > alpha:
        q = q * alpha / (q.norm() + 1e-8)
    n, b, _ = blocks.shape
    eye = torch.eye(b)
    rows = weight.reshape(n, b, -1)
    out = [((eye + q[k]) @ torch.inverse(eye - q[k])).T @ rows[k] for k in range(n)]
    return torch.cat(out).reshape(weight.shape)


def comfy_dora_weight(tensors: dict, key: str, weight: torch.Tensor) -> torch.Tensor:
    """DoRA with a magnitude of shape [1, in, ...]: V = W + LoRA delta, divided by its norm per input
    channel (plus float32 eps) and multiplied by the magnitude."""
    v = weight + comfy_lora_delta(tensors, key, weight.shape)
    per_in = v.transpose(0, 1).reshape(v.shape[1], -1).norm(dim=1)
    m = tensors[f"{key}.dora_scale"].reshape(-1)
    factor = (m / (per_in + torch.finfo(torch.float32).eps)).reshape(1, -1, *([1] * (v.dim() - 2)))
    return v * factor


def additive(delta):
    return lambda tensors, key, weight: weight + delta(tensors, key, weight.shape)


def comfy_full_delta(tensors: dict, key: str, shape) -> torch.Tensor:
    """ComfyUI's ``diff`` patch: the tensor is added to the weight as it is."""
    return tensors[f"{key}.diff"].reshape(shape)


REFERENCES = {
    "LoRA": additive(comfy_lora_delta),
    "LoHa": additive(comfy_loha_delta),
    "LoKr": additive(comfy_lokr_delta),
    "OFT": comfy_oft_weight,
    "DoRA": comfy_dora_weight,
    "Full": additive(comfy_full_delta),
}


def test_every_algorithm_has_a_reference() -> None:
    assert set(REFERENCES) == set(NATIVE_KEYS) == set(ALGORITHMS)


@pytest.mark.parametrize("shape", [(12, 6), (8, 4, 3, 3)])
@pytest.mark.parametrize("algorithm", list(ALGORITHMS))
def test_adapted_weight_matches_comfyui_formula(shape, algorithm) -> None:
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(shape, generator=gen)
    adapter = make_adapter(algorithm, shape, rank=3, alpha=1.5, generator=gen, weight=weight)
    with torch.no_grad():
        for p in adapter.parameters():
            p.normal_(generator=gen)
    tensors = adapter.native_state_dict("diffusion_model.layer")
    assert set(tensors) == {f"diffusion_model.layer.{k}" for k in NATIVE_KEYS[algorithm]}
    expected = REFERENCES[algorithm](tensors, "diffusion_model.layer", weight)
    assert not torch.allclose(expected, weight, atol=1e-3), "random factors must change the weight"
    torch.testing.assert_close(adapter(weight), expected, rtol=1e-5, atol=1e-5)
    if algorithm in ("LoRA", "DoRA") and len(shape) == 4:
        assert tensors["diffusion_model.layer.lora_down.weight"].shape == (3, 4, 3, 3)
        assert tensors["diffusion_model.layer.lora_up.weight"].shape == (8, 3, 1, 1)
    if algorithm == "DoRA":
        assert tensors["diffusion_model.layer.dora_scale"].shape == (1, shape[1], *([1] * (len(shape) - 2)))


def test_oft_norm_bound_applies_only_above_alpha() -> None:
    weight = torch.randn(12, 6)
    small, large = (make_adapter("OFT", weight.shape, rank=3, alpha=a) for a in (0.01, 100.0))
    for adapter in (small, large):
        with torch.no_grad():
            adapter.blocks.normal_(generator=torch.Generator().manual_seed(1))
    # both bounds give a rotation (row norms within a block are kept), but only alpha 0.01 limits it
    for adapter in (small, large):
        out = adapter(weight)
        torch.testing.assert_close(out.reshape(4, 3, 6).norm(dim=1), weight.reshape(4, 3, 6).norm(dim=1))
    assert (small(weight) - weight).norm() < 0.05 * (large(weight) - weight).norm()


@pytest.mark.parametrize("shape", [(12, 6), (8, 4, 3, 3)])
@pytest.mark.parametrize("algorithm", list(ALGORITHMS))
def test_fresh_adapter_is_the_base_and_every_parameter_trains(shape, algorithm) -> None:
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(shape, generator=gen)
    adapter = make_adapter(algorithm, shape, rank=2, alpha=2.0, generator=gen, weight=w)
    assert torch.equal(adapter(w), w), "a fresh adapter must leave the weight exactly as it is"
    start = {k: p.detach().clone() for k, p in adapter.named_parameters()}
    target = torch.randn(shape, generator=gen)
    optimizer = torch.optim.SGD(adapter.parameters(), lr=1e-2)
    losses = []
    for _ in range(3):
        optimizer.zero_grad()
        loss = (adapter(w) - target).pow(2).sum()
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in adapter.parameters())
        optimizer.step()
        losses.append(loss.item())
    changed = {k for k, p in adapter.named_parameters() if not torch.equal(p.detach(), start[k])}
    assert changed == set(start), f"parameters that never trained: {set(start) - changed}"
    assert losses[-1] < losses[0]


def test_factorization_splits() -> None:
    assert factorization(320, 8) == (8, 40)
    assert factorization(40, 8) == (5, 8)
    assert factorization(13, 4) == (1, 13)
    assert factorization(1024) == (32, 32)
    assert factorization(36, 100) == (6, 6)
    assert factorization(12, 0) == (1, 12)
    for dim in range(1, 200):
        for factor in (-1, 1, 2, 3, 4, 8, 16):
            m, n = factorization(dim, factor)
            assert m * n == dim and m <= n and (factor < 0 or m <= factor)


def test_dora_needs_the_base_weight_and_more_than_one_output_row() -> None:
    with pytest.raises(ValueError, match="pass weight="):
        make_adapter("DoRA", (4, 3), 2, 2.0)
    with pytest.raises(ValueError, match="more than one output row"):
        make_adapter("DoRA", (1, 3), 2, 2.0, weight=torch.randn(1, 3))
    with pytest.raises(ValueError, match="expected \\(4, 3\\)"):
        make_adapter("DoRA", (4, 3), 2, 2.0, weight=torch.randn(3, 4))


def test_targets_select_the_right_layers() -> None:
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attn1 = torch.nn.ModuleDict({n: torch.nn.Linear(4, 4) for n in ("to_q", "to_k", "to_v")})
            self.attn1["to_out"] = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout())
            self.ff = torch.nn.Module()
            self.ff.net = torch.nn.Sequential(torch.nn.Module(), torch.nn.GELU(), torch.nn.Linear(8, 4))
            self.ff.net[0].proj = torch.nn.Linear(4, 8)
            self.conv = torch.nn.Conv2d(4, 4, 3)
            self.norm = torch.nn.LayerNorm(4)

    model = torch.nn.Module()
    model.block = Block()
    attn = set(select_target_modules(model, "attention"))
    assert attn == {"block.attn1.to_q", "block.attn1.to_k", "block.attn1.to_v", "block.attn1.to_out.0"}
    ff = set(select_target_modules(model, "attention_ff"))
    assert ff == attn | {"block.ff.net.0.proj", "block.ff.net.2"}
    everything = set(select_target_modules(model, "all"))
    assert everything == ff | {"block.conv"}
    with pytest.raises(ValueError, match="targets 'mlp' is unknown"):
        select_target_modules(model, "mlp")


@pytest.mark.parametrize("algorithm", list(ALGORITHMS))
def test_state_dict_round_trip_and_parametrization(algorithm) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Conv1d(6, 2, 1))
    x = torch.randn(3, 4)
    modules = select_target_modules(model, "all")
    gen = torch.Generator().manual_seed(2)
    adapters = {n: make_adapter(algorithm, m.weight.shape, 2, 2.0, gen, weight=m.weight) for n, m in modules.items()}
    before = model[0](x)
    attach_parametrizations(modules, adapters)
    torch.testing.assert_close(model[0](x), before, rtol=0, atol=0)  # a fresh adapter changes nothing
    with torch.no_grad():
        for p in adapters["0"].parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    assert not torch.allclose(model[0](x), before)
    tensors = adapters_state_dict(adapters)
    assert set(tensors) == {f"diffusion_model.{n}.{t}" for n in ("0", "2") for t in NATIVE_KEYS[algorithm]}
    fresh = {
        n: make_adapter(algorithm, m.weight.shape, 2, 2.0, weight=torch.randn(m.weight.shape))
        for n, m in modules.items()
    }
    load_adapters_state_dict(fresh, tensors)
    for n, m in modules.items():
        base = m.parametrizations.weight.original
        torch.testing.assert_close(fresh[n](base), adapters[n](base), rtol=0, atol=0)
    with pytest.raises(KeyError, match="belong to no adapter"):
        load_adapters_state_dict(fresh, {**tensors, "diffusion_model.9.lora_up.weight": torch.zeros(1)})
    with pytest.raises(KeyError, match="adapter tensors missing"):
        load_adapters_state_dict(fresh, {k: v for k, v in tensors.items() if not k.startswith("diffusion_model.2.")})
