"""``fmabs bench teachers`` and the replay inputs of ``fmabs pseudo-label``: teachers of known kind, the
table's columns, and clear refusals of bad options before anything runs."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from fmabs_core.cli import main
from fmabs_core.cli.bench_teachers import (AUTO, AUTO_PER_SCAN, bench_teachers, format_teachers, made_teachers,
                                          soft_teacher)
from fmabs_core.contract import VIEWS
from fmabs_core.generalist.fusion import AUTO_CANDIDATES


def cube(shape=(24, 24, 24), lo=6, hi=18) -> np.ndarray:
    t = np.zeros(shape, np.uint8)
    t[lo:hi, lo:hi, lo:hi] = 1
    return t


def test_made_teachers_are_wrong_in_the_ways_they_are_named():
    truth = cube()
    made = made_teachers(truth, np.random.default_rng(0))
    n = int(truth.sum())
    assert made["grown 1"].sum() > n and made["grown 3"].sum() > made["grown 1"].sum()
    assert (made["grown 1"][truth > 0] == 1).all()
    assert made["shrunk 3"].sum() < made["shrunk 1"].sum() < n and not (made["shrunk 1"] & (truth == 0)).any()
    assert 0 < (made["shifted 3, holed"] & truth).sum() < n
    blobs = made["weak, blobs"] & (truth == 0)
    assert blobs.any()  # false positives outside the object


def test_made_teachers_are_sure_far_from_their_boundary():
    truth = cube()
    p = soft_teacher(truth, 1)
    assert p.shape == (2, *truth.shape) and np.allclose(p.sum(0), 1.0, atol=1e-6)
    assert p[1, 12, 12, 12] > 0.95 and p[1, 0, 0, 0] < 0.01  # 6 voxels inside, 10 outside
    assert 0.5 < p[1, 6, 12, 12] < 0.8 and 0.2 < p[1, 5, 12, 12] < 0.5  # just inside / outside the boundary


def test_bad_options_are_refused_with_their_names(tmp_path, capsys):
    assert main(["bench", "teachers", "--project", str(tmp_path / "none")]) == 2
    assert "none" in capsys.readouterr().err
    out = tmp_path / "r.json"
    out.write_text("{}")
    assert main(["bench", "teachers", "--project", str(tmp_path), "--json", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err and out.read_text() == "{}"


def test_pseudo_label_replay_inputs_are_checked_before_anything_runs(tmp_path, capsys):
    aff = np.eye(4)
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random((16, 16, 16)).astype(np.float32), aff),
             str(tmp_path / "scan.nii.gz"))
    nib.save(nib.Nifti1Image(cube((16, 16, 16), 4, 12), aff), str(tmp_path / "mask.nii.gz"))
    base = ["pseudo-label", "--image", str(tmp_path / "scan.nii.gz"), "--output", str(tmp_path / "out")]
    assert main([*base, "--prompt-from", str(tmp_path / "mask.nii.gz"), "--fusion", "auto"]) == 2
    assert "--crosslabel" in capsys.readouterr().err
    assert main([*base, "--prompt-from", str(tmp_path / "mask.nii.gz"),
                 "--teacher-probs", str(tmp_path / "mask.nii.gz")]) == 2
    assert "--teacher-probs" in capsys.readouterr().err
    assert main([*base, "--teacher-probs", str(tmp_path / "mask.nii.gz")]) == 2  # a 3D mask is not probabilities
    err = capsys.readouterr().err
    assert "mask.nii.gz" in err and "4D" in err
    assert main([*base, "--prompt-from", str(tmp_path / "mask.nii.gz"), "--fusion", "soft",
                 "--teacher-weight", "2"]) == 2
    assert "--teacher-weight" in capsys.readouterr().err
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "scan_fused.nii.gz").write_bytes(b"mine")
    assert main([*base, "--prompt-from", str(tmp_path / "mask.nii.gz")]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (tmp_path / "out" / "scan_fused.nii.gz").read_bytes() == b"mine"


@pytest.mark.slow  # runs LiteMedSAM
def test_bench_scores_every_rule_on_the_same_answers(tmp_path, phantom_data):
    proj = tmp_path / "proj"
    main(["import", str(phantom_data), "--project", str(proj)])
    main(["crosslabel", "simulate", "--project", str(proj), "--count", "1"])
    rep = bench_teachers(str(proj), scans=2, device="cpu", max_slices=1)
    assert rep["rules"] == [*[k for k in AUTO_CANDIDATES if k != "teacher"], AUTO, AUTO_PER_SCAN]
    kinds = {r["teacher"] for r in rep["rows"]}
    assert len(rep["rows"]) == 2 * len(kinds) == 2 * 6
    for r in rep["rows"]:
        assert all(0.0 <= r[k] <= 1.0 for k in (*VIEWS, *rep["rules"], "teacher_dice"))
        assert r["seconds"] > 0
    # auto is one of the candidates' figures (or the teacher's), per teacher as a round would choose it
    for kind, chosen in rep["auto"].items():
        assert chosen["rule"] in AUTO_CANDIDATES and chosen["scans"] >= 1
        for r in (r for r in rep["rows"] if r["teacher"] == kind):
            assert r[AUTO] == (r["teacher_dice"] if chosen["rule"] == "teacher" else r[chosen["rule"]])
            # auto/scan: the scan's own choice where its planes chose otherwise (the one cross-labelled scan),
            # else the pooled one
            own = chosen["per_scan"].get(r["case"], chosen["rule"])
            assert r[AUTO_PER_SCAN] == (r["teacher_dice"] if own == "teacher" else r[own])
    text = format_teachers(rep)
    assert "worst gain" in text and "auto:" in text and "auto/scan:" in text


@pytest.mark.slow  # runs LiteMedSAM
def test_bench_with_the_teacher_cut_to_its_largest_part(tmp_path, phantom_data):
    """--largest-component: the teacher's Dice stays the uncut teacher's, the 'cut' column is the cut teacher's;
    the weak teacher's separate blobs go (cut above the teacher), a one-part teacher is unchanged, and auto's
    fallback to the teacher is the cut teacher (what a round with the option would train on)."""
    from fmabs_core.cli.bench_teachers import CUT

    proj = tmp_path / "proj"
    main(["import", str(phantom_data), "--project", str(proj)])
    main(["crosslabel", "simulate", "--project", str(proj), "--count", "1"])
    rep = bench_teachers(str(proj), scans=1, device="cpu", max_slices=1, largest_component=True)
    assert rep["largest_component"] is True and rep["rules"][0] == CUT
    rows = {r["teacher"]: r for r in rep["rows"]}
    assert rows["weak, blobs"][CUT] > rows["weak, blobs"]["teacher_dice"]
    assert rows["grown 1"][CUT] == rows["grown 1"]["teacher_dice"]
    for kind, chosen in rep["auto"].items():
        if chosen["rule"] == "teacher":
            assert rows[kind][AUTO] == rows[kind][CUT]
    assert f"{CUT:>8}" in format_teachers(rep).splitlines()[1]


@pytest.mark.slow  # runs LiteMedSAM
def test_bench_with_a_tuned_adapter_prompts_the_adapted_encoder(tmp_path, phantom_data, capsys):
    """--adapter: the lever "a generalist tuned on the drawn planes" is measured with the adapter merged into the
    prompted encoder (its own embeddings, never the plain model's cache); a file that is no adapter is refused by
    name before any scan is read."""
    from adapters import write_adapter

    proj = tmp_path / "proj"
    main(["import", str(phantom_data), "--project", str(proj)])
    main(["crosslabel", "simulate", "--project", str(proj), "--count", "1"])
    write_adapter(tmp_path / "tuned.pt")
    rep = bench_teachers(str(proj), scans=1, device="cpu", max_slices=1, adapter=str(tmp_path / "tuned.pt"))
    plain = bench_teachers(str(proj), scans=1, device="cpu", max_slices=1)
    assert rep["adapter"] == str(tmp_path / "tuned.pt") and "adapter=" in rep["generalist_identity"]
    assert plain["adapter"] is None and "adapter=" not in plain["generalist_identity"]
    assert "adapter " in format_teachers(rep).splitlines()[0]
    (tmp_path / "notes.pt").write_bytes(b"not an adapter")
    assert main(["bench", "teachers", "--project", str(proj), "--scans", "1", "--adapter",
                 str(tmp_path / "notes.pt")]) == 2
    assert "notes.pt" in capsys.readouterr().err
