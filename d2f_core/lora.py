"""Low-rank weight adapters (LoRA, LoHa) that train as weight wrappers.

An adapter is a module called on a frozen base weight: ``adapter(W) = W + delta``. The same
module attaches to a ComfyUI model with ``ModelPatcher.add_weight_wrapper`` (the shared UNet is
never modified) and to a plain PyTorch module with ``torch.nn.utils.parametrize``. Its
:meth:`~WeightAdapter.native_state_dict` uses ComfyUI's native LoRA keys, which stock
``LoraLoaderModelOnly`` loads with no missing or unused keys:

- LoRA: ``<key>.lora_up.weight`` [out, r(,1,1)], ``<key>.lora_down.weight`` [r, in(, kh, kw)],
  ``<key>.alpha``; ``delta = alpha / r * up @ down`` (Hu et al. 2021).
- LoHa: ``<key>.hada_w1_a/_b``, ``<key>.hada_w2_a/_b``, ``<key>.alpha``;
  ``delta = alpha / r * (w1_a @ w1_b) * (w2_a @ w2_b)`` (Hadamard product, LyCORIS).

``<key>`` is the module path in the checkpoint, e.g. ``diffusion_model.input_blocks.1.1.proj_in``.
"""
from __future__ import annotations

import math
import re
from typing import Iterable, Optional

import torch
from torch import nn

__all__ = [
    "ALGORITHMS",
    "TARGETS",
    "WeightAdapter",
    "LoRAAdapter",
    "LoHaAdapter",
    "make_adapter",
    "select_target_modules",
    "attach_parametrizations",
    "adapters_state_dict",
    "load_adapters_state_dict",
]

# Which layers of an SD UNet get an adapter. Names follow the LDM / ComfyUI module layout.
TARGETS = {
    "attention": re.compile(r"(^|\.)attn[12]\.(to_q|to_k|to_v|to_out\.0)$"),
    "attention_ff": re.compile(r"(^|\.)(attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.(0\.proj|2))$"),
    "all": None,  # every Linear and Conv weight, convolutions included
}


class WeightAdapter(nn.Module):
    """Base class: ``forward(weight) -> weight + delta`` with ``delta`` shaped like ``weight``."""

    rank: int

    def __init__(self, weight_shape: Iterable[int], rank: int, alpha: float) -> None:
        super().__init__()
        self.weight_shape = tuple(int(s) for s in weight_shape)
        if len(self.weight_shape) < 2:
            raise ValueError(f"adapters need a weight of at least 2 dimensions, got shape {self.weight_shape}")
        if not isinstance(rank, int) or rank < 1:
            raise ValueError(f"rank must be a positive integer, got {rank!r}")
        self.rank = rank
        self.register_buffer("alpha", torch.tensor(float(alpha)))

    @property
    def fan_in(self) -> int:
        return math.prod(self.weight_shape[1:])

    @property
    def scale(self) -> torch.Tensor:
        return self.alpha / self.rank

    def delta(self) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.delta().reshape(weight.shape).to(weight.dtype)

    def native_state_dict(self, key: str) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def load_native_state_dict(self, key: str, tensors: dict[str, torch.Tensor]) -> None:
        own = self.native_state_dict(key)
        missing = sorted(set(own) - set(tensors))
        if missing:
            raise KeyError(f"adapter tensors missing for {key}: {missing}")
        with torch.no_grad():
            for name, param in self._native_items(key):
                src = tensors[name]
                if src.numel() != param.numel():
                    raise ValueError(f"{name}: shape {tuple(src.shape)} does not fit {tuple(param.shape)}")
                param.copy_(src.reshape(param.shape))

    def _native_items(self, key: str) -> list[tuple[str, torch.Tensor]]:
        raise NotImplementedError


class LoRAAdapter(WeightAdapter):
    """``delta = alpha / r * up @ down``; ``up`` starts at zero so training starts at the base model."""

    def __init__(self, weight_shape: Iterable[int], rank: int, alpha: float, generator: Optional[torch.Generator] = None) -> None:
        super().__init__(weight_shape, rank, alpha)
        out = self.weight_shape[0]
        self.down = nn.Parameter(torch.empty(rank, self.fan_in))
        self.up = nn.Parameter(torch.zeros(out, rank))
        bound = 1 / math.sqrt(self.fan_in)  # kaiming-uniform(a=sqrt(5)), as torch.nn.Linear and peft
        with torch.no_grad():
            self.down.uniform_(-bound, bound, generator=generator)

    def delta(self) -> torch.Tensor:
        return self.scale * (self.up @ self.down)

    def _native_items(self, key: str) -> list[tuple[str, torch.Tensor]]:
        conv = len(self.weight_shape) > 2
        up = self.up.view(*self.up.shape, *([1] * (len(self.weight_shape) - 2))) if conv else self.up
        down = self.down.view(self.rank, *self.weight_shape[1:]) if conv else self.down
        return [(f"{key}.lora_up.weight", up), (f"{key}.lora_down.weight", down)]

    def native_state_dict(self, key: str) -> dict[str, torch.Tensor]:
        out = {name: t.detach().clone() for name, t in self._native_items(key)}
        out[f"{key}.alpha"] = self.alpha.detach().clone()
        return out


class LoHaAdapter(WeightAdapter):
    """``delta = alpha / r * (w1_a @ w1_b) * (w2_a @ w2_b)``; ``w2_a`` starts at zero."""

    def __init__(self, weight_shape: Iterable[int], rank: int, alpha: float, generator: Optional[torch.Generator] = None) -> None:
        super().__init__(weight_shape, rank, alpha)
        out = self.weight_shape[0]
        self.w1_a = nn.Parameter(torch.empty(out, rank))
        self.w1_b = nn.Parameter(torch.empty(rank, self.fan_in))
        self.w2_a = nn.Parameter(torch.zeros(out, rank))
        self.w2_b = nn.Parameter(torch.empty(rank, self.fan_in))
        with torch.no_grad():  # LyCORIS' initialisation
            self.w1_a.normal_(0, 0.1, generator=generator)
            self.w1_b.normal_(0, 1.0, generator=generator)
            self.w2_b.normal_(0, 1.0, generator=generator)

    def delta(self) -> torch.Tensor:
        return self.scale * (self.w1_a @ self.w1_b) * (self.w2_a @ self.w2_b)

    def _native_items(self, key: str) -> list[tuple[str, torch.Tensor]]:
        return [
            (f"{key}.hada_w1_a", self.w1_a), (f"{key}.hada_w1_b", self.w1_b),
            (f"{key}.hada_w2_a", self.w2_a), (f"{key}.hada_w2_b", self.w2_b),
        ]

    def native_state_dict(self, key: str) -> dict[str, torch.Tensor]:
        out = {name: t.detach().clone() for name, t in self._native_items(key)}
        out[f"{key}.alpha"] = self.alpha.detach().clone()
        return out


ALGORITHMS = {"LoRA": LoRAAdapter, "LoHa": LoHaAdapter}


def make_adapter(
    algorithm: str, weight_shape: Iterable[int], rank: int, alpha: float, generator: Optional[torch.Generator] = None
) -> WeightAdapter:
    """A fresh adapter of ``algorithm`` (``"LoRA"`` or ``"LoHa"``) for a weight of ``weight_shape``."""
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm {algorithm!r} is unknown: choose one of {', '.join(ALGORITHMS)}")
    return ALGORITHMS[algorithm](weight_shape, rank, alpha, generator)


def select_target_modules(model: nn.Module, targets: str) -> dict[str, nn.Module]:
    """The modules of ``model`` that get an adapter, by name, in a stable order.

    ``targets``: ``"attention"`` (q, k, v, out projections), ``"attention_ff"`` (plus the
    feed-forward layers), ``"all"`` (every Linear and Conv weight). Layers are recognised by
    type (``nn.Linear`` / ``nn.Conv*d``, ComfyUI's ops subclass them).
    """
    if targets not in TARGETS:
        raise ValueError(f"targets {targets!r} is unknown: choose one of {', '.join(TARGETS)}")
    pattern = TARGETS[targets]
    layer_types = (nn.Linear,) if pattern is not None else (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
    selected = {}
    for name, module in model.named_modules():
        if not isinstance(module, layer_types) or getattr(module, "weight", None) is None:
            continue
        if pattern is None or pattern.search(name):
            selected[name] = module
    if not selected:
        raise ValueError(f"no layer of the model matches targets={targets!r}")
    return selected


def attach_parametrizations(modules: dict[str, nn.Module], adapters: dict[str, WeightAdapter]) -> None:
    """Attach adapters to plain PyTorch modules as weight parametrizations (modifies them)."""
    from torch.nn.utils import parametrize

    for name, module in modules.items():
        parametrize.register_parametrization(module, "weight", adapters[name], unsafe=True)


def adapters_state_dict(adapters: dict[str, WeightAdapter], prefix: str = "diffusion_model.") -> dict[str, torch.Tensor]:
    """ComfyUI-native LoRA tensors of all adapters, keys ``<prefix><module path>.<tensor>``."""
    out: dict[str, torch.Tensor] = {}
    for name, adapter in adapters.items():
        out.update(adapter.native_state_dict(prefix + name))
    return out


def load_adapters_state_dict(adapters: dict[str, WeightAdapter], tensors: dict[str, torch.Tensor], prefix: str = "diffusion_model.") -> None:
    """Inverse of :func:`adapters_state_dict`; raises for missing or unexpected tensors."""
    expected = set()
    for name, adapter in adapters.items():
        adapter.load_native_state_dict(prefix + name, tensors)
        expected |= set(adapter.native_state_dict(prefix + name))
    unexpected = sorted(set(tensors) - expected)
    if unexpected:
        raise KeyError(f"tensors that belong to no adapter of this model: {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
