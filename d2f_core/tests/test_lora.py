"""Weight adapters: the delta formulas ComfyUI's loader uses, native keys, attach and round trip."""
from __future__ import annotations

import pytest
import torch

from d2f_core.lora import (
    adapters_state_dict,
    attach_parametrizations,
    load_adapters_state_dict,
    make_adapter,
    select_target_modules,
)


def comfy_lora_delta(tensors: dict, key: str, shape) -> torch.Tensor:
    """ComfyUI's LoRA rule, written from its documented behaviour: alpha / rank * up @ down."""
    up, down = tensors[f"{key}.lora_up.weight"], tensors[f"{key}.lora_down.weight"]
    alpha = tensors[f"{key}.alpha"] / down.shape[0]
    return (alpha * (up.flatten(1) @ down.flatten(1))).reshape(shape)


def comfy_loha_delta(tensors: dict, key: str, shape) -> torch.Tensor:
    w1a, w1b, w2a, w2b = (tensors[f"{key}.hada_{n}"] for n in ("w1_a", "w1_b", "w2_a", "w2_b"))
    alpha = tensors[f"{key}.alpha"] / w1b.shape[0]
    return (alpha * (w1a @ w1b) * (w2a @ w2b)).reshape(shape)


@pytest.mark.parametrize("shape", [(12, 6), (8, 4, 3, 3)])
@pytest.mark.parametrize("algorithm,reference", [("LoRA", comfy_lora_delta), ("LoHa", comfy_loha_delta)])
def test_delta_matches_comfyui_formula(shape, algorithm, reference) -> None:
    gen = torch.Generator().manual_seed(0)
    adapter = make_adapter(algorithm, shape, rank=3, alpha=1.5, generator=gen)
    with torch.no_grad():
        for p in adapter.parameters():
            p.normal_(generator=gen)
    weight = torch.randn(shape, generator=gen)
    tensors = adapter.native_state_dict("diffusion_model.layer")
    torch.testing.assert_close(adapter(weight), weight + reference(tensors, "diffusion_model.layer", shape))
    if algorithm == "LoRA" and len(shape) == 4:
        assert tensors["diffusion_model.layer.lora_down.weight"].shape == (3, 4, 3, 3)
        assert tensors["diffusion_model.layer.lora_up.weight"].shape == (8, 3, 1, 1)


@pytest.mark.parametrize("algorithm", ["LoRA", "LoHa"])
def test_fresh_adapter_is_identity_and_trainable(algorithm) -> None:
    adapter = make_adapter(algorithm, (5, 7), rank=2, alpha=2.0, generator=torch.Generator().manual_seed(1))
    w = torch.randn(5, 7)
    assert torch.equal(adapter(w), w)
    adapter(w).pow(2).sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in adapter.parameters())


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


def test_state_dict_round_trip_and_parametrization() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Conv1d(6, 2, 1))
    x = torch.randn(3, 4)
    modules = select_target_modules(model, "all")
    gen = torch.Generator().manual_seed(2)
    adapters = {n: make_adapter("LoRA", m.weight.shape, 2, 2.0, gen) for n, m in modules.items()}
    before = model[0](x)
    attach_parametrizations(modules, adapters)
    torch.testing.assert_close(model[0](x), before)  # zero-initialised up: no change yet
    with torch.no_grad():
        adapters["0"].up.fill_(0.1)
    assert not torch.allclose(model[0](x), before)
    tensors = adapters_state_dict(adapters)
    assert set(tensors) == {f"diffusion_model.{n}.{t}" for n in ("0", "2") for t in ("lora_up.weight", "lora_down.weight", "alpha")}
    fresh = {n: make_adapter("LoRA", m.weight.shape, 2, 2.0) for n, m in modules.items()}
    load_adapters_state_dict(fresh, tensors)
    for n in adapters:
        torch.testing.assert_close(fresh[n].delta(), adapters[n].delta())
    with pytest.raises(KeyError, match="belong to no adapter"):
        load_adapters_state_dict(fresh, {**tensors, "diffusion_model.9.lora_up.weight": torch.zeros(1)})
