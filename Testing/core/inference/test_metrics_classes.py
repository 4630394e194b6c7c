"""Several classes are scored one by one (evaluate, reproduce, demo), never merged as ``label > 0``."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from fmabs_core.inference.metrics import evaluate_folders, format_table, score_case, summarise


def _two_blobs() -> np.ndarray:
    gt = np.zeros((24, 24, 16), np.uint8)
    gt[3:10, 4:12, 3:12] = 1
    gt[13:21, 10:20, 4:12] = 2
    return gt


def test_swapped_classes_score_zero_not_one():
    gt = _two_blobs()
    swapped = np.where(gt == 1, 2, np.where(gt == 2, 1, 0)).astype(np.uint8)
    s = score_case("swap", swapped, gt)
    assert s.dice == 0.0 and set(s.classes) == {"1", "2"}  # label > 0 would say 1.0
    assert s.classes["1"]["dice"] == 0.0 and s.classes["2"]["dice"] == 0.0
    right = score_case("right", gt, gt)
    assert right.dice == 1.0 and right.classes["2"]["hd95_pooled_vox"] == 0.0


def test_case_metrics_are_the_mean_over_classes_and_binary_is_unchanged():
    gt = _two_blobs()
    pred = gt.copy()
    pred[pred == 2] = 0  # class 2 missed entirely
    s = score_case("half", pred, gt)
    assert s.classes["1"]["dice"] == 1.0 and s.classes["2"]["dice"] == 0.0 and s.classes["2"]["failed"]
    assert s.dice == pytest.approx(0.5) and s.failed
    assert s.hd95_pooled_vox == 0.0  # the failed class has no distance; the mean is over those that have one
    binary = score_case("bin", (gt == 1).astype(np.uint8), (gt > 0).astype(np.uint8))
    assert binary.classes == {} and 0 < binary.dice < 1
    summary = summarise([s, score_case("right", gt, gt)])
    assert summary["classes"]["2"]["dice"]["mean"] == pytest.approx(0.5)
    assert summary["classes"]["1"]["n_cases"] == 2 and summary["classes"]["2"]["n_failed"] == 1
    table = format_table([s], summarise([s]), {"1": "atrium", "2": "scar"})
    assert "class 1 atrium" in table and "class 2 scar" in table


def test_evaluate_command_reports_each_class(tmp_path, capsys):
    from fmabs_core.cli import main

    gt = _two_blobs()
    pred = gt.copy()
    pred[pred == 2] = 1  # scar painted as atrium
    for folder, arr in (("labels", gt), ("pred", pred)):
        (tmp_path / folder).mkdir()
        nib.save(nib.Nifti1Image(arr, np.eye(4)), str(tmp_path / folder / "c1.nii.gz"))
    scores, summary = evaluate_folders(tmp_path / "pred", tmp_path / "labels")
    assert scores[0].classes["2"]["dice"] == 0.0 and scores[0].dice < 0.5
    assert main(["evaluate", "--pred", str(tmp_path / "pred"), "--labels", str(tmp_path / "labels"),
                 "--json", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    assert "class 1" in out and "class 2" in out
    report = json.loads((tmp_path / "r.json").read_text())
    assert set(report["cases"][0]["classes"]) == {"1", "2"} and "classes" in report["summary"]


def test_reproduce_table_names_each_class():
    from types import SimpleNamespace

    from fmabs_core.reproduce.report import PER_CLASS, summarise_cells

    gt = _two_blobs()
    half = gt.copy()
    half[half == 2] = 0
    cases = [score_case("a", gt, gt).as_dict(), score_case("b", half, gt).as_dict()]
    setting = SimpleNamespace(key="c4", label="4 scans")
    row = SimpleNamespace(key="sup", label="Sup", method="sup", baseline=True, paper={})
    cells = [SimpleNamespace(setting=setting, row=row, seed=s) for s in (0, 1)]
    results = [{"summary": {"n_failed": 1, "n_cases": 2}, "cases": cases, "train_seconds_this_call": 1.0}] * 2
    rows = summarise_cells(None, cells, results)
    assert rows[0][PER_CLASS]["1"]["mean"] == pytest.approx(100.0)
    assert rows[0][PER_CLASS]["2"]["mean"] == pytest.approx(50.0)
    from fmabs_core.reproduce.report import markdown

    protocol = SimpleNamespace(paper="P", name="p", scales={"cpu": SimpleNamespace(description="d")})
    split = SimpleNamespace(train=["x"], val=[], test=["a", "b"], how="h")
    table = markdown(protocol, "cpu", rows, split, 2)
    assert f"| {PER_CLASS} |" in table and "1: 100.00, 2: 50.00" in table
