"""Dependency handling: nothing at import, one confirmation, torch through the PyTorch extension."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

from SlicerFMABSLib import deps

REPO = Path(__file__).resolve().parents[2]


def _name(req: str) -> str:
    return re.split(r"[<>=!~ \[]", req, maxsplit=1)[0].lower()


def test_requirements_match_pyproject():
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())
    wanted = {_name(r): r for r in meta["project"]["dependencies"] if _name(r) not in ("torch", "torchvision")}
    ours = {_name(r): r for r in deps.PIP_REQUIREMENTS.values()}
    assert ours == wanted, "update SlicerFMABSLib/deps.py PIP_REQUIREMENTS to match pyproject.toml"


def test_declined_installs_nothing():
    calls = []
    ok = deps.install(["torch", "monai"], confirm=lambda text: calls.append(("ask", text)) or False,
                      install_torch=lambda r: calls.append(("torch", r)), pip_install=lambda a: calls.append(("pip", a)))
    assert ok is False and [c[0] for c in calls] == ["ask"]
    assert "PyTorch" in calls[0][1] and "monai>=1.3" in calls[0][1]


def test_accepted_installs_torch_then_pip():
    calls = []
    ok = deps.install(["torch", "monai", "nibabel"], confirm=lambda text: True,
                      install_torch=lambda r: calls.append(("torch", r)) or object(),
                      pip_install=lambda a: calls.append(("pip", a)))
    assert ok and calls == [("torch", deps.TORCH_REQUIREMENT), ("pip", '"monai>=1.3" "nibabel>=5"')]
    assert deps.install([], confirm=lambda t: 1 / 0, install_torch=None, pip_install=None)  # nothing to ask


def test_missing_and_core_root():
    assert deps.missing(available=lambda n: n != "monai") == ["monai"]
    assert deps.missing(available=lambda n: False)[0] == "torch"
    assert deps.fmabs_core_root() == REPO


def _module_level_imports(path: Path) -> list[str]:
    """Absolute modules imported at module level (imports inside functions are lazy by design)."""
    names = []
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names += [f"{node.module}.{a.name}" if node.module == "fmabs_core" else node.module for a in node.names]
    return names


def test_no_third_party_import_at_module_import():
    """SlicerFMABS.py, deps.py and jobs.py must load in a Slicer without torch/nibabel/monai: besides the
    standard library and Slicer, they import only fmabs_core.contract, itself standard-library only."""
    allowed_top = {"__future__", "logging", "os", "sys", "json", "math", "shutil", "signal", "subprocess", "re",
                   "dataclasses", "pathlib", "typing", "importlib", "time", "unittest", "tempfile",
                   "vtk", "qt", "slicer", "SlicerFMABSLib"}
    for path in (REPO / "SlicerFMABS" / "SlicerFMABS.py", REPO / "SlicerFMABS" / "SlicerFMABSLib" / "deps.py",
                 REPO / "SlicerFMABS" / "SlicerFMABSLib" / "jobs.py"):
        for name in _module_level_imports(path):
            assert name.split(".")[0] in allowed_top or name == "fmabs_core.contract", \
                f"{path.name} imports {name} at module level"
    for name in _module_level_imports(REPO / "fmabs_core" / "contract.py"):
        assert name.split(".")[0] in sys.stdlib_module_names, f"contract.py imports {name}"


def test_jobs_module_loads_without_the_dependencies(tmp_path):
    """A fresh Slicer: jobs.py (and the contract it reads) import with numpy, torch, psutil... unavailable,
    and its process helpers fall back to the standard library."""
    import subprocess

    code = (
        "import sys\n"
        "for name in ('numpy', 'torch', 'nibabel', 'monai', 'psutil', 'filelock', 'scipy'):\n"
        "    sys.modules[name] = None\n"
        f"sys.path[:0] = [{str(REPO / 'SlicerFMABS')!r}]\n"
        "from SlicerFMABSLib import jobs\n"
        "import os\n"
        "assert jobs.pid_alive(os.getpid()) and not jobs.pid_alive(None)\n"
        "assert jobs.WAITING == 'waiting_for_labels' and jobs.EXIT_NEEDS_LABELS == 3\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
