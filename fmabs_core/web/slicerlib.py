"""Find the Slicer module's logic package (``SlicerFMABSLib``) for the web app.

Why: the panels' logic lives beside the Slicer module (``SlicerFMABS/SlicerFMABSLib``), not in the
``fmabs_core`` wheel, so that the Slicer extension ships it; the web app uses that very code from the
source checkout (``pip install -e ".[web]"``) instead of keeping a second copy.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import SimpleNamespace

from fmabs_core.errors import FmabsError

MODULE_DIR = Path(__file__).resolve().parents[2] / "SlicerFMABS"


def slicer_lib() -> SimpleNamespace:
    """``SlicerFMABSLib``'s ``logic`` and ``jobs`` modules (imported from the checkout when not on the path)."""
    try:
        importlib.import_module("SlicerFMABSLib")
    except ImportError:
        if not (MODULE_DIR / "SlicerFMABSLib" / "__init__.py").is_file():
            raise FmabsError("fmabs web needs the SlicerFMABS module's logic (SlicerFMABS/SlicerFMABSLib): install "
                             "fmabs from a source checkout (pip install -e \".[web]\")") from None
        sys.path.insert(0, str(MODULE_DIR))
        importlib.invalidate_caches()
    logic = importlib.import_module("SlicerFMABSLib.logic")
    jobs = importlib.import_module("SlicerFMABSLib.jobs")
    return SimpleNamespace(logic=logic, jobs=jobs)
