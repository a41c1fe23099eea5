"""The test tiers: the markers comfy, browser, multiprocess and slow are registered (pyproject.toml),
the first three are applied automatically by the root conftest.py from what a test uses (fixtures,
launchers, a module-level import of tests/comfy_harness.py), and a plain ``pytest`` deselects nothing.

Needs no ComfyUI: the hook is checked on a small stand-in project in a temporary folder, and on real
test files of this repository collected without ComfyUI. The check that conftest.SLOW_VARIANTS still
names existing variants (slow itself: it collects ComfyUI modules) covers the ComfyUI modules only where
ComfyUI is found. Each check collects in a subprocess (``--collect-only``: nothing runs)."""

from __future__ import annotations

import importlib.util
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import textwrap

import pytest

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = pathlib.Path(__file__).resolve().parents[1]
TIERS = ("comfy", "browser", "multiprocess", "slow")


def ini_options() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]


REPORTER = """
import os

TIERS = {"comfy", "browser", "multiprocess", "slow"}


def pytest_collection_finish(session):
    with open(os.environ["TIERS_REPORT"], "w") as out:
        for item in session.items:
            out.write(item.nodeid + " " + ",".join(sorted({m.name for m in item.iter_markers()} & TIERS)) + "\\n")
"""


def collect(*args: str, cwd: pathlib.Path = ROOT, comfyui: bool = False) -> dict[str, set[str]]:
    """``pytest --collect-only ARGS`` in a subprocess (an unregistered marker is an error): the node id
    of each selected test -> its tier markers. Without ``comfyui``, COMFYUI_PATH is unset."""
    with tempfile.TemporaryDirectory() as folder:
        (pathlib.Path(folder) / "tiers_reporter.py").write_text(REPORTER)
        report = pathlib.Path(folder) / "report.txt"
        env = {k: v for k, v in os.environ.items() if comfyui or k != "COMFYUI_PATH"}
        env.update(TIERS_REPORT=str(report), PYTHONPATH=os.pathsep.join(filter(None, [folder, env.get("PYTHONPATH")])))
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "pytest",
                "--collect-only",
                "-q",
                "-p",
                "no:cacheprovider",
                "-p",
                "tiers_reporter",
                "-W",
                "error::pytest.PytestUnknownMarkWarning",
                *args,
            ],
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode in (0, 5), result.stdout[-3000:] + result.stderr[-3000:]  # 5: nothing selected
        lines = report.read_text().splitlines() if report.is_file() else []
    return {name: set(filter(None, tiers.split(","))) for name, _, tiers in (line.rpartition(" ") for line in lines)}


def by_name(found: dict[str, set[str]]) -> dict[str, set[str]]:
    return {nodeid.rpartition("::")[2]: tiers for nodeid, tiers in found.items()}


def test_the_tier_markers_are_registered_with_a_description() -> None:
    registered = dict(m.split(":", 1) for m in ini_options()["markers"])
    for tier in TIERS:
        assert registered.get(tier, "").strip(), f"marker {tier!r} is not registered in [tool.pytest.ini_options]"


def test_a_plain_run_deselects_nothing() -> None:
    """CI runs plain ``python -m pytest``: every tier runs there, so addopts selects no marker or keyword."""
    addopts = ini_options()["addopts"].split()
    chosen = [
        a
        for a in addopts
        if a in ("-m", "-k", "--deselect", "--ignore", "--ignore-glob")
        or a.startswith(("-m", "-k", "--deselect", "--ignore"))
    ]
    assert not chosen, f"addopts deselects tests: {chosen}"


STAND_INS = {
    # a stand-in of the ComfyUI harness: the tiers are read from the code, nothing here runs
    "tests/comfy_harness.py": """
        COMFYUI = None

        def run_cli_in_one_and_two_processes(args, folder):
            raise AssertionError("never run while collecting")
    """,
    "tests/conftest.py": """
        import pytest

        @pytest.fixture
        def comfy_nodes():
            raise AssertionError("never run while collecting")

        @pytest.fixture
        def pack(comfy_nodes):
            return comfy_nodes
    """,
    "tests/helper.py": """
        from comfy_harness import COMFYUI
    """,
    "tests/test_fixtures.py": """
        import pytest

        @pytest.fixture
        def trained(pack):
            return pack

        @pytest.fixture
        def browser():
            from playwright.sync_api import sync_playwright

            with sync_playwright() as pw:
                yield pw

        def test_uses_the_harness(pack):
            pass

        def test_uses_a_fixture_on_the_harness(trained):
            pass

        def test_uses_the_browser(browser):
            pass

        def test_pure(tmp_path):
            pass
    """,
    "tests/test_module_level.py": """
        import helper  # imports comfy_harness at module level

        def test_in_a_module_that_imports_comfyui():
            pass
    """,
    "tests/test_launchers.py": """
        import subprocess
        import sys

        TORCHRUN = ["-m", "torch.distributed.run", "--nproc_per_node", "2"]

        def launch(args):
            subprocess.run([sys.executable, *TORCHRUN, *args])

        def test_torchrun_through_a_helper_of_the_module(tmp_path):
            launch(["worker.py"])

        def test_the_cli_helper_of_the_harness(tmp_path):
            from comfy_harness import run_cli_in_one_and_two_processes

            run_cli_in_one_and_two_processes([], tmp_path)

        def test_one_process(tmp_path):
            subprocess.run([sys.executable, "-c", "pass"])
    """,
}


@pytest.fixture(scope="module")
def stand_in_project(tmp_path_factory) -> pathlib.Path:
    """A temporary project with this repository's root conftest.py and pyproject.toml and the stand-ins above."""
    project = tmp_path_factory.mktemp("tiers")
    shutil.copy(ROOT / "conftest.py", project / "conftest.py")
    shutil.copy(ROOT / "pyproject.toml", project / "pyproject.toml")
    for name, text in STAND_INS.items():
        (project / name).parent.mkdir(exist_ok=True)
        (project / name).write_text(textwrap.dedent(text))
    return project


def test_markers_follow_fixtures_launchers_and_module_imports(stand_in_project) -> None:
    assert by_name(collect("tests", cwd=stand_in_project)) == {
        "test_uses_the_harness": {"comfy"},
        "test_uses_a_fixture_on_the_harness": {"comfy"},
        "test_uses_the_browser": {"browser"},
        "test_pure": set(),
        "test_in_a_module_that_imports_comfyui": {"comfy"},
        "test_torchrun_through_a_helper_of_the_module": {"multiprocess"},
        "test_the_cli_helper_of_the_harness": {"multiprocess"},
        "test_one_process": set(),
    }


def test_marker_expressions_select_by_the_automatic_markers(stand_in_project) -> None:
    """What a developer types: -m selects on the markers the hook added."""
    assert set(by_name(collect("tests", "-m", "comfy and not browser", cwd=stand_in_project))) == {
        "test_uses_the_harness",
        "test_uses_a_fixture_on_the_harness",
        "test_in_a_module_that_imports_comfyui",
    }
    assert set(
        by_name(collect("tests", "-m", "not comfy and not browser and not multiprocess", cwd=stand_in_project))
    ) == {"test_pure", "test_one_process"}


def test_the_real_torchrun_tests_are_multiprocess_and_pure_tests_are_no_tier() -> None:
    """On this repository, collected without ComfyUI: the torchrun tests of the headless application are
    multiprocess and its single-process one is not; a module importing comfy_harness is comfy; d2f_core is neither."""
    multiprocess, progress, pure = (
        "d2f_app/tests/test_multiprocess.py",
        "tests/test_progress_history.py",
        "d2f_core/tests/test_schedules.py",
    )
    found = collect(multiprocess, progress, pure)
    runs = {nodeid.rpartition("::")[2] for nodeid, tiers in found.items() if "multiprocess" in tiers}
    assert {"test_two_processes_equal_one", "test_torchrun_processes_stop_together_on_sigterm"} <= runs
    assert (
        "multiprocess" not in found[f"{multiprocess}::test_sigterm_saves_a_state_that_resumes_exactly"]
    )  # one at a time
    in_file = {
        path: {n: t for n, t in found.items() if n.startswith(path + "::")} for path in (multiprocess, progress, pure)
    }
    assert in_file[progress] and all(tiers - {"slow"} == {"comfy"} for tiers in in_file[progress].values())
    assert in_file[pure] and all(tiers - {"slow"} == set() for tiers in in_file[pure].values())


def root_conftest():
    spec = importlib.util.spec_from_file_location("_d2f_root_conftest", ROOT / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_slow_variants_exist_and_the_unlisted_variants_stay_fast_and_comfyui_modules_are_comfy() -> None:
    """Each variant in conftest.SLOW_VARIANTS is still collected and marked slow, and its test keeps a
    variant in the fast tier; a ComfyUI test module's tests are all comfy. Where ComfyUI is not found,
    the ComfyUI modules skip at collection, so only the others are checked."""
    from d2f_host.bootstrap import find_comfyui

    comfyui = find_comfyui() is not None
    variants = root_conftest().SLOW_VARIANTS
    schemas = "tests/test_comfy_node_schemas.py"
    files = sorted({test.split("::")[0] for test in variants} | {schemas})
    found = collect(*files, comfyui=comfyui)
    collected = {nodeid.split("::")[0] for nodeid in found}
    comfyui = schemas in collected  # False too where ComfyUI is found but cannot be imported
    checked = 0
    for test, ids in variants.items():
        if test.split("::")[0] not in collected:
            assert not comfyui, f"{test}: its module collected nothing"
            continue
        params = {
            nodeid.partition("[")[2][:-1]: tiers for nodeid, tiers in found.items() if nodeid.partition("[")[0] == test
        }
        assert set(ids) <= set(params), (
            f"{test}: SLOW_VARIANTS names variants it no longer has: {sorted(set(ids) - set(params))}"
        )
        assert not [i for i in ids if "slow" not in params[i]], f"{test}: listed variants not marked slow"
        assert any("slow" not in tiers for tiers in params.values()), f"{test}: no variant left in the fast tier"
        checked += 1
    assert checked
    if comfyui:
        in_schemas = [tiers for nodeid, tiers in found.items() if nodeid.startswith(schemas + "::")]
        assert in_schemas and all("comfy" in tiers for tiers in in_schemas)
