"""Hostile and broken input (issue 14): every case of the generated corpus ends in a clear error.

For each case of ``hostile_corpus.py`` (broken NIfTI files, headers, affines, dtypes, label values,
project and run documents, names and paths, option bounds, output paths, model files): exit code 2,
a message naming the file, key or option, no traceback, every pre-existing file byte for byte the
same, and no new file outside the project or the output folder. The command runs in this process
(``fmabs_core.cli.main``); the cases marked ``subprocess`` run as a real ``python -m fmabs_core``.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import hostile_corpus as hc  # noqa: E402

CASES = hc.all_cases()


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Path:
    return hc.make_assets(tmp_path_factory.mktemp("hostile-assets"))


def test_corpus_covers_every_class():
    counts = {cls: sum(c.cls == cls for c in CASES) for cls in hc.CLASSES}
    assert len(CASES) >= 100
    assert all(n >= 5 for n in counts.values()), counts
    assert any(c.subprocess for c in CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_case(case: hc.Case, assets: Path, tmp_path: Path, capsys, caplog):
    """One case of the corpus. Skips only a read-only-folder case where no unwritable folder exists (neither a
    chmod 555 folder nor, as root, /sys); under FMABS_STRICT_SKIPS that skip fails."""
    folder = tmp_path / "case"
    env = hc.Env(folder, assets)
    try:
        argv = case.build(env)
    except hc.Skip as exc:
        pytest.skip(str(exc))
    before, around_before = hc.snapshot(folder), sorted(os.listdir(tmp_path))
    try:
        if case.subprocess:
            outcome = hc.run_subprocess(argv, folder)
        else:
            outcome = _run(argv, capsys, caplog)
        problems = hc.check_outcome(case, outcome, before, hc.snapshot(folder), around_before,
                                    sorted(os.listdir(tmp_path)))
    finally:
        hc._chmod_back(tmp_path)
    assert not problems, f"{case.id} ({' '.join(map(repr, argv))}):\n  " + "\n  ".join(problems) + \
        f"\n--- output ---\n{outcome.output[-2000:]}{outcome.crashed[-3000:]}"


def _run(argv: list[str], capsys, caplog) -> hc.Outcome:
    from fmabs_core.cli import main

    capsys.readouterr()
    crashed = ""
    with caplog.at_level(logging.INFO):
        try:
            rc = main(argv)
        except SystemExit as exc:
            rc = exc.code if isinstance(exc.code, int) else 2
        except Exception:  # noqa: BLE001 - an escaped exception is what the suite looks for
            rc, crashed = None, traceback.format_exc()
    out = capsys.readouterr()
    return hc.Outcome(rc, out.out + out.err + caplog.text, crashed)


# ---- what the corpus cannot show: bugs, and the ways that still work --------------------------------
def test_internal_error_prints_one_line_and_saves_the_traceback(assets, tmp_path, capsys, monkeypatch):
    """A bug (not bad input) prints one line naming the saved traceback, exits with 1, prints no traceback."""
    import shutil

    from fmabs_core.cli import main
    from fmabs_core.data.project import Project

    proj = tmp_path / "proj"
    shutil.copytree(assets / "proj", proj)
    monkeypatch.delenv("FMABS_CRASH_DIR", raising=False)

    def boom(self, *args, **kwargs):
        raise ZeroDivisionError("a bug in the checker")

    monkeypatch.setattr(Project, "check", boom)
    assert main(["check", "--project", str(proj)]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "internal error" in err and "ZeroDivisionError: a bug in the checker" in err
    reports = list((proj / ".fmabs" / "crash").glob("crash-*.txt"))
    assert len(reports) == 1 and str(reports[0]) in err
    text = reports[0].read_text()
    assert "Traceback" in text and "boom" in text and "fmabs check --project" in text

    # without a project: the directory FMABS_CRASH_DIR names (else the system's temporary folder)
    monkeypatch.setenv("FMABS_CRASH_DIR", str(tmp_path / "crashes"))
    monkeypatch.setattr("fmabs_core.cli.train_cmds.cmd_evaluate", lambda args: 1 / 0)  # main builds its parser anew
    (tmp_path / "p").mkdir()
    (tmp_path / "l").mkdir()
    assert main(["evaluate", "--pred", str(tmp_path / "p"), "--labels", str(tmp_path / "l")]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(list((tmp_path / "crashes").glob("crash-*.txt"))) == 1


def test_import_lists_skipped_files_and_imports_the_rest(assets, tmp_path, capsys):
    import shutil

    from fmabs_core.cli import main
    from fmabs_core.data.project import Project

    src = tmp_path / "data"
    shutil.copytree(assets / "data", src)
    (src / "imagesTr" / ".hidden.nii.gz").write_bytes(b"junk")
    (src / "imagesTr" / "notes.txt").write_text("notes")
    shutil.copyfile(src / "labelsTr" / "c1.nii.gz", src / "labelsTr" / "orphan.nii.gz")
    assert main(["import", str(src), "--project", str(tmp_path / "proj")]) == 0
    out = capsys.readouterr().out
    assert "3 file(s) skipped" in out
    assert ".hidden.nii.gz: hidden" in out and "notes.txt: not a NIfTI" in out and "orphan.nii.gz: a label without" in out
    assert sorted(Project(tmp_path / "proj").cases) == ["c1", "c2", "c3", "c4"]


def test_overwrite_replaces_outputs_but_never_inputs(assets, tmp_path, capsys):
    import shutil

    from fmabs_core.cli import main

    (tmp_path / "in").mkdir()
    shutil.copyfile(assets / "data" / "imagesTr" / "c1.nii.gz", tmp_path / "in" / "c1.nii.gz")
    out = tmp_path / "out"
    args = ["predict", "--model", str(assets / "model.pt"), "--input", str(tmp_path / "in"), "--output", str(out),
            "--device", "cpu"]
    assert main(args) == 0
    first = (out / "c1.nii.gz").stat().st_mtime_ns
    assert main(args) == 0  # the same command again: its own finished output is kept, not redone
    assert (out / "c1.nii.gz").stat().st_mtime_ns == first
    assert main(args + ["--overlap", "0.25"]) == 2  # other settings: not this command's output
    assert "--overwrite" in capsys.readouterr().err
    assert main(args + ["--overwrite"]) == 0
    assert (out / "c1.nii.gz").stat().st_mtime_ns != first
    # --overwrite never reaches an input: the output folder may not be the inputs' folder
    assert main(args[:-4] + ["--output", str(tmp_path / "in"), "--overwrite", "--device", "cpu"]) == 2

    report = tmp_path / "report.json"
    report.write_text("{}")
    ev = ["evaluate", "--pred", str(out), "--labels", str(assets / "data" / "labelsTr"), "--json", str(report)]
    assert main(ev) == 2 and report.read_text() == "{}"
    assert main(ev + ["--overwrite"]) == 0 and '"summary"' in report.read_text()
    label = assets / "data" / "labelsTr" / "c1.nii.gz"
    before = label.read_bytes()
    assert main(ev[:-1] + [str(label), "--overwrite"]) == 2 and label.read_bytes() == before


def test_simulate_count_draws_only_unlabelled_scans(assets, tmp_path, capsys):
    import json
    import shutil

    from fmabs_core.cli import main
    from fmabs_core.data.project import Project

    proj = tmp_path / "proj"
    shutil.copytree(assets / "proj", proj)
    project = Project(proj)
    drawn = set(project.crosslabelled())
    before = {c: project.crosslabel_path(c).read_bytes() for c in drawn}
    assert main(["crosslabel", "simulate", "--project", str(proj), "--count", "5"]) == 0
    new = set(json.loads(capsys.readouterr().out)["crosslabelled"])
    assert new and not new & drawn and all(project.crosslabel_path(c).read_bytes() == b for c, b in before.items())
    case = sorted(drawn)[0]
    assert main(["crosslabel", "simulate", "--project", str(proj), "--cases", case, "--overwrite"]) == 0


def test_unusual_but_valid_files_are_still_read(tmp_path):
    """Big-endian headers, NIfTI-2, uncompressed .nii and an oblique affine all load."""
    import nibabel as nib
    import numpy as np

    from fmabs_core.data import io

    data = np.arange(16 ** 3, dtype=np.float32).reshape(hc.SHAPE)
    aff = np.array([[0, -1.2, 0, 3], [0.8, 0, 0.1, -2], [0, 0, 2.0, 1], [0, 0, 0, 1]])
    h = nib.Nifti1Header(endianness=">")
    h.set_data_dtype(">f4")
    h.set_data_shape(hc.SHAPE)
    h["vox_offset"] = 352
    h.set_sform(aff, code=1)
    (tmp_path / "big.nii.gz").write_bytes(hc._gz(h.binaryblock + b"\0" * 4 + data.astype(">f4").tobytes(order="F")))
    assert nib.load(str(tmp_path / "big.nii.gz")).header.endianness == ">"
    nib.save(nib.Nifti2Image(data, aff), str(tmp_path / "two.nii"))
    nib.save(nib.Nifti1Image(data.astype(np.int16), aff), str(tmp_path / "plain.nii"))
    for name in ("big.nii.gz", "two.nii", "plain.nii"):
        vol = io.load_image(tmp_path / name)
        assert vol.array.shape == hc.SHAPE and float(vol.array.sum()) == float(data.astype(np.int16 if name == "plain.nii" else np.float32).sum())
