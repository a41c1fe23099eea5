"""The layers of the pack and what each may import (docs/ARCHITECTURE.md). Needs no ComfyUI.

    d2f_core   pure PyTorch math          imports no other layer and never ComfyUI
    training   the engine and the CLI     imports d2f_core; never ComfyUI; d2f_host only from
                                          training/cli.py (the headless application)
    d2f_host   ComfyUI as a library       imports d2f_core, training.config and ComfyUI
    nodes      ComfyUI nodes              imports all of the above by absolute name, never the
                                          headless modules (signal handling, progress bars)
    demo       the embedded demo          imports d2f_core and training; never ComfyUI
"""
from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
COMFY = {"comfy", "comfy_api", "comfy_extras", "comfy_execution", "folder_paths", "server", "execution",
         "latent_preview", "node_helpers"}
LAYERS = ("d2f_core", "training", "d2f_host", "nodes", "demo")


def imports_of(path: pathlib.Path) -> list[tuple[int, str]]:
    """(relative level, module) of every import statement of a file, anywhere in it."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found += [(0, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            found.append((node.level, node.module or ""))
    return found


def top(module: str) -> str:
    return module.split(".")[0]


def modules(layer: str) -> list[pathlib.Path]:
    files = sorted((ROOT / layer).rglob("*.py"))
    assert files, f"{layer}/ has no modules"
    return [f for f in files if "tests" not in f.relative_to(ROOT).parts[1:]]


def offenders(layer: str, allowed: callable) -> dict[str, list[str]]:
    bad = {}
    for path in modules(layer):
        rel = str(path.relative_to(ROOT))
        wrong = [("." * level) + module for level, module in imports_of(path) if not allowed(rel, level, module)]
        if wrong:
            bad[rel] = wrong
    return bad


def test_d2f_core_imports_no_other_layer_and_no_comfyui() -> None:
    forbidden = COMFY | {"training", "d2f_host", "nodes", "demo"}
    assert offenders("d2f_core", lambda rel, level, m: level > 0 or top(m) not in forbidden) == {}


def test_training_never_imports_comfyui_and_reaches_the_host_only_from_the_cli() -> None:
    def allowed(rel: str, level: int, module: str) -> bool:
        if level > 0:
            return level == 1  # its own modules
        if top(module) in COMFY | {"nodes", "demo"}:
            return False
        return top(module) != "d2f_host" or rel == "training/cli.py"

    assert offenders("training", allowed) == {}


def test_d2f_host_imports_no_nodes_and_only_the_config_of_training() -> None:
    def allowed(rel: str, level: int, module: str) -> bool:
        if level > 0:
            return level == 1
        if top(module) == "training":
            return module == "training.config"
        return top(module) not in {"nodes", "demo"} or module == "nodes"  # never the pack's nodes/

    bad = offenders("d2f_host", allowed)
    # ``import nodes`` would be ComfyUI's nodes.py; the pack's node package is never imported by the host
    assert bad == {}
    assert not any(m == "nodes" for p in modules("d2f_host") for _, m in imports_of(p))


def test_nodes_import_the_other_layers_by_absolute_name_and_never_the_headless_modules() -> None:
    headless = {"d2f_app.cli", "d2f_app.headless", "training.distributed", "training.__main__"}

    def allowed(rel: str, level: int, module: str) -> bool:
        if level > 1:
            return False  # `..training` would load the engine a second time under the pack's name
        return module not in headless

    assert offenders("nodes", allowed) == {}


def test_demo_never_imports_comfyui() -> None:
    assert offenders("demo", lambda rel, level, m: level > 0 or top(m) not in COMFY | {"d2f_host", "nodes"}) == {}


@pytest.mark.parametrize("layer", LAYERS)
def test_the_layer_is_documented_in_the_architecture_note(layer: str) -> None:
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text(encoding="utf-8")
    assert f"`{layer}/`" in text
