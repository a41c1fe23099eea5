"""The help pages' generated blocks (training/registry_text.py) against the registries, without ComfyUI:
a stale block fails naming the command that rewrites it, and every entry of a registry a node chooses
from is named on that node's page."""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import sys

import pytest

from d2f_core import FM_GRIDS, LOSSES, OBJECTIVES, SAMPLERS, START_RULES, TIMESTEP_SAMPLERS
from training import registry_text
from training.registry_text import (
    BLOCKS,
    DOCS,
    PAGE_BLOCKS,
    REGISTRIES,
    WRITE_COMMAND,
    block_names,
    entries,
    names,
    render_blocks,
    stale_pages,
    write_pages,
)


def test_help_pages_are_rendered_from_the_current_registries() -> None:
    stale = [str(p.relative_to(DOCS)) for p in stale_pages()]
    assert not stale, f"generated blocks out of date in {stale}: run `{WRITE_COMMAND}`"


@pytest.mark.parametrize("node_id", sorted(PAGE_BLOCKS))
def test_each_page_names_every_entry_of_the_registries_its_node_chooses_from(node_id: str) -> None:
    page = DOCS / node_id / "en.md"
    text = page.read_text(encoding="utf-8")
    missing_blocks = sorted(set(PAGE_BLOCKS[node_id]) - set(block_names(text)))
    assert not missing_blocks, (
        f"{page.relative_to(DOCS)} lacks the generated blocks {missing_blocks}: add "
        f"'<!-- generated: NAME -->' / '<!-- end generated -->' lines and run `{WRITE_COMMAND}`"
    )
    wanted = {
        block: names("objectives") if block == "objective_sampling" else names(block)
        for block in PAGE_BLOCKS[node_id]
        if block in REGISTRIES or block == "objective_sampling"
    }
    unnamed = {block: [n for n in entry_names if f"`{n}`" not in text] for block, entry_names in wanted.items()}
    assert not {k: v for k, v in unnamed.items() if v}, f"{page.relative_to(DOCS)}: entries not named: {unnamed}"


def test_every_page_block_is_known_and_every_page_is_checked() -> None:
    for page in registry_text.pages():
        unknown = sorted(set(block_names(page.read_text(encoding="utf-8"))) - set(BLOCKS))
        assert not unknown, f"{page}: unknown generated blocks {unknown}"
    assert set(PAGE_BLOCKS) <= {p.parent.name for p in registry_text.pages()}


def test_every_registry_entry_has_a_description() -> None:
    for registry in REGISTRIES:
        assert all(description for _, description in entries(registry)), registry
    assert [name for name, _ in entries("start_rules")] == list(START_RULES)
    assert [name for name, _ in entries("timestep_samplers")] == list(TIMESTEP_SAMPLERS)
    assert [name for name, _ in entries("losses")] == ["recommended", *LOSSES]
    assert [name for name, _ in entries("grids")] == list(FM_GRIDS)
    assert {o.flow_model for o in OBJECTIVES.values()} <= set(registry_text.FLOW_MODEL_TEXT)


@pytest.fixture
def docs_copy(tmp_path):
    copy = tmp_path / "docs"
    shutil.copytree(DOCS, copy)
    return copy


def test_a_reworded_description_makes_its_pages_stale(docs_copy, monkeypatch, capsys) -> None:
    euler = SAMPLERS["euler"]
    monkeypatch.setitem(SAMPLERS, "euler", dataclasses.replace(euler, description="FM Euler, reworded"))
    stale = {p.parent.name for p in stale_pages(docs_copy)}
    assert {"D2F_FMEulerSampler", "D2F_KSampler", "D2F_ReflowPairs"} <= stale
    assert registry_text.main(["--check", "--docs", str(docs_copy)]) == 1
    assert WRITE_COMMAND in capsys.readouterr().err
    assert {p.parent.name for p in write_pages(docs_copy)} == stale
    assert stale_pages(docs_copy) == [] and registry_text.main(["--check", "--docs", str(docs_copy)]) == 0
    assert "FM Euler, reworded" in (docs_copy / "D2F_KSampler" / "en.md").read_text(encoding="utf-8")


def test_a_new_entry_appears_on_the_pages_and_one_without_a_description_is_refused(docs_copy, monkeypatch) -> None:
    euler = SAMPLERS["euler"]
    monkeypatch.setitem(SAMPLERS, "midpoint", dataclasses.replace(euler, name="midpoint", description="FM midpoint"))
    write_pages(docs_copy)
    assert "- `midpoint`: FM midpoint" in (docs_copy / "D2F_FMEulerSampler" / "en.md").read_text(encoding="utf-8")
    monkeypatch.setitem(SAMPLERS, "midpoint", dataclasses.replace(euler, name="midpoint", description=""))
    with pytest.raises(ValueError, match="no description for midpoint"):
        stale_pages(docs_copy)


def test_blocks_render_inline_or_on_lines_of_their_own() -> None:
    text = (
        "a <!-- generated: default_depth_steps -->?<!-- end generated --> b\n"
        "<!-- generated: samplers -->\nold\n<!-- end generated -->\n"
    )
    rendered = render_blocks(text)
    assert rendered.startswith(f"a <!-- generated: default_depth_steps -->{BLOCKS['default_depth_steps']()}<!-- end")
    assert f"<!-- generated: samplers -->\n{BLOCKS['samplers']()}\n<!-- end generated -->\n" in rendered
    assert render_blocks(rendered) == rendered
    with pytest.raises(ValueError, match="unknown generated block"):
        render_blocks("<!-- generated: nonsense -->\n<!-- end generated -->")
    with pytest.raises(ValueError, match="without its"):
        render_blocks("<!-- generated: samplers -->\n")


def test_the_generator_imports_no_comfyui() -> None:
    code = (
        "import sys, training.registry_text;"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('comfy', 'comfy_api', 'folder_paths', 'd2f_host', 'nodes', 'd2f_app'));"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=DOCS.parents[1])
    assert result.returncode == 0, result.stdout + result.stderr
