"""``fmabs_core.web`` is a front-end: no library module imports it, and ``fmabs`` imports it only when run."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "fmabs_core"


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(module imported, at module level?) for every import in a file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    top = {id(node) for node in tree.body}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, id(node) in top) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            out += [(node.module, id(node) in top)] + [(f"{node.module}.{a.name}", id(node) in top) for a in node.names]
    return out


def test_library_never_imports_the_web_app():
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE).parts
        if rel[0] == "web":
            continue
        for module, at_top in _imports(path):
            if module == "fmabs_core.web" or module.startswith("fmabs_core.web."):
                if rel[0] != "cli" or at_top:  # the CLI may import it inside the command's function only
                    offenders.append(f"{'/'.join(rel)}: {module}")
    assert offenders == []


def test_fmabs_help_does_not_load_trame():
    code = "import sys; from fmabs_core.cli import build_parser; build_parser(light=True); " \
           "print(any(m.startswith(('trame', 'fmabs_core.web.app')) for m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "False", done.stdout + done.stderr
