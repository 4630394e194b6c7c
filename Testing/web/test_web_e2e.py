"""``fmabs web`` end to end in headless chromium, against the real server on loopback.

One server and one page for the whole path (starting them costs seconds): open the project, refuse
a folder outside it, load a scan, paint on the three slice views with mouse events, save the
cross-label (checked on disk), train a tiny network (progress seen in the page), cancel, resume,
review, upload, segment, export and download; the downloaded NIfTI equals what ``fmabs predict``
writes. A screenshot of each panel is kept in ``ARTEFACTS``.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from web_helpers import ARTEFACTS, fill, need_web, shot, tab, text_of, wait_text

pytestmark = pytest.mark.slow

TINY = "--patch-size 32 32 32 --width 4 --batch-size 2 --labelled-batch-size 1 --val-every 1000"


def paint_stroke(page, view_index: int) -> None:
    """A horizontal stroke through the middle of a slice view, with real mouse events."""
    view = page.locator("img.image-display-area").nth(view_index)
    box = view.bounding_box()
    assert box and box["width"] > 50, f"slice view {view_index} is not shown: {box}"
    cx, cy = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.move(cx - 30, cy)
    page.wait_for_timeout(150)
    page.mouse.down()
    for step in range(13):
        page.mouse.move(cx - 30 + 5 * step, cy + (step % 2))
        page.wait_for_timeout(40)
    page.mouse.up()
    page.wait_for_timeout(400)


def test_web_end_to_end(phantom_project, server_factory, browser_page, tmp_path):
    need_web()
    started = time.time()
    page = browser_page
    server = server_factory(phantom_project)
    url = server.url_line()
    page.goto(url)
    page.wait_for_selector("#tab-project", timeout=60_000)
    wait_text(page, "#project-summary", r"4 scans, 0 cross-labelled")
    shot(page, "1-project")

    # a browser-supplied path outside the project is refused, with one line naming it
    fill(page, "#import-folder", "/etc")
    page.click("#btn-import")
    wait_text(page, "#message", r"'/etc' is outside the project folder")

    # ---- Label: load, the planes shown, paint on the three views, save ----------------------------
    tab(page, "label")
    page.click("#btn-load")
    status = wait_text(page, "#label-status", r"Showing axial \d+, coronal \d+, sagittal \d+", 60)
    shown = {v: int(i) for v, i in re.findall(r"(axial|coronal|sagittal) (\d+)", status)}
    page.click("#btn-draw")
    wait_text(page, "#label-status", r"Paint on the three slices")
    page.wait_for_timeout(1000)
    for view_index in range(3):  # DOM order of the layout: axial, coronal, sagittal, 3D
        paint_stroke(page, view_index)
        # the stroke's events reach the server through the view's own channel: wait until it is applied
        wait_text(page, "#label-edits", rf"Edits since Draw: ([{view_index + 1}-9]|\d\d)", 60)
    shot(page, "2-label")
    page.click("#btn-save")
    wait_text(page, "#label-status", r"Saved phantom_000\.nii\.gz")
    assert page.locator("#label-warnings").count() == 0, text_of(page, "#label-warnings")

    from fmabs_core.data.crosslabel import labelled_planes
    from fmabs_core.data.project import Project

    project = Project(phantom_project)
    path = project.crosslabel_path("phantom_000")
    img = nib.as_closest_canonical(nib.load(str(path)))
    cross = np.asarray(img.dataobj)
    assert set(np.unique(cross).tolist()) <= {0, 1, 255} and cross.dtype == np.uint8
    assert labelled_planes(cross) == {v: [shown[v]] for v in ("axial", "coronal", "sagittal")}
    assert (cross[shown["sagittal"]] == 1).any() and (cross[:, shown["coronal"]] == 1).any() \
        and (cross[:, :, shown["axial"]] == 1).any(), "a stroke did not reach one of the three planes"
    # saving again without the Replace tick is refused (nothing the user owns is overwritten unasked)
    page.click("#btn-save")
    wait_text(page, "#message", r"already has a cross-label")
    label_s = time.time() - started

    # ---- Train: start, follow, cancel, resume --------------------------------------------------------
    tab(page, "train")
    fill(page, "#train-run", "web1")
    fill(page, "#train-method", "sup-dense")  # learns the phantom in 60 tiny iterations: a non-empty segmentation
    fill(page, "#train-iterations", "60")
    fill(page, "#train-options", TINY)
    page.click("#btn-train-start")
    state = wait_text(page, "#train-state", r"running [1-9]\d*/60|failed|crashed|done", 180)
    assert state.startswith("running"), f"{state}: {page.input_value('#train-log')}"
    page.click("#btn-train-cancel")
    wait_text(page, "#train-state", r"^cancelled [0-9/]+$", 120)  # and the process has exited
    stopped_at = int(re.search(r"\d+", text_of(page, "#train-iteration")).group())
    assert stopped_at < 60
    page.click("#btn-train-start")  # the same run again: resumes from its checkpoint
    wait_text(page, "#train-state", r"done", 240)
    assert "60/60" in text_of(page, "#train-state")
    assert page.locator("#train-plot polyline").get_attribute("points").count(",") > 10  # the live loss plot
    shot(page, "3-train")
    log = page.input_value("#train-log")
    assert "started" in log or "resumed" in log, log
    run_dir = phantom_project / "runs" / "web1"
    assert (run_dir / "model.pt").is_file()

    # the per-round line on the drawn slices (contract.planes_line). The run above is sup-dense, which has no
    # pseudo-label rounds (an fmabs run needs a generalist's weights and minutes): two pseudo_label events, as
    # FM-ABS writes them, are appended to its events.jsonl with RunLog, then "Watch run" re-reads the run.
    from fmabs_core.contract import planes_line
    from fmabs_core.runs.events import RunLog

    rounds = [RunLog(run_dir).event("pseudo_label", iteration=60, round=1, cases=1, planes_scans=1,
                                    planes_teacher_dice=0.828, planes_pseudo_dice=0.84, planes_gain=0.012,
                                    fusion="teacher", fusion_scores={"teacher": 0.828, "mv": 0.81},
                                    planes_gain_heldout=-0.004, fusion_per_scan={"phantom_001": "soft 0"}),
              RunLog(run_dir).event("pseudo_label", iteration=60, round=2, cases=1, planes_scans=1,
                                    planes_teacher_dice=0.8, planes_pseudo_dice=0.75, planes_gain=-0.05,
                                    warning="the pseudo-labels are worse than the teacher on your drawn slices")]
    page.click("#btn-train-watch")
    wait_text(page, "#train-rounds", r"round 2: .*WARNING", 60)
    assert text_of(page, "#train-rounds").splitlines() == [planes_line(e) for e in rounds]  # newest last
    assert "1 scan(s) by their own slices (phantom_001: soft 0)" in text_of(page, "#train-rounds")  # --fusion-per-scan
    assert "worse than the teacher" in text_of(page, "#train-rounds-warning")
    assert "60/60" in text_of(page, "#train-state") and planes_line(rounds[1]) in page.input_value("#train-log")
    shot(page, "3-train-rounds")
    train_s = time.time() - started - label_s

    # the reference: what the command line writes for the same model and scan
    reference_dir = run_dir / "predictions"
    done = subprocess.run([sys.executable, "-m", "fmabs_core", "predict", "--model", str(run_dir), "--input",
                           str(project.image_path("phantom_000")), "--output", str(reference_dir)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    reference = nib.load(str(reference_dir / "phantom_000.nii.gz"))
    assert (np.asarray(reference.dataobj) == 1).sum() > 100, "the tiny model segments nothing: the comparison is void"

    # ---- Label again: the model suggests scans and slices; the views jump to them ---------------------
    tab(page, "label")
    page.click("#btn-suggest")
    wait_text(page, "#label-status", r"[1-9] suggestions", 120)
    page.locator(".v-field", has=page.locator("#label-suggestions")).click()
    option = page.get_by_role("option").first
    title = option.inner_text()
    option.click()
    suggested = {v: int(i) for v, i in re.findall(r"(axial|coronal|sagittal) (\d+)", title)}
    case = title.split()[0]
    page.wait_for_timeout(300)
    page.click("#btn-load")
    status = wait_text(page, "#label-status", r"Showing axial", 60)
    assert {v: int(i) for v, i in re.findall(r"(axial|coronal|sagittal) (\d+)", status)} == suggested, (title, status)
    assert case in page.locator(".v-field", has=page.locator("#label-case")).inner_text()  # the suggested scan

    # ---- Review: the prediction layer, toggled ---------------------------------------------------------
    tab(page, "review")
    page.click("#tab-project")
    page.click("#btn-open")
    tab(page, "review")
    page.click("#btn-review")
    wait_text(page, "#review-status", r"Layers: .*prediction")
    page.click("#layer-prediction")  # hide, then show again
    page.wait_for_timeout(300)
    page.click("#layer-prediction")
    assert page.locator("#message").count() == 0 or "error" not in page.locator("#message").get_attribute("class")
    shot(page, "4-review")

    # ---- Segment and export: upload (refused, then accepted), segment, export, download -------------------
    tab(page, "segment")
    bad = tmp_path / "notes.txt"
    bad.write_text("not a scan")
    page.set_input_files("#upload-input", str(bad))
    wait_text(page, "#upload-status", r"not a NIfTI file")
    page.set_input_files("#upload-input", str(phantom_project.parent / "data" / "imagesTr" / "phantom_003.nii.gz"))
    wait_text(page, "#upload-status", r"Uploaded phantom_003\.nii\.gz")
    assert (phantom_project / "uploads" / "phantom_003.nii.gz").is_file()
    page.locator(".v-field", has=page.locator("#segment-scan")).click()  # open the scan list, pick a project scan
    page.get_by_role("option", name="project: phantom_000", exact=True).click()
    page.wait_for_timeout(300)
    page.click("#btn-segment")
    wait_text(page, "#segment-status", r"Done", 240)
    page.click("#btn-export")
    page.wait_for_selector("#dl-nifti", timeout=30_000)
    shot(page, "5-segment")
    with page.expect_download() as info:
        page.click("#dl-nifti")
    nifti = tmp_path / "downloaded.nii.gz"
    info.value.save_as(nifti)
    with page.expect_download() as info:
        page.click("#dl-nrrd")
    nrrd = tmp_path / "downloaded.seg.nrrd"
    info.value.save_as(nrrd)
    assert nrrd.stat().st_size > 0 and nrrd.read_bytes()[:4] == b"NRRD"

    exported = nib.load(str(nifti))
    np.testing.assert_allclose(exported.affine, reference.affine, atol=1e-4)
    assert exported.shape == reference.shape
    np.testing.assert_array_equal(np.asarray(exported.dataobj), np.asarray(reference.dataobj))
    assert page.errors == [], page.errors

    total = time.time() - started
    print(f"\nweb e2e: label {label_s:.0f} s, train {train_s:.0f} s, total {total:.0f} s")
    (ARTEFACTS / "timing.txt").write_text(f"label {label_s:.1f} s, train {train_s:.1f} s, total {total:.1f} s\n")
