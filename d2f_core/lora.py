"""Weight adapters (LoRA, LoHa, LoKr, OFT, DoRA, Full) that train as weight wrappers.

An adapter is a module called on a frozen base weight: ``adapter(W) = W'`` (``W + delta`` for the
additive ones). The same module attaches to a ComfyUI model with ``ModelPatcher.add_weight_wrapper``
(the shared UNet is never modified) and to a plain PyTorch module with ``torch.nn.utils.parametrize``.
Its :meth:`~WeightAdapter.native_state_dict` uses ComfyUI's native keys, which stock ``LoraLoader`` /
``LoraLoaderModelOnly`` load with no missing or unused key, and whose loaded weight (ComfyUI 0.8.0's
``comfy.weight_adapter`` ``calculate_weight``) equals the trained ``W'``:

- LoRA: ``<key>.lora_up.weight`` [out, r(,1,1)], ``<key>.lora_down.weight`` [r, in(, kh, kw)],
  ``<key>.alpha``; ``W' = W + alpha / r * up @ down`` (Hu et al. 2021).
- LoHa: ``<key>.hada_w1_a/_b``, ``<key>.hada_w2_a/_b``, ``<key>.alpha``;
  ``W' = W + alpha / r * (w1_a @ w1_b) * (w2_a @ w2_b)`` (Hadamard product, LyCORIS).
- LoKr: ``<key>.lokr_w1`` [out1, in1], ``<key>.lokr_w2`` [out2, in2] (full factors, no alpha: the
  loader applies none to full factors); ``W' = W + kron(w1, w2)`` with ``out = out1 * out2`` and
  ``in = in1 * in2`` split by :func:`factorization` around ``rank`` (ComfyUI's trainer's layout).
- OFT: ``<key>.oft_blocks`` [n, b, b], ``<key>.alpha``; the output rows are rotated in ``n`` blocks of
  ``b`` (``b`` from :func:`factorization` of ``out`` around ``rank``) by the Cayley transform
  ``R = (I + Q)(I - Q)^-1`` of ``Q = B - B^T``, scaled down to Frobenius norm ``alpha`` when larger
  (over all blocks); ``W'[block k] = R_k^T W[block k]`` (Qiu et al. 2023; ComfyUI's ``OFTDiff`` rule).
- DoRA: the LoRA keys plus ``<key>.dora_scale`` [1, in(, 1, 1)]; ``V = W + alpha / r * up @ down``,
  ``W' = V * m / (||V|| + eps)`` with the norm per INPUT channel (over the output rows and the kernel,
  ``eps`` = float32 epsilon): the decomposition ComfyUI's ``weight_decompose`` applies when
  ``dora_scale`` does not lie on the output axis (LyCORIS' layout). Its output-axis branch divides by
  the norm of the base weight instead of ``V``, which is not DoRA, so it is never used (a layer with one
  output row is refused). ``m`` starts at ``||W|| + eps``, so ``W' = W`` exactly at the start
  (Liu et al. 2024).
- Full: ``<key>.diff`` shaped like the weight; ``W' = W + diff`` (full fine-tuning of the layer, saved as
  the difference from the base, ComfyUI's ``diff`` patch; ``rank`` and ``alpha`` are unused).

Every adapter starts exactly at the base model (zero delta, identity rotation, magnitude = norms).

Why hand-written rather than ComfyUI's ``comfy.weight_adapter`` train modules: ``d2f_core`` must run
without ComfyUI (the demo, the pure-PyTorch tests, the engine's tests), the engine, its EMA and the
resume state need one interface with seeded initialisation, and LoRA must stay as fast as the bare
loop. The modules are small, and tests/test_comfy_adapters.py checks each one against the host: the
stock loaders read every saved key and reproduce the trained outputs, and LoKr / OFT equal ComfyUI's
own ``LokrDiff`` / ``OFTDiff`` train modules on the same tensors.

``<key>`` is the module path in the checkpoint, e.g. ``diffusion_model.input_blocks.1.1.proj_in``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable

import torch
from torch import nn

__all__ = [
    "ALGORITHMS",
    "TARGETS",
    "WeightAdapter",
    "LoRAAdapter",
    "LoHaAdapter",
    "LoKrAdapter",
    "OFTAdapter",
    "DoRAAdapter",
    "FullAdapter",
    "factorization",
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
    """Base class: ``forward(weight) -> adapted weight`` (``weight + delta`` unless overridden)."""

    rank: int
    description: str = ""
    saves_alpha = True  # whether ``<key>.alpha`` is part of the native tensors

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

    def match_base(self, weight: torch.Tensor) -> None:
        """Re-initialise what depends on the base weight from the weight this adapter will be called
        on (DoRA's magnitude); nothing for the others."""

    def _native_items(self, key: str) -> list[tuple[str, torch.Tensor]]:
        """(native key, the trained tensor viewed in its native shape) for every trained tensor."""
        raise NotImplementedError

    def native_state_dict(self, key: str) -> dict[str, torch.Tensor]:
        out = {name: t.detach().clone() for name, t in self._native_items(key)}
        if self.saves_alpha:
            out[f"{key}.alpha"] = self.alpha.detach().clone()
        return out

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


def _kaiming_uniform_(t: torch.Tensor, fan_in: int, generator: torch.Generator | None) -> None:
    bound = 1 / math.sqrt(fan_in)  # kaiming-uniform(a=sqrt(5)), as torch.nn.Linear and peft
    with torch.no_grad():
        t.uniform_(-bound, bound, generator=generator)


class LoRAAdapter(WeightAdapter):
    """``delta = alpha / r * up @ down``; ``up`` starts at zero so training starts at the base model."""

    description = "low-rank product up @ down (Hu et al. 2021)"

    def __init__(
        self, weight_shape: Iterable[int], rank: int, alpha: float, generator: torch.Generator | None = None
    ) -> None:
        super().__init__(weight_shape, rank, alpha)
        out = self.weight_shape[0]
        self.down = nn.Parameter(torch.empty(rank, self.fan_in))
        self.up = nn.Parameter(torch.zeros(out, rank))
        _kaiming_uniform_(self.down, self.fan_in, generator)

    def delta(self) -> torch.Tensor:
        return self.scale * (self.up @ self.down)

    def _native_items(self, key: str) -> list[tuple[str, torch.Tensor]]:
        conv = len(self.weight_shape) > 2
        up = self.up.view(*self.up.shape, *([1] * (len(self.weight_shape) - 2))) if conv else self.up
        down = self.down.view(self.rank, *self.weight_shape[1:]) if conv else self.down
        return [(f"{key}.lora_up.weight", up), (f"{key}.lora_down.weight", down)]


class LoHaAdapter(WeightAdapter):
    """``delta = alpha / r * (w1_a @ w1_b) * (w2_a @ w2_b)``; ``w2_a`` starts at zero."""

    description = "Hadamard product of two low-rank terms (LyCORIS; more expressive at the same rank)"

    def __init__(
        self, weight_shape: Iterable[int], rank: int, alpha: float, generator: torch.Generator | None = None
    ) -> None:
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
            (f"{key}.hada_w1_a", self.w1_a),
            (f"{key}.hada_w1_b", self.w1_b),
            (f"{key}.hada_w2_a", self.w2_a),
            (f"{key}.hada_w2_b", self.w2_b),
        ]


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """``(m, n)`` with ``m * n == dimension`` and ``m <= n``: ``m`` is the largest divisor of
    ``dimension`` that is at most ``factor`` (any, for ``factor < 0``) and at most ``sqrt(dimension)``.

    The split LyCORIS and ComfyUI's trainer use for LoKr factors and OFT blocks (e.g. 320 around 8
    gives (8, 40), 40 around 8 gives (5, 8), a prime gives (1, p)); tests/test_comfy_adapters.py
    compares it with ComfyUI's on a range of sizes.
    """
    if dimension < 1:
        raise ValueError(f"cannot factorise dimension {dimension}")
    limit = math.isqrt(dimension) if factor < 0 else max(1, min(factor, math.isqrt(dimension)))
    m = max(d for d in range(1, limit + 1) if dimension % d == 0)
    return m, dimension // m


class LoKrAdapter(WeightAdapter):
    """``delta = kron(w1, w2)`` with full factors ``w1`` [out1, in1] (starts at zero) and ``w2``
    [out2, in2]; ``rank`` is the factor the dimensions are split around, ``alpha`` is unused (as
    ComfyUI's trainer and loader treat full factors)."""

    description = "Kronecker product of two small full matrices (rank: the split factor; alpha unused)"
    saves_alpha = False

    def __init__(
        self, weight_shape: Iterable[int], rank: int, alpha: float, generator: torch.Generator | None = None
    ) -> None:
        super().__init__(weight_shape, rank, alpha)
        out1, out2 = factorization(self.weight_shape[0], rank)
        in1, in2 = factorization(self.fan_in, rank)
        self.w1 = nn.Parameter(torch.zeros(out1, in1))
        self.w2 = nn.Parameter(torch.empty(out2, in2))
        _kaiming_uniform_(self.w2, in2, generator)

    def delta(self) -> torch.Tensor:
        return torch.kron(self.w1, self.w2)

    def _native_items(self, key: str) -> list[tuple[str, torch.Tensor]]:
        return [(f"{key}.lokr_w1", self.w1), (f"{key}.lokr_w2", self.w2)]


class OFTAdapter(WeightAdapter):
    """Block-diagonal orthogonal rotation of the output rows, ``W' = R^T W`` per block, by the
    Cayley transform of a skew-symmetric ``Q = B - B^T`` (norm bounded by ``alpha``); ``B`` starts
    at zero (``R = I``). ``rank`` is the factor the block size is chosen around."""

    description = (
        "orthogonal rotation of the output rows in blocks (rank: the block size; alpha: the rotation's norm bound)"
    )

    def __init__(
        self, weight_shape: Iterable[int], rank: int, alpha: float, generator: torch.Generator | None = None
    ) -> None:
        super().__init__(weight_shape, rank, alpha)
        block_size, blocks = factorization(self.weight_shape[0], rank)
        self.blocks = nn.Parameter(torch.zeros(blocks, block_size, block_size))

    def rotation(self) -> torch.Tensor:
        """``R`` [n, b, b]: ``(I + Q)(I - Q)^-1``, ``Q`` scaled to norm ``alpha`` when it is larger."""
        q = self.blocks - self.blocks.transpose(1, 2)
        norm = torch.linalg.vector_norm(q) + 1e-8
        # the loader's "if alpha > 0 and norm > alpha" as torch.where: no host sync in the training step
        q = torch.where((self.alpha > 0) & (norm > self.alpha), q * (self.alpha / norm), q)
        eye = torch.eye(q.shape[-1], device=q.device, dtype=q.dtype)
        return (eye + q) @ torch.linalg.inv(eye - q)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        r = self.rotation()
        blocks = weight.to(r.dtype).unflatten(0, (r.shape[0], r.shape[1]))
        return torch.einsum("knm,kn...->km...", r, blocks).flatten(0, 1).to(weight.dtype)

    def delta(self) -> torch.Tensor:
        raise NotImplementedError("OFT rotates the weight: its change depends on the weight, call the adapter on it")

    def _native_items(self, key: str) -> list[tuple[str, torch.Tensor]]:
        return [(f"{key}.oft_blocks", self.blocks)]


class DoRAAdapter(LoRAAdapter):
    """LoRA's direction update with a trained magnitude per input channel:
    ``W' = V * m / (||V|| + eps)``, ``V = W + alpha / r * up @ down``, the norm over every axis but the
    input channels (module docstring). ``m`` starts at the base weight's ``||W|| + eps``."""

    description = "LoRA plus a trained magnitude per input channel (weight-decomposed, Liu et al. 2024)"

    def __init__(
        self,
        weight_shape: Iterable[int],
        rank: int,
        alpha: float,
        generator: torch.Generator | None = None,
        weight: torch.Tensor | None = None,
    ) -> None:
        super().__init__(weight_shape, rank, alpha, generator)
        if weight is None:
            raise ValueError("DoRA initialises its magnitude from the base weight: pass weight= (the layer's weight)")
        if self.weight_shape[0] == 1:
            raise ValueError(
                "DoRA needs a layer with more than one output row: ComfyUI reads a magnitude of "
                "length 1 as lying on the output axis"
            )
        self.magnitude = nn.Parameter(torch.empty(1, self.weight_shape[1], *([1] * (len(self.weight_shape) - 2))))
        self.match_base(weight)

    @staticmethod
    def _norms(v: torch.Tensor) -> torch.Tensor:
        """``||v|| + eps`` per input channel (axis 1), shaped [1, in, 1, ...] (float32 eps, as the loader)."""
        return (
            torch.linalg.vector_norm(v, dim=[d for d in range(v.dim()) if d != 1], keepdim=True)
            + torch.finfo(torch.float32).eps
        )

    def match_base(self, weight: torch.Tensor) -> None:
        if tuple(weight.shape) != self.weight_shape:
            raise ValueError(f"DoRA base weight has shape {tuple(weight.shape)}, expected {self.weight_shape}")
        with torch.no_grad():
            self.magnitude.copy_(self._norms(weight.detach().float()).to(self.magnitude.device))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        v = weight.to(self.up.dtype) + self.delta().reshape(weight.shape)
        return (v * (self.magnitude / self._norms(v))).to(weight.dtype)

    def _native_items(self, key: str) -> list[tuple[str, torch.Tensor]]:
        return [*super()._native_items(key), (f"{key}.dora_scale", self.magnitude)]


class FullAdapter(WeightAdapter):
    """``delta`` is a full tensor shaped like the weight, starting at zero: the layer is fine-tuned
    entirely (``rank`` and ``alpha`` are ignored). Saved as ``<key>.diff``, which stock loaders add to
    the weight; a widened layer (an image-conditioned model's first convolution) has a delta of the
    widened shape, so it loads only onto a model widened the same way (d2f_host.depth)."""

    description = "every weight of the layer trained (full fine-tuning, saved as the difference from the base; rank and alpha unused)"
    saves_alpha = False

    def __init__(
        self, weight_shape: Iterable[int], rank: int, alpha: float, generator: torch.Generator | None = None
    ) -> None:
        super().__init__(weight_shape, rank, alpha)
        self.diff = nn.Parameter(torch.zeros(self.weight_shape))

    def delta(self) -> torch.Tensor:
        return self.diff

    def _native_items(self, key: str) -> list[tuple[str, torch.Tensor]]:
        return [(f"{key}.diff", self.diff)]


# name -> adapter class; TrainConfig.algorithm's choices (node combo, CLI flag) come from here
ALGORITHMS: dict[str, type[WeightAdapter]] = {
    "LoRA": LoRAAdapter,
    "LoHa": LoHaAdapter,
    "LoKr": LoKrAdapter,
    "OFT": OFTAdapter,
    "DoRA": DoRAAdapter,
    "Full": FullAdapter,
}


def make_adapter(
    algorithm: str,
    weight_shape: Iterable[int],
    rank: int,
    alpha: float,
    generator: torch.Generator | None = None,
    weight: torch.Tensor | None = None,
) -> WeightAdapter:
    """A fresh adapter of ``algorithm`` (a key of :data:`ALGORITHMS`) for a weight of ``weight_shape``.

    ``weight``: the base weight, needed by DoRA (its magnitude starts at the weight's norms).
    """
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm {algorithm!r} is unknown: choose one of {', '.join(ALGORITHMS)}")
    if algorithm == "DoRA":
        return DoRAAdapter(weight_shape, rank, alpha, generator, weight=weight)
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


def adapters_state_dict(
    adapters: dict[str, WeightAdapter], prefix: str = "diffusion_model."
) -> dict[str, torch.Tensor]:
    """ComfyUI-native LoRA tensors of all adapters, keys ``<prefix><module path>.<tensor>``."""
    out: dict[str, torch.Tensor] = {}
    for name, adapter in adapters.items():
        out.update(adapter.native_state_dict(prefix + name))
    return out


def load_adapters_state_dict(
    adapters: dict[str, WeightAdapter], tensors: dict[str, torch.Tensor], prefix: str = "diffusion_model."
) -> None:
    """Inverse of :func:`adapters_state_dict`; raises for missing or unexpected tensors."""
    expected = set()
    for name, adapter in adapters.items():
        adapter.load_native_state_dict(prefix + name, tensors)
        expected |= set(adapter.native_state_dict(prefix + name))
    unexpected = sorted(set(tensors) - expected)
    if unexpected:
        raise KeyError(
            f"tensors that belong to no adapter of this model: {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}"
        )
