"""The docs stay true: every repository path they name exists, and every ``fmabs`` command they quote
uses options that command has (visible ones: a renamed option's old name fails here)."""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), *sorted((REPO / "tools").rglob("*.md"))]
PATH = re.compile(r"(?<![\w/.-])((?:Testing|fmabs_core|SlicerFMABS|tools|docs|Resources|\.ci)/[\w./-]*\w)(?![\w<])")


def test_every_path_named_in_the_docs_exists():
    missing = [f"{doc.relative_to(REPO)}: {m.group(1)}" for doc in DOCS
               for m in PATH.finditer(doc.read_text(encoding="utf-8")) if not (REPO / m.group(1)).exists()]
    assert not missing, "paths named in the docs that do not exist:\n" + "\n".join(missing)


def _quoted_commands(text: str) -> list[str]:
    """``fmabs ...`` lines of fenced code (backslash continuations joined; diagrams and trees, whose lines
    do not start with the command, are not commands) and inline code spans that start with it."""
    found, fenced = [], False
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.strip().startswith("```"):
            fenced = not fenced
        elif fenced:
            while line.rstrip().endswith("\\") and i + 1 < len(lines):
                i += 1
                line = line.rstrip()[:-1] + " " + lines[i].strip()
            m = re.match(r"\s*(?:\$ |\.venv/bin/)?(fmabs [^#|]*)", line)
            found += [m.group(1)] if m else []
        else:
            found += [m.group(1) for m in re.finditer(r"`(fmabs [^`]*)`", line)]
        i += 1
    return found


def _leaf(parser: argparse.ArgumentParser, words: list[str]) -> tuple[argparse.ArgumentParser, str]:
    name = "fmabs"
    while True:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs or not words or words[0] not in subs[0].choices:
            return parser, name
        name += " " + words[0]
        parser = subs[0].choices[words.pop(0)]


def test_every_quoted_command_uses_options_it_has():
    from fmabs_core.cli import build_parser

    parser = build_parser()
    problems, checked = [], 0
    for doc in DOCS:
        for command in _quoted_commands(doc.read_text(encoding="utf-8")):
            try:
                words = shlex.split(command.replace("[", " ").replace("]", " "))[1:]
            except ValueError:
                words = command.split()[1:]
            leaf, name = _leaf(parser, list(words))
            if name == "fmabs":
                if words and not words[0].startswith("-"):
                    problems.append(f"{doc.name}: '{command.strip()}': no command '{words[0]}'")
                continue
            visible = {o for a in leaf._actions if a.help != argparse.SUPPRESS for o in a.option_strings}
            for word in words:
                option = word.split("=")[0].rstrip(",.;:)`")
                if option.startswith("--") and len(option) > 2 and option not in visible:
                    problems.append(f"{doc.name}: '{command.strip()}': {name} has no {option}")
            checked += 1
    assert checked > 20
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("text, want", [("```\nfmabs train --a 1 \\\n   --b 2  # c\n```", ["fmabs train --a 1  --b 2  "]),
                                        ("see `fmabs predict --x` here", ["fmabs predict --x"])])
def test_quoted_commands_are_found(text, want):
    assert _quoted_commands(text) == want


LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def test_every_relative_link_and_image_in_the_docs_exists():
    missing = []
    for doc in DOCS:
        for target in LINK.findall(doc.read_text(encoding="utf-8")):
            if re.match(r"[a-z]+://", target) or target.startswith(("#", "mailto:")):
                continue
            path = (doc.parent / target.split("#")[0]).resolve()
            if not path.exists():
                missing.append(f"{doc.relative_to(REPO)}: {target}")
    assert not missing, "links or images that lead nowhere:\n" + "\n".join(missing)


def test_the_readme_is_short_and_its_test_command_is_what_ci_runs():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 120
    line = next(ln for ln in readme.splitlines() if "pytest" in ln and "pip install" in ln)
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8").replace(" -q", "")
    for step in (s.strip() for s in line.split("&&")):
        assert step in ci, f"the README's step {step!r} is not what .ci/run runs"
    assert "docs/troubleshooting.md" in readme and "docs/slicer.md" in readme
