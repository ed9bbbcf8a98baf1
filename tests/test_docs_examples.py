"""Every code block of README.md and docs/*.md, run as written (on the CPU).

Python blocks of one document run in order in one namespace, as a reader pastes them into one session.
A block that cannot run here says so in the document, on the line before it:
``<!-- docs-test: skip <reason> -->`` (the reason becomes the skip's). Shell blocks are not run (they
train, build or benchmark); each command's `make` targets, script paths, `tests/` files and `--flags`
(against the command's own `--help`) must exist.
"""

from __future__ import annotations

import functools
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SKIP = re.compile(r"<!--\s*docs-test:\s*skip\s+(.+?)\s*-->")
FENCE = re.compile(r"^```(\w*)\s*$")


@dataclass
class Block:
    doc: Path
    line: int  # of the opening fence, 1-based
    lang: str
    code: str
    skip: str | None  # the document's reason, if it marks the block


def _blocks(doc: Path) -> list[Block]:
    blocks, lines = [], doc.read_text().splitlines()
    i = 0
    while i < len(lines):
        fence = FENCE.match(lines[i])
        if fence is None:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        marker = SKIP.search(lines[i - 1]) if i > 0 else None
        code = "\n".join(lines[i + 1 : end]) + "\n"
        blocks.append(Block(doc, i + 1, fence.group(1), code, marker.group(1) if marker else None))
        i = end + 1
    return blocks


def _name(doc: Path) -> str:
    return str(doc.relative_to(ROOT))


def _python_blocks() -> list:
    return [
        pytest.param(block, id=f"{_name(block.doc)}:{block.line}")
        for doc in DOCS
        for block in _blocks(doc)
        if block.lang == "python"
    ]


# One namespace and working directory per document: its blocks build on each other, in order (select
# a document's blocks together, e.g. `-k README`).
_sessions: dict[Path, tuple[dict, Path]] = {}


@pytest.mark.parametrize("block", _python_blocks())
def test_python_block_runs(block: Block, tmp_path_factory, monkeypatch) -> None:
    if block.skip is not None:
        pytest.skip(block.skip)
    if block.doc not in _sessions:
        _sessions[block.doc] = {"__name__": "__docs__"}, tmp_path_factory.mktemp(block.doc.stem)
    namespace, workdir = _sessions[block.doc]
    monkeypatch.chdir(workdir)  # files a block writes stay out of the repository
    exec(compile(block.code, f"{_name(block.doc)}:{block.line}", "exec"), namespace)


@functools.cache
def _help(command: tuple[str, ...]) -> str:
    result = subprocess.run(
        [*command, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=300, env=os.environ
    )
    assert result.returncode == 0, f"{' '.join(command)} --help failed: {result.stderr[-2000:]}"
    return result.stdout


def _make_targets() -> set[str]:
    return set(re.findall(r"^([\w.-]+):", (ROOT / "Makefile").read_text(), flags=re.M))


def _commands(code: str) -> list[list[str]]:
    """Each command line of a shell block, comments and env assignments dropped, continuations joined."""
    text = code.replace("\\\n", " ")
    commands = []
    for line in text.splitlines():
        line = line.split(" #")[0].strip()
        if not line or line.startswith("#"):
            continue
        words = shlex.split(line)
        while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", words[0]):
            words = words[1:]
        if words:
            commands.append(words)
    return commands


def _python_command(words: list[str]) -> tuple[tuple[str, ...], list[str]] | None:
    """(how to run the program, its arguments) for `python -m module ...`, `python script.py ...` or
    `resfast-train ...`; None for other commands."""
    if words[0] == "resfast-train":
        return (sys.executable, "-m", "resfast.train"), words[1:]
    if not re.fullmatch(r"(\S*/)?python3?", words[0]) or len(words) < 2:
        return None
    if words[1] == "-m":
        if words[2] != "resfast.train":  # e.g. pytest: its own tool
            return None
        return (sys.executable, "-m", words[2]), words[3:]
    script = ROOT / words[1]
    assert script.exists(), f"{words[1]} does not exist"
    return (sys.executable, str(script)), words[2:]


def _shell_blocks() -> list:
    return [
        pytest.param(block, id=f"{_name(block.doc)}:{block.line}")
        for doc in DOCS
        for block in _blocks(doc)
        if block.lang in ("bash", "sh", "shell", "console")
    ]


@pytest.mark.parametrize("block", _shell_blocks())
def test_shell_commands_exist(block: Block) -> None:
    if block.skip is not None:
        pytest.skip(block.skip)
    for words in _commands(block.code):
        where = f"{_name(block.doc)}:{block.line}: `{' '.join(words)}`"
        for word in words:
            if re.fullmatch(r"(tests|benchmarks|docs|resfast)/[\w/.-]+\.\w+", word):
                assert (ROOT / word).exists(), f"{where}: {word} does not exist"
        if words[0] == "make":
            missing = {w for w in words[1:] if not w.startswith("-") and "=" not in w} - _make_targets()
            assert not missing, f"{where}: no make target {sorted(missing)}"
            continue
        program = _python_command(words)
        if program is None:
            continue
        command, args = program
        flags = {a.split("=")[0] for a in args if a.startswith("--")}
        if flags:
            usage = _help(command)
            unknown = sorted(f for f in flags if f not in usage)
            assert not unknown, f"{where}: {unknown} not in `{' '.join(command[1:])} --help`"
