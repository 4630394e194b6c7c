"""The documentation's pictures are generated on real LA scans (Testing/web/screenshots.py): the path that makes
them works end to end, and every picture of it that the docs show is in docs/screenshots/."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from screenshots import PANELS, REPO, ShotConfig, make_screenshots
from web_helpers import need_web

pytestmark = pytest.mark.slow


def test_each_panel_is_pictured_on_a_real_scan(la_dir, tmp_path):
    """A small run of the docs' path: two LA scans, a 20-iteration FM-ABS run with its rounds; each waited-for
    state (the saved cross-label on its slices, the rounds' lines, the fused label and prediction layers, the
    export) is reached before its picture is taken, and each picture shows a rendered page, not a blank one."""
    from PIL import Image

    need_web()
    shots = make_screenshots(tmp_path / "out", la_dir, ShotConfig(scans=2, iterations=20, width=4, pseudo_max_slices=2),
                             work=tmp_path / "work")
    assert list(shots) == list(PANELS)
    pictures = {}
    for panel, path in shots.items():
        with Image.open(path) as image:
            assert image.format == "PNG" and image.size == (1500, 900), (panel, image.format, image.size)
            pixels = np.asarray(image.convert("RGB"))
        assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 500, f"{panel}: a nearly uniform picture"
        pictures[panel] = pixels
    assert all(not np.array_equal(pictures["label"], pictures[p]) for p in PANELS[1:])


def test_the_docs_show_the_generated_pictures():
    """docs/screenshots/ holds the four panels (regenerate: python Testing/web/screenshots.py --out
    docs/screenshots), and the README shows them (a missing file fails Testing/test_docs.py)."""
    folder = REPO / "docs" / "screenshots"
    assert sorted(p.stem for p in folder.glob("*.png")) == sorted(PANELS)
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    shown = set(re.findall(r"docs/screenshots/(\w+)\.png", readme))
    assert shown == set(PANELS), f"README pictures: {sorted(shown)}"
    assert not re.search(r"\]\(docs/web-(label|train)\.png\)", readme), "the README still shows the phantom pictures"
