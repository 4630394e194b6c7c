"""A clinician's own file names: imported under a safe case id, the original name kept and shown."""

from __future__ import annotations

import shutil

import pytest

from fmabs_core.contract import check_name, safe_case_id
from fmabs_core.data.project import Project, import_folder


@pytest.mark.parametrize("name, expected", [("my scan 1", "my_scan_1"), ("Müller Ärger", "Muller_Arger"),
                                            ("-x", "x"), ("c1\n", "c1"), ("a..b", "a_b")])
def test_safe_case_ids(name, expected):
    assert safe_case_id(name) == expected


def test_safe_ids_of_any_name_are_safe_and_distinct():
    names = ["患者一", "患者二", "a" * 300, "..", "  ", "my scan", "my_scan"]
    taken: set[str] = {"my_scan"}
    for name in names:
        case = safe_case_id(name, taken)
        assert check_name(case, "case id") == case and case not in taken
        taken.add(case)


def test_clinicians_file_names_are_imported_under_safe_ids(tmp_path, phantom_data):
    """'my scan 1.nii.gz', accented and non-Latin names import (they were refused: "rename the file"), beside a
    scan already called my_scan_1; fmabs.json keeps each original name, the panels show it."""
    src = tmp_path / "src"
    src.mkdir()
    scans = sorted((phantom_data / "imagesTr").glob("*.nii.gz"))
    for scan, name in zip(scans, ["my scan 1.nii.gz", "Müller Ärger.nii.gz", "患者一.nii.gz", "my_scan_1.nii.gz"]):
        shutil.copy(scan, src / name)
    project, problems = import_folder(src, tmp_path / "proj")
    assert problems == []
    names = project.original_names()
    assert sorted(names.values()) == ["Müller Ärger.nii.gz", "my scan 1.nii.gz", "患者一.nii.gz"]
    assert "my_scan_1" in project.cases and names.get("my_scan_1") is None  # a safe name keeps its id
    case = next(c for c, n in names.items() if n == "my scan 1.nii.gz")
    assert case.startswith("my_scan_1-") and project.display_names()[case] == f"{case} (my scan 1.nii.gz)"
    assert all(project.image_path(c).is_file() for c in project.cases)
    # importing the same folder again adds nothing: the ids are the same
    again, problems = import_folder(src, tmp_path / "proj")
    assert problems == [] and sorted(again.cases) == sorted(project.cases)
    assert Project(tmp_path / "proj").original_names() == names
