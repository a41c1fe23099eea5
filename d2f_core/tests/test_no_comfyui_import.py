"""d2f_core is pure PyTorch: no module in it may import ComfyUI."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import d2f_core

COMFY_MODULES = {
    "comfy",
    "comfy_api",
    "comfy_extras",
    "comfy_execution",
    "nodes",
    "folder_paths",
    "server",
    "execution",
    "latent_preview",
}
PACKAGE = pathlib.Path(d2f_core.__file__).parent


def imported_top_levels(path: pathlib.Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_no_module_imports_comfyui() -> None:
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 5
    offenders = {str(f.relative_to(PACKAGE)): sorted(imported_top_levels(f) & COMFY_MODULES) for f in files}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_import_in_fresh_interpreter_loads_no_comfyui() -> None:
    code = (
        "import sys, d2f_core, d2f_core.objectives, d2f_core.sampling, d2f_core.gaussian_mixture;"
        f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {sorted(COMFY_MODULES)!r});"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=PACKAGE.parent)
    assert result.returncode == 0, result.stdout + result.stderr
