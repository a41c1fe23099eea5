"""What the nodes and the help pages say about the registries, rendered from the registries.

The choices of samplers, sigma grids, objectives, timestep samplers, losses, start rules, adapter algorithms
and optimizers are registries (``d2f_core.SAMPLERS``, ``FM_GRIDS``, ``OBJECTIVES``, ``TIMESTEP_SAMPLERS``,
``training.config.LOSS_CHOICES`` (``d2f_core.LOSSES`` and ``recommended``), ``START_RULES``,
``d2f_core.lora.ALGORITHMS``, ``training.optimizers.OPTIMIZERS``); every
tooltip, description and help-page list of them is rendered here from the entries' own
descriptions, so a new entry shows up everywhere and a reworded one nowhere stays behind.

The help pages (``web/docs/<node id>/<locale>.md``) are static files: their lists live between
``<!-- generated: NAME -->`` and ``<!-- end generated -->`` (``NAME`` a key of :data:`BLOCKS`) and
are rewritten by::

    python -m training.registry_text --write   # rewrite every generated block
    python -m training.registry_text --check   # exit 1 naming the stale pages

This module never imports ComfyUI (nor d2f_host, nodes, d2f_app): the check runs anywhere.
"""

from __future__ import annotations

import argparse
import pathlib
import re
import sys
from collections.abc import Callable, Sequence

from d2f_core import FM_GRIDS, OBJECTIVES, SAMPLERS, START_RULES, TIMESTEP_SAMPLERS
from d2f_core.depth_settings import DEFAULT_DEPTH_STEPS
from d2f_core.lora import ALGORITHMS

from .config import LOSS_CHOICES
from .optimizers import OPTIMIZERS

__all__ = [
    "REGISTRIES",
    "BLOCKS",
    "PAGE_BLOCKS",
    "DOCS",
    "WRITE_COMMAND",
    "entries",
    "names",
    "choices_text",
    "choice_text",
    "default_sampler",
    "evaluations_text",
    "recommended_sampling_text",
    "markdown_list",
    "objective_table",
    "render_blocks",
    "block_names",
    "pages",
    "stale_pages",
    "write_pages",
    "main",
]

DOCS = pathlib.Path(__file__).resolve().parents[1] / "web" / "docs"
WRITE_COMMAND = "python -m training.registry_text --write"

# Objective.flow_model: how a model trained with the objective is sampled (d2f_host builds the model)
FLOW_MODEL_TEXT = {
    "diff2flow": "the Diff2Flow patch",
    "naive": "a plain flow model (raw output = velocity at timestep T * sigma)",
}


def _optimizer_text(name: str) -> str:
    record = OPTIMIZERS[name]
    if record.package is None:
        return record.description
    return f"{record.description}; needs `pip install '{record.package}'` (not offered without it)"


REGISTRIES: dict[str, Callable[[], dict[str, str]]] = {
    "samplers": lambda: {name: s.description for name, s in SAMPLERS.items()},
    "grids": lambda: dict(FM_GRIDS),
    "objectives": lambda: {name: o.description for name, o in OBJECTIVES.items()},
    "timestep_samplers": lambda: dict(TIMESTEP_SAMPLERS),
    "losses": lambda: dict(LOSS_CHOICES),
    "start_rules": lambda: dict(START_RULES),
    "algorithms": lambda: {name: cls.description for name, cls in ALGORITHMS.items()},
    "optimizers": lambda: {name: o.description for name, o in OPTIMIZERS.items()},
}
"""Each registry's entries as ``name -> description``, in registry order (read when called)."""


def entries(registry: str) -> list[tuple[str, str]]:
    """``(name, description)`` of every entry of ``registry`` (a key of :data:`REGISTRIES`);
    ``ValueError`` naming an entry without a description."""
    items = list(REGISTRIES[registry]().items())
    bare = [name for name, description in items if not description]
    if bare:
        raise ValueError(f"{registry}: no description for {', '.join(bare)} (write one in its registry entry)")
    return items


def names(registry: str) -> list[str]:
    """The entry names of ``registry``, in registry order."""
    return list(REGISTRIES[registry]())


def choices_text(registry: str, separator: str = "; ") -> str:
    """``"name: description; name: description"`` for a tooltip or CLI help."""
    return separator.join(f"{name}: {description}" for name, description in entries(registry))


def choice_text(registry: str, name: str) -> str:
    """One entry as ``"name (description)"``."""
    return f"{name} ({dict(entries(registry))[name]})"


def default_sampler() -> str:
    """The sampler every sampler choice defaults to: the one the Diff2Flow objective recommends."""
    return OBJECTIVES["diff2flow"].sampler


def evaluations_text() -> str:
    """``"euler 1, heun 2"``: the model evaluations each sampler spends per step."""
    return ", ".join(f"{name} {s.evaluations_per_step}" for name, s in SAMPLERS.items())


def recommended_sampling_text(objective: str) -> str:
    """``"2 steps, cfg 1"``: how a LoRA trained with ``objective`` samples by default."""
    record = OBJECTIVES[objective]
    return f"{record.steps} steps, cfg {record.cfg:g}"


def markdown_list(registry: str) -> str:
    """A help-page bullet list: one ``- `name`: description`` line per entry."""
    items = entries(registry)
    if registry == "optimizers":
        items = [(name, _optimizer_text(name)) for name, _ in items]
    return "\n".join(f"- `{name}`: {text}" for name, text in items)


def objective_table() -> str:
    """A help-page table: how a model trained with each objective is sampled, and its recommended
    sampler, steps and cfg (what its LoRA's metadata records)."""
    rows = [
        "| objective | the trained model samples as | previews and reports sample with | sampler | steps | cfg | "
        "depth model steps |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, o in OBJECTIVES.items():
        if o.flow_model not in FLOW_MODEL_TEXT:
            raise ValueError(f"objective {name}: flow_model {o.flow_model!r} has no text in {__name__}.FLOW_MODEL_TEXT")
        rows.append(
            f"| `{name}` | {FLOW_MODEL_TEXT[o.flow_model]} | {o.sampling_label} | `{o.sampler}` | {o.steps} | "
            f"{o.cfg:g} | {o.recommended_steps('depth')} |"
        )
    return "\n".join(rows)


BLOCKS: dict[str, Callable[[], str]] = {
    **{registry: (lambda registry=registry: markdown_list(registry)) for registry in REGISTRIES},
    "objective_sampling": objective_table,
    # the depth steps of the diff2flow objective: a depth model's (and a Marigold conversion's) recommendation
    "default_depth_steps": lambda: str(DEFAULT_DEPTH_STEPS),
}
"""The generated blocks a help page may hold, by name. A block of one line is written inline
(``<!-- generated: NAME -->text<!-- end generated -->``, e.g. in a table cell), others on lines of
their own."""

# which blocks each help page must hold: those of the registries its node's inputs choose from
PAGE_BLOCKS: dict[str, tuple[str, ...]] = {
    "D2F_FMEulerSampler": ("samplers",),
    "D2F_FMScheduler": ("start_rules",),
    "D2F_KSampler": ("samplers", "start_rules", "objective_sampling"),
    "D2F_ReflowPairs": ("samplers", "grids"),
    "D2F_TrainLoRA": (
        "objectives",
        "optimizers",
        "algorithms",
        "timestep_samplers",
        "losses",
        "objective_sampling",
    ),
    "D2F_CheckpointLoader": ("objective_sampling",),
    "D2F_DepthModelLoader": ("objective_sampling",),
    "D2F_DepthEstimate": ("default_depth_steps",),
    "D2F_MarigoldLoader": ("default_depth_steps",),
}

_BLOCK = re.compile(r"<!-- generated: ([a-z_]+) -->(.*?)<!-- end generated -->", re.S)


def render_blocks(text: str) -> str:
    """``text`` with every generated block rendered afresh (``ValueError`` for an unknown block name)."""

    def render(match: re.Match) -> str:
        name = match.group(1)
        if name not in BLOCKS:
            raise ValueError(f"unknown generated block {name!r}: one of {', '.join(BLOCKS)}")
        body = BLOCKS[name]()
        if "\n" not in body:
            return f"<!-- generated: {name} -->{body}<!-- end generated -->"
        return f"<!-- generated: {name} -->\n{body}\n<!-- end generated -->"

    if text.count("<!-- generated:") != len(_BLOCK.findall(text)):
        raise ValueError("a '<!-- generated: NAME -->' marker without its '<!-- end generated -->'")
    return _BLOCK.sub(render, text)


def block_names(text: str) -> list[str]:
    """The names of the generated blocks in ``text``, in order."""
    return [m.group(1) for m in _BLOCK.finditer(text)]


def pages(docs: pathlib.Path = DOCS) -> list[pathlib.Path]:
    """Every help page under ``docs``."""
    return sorted(docs.glob("*/*.md"))


def stale_pages(docs: pathlib.Path = DOCS) -> list[pathlib.Path]:
    """The help pages whose generated blocks differ from the registries."""
    return [p for p in pages(docs) if render_blocks(p.read_text(encoding="utf-8")) != p.read_text(encoding="utf-8")]


def write_pages(docs: pathlib.Path = DOCS) -> list[pathlib.Path]:
    """Rewrite the stale help pages; returns them."""
    stale = stale_pages(docs)
    for page in stale:
        page.write_text(render_blocks(page.read_text(encoding="utf-8")), encoding="utf-8")
    return stale


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.registry_text", description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--write", action="store_true", help="rewrite the generated blocks of the help pages")
    mode.add_argument("--check", action="store_true", help="exit 1 if a help page's generated block is stale")
    parser.add_argument("--docs", type=pathlib.Path, default=DOCS, help="the help pages' folder (default web/docs)")
    args = parser.parse_args(argv)
    if args.write:
        for page in write_pages(args.docs):
            print(f"rewrote {page}")
        return 0
    stale = stale_pages(args.docs)
    for page in stale:
        print(f"stale: {page} (run {WRITE_COMMAND})", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
