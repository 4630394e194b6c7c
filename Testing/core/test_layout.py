"""The package's shape: imports point one way, the library never imports the CLI, the contract is stdlib-only."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import fmabs_core

PKG = Path(fmabs_core.__file__).parent


def _modules() -> dict[str, Path]:
    out = {}
    for f in PKG.rglob("*.py"):
        parts = list(f.relative_to(PKG.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """fmabs_core modules imported anywhere in the file (function bodies too), except under TYPE_CHECKING."""
    tree = ast.parse(path.read_text())
    typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.dump(node.test)
                   for stmt in node.body for n in ast.walk(stmt)}
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names}
    return {m for m in found if m in known and m != name}


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {name: _imports(name, path, set(mods)) for name, path in mods.items()}


def _related(a: str, b: str) -> bool:
    return a == b or a.startswith(b + ".") or b.startswith(a + ".")


def test_no_import_circle():
    graph = _graph()
    # a package's __init__ may import its own children: drop edges between a module and its ancestors
    edges = {m: {d for d in deps if not _related(m, d)} for m, deps in graph.items()}
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in sorted(edges[node]):
            if state.get(dep) == 1:
                cycles.append(path[path.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, path + [dep])
        state[node] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
    assert not cycles, f"import circles: {cycles}"


def test_library_never_imports_the_cli():
    offenders = {m: sorted(d for d in deps if d.startswith("fmabs_core.cli"))
                 for m, deps in _graph().items() if not m.startswith("fmabs_core.cli") and m != "fmabs_core.__main__"}
    assert not {m: d for m, d in offenders.items() if d}


def test_contract_uses_the_standard_library_only():
    tree = ast.parse((PKG / "contract.py").read_text())
    roots = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    roots |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert roots <= set(sys.stdlib_module_names) | {"__future__"}, roots
    # and importing it loads nothing else of the package's dependencies
    code = ("import sys, fmabs_core.contract as c; "
            "bad = [m for m in ('numpy', 'torch', 'nibabel', 'monai') if m in sys.modules]; "
            "assert not bad, bad; print(len(c.EVENT_TYPES))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=PKG.parent)
    assert out.returncode == 0, out.stderr


def test_one_definition_of_the_conventions():
    """The values the contract owns are not assigned again anywhere in the library or the Slicer module."""
    owned = ("UNLABELLED", "VIEWS", "VIEW_AXIS", "EVENT_TYPES", "FINAL_STATES", "EXIT_NEEDS_LABELS", "WAITING",
             "MODEL_FILE", "STATES")
    files = [p for p in PKG.rglob("*.py") if p.name != "contract.py"]
    files += list((PKG.parent / "SlicerFMABS").rglob("*.py"))
    again = []
    for f in files:
        for node in ast.parse(f.read_text()).body:
            if isinstance(node, ast.Assign):
                for target in node.targets:
                    if isinstance(target, ast.Name) and target.id in owned and not isinstance(node.value, ast.Name):
                        again.append(f"{f.relative_to(PKG.parent)}: {target.id}")
    assert not again, again
