"""Packaging rules that hold without ComfyUI: guarded registration, registry metadata, and a
requirements.txt that never replaces the user's torch."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import tomllib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_root_package_imports_without_comfyui_and_registers_nothing() -> None:
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('d2f_pack', {str(ROOT / '__init__.py')!r}, "
        f"submodule_search_locations=[{str(ROOT)!r}])\n"
        "mod = importlib.util.module_from_spec(spec); sys.modules['d2f_pack'] = mod; spec.loader.exec_module(mod)\n"
        "assert mod.NODE_CLASS_MAPPINGS == {}, mod.NODE_CLASS_MAPPINGS\n"
        "assert mod.WEB_DIRECTORY == './web'\n"
        "assert not [m for m in sys.modules if m.split('.')[0] in ('comfy', 'comfy_api', 'folder_paths')]\n"
        "import d2f_core; print(d2f_core.__version__)\n"
    )
    env = {"PATH": "", "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd="/")
    assert result.returncode == 0, result.stderr


def test_pyproject_has_registry_table_and_dependencies() -> None:
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    project = meta["project"]
    assert "comfyui" not in project["name"].lower()
    deps = " ".join(project["dependencies"])
    for name in ("torch", "numpy", "safetensors"):
        assert name in deps
    assert "test" in project["optional-dependencies"]
    comfy = meta["tool"]["comfy"]
    assert {"PublisherId", "DisplayName", "Icon", "requires-comfyui"} <= set(comfy)
    assert "Repository" in project["urls"]


def test_requirements_txt_does_not_touch_comfyui_provided_packages() -> None:
    lines = [line.split("#")[0].strip() for line in (ROOT / "requirements.txt").read_text().splitlines()]
    names = {line.split(">")[0].split("=")[0].split("<")[0].strip().lower() for line in lines if line}
    assert names.isdisjoint({"torch", "torchvision", "torchaudio", "numpy", "safetensors", "einops", "transformers"})


def test_every_declared_dependency_is_imported() -> None:
    """A dependency no module imports is dead weight in every install: use it or drop it."""
    import re

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    import_names = {"pillow": "PIL"}
    sources = "\n".join(
        p.read_text(encoding="utf-8")
        for layer in ("d2f_core", "training", "d2f_host", "d2f_app", "nodes", "demo")
        for p in (ROOT / layer).rglob("*.py")
    )
    unused = []
    for dep in project["dependencies"]:
        name = re.split(r"[<>=~!; ]", dep, maxsplit=1)[0].lower()
        module = import_names.get(name, name)
        if not re.search(rf"^\s*(import|from)\s+{re.escape(module)}\b", sources, flags=re.M):
            unused.append(name)
    assert unused == []


def test_every_layer_but_the_nodes_is_installed() -> None:
    """``pip install`` ships each top-level package (the console script runs d2f_app.cli); nodes/ stays
    out: a top-level "nodes" would shadow ComfyUI's own nodes.py."""
    include = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = {p.parent.name for p in ROOT.glob("*/__init__.py")} - {"nodes"}
    assert {name + "*" for name in packages} == set(include)


def test_ci_lints_with_the_ruff_of_the_lint_extra() -> None:
    """.ci/run installs ruff by itself (the extra would pull torch): the same pin as pyproject's lint extra."""
    (pin,) = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["lint"]
    ci = (ROOT / ".ci" / "run").read_text()
    assert f'pip install "{pin}"' in ci and "ruff check ." in ci
    assert ci.index("ruff check .") < ci.index("python -m pytest")
