"""Test tiers: the markers ``comfy``, ``browser`` and ``multiprocess`` (registered in pyproject.toml)
are applied here, automatically, from what a test uses; ``slow`` is set by hand from measured durations.

    python -m pytest                                   everything (what CI runs; nothing is deselected)
    python -m pytest -m "not slow and not browser"     the fast tier (under 3 minutes on 2 CPU cores)
    python -m pytest -m "not comfy"                    without ComfyUI

- comfy: the test needs ComfyUI. It uses the harness fixture ``comfy_nodes`` (tests/conftest.py: every
  ComfyUI fixture, ``pack``, ``loras_dir``, ``tiny_model``, ``tiny_sd15_file``, ..., depends on it, and
  ``item.fixturenames`` is the whole closure), or its module imports ComfyUI at module level through
  tests/comfy_harness.py (directly or through a helper module of its folder that does), or it or one
  of its fixtures starts ComfyUI's server (``comfy_server.ComfyServer``).
- browser: the test or one of its fixtures launches headless Chromium through Playwright
  (``comfy_server.launch_chromium`` or ``sync_playwright``), or its module imports that launcher at
  module level (tests/test_browser.py skips whole without Playwright and Chromium).
- multiprocess: the test or one of its fixtures launches torchrun: the shared launchers
  (``TORCHRUN`` of training/tests/torchrun.py, ``comfy_harness.run_cli_in_one_and_two_processes``)
  or ``torch.distributed.run`` itself.

"Uses" is read from the code of the test function, of the fixtures it requests (their closure) and of
the module-level functions of the same module that these call, so a new test that uses a launcher or
a fixture is marked without being listed anywhere. At the repository root so that one hook sees every
test folder; it imports nothing heavy, so ``pytest d2f_core`` works on its own.

``slow`` on a whole test or module is a ``@pytest.mark.slow`` / ``pytestmark`` line in its file; the
heavier variants of a parametrized test, whose lightest variant stays in the fast tier, are listed in
SLOW_VARIANTS below (tests/test_tiers.py checks that each still exists).
"""

from __future__ import annotations

import ast
import functools
import inspect
import pathlib
import types
from collections.abc import Iterable
from typing import Any

import pytest

# fixtures whose use means ComfyUI is needed (the closure in item.fixturenames brings in their dependents)
COMFY_FIXTURES = frozenset({"comfy_nodes"})
# names that, referenced in a test's (or its fixtures') code, mean the tier
COMFY_NAMES = frozenset({"ComfyServer"})
BROWSER_NAMES = frozenset({"sync_playwright", "async_playwright", "launch_chromium"})
MULTIPROCESS_NAMES = frozenset({"TORCHRUN", "run_cli_in_one_and_two_processes", "torch.distributed.run"})
# the module that imports ComfyUI for the tests (tests/comfy_harness.py)
COMFY_HARNESS = "comfy_harness"

# test (node id without parameters) -> {parameter id: seconds measured on the 2-core machine} of the
# variants marked slow; the variants not listed stay in the fast tier
SLOW_VARIANTS: dict[str, dict[str, float]] = {
    "tests/test_benchmarks.py::test_benchmark_quick_mode_runs": {  # exactness.py (1.5 s) stays
        "train_speed.py": 45.2,
        "gpu_suite.py": 183.5,  # on busy cores
        "memory.py": 100.5,  # on busy cores
        "paper_comparison.py": 31.4,
        "cli_overhead.py": 15.7,
        "depth.py": 13.5,
        "ema.py": 12.0,
        "reflow.py": 11.4,
        "patch_overhead.py": 5.7,
        "start_rule.py": 2.3,
    },  # its table is checked in the fast d2f_core/tests/test_top_of_schedule.py
    "tests/test_comfy_training.py::test_each_objective_trains_with_finite_decreasing_loss": {  # eps-diff2flow stays
        "eps-naive_fm": 5.1,
        "eps-diffusion": 5.8,
        "v-diff2flow": 5.9,
        "v-naive_fm": 5.9,
        "v-diffusion": 5.9,
    },
    "tests/test_comfy_families.py::test_training_node_on_mixed_sizes_gives_a_lora_the_stock_loader_loads_whole": {
        "sdxl_v": 2.2,
        "sdxl_v_ztsnr": 2.0,
        "sd2_768_v": 3.3,
        "sd2_v_zsnr_option": 3.6,
    },  # sdxl_eps stays
    "tests/test_comfy_families.py::test_stock_samplers_run_on_the_patched_model_with_sdxl_y": {
        "sdxl_v": 1.0,
        "sdxl_v_ztsnr": 1.0,
        "sd2_768_v": 1.1,
        "sd2_v_zsnr_option": 1.1,
    },  # sdxl_eps stays
    "tests/test_comfy_families.py::test_patched_denoised_equals_unpatched": {
        "sdxl_v": 0.6,
        "sdxl_v_ztsnr": 0.6,
        "sd2_768_v": 0.7,
        "sd2_v_zsnr_option": 0.7,
    },  # sdxl_eps stays
    "tests/test_comfy_adapters.py::test_saved_file_loads_completely_in_stock_loaders_and_gives_the_trained_outputs": {
        "LoHa": 0.8,
        "LoKr": 0.7,
        "OFT": 1.1,
        "DoRA": 1.3,
        "Full": 0.7,
    },  # LoRA stays
    "tests/test_comfy_reflow.py::test_reflow_chain_from_pairs_to_few_step_sampling": {"sdxl": 2.0},  # sd15 stays
    "tests/test_comfy_depth_training.py::test_node_trains_a_depth_model_whose_file_loads_back_with_the_trained_outputs": {
        "LoHa-diffusion": 1.4,
        "Full-naive_fm": 1.0,
    },  # LoRA-diff2flow stays
    "d2f_app/tests/test_cli.py::test_help_of_every_subcommand_shows_every_flag_help": {
        "prepare": 1.9,
        "train": 1.9,
        "pairs": 1.7,
        "sample": 1.9,
        "depth": 2.0,
    },  # the top-level help stays
}


def _function(obj: Any) -> Any:
    """The plain function behind a fixture definition, a bound method or a decorated function."""
    getter = getattr(obj, "_get_wrapped_function", None)  # pytest >= 8.4 wraps fixture functions
    if getter is not None:
        obj = getter()
    obj = getattr(obj, "__func__", obj)
    try:
        return inspect.unwrap(obj)
    except ValueError:
        return obj


def _code_names(code: types.CodeType) -> set[str]:
    """Global / attribute names and string constants used by ``code`` and the code nested in it."""
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, str):
            names.add(const)
        elif isinstance(const, types.CodeType):
            names |= _code_names(const)
    return names


def _names_used(functions: Iterable[Any]) -> set[str]:
    """The names used by ``functions`` and, transitively, by the functions of their own modules they call."""
    names: set[str] = set()
    seen: set[int] = set()
    todo = [_function(f) for f in functions]
    while todo:
        func = todo.pop()
        code = getattr(func, "__code__", None)
        if code is None or id(code) in seen:
            continue
        seen.add(id(code))
        used = _code_names(code)
        names |= used
        module_globals = getattr(func, "__globals__", {})
        for name in used:
            helper = module_globals.get(name)
            if inspect.isfunction(helper) and helper.__module__ == func.__module__:
                todo.append(helper)
    return names


def _fixture_functions(item: pytest.Item) -> list[Any]:
    info = getattr(item, "_fixtureinfo", None)
    defs = getattr(info, "name2fixturedefs", {}) or {}
    return [fd.func for name in getattr(item, "fixturenames", ()) for fd in defs.get(name, ())]


@functools.cache
def module_imports(path: pathlib.Path) -> tuple[frozenset, frozenset]:
    """The top-level modules and the names that the module at ``path`` imports at module level (in if /
    try / with blocks too; never in function bodies)."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    except (OSError, SyntaxError, ValueError):
        return frozenset(), frozenset()
    modules: set[str] = set()
    names: set[str] = set()
    stack: list[ast.AST] = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
            continue
        if isinstance(node, ast.Import):
            modules |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules.add(node.module.split(".")[0])
            names |= {alias.name for alias in node.names}
        else:
            stack.extend(ast.iter_child_nodes(node))
    return frozenset(modules), frozenset(names)


def imports_comfy_harness(path: pathlib.Path, visiting: frozenset = frozenset()) -> bool:
    """Does the module at ``path`` import tests/comfy_harness.py at module level (which imports ComfyUI),
    directly or through another module of its folder that does?"""
    if path in visiting or not path.is_file():
        return False
    modules, _ = module_imports(path)
    return COMFY_HARNESS in modules or any(
        imports_comfy_harness(path.parent / f"{name}.py", visiting | {path}) for name in modules
    )


def tiers(item: pytest.Item) -> set[str]:
    """The automatic markers of ``item`` (a subset of comfy, browser, multiprocess)."""
    found: set[str] = set()
    function = getattr(item, "function", None)
    names = _names_used([function, *_fixture_functions(item)] if function is not None else _fixture_functions(item))
    fixturenames = set(getattr(item, "fixturenames", ()))
    path = getattr(item, "path", None)
    module_path = pathlib.Path(path) if path is not None and str(path).endswith(".py") else None
    if (
        fixturenames & COMFY_FIXTURES
        or names & COMFY_NAMES
        or (module_path is not None and imports_comfy_harness(module_path))
    ):
        found.add("comfy")
    if names & BROWSER_NAMES or (module_path is not None and module_imports(module_path)[1] & BROWSER_NAMES):
        found.add("browser")
    if names & MULTIPROCESS_NAMES:
        found.add("multiprocess")
    return found


def slow_variant(item: pytest.Item) -> bool:
    """Is ``item`` one of the SLOW_VARIANTS?"""
    callspec = getattr(item, "callspec", None)
    return callspec is not None and callspec.id in SLOW_VARIANTS.get(item.nodeid.split("[", 1)[0], ())


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        for name in sorted(tiers(item)):
            if item.get_closest_marker(name) is None:
                item.add_marker(name)
        if slow_variant(item) and item.get_closest_marker("slow") is None:
            item.add_marker("slow")
