"""Sample data: four small phantom scans and the three drawn planes of the first, registered with Slicer's
Sample Data module (category "FM-ABS"), so that the whole loop can be tried without one's own scans.

The files ship in the repository's ``Resources/SampleData`` (installed beside the module) and are read through
``file:`` URLs: nothing is downloaded. Sample Data checks each file's SHA256 after copying it into Slicer's cache.
They are made by ``fmabs_core.data.phantom.write_sample`` (a test keeps them equal to what it writes).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

CATEGORY = "FM-ABS"
SAMPLE_NAME = "FMABSPhantoms"
#: the files, in load order: four scans, then the drawn planes of the first (a segmentation)
FILES = [f"FMABS-phantom-{i}.nii.gz" for i in range(1, 5)] + ["FMABS-phantom-1-drawn.nii.gz"]


def source_arguments(folder: str | Path, thumbnail: str | None = None) -> dict[str, Any]:
    """The keyword arguments of ``SampleDataLogic.registerCustomSampleDataSource`` for the files in ``folder``."""
    folder = Path(folder)
    paths = [folder / name for name in FILES]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"FM-ABS sample data missing: {', '.join(missing)}")
    return {
        "category": CATEGORY,
        "sampleName": SAMPLE_NAME,
        "uris": [p.resolve().as_uri() for p in paths],
        "fileNames": list(FILES),
        "nodeNames": [name[: -len(".nii.gz")] for name in FILES],
        "loadFileTypes": ["VolumeFile"] * (len(FILES) - 1) + ["SegmentationFile"],
        "checksums": ["SHA256:" + hashlib.sha256(p.read_bytes()).hexdigest() for p in paths],
        "thumbnailFileName": thumbnail,
    }


def register(folder: str | Path, thumbnail: str | None = None) -> bool:
    """Register the sample with Sample Data (inside Slicer); False when the module or the files are absent."""
    try:
        import SampleData  # a Slicer module: only inside the application
    except ImportError:
        return False
    try:
        arguments = source_arguments(folder, thumbnail)
    except FileNotFoundError:
        return False
    SampleData.SampleDataLogic.registerCustomSampleDataSource(**arguments)
    return True
