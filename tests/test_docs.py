"""The README and docs/ stay small and true: the README's length, every relative link and image,
no pointer to an issue tracker the reader cannot see, every documented ``python -m training``
command line accepted by the real parser, and the generated option reference in docs/CLI.md up to
date. Needs no ComfyUI."""

from __future__ import annotations

import contextlib
import io
import pathlib
import re
import shlex
import unicodedata
import urllib.parse

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MAX_README_LINES = 300


def documents() -> list[pathlib.Path]:
    return [README, *sorted((ROOT / "docs").glob("*.md"))]


def doc_id(path: pathlib.Path) -> str:
    return path.relative_to(ROOT).as_posix()


# ---------------------------------------------------------------------- Markdown reading
FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})(.*)$")


def split_fences(text: str) -> tuple[list[tuple[int, str]], list[tuple[str, list[tuple[int, str]]]]]:
    """(prose lines, fenced blocks) of a Markdown text: lines as (1-based number, text); a block as
    (its info string, its lines)."""
    prose: list[tuple[int, str]] = []
    blocks: list[tuple[str, list[tuple[int, str]]]] = []
    fence = None
    for number, line in enumerate(text.splitlines(), 1):
        m = FENCE.match(line)
        if fence is None:
            if m:
                fence = m.group(1)
                blocks.append((m.group(2).strip(), []))
            else:
                prose.append((number, line))
        elif m and m.group(1)[0] == fence[0] and len(m.group(1)) >= len(fence) and not m.group(2).strip():
            fence = None
        else:
            blocks[-1][1].append((number, line))
    return prose, blocks


INLINE_CODE = re.compile(r"(`+)(.+?)\1")


def without_code(line: str) -> str:
    return INLINE_CODE.sub(" ", line)


LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HTML_LINK = re.compile(r"<(?:img|a|source)\b[^>]*?\b(?:src|href)\s*=\s*[\"']([^\"']+)[\"']", re.IGNORECASE)


def links(path: pathlib.Path) -> list[tuple[int, str]]:
    """(line, target) of every inline Markdown link or image and HTML src / href outside code."""
    prose, _ = split_fences(path.read_text(encoding="utf-8"))
    found = []
    for number, line in prose:
        line = without_code(line)
        found += [(number, m.group(1)) for m in LINK.finditer(line)]
        found += [(number, m.group(1)) for m in HTML_LINK.finditer(line)]
    return found


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: Markdown and HTML dropped, lower case, punctuation removed,
    spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # links -> their text
    text = re.sub(r"<[^>]+>", "", text).replace("`", "").strip().lower()
    text = "".join(c for c in text if c in " -_" or unicodedata.category(c)[0] in "LN")
    return text.replace(" ", "-")


def anchors(path: pathlib.Path) -> set[str]:
    """The anchors of a Markdown file's headings (repeated headings get -1, -2, ... as on GitHub)."""
    prose, _ = split_fences(path.read_text(encoding="utf-8"))
    seen: dict[str, int] = {}
    result = set()
    for _, line in prose:
        m = re.match(r"^ {0,3}#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        base = slug(m.group(1))
        n = seen.get(base, 0)
        seen[base] = n + 1
        result.add(base if n == 0 else f"{base}-{n}")
    return result


def link_problem(source: pathlib.Path, target: str) -> str | None:
    """Why a link target of ``source`` is broken (None when it is fine or not a local file)."""
    parsed = urllib.parse.urlsplit(target)
    if parsed.scheme or target.startswith("//"):
        return None  # http(s), mailto, ...: not checked here
    file_part = urllib.parse.unquote(parsed.path)
    resolved = (source.parent / file_part).resolve() if file_part else source
    if not resolved.exists():
        return f"{target}: {resolved.relative_to(ROOT) if resolved.is_relative_to(ROOT) else resolved} does not exist"
    if not resolved.is_relative_to(ROOT):
        return f"{target}: points outside the repository"
    if parsed.fragment and resolved.suffix == ".md" and parsed.fragment.lower() not in anchors(resolved):
        return f"{target}: {doc_id(resolved)} has no heading with the anchor #{parsed.fragment}"
    return None


# ---------------------------------------------------------------------- (a) the README's length
def test_readme_is_short() -> None:
    lines = README.read_text(encoding="utf-8").count("\n")
    assert lines <= MAX_README_LINES, (
        f"README.md has {lines} lines, at most {MAX_README_LINES}: it is for a newcomer; move reference material "
        "into docs/ (CLI.md, RESULTS.md, REFLOW.md, DEPTH.md, DEMO.md) and link it"
    )


# ---------------------------------------------------------------------- (b) links and images
@pytest.mark.parametrize("path", documents(), ids=doc_id)
def test_relative_links_and_images_exist(path: pathlib.Path) -> None:
    found = links(path)
    problems = [
        f"{doc_id(path)}:{number}: {problem}"
        for number, target in found
        if (problem := link_problem(path, target)) is not None
    ]
    assert not problems, "broken links:\n" + "\n".join(problems)


def test_readme_links_the_docs_and_a_workflow_thumbnail() -> None:
    targets = {target for _, target in links(README)}
    for doc in (
        "docs/CLI.md",
        "docs/RESULTS.md",
        "docs/REFLOW.md",
        "docs/DEPTH.md",
        "docs/MATH.md",
        "docs/ARCHITECTURE.md",
    ):
        assert doc in targets, f"README.md does not link {doc}"
    assert any(t.startswith("example_workflows/") and t.endswith(".jpg") for t in targets), (
        "README.md shows no workflow thumbnail (example_workflows/*.jpg)"
    )


# ---------------------------------------------------------------------- (c) no issue-tracker pointers
URL = re.compile(r"\b[a-z][a-z0-9+.-]*://\S+|\]\([^)]*\)", re.IGNORECASE)
HASH_NUMBER = re.compile(r"(?<![\w&#/])#\d+\b")
TRACKER_WORD = re.compile(
    r"\b(?:issues?|tasks?|tickets?|PRs?|pull requests?)\s*(?:no\.?\s*|number\s*)?#?\d+\b", re.IGNORECASE
)


def tracker_pointers(text: str) -> list[tuple[int, str]]:
    """(line, text) of every "#12" outside code and URLs, and every "issue 12" / "task 7" / "PR 3"
    anywhere but in URLs."""
    prose, blocks = split_fences(text)
    found = []
    for number, line in prose:
        plain = URL.sub(" ", line)
        words = [m.group(0) for m in TRACKER_WORD.finditer(plain)]
        found += [(number, w) for w in words]
        found += [
            (number, m.group(0))
            for m in HASH_NUMBER.finditer(without_code(plain))
            if not any(w.endswith(m.group(0)) for w in words)
        ]  # "PR #4" once, not again as "#4"
    for _, lines in blocks:
        for number, line in lines:
            found += [(number, m.group(0)) for m in TRACKER_WORD.finditer(URL.sub(" ", line))]
    return sorted(found)


@pytest.mark.parametrize("path", documents(), ids=doc_id)
def test_no_issue_tracker_numbers(path: pathlib.Path) -> None:
    found = tracker_pointers(path.read_text(encoding="utf-8"))
    assert not found, (
        f"{doc_id(path)} points at issue-tracker numbers the reader cannot see; say what is meant "
        "instead:\n" + "\n".join(f"  line {n}: {s!r}" for n, s in found)
    )


def test_tracker_pointer_patterns() -> None:
    """The patterns catch what they should and leave colours, anchors, URLs and code alone."""
    assert sorted(s for _, s in tracker_pointers("Targets of issue 11:\nsee #23.\nas in task 7\nPR #4")) == sorted(
        ["issue 11", "#23", "task 7", "PR #4"]
    )
    clean = (
        "docs/MATH.md section 10; colour `#232`; [x](RESULTS.md#faults)\n"
        "https://github.com/o/r/issues/12\n```bash\necho '#12'\n```\n"
    )
    assert tracker_pointers(clean) == []


# ---------------------------------------------------------------------- (d) documented commands parse
SHELL_FENCES = {"", "bash", "sh", "shell", "console", "zsh"}
SEPARATORS = {"&&", "||", "|", ";", ">", ">>", "<", "2>", "&"}


def command_lines(path: pathlib.Path) -> list[tuple[int, str]]:
    """(first line, command) of every line in a shell fence, backslash continuations joined."""
    _, blocks = split_fences(path.read_text(encoding="utf-8"))
    commands = []
    for info, lines in blocks:
        language = info.split()[0].lower() if info.split() else ""
        if language not in SHELL_FENCES:
            continue
        pending, start = "", 0
        for number, line in lines:
            text = line.strip()
            text = text.removeprefix("$ ")
            if not pending:
                start = number
            if text.endswith("\\"):
                pending += text[:-1] + " "
                continue
            commands.append((start, pending + text))
            pending = ""
        if pending:
            commands.append((start, pending))
    return commands


def training_argv(command: str) -> list[str] | None:
    """The arguments after the program of a ``python -m training`` / ``diff2flow-train`` /
    ``torchrun ... -m training`` command line; None for any other line."""
    try:
        words = shlex.split(command, comments=True)
    except ValueError:
        return None
    while words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", words[0]):
        words = words[1:]  # VAR=value prefixes
    for i, word in enumerate(words):
        if word in SEPARATORS:
            words = words[:i]
            break
    if not words:
        return None
    if words[0] == "diff2flow-train":
        return words[1:]
    if re.fullmatch(r"python(3(\.\d+)?)?", words[0]) and words[1:3] == ["-m", "training"]:
        return words[3:]
    if words[0] == "torchrun":
        for i in range(1, len(words) - 1):
            if words[i : i + 2] == ["-m", "training"]:
                return words[i + 2 :]
    return None


def documented_commands() -> list[tuple[str, list[str]]]:
    """(file:line, argv) of every training command line in README.md and docs/*.md."""
    found = []
    for path in documents():
        for number, command in command_lines(path):
            argv = training_argv(command)
            if argv is not None:
                found.append((f"{doc_id(path)}:{number}", argv))
    return found


def parse_error(argv: list[str]) -> str | None:
    """argparse's complaint about ``argv`` (None when it parses; ``--help`` counts as parsing)."""
    from d2f_app.cli import build_parser

    err, out = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            build_parser().parse_args(argv)
    except SystemExit as exc:
        if exc.code not in (0, None):
            return err.getvalue().strip().splitlines()[-1] if err.getvalue().strip() else f"exit {exc.code}"
    return None


def test_the_docs_document_training_commands() -> None:
    where = {w.split(":")[0] for w, _ in documented_commands()}
    assert {"README.md", "docs/CLI.md", "docs/REFLOW.md", "docs/DEPTH.md"} <= where, where


@pytest.mark.parametrize("where, argv", [pytest.param(w, a, id=w) for w, a in documented_commands()])
def test_documented_command_parses(where: str, argv: list[str]) -> None:
    error = parse_error(argv)
    assert error is None, f"{where}: `python -m training {shlex.join(argv)}` is refused by the parser: {error}"


def test_command_extraction() -> None:
    """Continuations, env prefixes, comments, torchrun and the console script are understood; a bad
    flag is reported."""
    assert training_argv("COMFYUI_PATH=/x python -m training sample --checkpoint A --output B  # note") == [
        "sample",
        "--checkpoint",
        "A",
        "--output",
        "B",
    ]
    assert training_argv("torchrun --nproc_per_node 4 -m training pairs --config P") == ["pairs", "--config", "P"]
    assert training_argv("diff2flow-train --help") == ["--help"]
    assert training_argv("pip install -e . && python -m demo") is None
    assert parse_error(["train", "--cache", "C", "--no-such-flag"]) is not None
    assert parse_error(["--help"]) is None


# ---------------------------------------------------------------------- the generated option reference
def test_cli_option_reference_writes_only_into_a_marked_file(tmp_path: pathlib.Path) -> None:
    """--write fills the marked block of an existing file, and refuses a missing file or one without the markers
    with a message naming the file and the markers, not a traceback."""
    from d2f_app import reference

    missing = tmp_path / "missing.md"
    with pytest.raises(SystemExit, match=f"{re.escape(str(missing))} is not a file") as stopped:
        reference.main(["--write", str(missing)])
    assert reference.BEGIN in str(stopped.value) and not missing.exists()
    unmarked = tmp_path / "unmarked.md"
    unmarked.write_text("# Notes\n", encoding="utf-8")
    with pytest.raises(SystemExit, match="has no option reference block"):
        reference.write(unmarked)
    assert unmarked.read_text(encoding="utf-8") == "# Notes\n"
    marked = tmp_path / "marked.md"
    marked.write_text(f"# CLI\n\n{reference.BEGIN}\n{reference.END}\n\nafter\n", encoding="utf-8")
    assert reference.write(marked) is True and reference.write(marked) is False
    text = marked.read_text(encoding="utf-8")
    assert reference.current_block(text) == reference.block() and text.endswith("\n\nafter\n")


def test_cli_option_reference_is_current() -> None:
    from d2f_app import reference

    text = (ROOT / "docs" / "CLI.md").read_text(encoding="utf-8")
    current = reference.current_block(text)
    assert current is not None, f"docs/CLI.md lost its option reference markers ({reference.BEGIN} ... {reference.END})"
    assert current == reference.block(), (
        f"docs/CLI.md's option reference is stale (the CLI's options or help changed): run `{reference.REGENERATE}`"
    )
