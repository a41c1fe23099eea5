"""The layers of the pack and what each may import (docs/ARCHITECTURE.md). Needs no ComfyUI.

    d2f_core   pure PyTorch math          no other layer, never ComfyUI
    training   the engine                 d2f_core; never ComfyUI
    d2f_host   ComfyUI as a library       d2f_core, training, ComfyUI
    d2f_app    the headless application   d2f_core, training, d2f_host; ComfyUI only through d2f_host
    nodes      ComfyUI nodes              d2f_core, training, d2f_host by absolute name, and of ComfyUI
                                          only its node API (NODE_API below); never d2f_app
    demo       the embedded demo          d2f_core, training; never ComfyUI

A layer imports only layers listed before it, so no two layers import each other.
"""

from __future__ import annotations

import ast
import pathlib
import re
from collections.abc import Callable

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
COMFY = {
    "comfy",
    "comfy_api",
    "comfy_extras",
    "comfy_execution",
    "folder_paths",
    "server",
    "execution",
    "latent_preview",
    "node_helpers",
}
LAYERS = ("d2f_core", "training", "d2f_host", "d2f_app", "nodes", "demo")
# what each layer may import of the others (its own modules by relative import)
MAY_IMPORT = {
    "d2f_core": set(),
    "training": {"d2f_core"},
    "d2f_host": {"d2f_core", "training"} | COMFY,
    "d2f_app": {"d2f_core", "training", "d2f_host"},
    "nodes": {"d2f_core", "training", "d2f_host"} | COMFY,
    "demo": {"d2f_core", "training"},
}
# ComfyUI's node API, the part of ComfyUI a node may use: the V3 schema, model folders, progress,
# interruption and the sampling entry points. Model internals (loading, patching, LoRA application,
# the UNet) belong to d2f_host. ``None``: any name of the module.
NODE_API: dict[str, set[str] | None] = {
    "comfy_api.latest": None,  # io, ComfyExtension: the V3 node schema
    "folder_paths": None,  # the model folders
    "comfy.utils": {"ProgressBar", "PROGRESS_BAR_ENABLED"},
    "comfy.model_management": {"throw_exception_if_processing_interrupted"},
    "comfy.sample": {"fix_empty_latent_channels", "prepare_noise", "sample_custom"},
    "latent_preview": {"prepare_callback"},
    "comfy.cli_args": {"args"},  # the preview size of the server
    "comfy_execution.utils": {"get_executing_context"},  # which node reports progress
}


def imports_of(path: pathlib.Path) -> list[tuple[int, str, list[str]]]:
    """(relative level, module, names imported from it) of every import statement of a file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found += [(0, alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            found.append((node.level, node.module or "", [alias.name for alias in node.names]))
    return found


def top(module: str) -> str:
    return module.split(".")[0]


def modules(layer: str) -> list[pathlib.Path]:
    files = sorted((ROOT / layer).rglob("*.py"))
    assert files, f"{layer}/ has no modules"
    return [f for f in files if "tests" not in f.relative_to(ROOT).parts[1:]]


def offenders(layer: str, allowed: Callable[[int, str], bool]) -> dict[str, list[str]]:
    bad = {}
    for path in modules(layer):
        wrong = [("." * level) + module for level, module, _ in imports_of(path) if not allowed(level, module)]
        if wrong:
            bad[str(path.relative_to(ROOT))] = wrong
    return bad


LOCAL = {*LAYERS, "nodes"}


@pytest.mark.parametrize("layer", LAYERS)
def test_each_layer_imports_only_the_layers_below_it(layer: str) -> None:
    def allowed(level: int, module: str) -> bool:
        if level > 0:
            return level == 1  # its own modules; `..training` would load a layer a second time under the pack's name
        if layer != "nodes" and module == "nodes":
            return False  # ComfyUI's nodes.py: only the pack's node layer stands inside a running ComfyUI
        return top(module) not in LOCAL | COMFY or top(module) in MAY_IMPORT[layer]

    assert offenders(layer, allowed) == {}


def test_the_layers_form_no_circle() -> None:
    for i, layer in enumerate(LAYERS):
        for other in LAYERS[i + 1 :]:
            assert other not in MAY_IMPORT[layer], f"{layer} may import {other}, which is above it"


def test_nodes_use_only_the_node_api_of_comfyui() -> None:
    """Every ComfyUI module a node module imports, and every name it takes from one, is in NODE_API."""
    bad = []
    for path in modules("nodes"):
        text = path.read_text(encoding="utf-8")
        for level, module, names in imports_of(path):
            if level or top(module) not in COMFY:
                continue
            if module not in NODE_API:
                bad.append(f"{path.name}: import {module}")
                continue
            allowed = NODE_API[module]
            used = set(names) or set(re.findall(rf"\b{re.escape(module)}\.(\w+)", text))
            if allowed is not None and used - allowed:
                bad.append(f"{path.name}: {module}.{sorted(used - allowed)}")
    assert bad == [], "nodes reach ComfyUI's model internals: move that code into d2f_host"


def test_the_node_api_check_catches_an_internal() -> None:
    """The check above reads attribute uses, not only imported names."""
    text = "import comfy.model_management\ncomfy.model_management.load_models_gpu([m])\n"
    assert set(re.findall(r"\bcomfy\.model_management\.(\w+)", text)) - NODE_API["comfy.model_management"] == {
        "load_models_gpu"
    }


def test_training_runs_the_app_without_importing_it() -> None:
    """``python -m training`` hands over to the application's program; no engine module imports it."""
    main = (ROOT / "training" / "__main__.py").read_text(encoding="utf-8")
    assert 'runpy.run_module("d2f_app"' in main
    assert not any(top(m) == "d2f_app" for p in modules("training") for _, m, _ in imports_of(p))


@pytest.mark.parametrize("layer", LAYERS)
def test_the_layer_is_documented_in_the_architecture_note(layer: str) -> None:
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text(encoding="utf-8")
    assert f"`{layer}/`" in text


def test_every_module_is_named_in_the_architecture_table() -> None:
    """Each module of every layer appears in the note's module table (by its path, or by its file name
    in a row that names its folder first)."""
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text(encoding="utf-8")
    table = [line for line in text.splitlines() if line.startswith("| `")]
    named = set()
    for row in table:
        cell = row.split("|")[1]
        folder = None
        for name in re.findall(r"`([^`]+)`", cell):
            if "/" in name:
                folder, _, name = name.rpartition("/")
            if folder is not None:
                named.add(f"{folder}/{name}")
    missing = [
        str(p.relative_to(ROOT))
        for layer in LAYERS
        for p in modules(layer)
        if p.name != "__init__.py" and str(p.relative_to(ROOT)) not in named
    ]
    assert missing == [], "name these modules in docs/ARCHITECTURE.md's module table"
